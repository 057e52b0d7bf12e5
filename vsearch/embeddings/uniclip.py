"""The UniCLIP encoder (`uniclip:PATH`): Chinese-CLIP ViT-B/16 towers plus UniCLIP's two OCR heads.

The model is the one in the CBVS paper's released checkpoint (`UniCLIP-base-QA-CLIP-5M.pt`):

* image tower: open_clip's `ViT-B-16-quickgelu` vision module; image vector = ln_post(token 0) @ proj.
  The heads read the tower's 197 raw output tokens (before ln_post), taken in the same pass.
* text tower: Hugging Face `BertModel` (RoBERTa-wwm-ext-base-chinese shape, no pooler); text vector =
  last_hidden_state[:, 0] @ text_projection, attention mask = token id != 0.
* presence head: 3 open_clip residual blocks over the visual tokens, ln on token 0, @ proj -> logits
  [no text, has text].
* semantic head: the text's ids through a separate BERT embeddings module, a learned class token
  prepended, 3 decoder blocks (self-attention, cross-attention to the visual tokens, MLP), ln on
  token 0, @ proj -> logits [no match, match]. Neither head masks padding, as in training.

The architecture's sizes are read from the checkpoint's tensor shapes, so the released file gives
exactly ViT-B/16 + BERT-base, and smaller checkpoints in the same format (tests) work the same way.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from torch import nn
from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor
from transformers import BertConfig, BertModel, BertTokenizer
from transformers.models.bert.modeling_bert import BertEmbeddings

from vsearch.embeddings.checkpoints import existing_file, file_fingerprint, load_strict, read_state_dict
from vsearch.embeddings.torch_encoder import TorchImageEncoder, resolve_device, rgb, split_preprocess
from vsearch.errors import VsearchError

RELEASED_FILE = "UniCLIP-base-QA-CLIP-5M.pt"
ENV_VAR = "VSEARCH_UNICLIP"
QUERY_CONTEXT = 12  # the released evaluation reads queries at 12 tokens
SEMANTIC_CONTEXT = 20  # the semantic head was trained on 20-token texts
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # attention head width of both towers and both heads


@dataclass(frozen=True)
class UniClipConfig:
    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vocab_size: int = 21128
    text_width: int = 768
    text_layers: int = 12
    text_intermediate: int = 3072
    max_positions: int = 512
    type_vocab: int = 2
    presence_layers: int = 3
    semantic_layers: int = 3

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "UniClipConfig":
        def layers(prefix: str) -> int:
            pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
            return len({m.group(1) for key in state if (m := pattern.match(key))})

        conv = state["visual.conv1.weight"]
        words = state["bert.embeddings.word_embeddings.weight"]
        return cls(
            embed_dim=state["text_projection"].shape[1],
            image_size=conv.shape[-1] * round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5),
            patch_size=conv.shape[-1],
            vision_width=conv.shape[0],
            vision_layers=layers("visual.transformer.resblocks."),
            vocab_size=words.shape[0],
            text_width=words.shape[1],
            text_layers=layers("bert.encoder.layer."),
            text_intermediate=state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_positions=state["bert.embeddings.position_embeddings.weight"].shape[0],
            type_vocab=state["bert.embeddings.token_type_embeddings.weight"].shape[0],
            presence_layers=layers("ocr_presence_decoder.resblocks."),
            semantic_layers=layers("ocr_semantic_decoder.resblocks."),
        )

    def bert(self) -> BertConfig:
        return BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.text_width, num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_width // HEAD_WIDTH, intermediate_size=self.text_intermediate,
            hidden_act="gelu", max_position_embeddings=self.max_positions, type_vocab_size=self.type_vocab,
            layer_norm_eps=1e-12,
        )


class OcrDecoderBlock(nn.Module):
    """Text tokens attend to themselves, then to the visual tokens (keys ln_2, values ln_3), then an MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_3 = LayerNorm(width)
        self.ln_4 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, width * 4), gelu=QuickGELU(), c_proj=nn.Linear(width * 4, width)))

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        normed = self.ln_1(text)
        text = text + self.self_attn(normed, normed, normed, need_weights=False)[0]
        text = text + self.cross_attn(self.ln_2(text), self.ln_2(visual), self.ln_3(visual), need_weights=False)[0]
        return text + self.mlp(self.ln_4(text))


class OcrSemanticDecoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(OcrDecoderBlock(width, heads) for _ in range(layers))

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            text = block(text, visual)
        return text


class UniClip(nn.Module):
    def __init__(self, config: UniClipConfig):
        super().__init__()
        vision = CLIPVisionCfg(layers=config.vision_layers, width=config.vision_width, head_width=HEAD_WIDTH,
                               patch_size=config.patch_size, image_size=config.image_size)
        self.visual = _build_vision_tower(config.embed_dim, vision, quick_gelu=True)
        self.bert = BertModel(config.bert(), add_pooling_layer=False)
        self.text_projection = nn.Parameter(torch.randn(config.text_width, config.embed_dim) * config.text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

        width, heads = config.vision_width, config.vision_width // HEAD_WIDTH
        self.ocr_presence_decoder = Transformer(width, config.presence_layers, heads, act_layer=QuickGELU)
        self.ln_ocr_presence = LayerNorm(width)
        self.proj_ocr_presence = nn.Parameter(torch.randn(width, 2) * width ** -0.5)

        self.bert_embedding = BertEmbeddings(config.bert())
        self.decoder_class_embedding = nn.Parameter(torch.randn(config.text_width) * config.text_width ** -0.5)
        self.ocr_semantic_decoder = OcrSemanticDecoder(config.text_width, config.semantic_layers, heads)
        self.ln_ocr_semantic = LayerNorm(config.text_width)
        self.proj_ocr_semantic = nn.Parameter(torch.randn(config.text_width, 2) * config.text_width ** -0.5)

        # The heads read the image tower's raw visual tokens, its transformer's output before ln_post,
        # which open_clip does not return: a hook keeps them, for the thread whose pass made them
        # (threads reranking at once each run the tower; a hook per call saw the others' passes too).
        self._visual_tokens = threading.local()
        self.visual.transformer.register_forward_hook(self._keep_visual_tokens)

    def _keep_visual_tokens(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._visual_tokens.value = output

    @classmethod
    def for_checkpoint(cls, config: UniClipConfig, state: dict[str, torch.Tensor], path: Path) -> "UniClip":
        """The model holding `state`'s weights (checked strictly), in float32.

        It is built on the meta device, so that no time goes on random values for the 250M weights
        the checkpoint replaces (3-4 s of a query's start on a CPU); then only the buffers a
        checkpoint never holds are made: BERT's position and token-type ids.
        """
        with torch.device("meta"):
            model = cls(config)
        load_strict(model, state, path, "UniCLIP", assign=True)
        for embeddings in (model.bert.embeddings, model.bert_embedding):
            embeddings.position_ids = torch.arange(config.max_positions).expand(1, -1)
            embeddings.token_type_ids = torch.zeros(1, config.max_positions, dtype=torch.long)
        left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
        if left:
            raise RuntimeError(f"UniCLIP tensors left unmade after loading: {', '.join(left)}")
        return model.float()

    def encode_image_and_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image vectors, raw visual tokens) from one pass of the image tower."""
        vectors = self.visual(pixels)
        tokens = self._visual_tokens.value
        del self._visual_tokens.value  # not held on the device past the call
        return vectors, tokens

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        return hidden[:, 0] @ self.text_projection.to(hidden.dtype)

    def presence_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        decoded = self.ocr_presence_decoder(tokens)
        return self.ln_ocr_presence(decoded[:, 0]) @ self.proj_ocr_presence.to(decoded.dtype)

    def semantic_logits(self, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        text = self.bert_embedding(input_ids=ids)
        first = self.decoder_class_embedding.to(text.dtype).expand(text.shape[0], 1, -1)
        decoded = self.ocr_semantic_decoder(torch.cat([first, text], dim=1), tokens.to(text.dtype))
        return self.ln_ocr_semantic(decoded[:, 0]) @ self.proj_ocr_semantic.to(decoded.dtype)


def released_to_module_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Apply the released checkpoint's renames: drop `module.`, exist -> presence, content -> semantic,
    and the unused `bert.pooler.*`."""
    renamed = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("bert.pooler."):
            continue
        renamed[key.replace("exist", "presence").replace("content", "semantic")] = value
    return renamed


def chinese_tokenizer() -> BertTokenizer:
    """BERT basic + WordPiece tokenizer over the packaged Chinese vocabulary (bert-base-chinese's)."""
    folder = resources.files("vsearch") / "embeddings" / "zh_tokenizer"
    return BertTokenizer.from_pretrained(str(folder), do_lower_case=True)


def image_transform(size: int) -> Compose:
    """The released preprocessing: resize straight to size x size (bicubic, no crop), RGB, [0, 1],
    CLIP mean/std. Picklable, as reader processes started by spawn or forkserver (device processes,
    Python 3.14) need it, and by reference to torchvision and `torch_encoder` only: such a reader
    then imports neither open_clip nor transformers (it starts in 4.0 s here instead of 5.9 s)."""
    return Compose([Resize((size, size), interpolation=InterpolationMode.BICUBIC), rgb, ToTensor(),
                    Normalize(MEAN, STD)])


def default_checkpoint(models_dir: Path) -> str:
    """The checkpoint `uniclip` with no path means: $VSEARCH_UNICLIP, else <workspace>/models/<released file>."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    candidate = models_dir / RELEASED_FILE
    if candidate.is_file():
        return str(candidate)
    raise VsearchError(
        f"no UniCLIP checkpoint: download {RELEASED_FILE} from the CBVS-UniCLIP release and put it at "
        f"{candidate}, set {ENV_VAR}=/path/to/it, or pass --model uniclip:PATH "
        "(--model lexical needs no checkpoint)"
    )


class UniClipEncoder(TorchImageEncoder):
    extra_columns = {"ocr_presence": pa.float32()}

    def __init__(self, path: str, device: str = "auto", context_length: int = QUERY_CONTEXT):
        self.device = resolve_device(device)
        checkpoint = existing_file(path, "UniCLIP checkpoint")
        state = released_to_module_keys(read_state_dict(checkpoint))
        try:
            config = UniClipConfig.from_state_dict(state)
        except (KeyError, IndexError) as exc:
            raise VsearchError(f"checkpoint {path} is not a UniCLIP checkpoint: it has no {exc} tensor") from None
        model = UniClip.for_checkpoint(config, state, checkpoint)
        self.model = model.to(self.device).eval()
        self.tokenizer = chinese_tokenizer()
        # The tokenizer (Rust-backed since transformers 5) keeps its truncation and padding between
        # calls, in state that threads share: queries at 12 tokens and the semantic head's texts at
        # 20, tokenized at once, got each other's.
        self._tokenizing = threading.Lock()
        self.image_transform, self.normalisation = split_preprocess(image_transform(config.image_size))
        self.context_length = context_length
        self.spec = f"uniclip:{checkpoint.resolve()}"
        self.fingerprint = file_fingerprint(checkpoint)
        self.dim = config.embed_dim

    def tensor_transform(self, images: torch.Tensor) -> torch.Tensor:
        """`image_transform` for a batch of uint8 NCHW images of one size already on the device
        (JPEGs decoded there). Antialiased bicubic, rounded to uint8 as PIL's is, matches PIL's resize
        to within a few grey levels."""
        size = self.image_transform.transforms[0].size
        resized = torch.nn.functional.interpolate(images.float(), size=size, mode="bicubic", antialias=True,
                                                  align_corners=False)
        return resized.round_().clamp_(0, 255).to(torch.uint8)

    def tokenize(self, texts: Sequence[str], context_length: int) -> torch.Tensor:
        """[CLS] + the first context_length - 2 WordPiece ids + [SEP], zero-padded."""
        with self._tokenizing:
            return self.tokenizer(list(texts), max_length=context_length, truncation=True, padding="max_length",
                                  return_tensors="pt")["input_ids"]

    def encode_texts(self, texts: Sequence[str], context_length: int | None = None) -> np.ndarray:
        ids = self.tokenize(texts, context_length or self.context_length).to(self.device)
        return self._text_vectors(lambda: self.model.encode_text(ids))

    def _encode_pixels(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        vectors, tokens = self.model.encode_image_and_tokens(pixels)
        return {"vector": vectors, "ocr_presence": self.model.presence_logits(tokens).float().softmax(-1)[:, 1]}

    def presence(self, images: Sequence) -> np.ndarray:
        """Probability that each cover carries text."""
        return self.encode_pixels(self.pixels(images))["ocr_presence"]

    def match(self, texts: Sequence[str], images: Sequence) -> np.ndarray:
        """Probability that text i matches the text on cover i (semantic head, 20-token texts)."""
        return self.match_and_presence(texts, self.pixels(images))[0]

    def match_and_presence(self, texts: Sequence[str], pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """`match` and `presence` from one pass of the image tower, for covers already read into
        `pixels` (a batch of `image_transform` outputs)."""
        ids = self.tokenize(texts, SEMANTIC_CONTEXT).to(self.device)

        def heads() -> list[np.ndarray]:
            _, tokens = self.model.encode_image_and_tokens(self.model_input(pixels))
            return [self.model.semantic_logits(ids, tokens).float().softmax(-1)[:, 1].cpu().numpy(),
                    self.model.presence_logits(tokens).float().softmax(-1)[:, 1].cpu().numpy()]

        semantic, presence = self._in_fp32_where_fp16_overflowed(heads)
        return semantic, presence
