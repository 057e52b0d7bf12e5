"""UniCLIP fidelity: a checkpoint in the released format, made from the reference Chinese-CLIP model
(`cn_clip`, random weights) plus head weights under their released names, must load through
vsearch and give the reference's vectors and token ids."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vsearch.embeddings import load_encoder
from vsearch.embeddings.datasets import demo_source
from vsearch.embeddings.uniclip import HEAD_WIDTH, OcrSemanticDecoder, UniClipConfig, default_checkpoint
from vsearch.errors import VsearchError
from tests.conftest import SHARED

cc = pytest.importorskip("cn_clip.clip")
from cn_clip.clip.model import CLIP  # noqa: E402
from open_clip.transformer import LayerNorm, QuickGELU, Transformer  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.models.bert.modeling_bert import BertEmbeddings  # noqa: E402


def released_head_weights(config: UniClipConfig) -> dict[str, torch.Tensor]:
    """Random OCR-head weights named as in the released checkpoint (exist / content)."""
    width, heads = config.vision_width, config.vision_width // HEAD_WIDTH
    modules = {
        "ocr_exist_decoder": Transformer(width, config.presence_layers, heads, act_layer=QuickGELU),
        "ln_ocr_exist": LayerNorm(width),
        "bert_embedding": BertEmbeddings(config.bert()),
        "ocr_content_decoder": OcrSemanticDecoder(config.text_width, config.semantic_layers, heads),
        "ln_ocr_content": LayerNorm(config.text_width),
    }
    weights = {f"{name}.{key}": value for name, module in modules.items() for key, value in module.state_dict().items()}
    for name in ("proj_ocr_exist", "proj_ocr_content"):
        weights[name] = torch.randn(width, 2) * width ** -0.5
    weights["decoder_class_embedding"] = torch.randn(config.text_width)
    return weights


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(cn_clip reference model, path of a released-format checkpoint made from it)."""
    configs = Path(cc.__file__).parent / "model_configs"
    info = {**json.loads((configs / "ViT-B-16.json").read_text()),
            **json.loads((configs / "RoBERTa-wwm-ext-base-chinese.json").read_text())}
    torch.manual_seed(0)
    model = CLIP(**info).eval()
    state = {**model.state_dict(), **released_head_weights(UniClipConfig()),
             "bert.pooler.dense.weight": torch.randn(768, 768), "bert.pooler.dense.bias": torch.zeros(768)}
    path = tmp_path_factory.mktemp("uniclip") / "UniCLIP-base-QA-CLIP-5M.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3, "step": 1200}, path)
    return model, path


@pytest.fixture(scope="module")
def encoder(reference):
    return load_encoder(f"uniclip:{reference[1]}", device="cpu")


def cbvs20k_queries(count: int) -> list[str]:
    lines = (SHARED / "data" / "cbvs20k.txt").read_text(encoding="utf-8").splitlines()
    return list(dict.fromkeys(line.split("\t")[0] for line in lines))[:count]


def normalised(tensor: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(tensor, dim=-1).detach().numpy()


def test_image_vectors_match_the_reference(reference, encoder):
    model, _ = reference
    covers = [Image.open(Path(demo_source()).parent / f"covers/{i:03d}.jpg") for i in (0, 7, 42, 150)]
    with torch.no_grad():
        want = normalised(model.encode_image(torch.stack([cc.image_transform(224)(c) for c in covers])))
    np.testing.assert_allclose(encoder.encode_images(covers), want, atol=1e-4)


@pytest.mark.skipif(not (SHARED / "data" / "cbvs20k.txt").exists(), reason="needs ../shared")
def test_token_ids_equal_the_reference_tokenizer_on_cbvs20k_queries(encoder):
    queries = cbvs20k_queries(2487)
    assert len(queries) >= 100
    for context in (12, 20, 52):
        assert torch.equal(encoder.tokenize(queries, context), cc.tokenize(queries, context_length=context)), context


def test_text_vectors_match_the_reference_at_query_length_12(reference, encoder):
    model, _ = reference
    texts = ["大宅门演员表", "艾尔登法环马怎么获得", "周杰伦个人资料 Jay Chou", "一个很长很长的查询会被截断到十个字以内"]
    with torch.no_grad():
        want = normalised(model.encode_text(cc.tokenize(texts, context_length=12)))
    np.testing.assert_allclose(encoder.encode_texts(texts), want, atol=1e-4)


def test_head_weights_load_from_their_released_names(reference, encoder):
    saved = torch.load(reference[1], weights_only=True)["state_dict"]
    loaded = encoder.model.state_dict()
    for released, ours in [("module.ocr_exist_decoder.resblocks.2.mlp.c_proj.weight",
                            "ocr_presence_decoder.resblocks.2.mlp.c_proj.weight"),
                           ("module.ocr_content_decoder.resblocks.0.cross_attn.in_proj_weight",
                            "ocr_semantic_decoder.resblocks.0.cross_attn.in_proj_weight"),
                           ("module.proj_ocr_content", "proj_ocr_semantic"),
                           ("module.bert_embedding.word_embeddings.weight", "bert_embedding.word_embeddings.weight")]:
        assert torch.equal(saved[released], loaded[ours])


def test_presence_and_match_are_probabilities_that_depend_on_their_inputs(encoder):
    covers = [Image.new("RGB", (320, 180), "white"), Image.open(Path(demo_source()).parent / "covers/000.jpg")]
    presence = encoder.presence(covers)
    assert presence.shape == (2,) and ((0 <= presence) & (presence <= 1)).all()
    same_cover = [covers[1], covers[1]]
    match = encoder.match(["大宅门 演员表", "原神 攻略"], same_cover)
    assert match.shape == (2,) and ((0 <= match) & (match <= 1)).all() and match[0] != match[1]


def test_a_missing_head_key_is_named(tiny_uniclip, tmp_path):
    state = torch.load(tiny_uniclip, weights_only=True)
    del state["state_dict"]["module.proj_ocr_exist"]
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    with pytest.raises(VsearchError, match="does not fit UniCLIP: missing proj_ocr_presence$"):
        load_encoder(f"uniclip:{broken}")


def test_sizes_are_read_from_the_checkpoint(tiny_uniclip):
    encoder = load_encoder(f"uniclip:{tiny_uniclip}", device="cpu")
    assert encoder.dim == 32 and encoder.spec == f"uniclip:{tiny_uniclip.resolve()}"
    assert encoder.encode_texts(["大宅门"]).shape == (1, 32)


def test_an_open_clip_checkpoint_is_not_a_uniclip_checkpoint(tiny_open_clip):
    with pytest.raises(VsearchError, match="is not a UniCLIP checkpoint"):
        load_encoder(f"uniclip:{tiny_open_clip[1]}")


def test_the_default_checkpoint_comes_from_the_environment_or_the_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("VSEARCH_UNICLIP", raising=False)
    with pytest.raises(VsearchError, match="no UniCLIP checkpoint.*--model lexical needs no checkpoint"):
        default_checkpoint(tmp_path)
    (tmp_path / "UniCLIP-base-QA-CLIP-5M.pt").write_bytes(b"")
    assert default_checkpoint(tmp_path) == str(tmp_path / "UniCLIP-base-QA-CLIP-5M.pt")
    monkeypatch.setenv("VSEARCH_UNICLIP", "/models/u.pt")
    assert default_checkpoint(tmp_path) == "/models/u.pt"


def test_checkpoints_in_the_legacy_format_or_in_float16_load_the_same_model(tiny_uniclip, tmp_path):
    state = torch.load(tiny_uniclip, weights_only=True)
    legacy, half = tmp_path / "legacy.pt", tmp_path / "half.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)  # PyTorch < 1.6: cannot be memory-mapped
    torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in state["state_dict"].items()}},
               half)
    texts, covers = ["大宅门 演员表"], [Image.open(Path(demo_source()).parent / "covers/000.jpg")]
    expected = load_encoder(f"uniclip:{tiny_uniclip}", device="cpu")
    for path, tolerance in [(legacy, 0), (half, 2e-2)]:
        loaded = load_encoder(f"uniclip:{path}", device="cpu")
        assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
        assert np.allclose(loaded.encode_texts(texts), expected.encode_texts(texts), atol=tolerance)
        assert np.allclose(loaded.encode_images(covers), expected.encode_images(covers), atol=tolerance)


def test_a_head_of_the_wrong_shape_is_named(tiny_uniclip, tmp_path):
    state = torch.load(tiny_uniclip, weights_only=True)
    state["state_dict"]["module.proj_ocr_exist"] = torch.zeros(3, 2)
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    with pytest.raises(VsearchError, match="does not fit UniCLIP: size mismatch for proj_ocr_presence"):
        load_encoder(f"uniclip:{broken}")


def test_texts_that_overflow_in_fp16_are_encoded_again_in_float32(tiny_uniclip, overflow_in_fp16):
    from vsearch.embeddings.uniclip import UniClip

    encoder = load_encoder(f"uniclip:{tiny_uniclip}", device="cpu")
    texts = ["大宅门演员表", "周杰伦个人资料"]
    want = encoder.encode_texts(texts)
    overflow_in_fp16(UniClip, "encode_text", 1)  # as a query can on CUDA
    np.testing.assert_allclose(encoder.encode_texts(texts), want, atol=1e-6)


def test_ocr_heads_that_overflow_in_fp16_are_run_again_in_float32(tiny_uniclip, overflow_in_fp16):
    from vsearch.embeddings.uniclip import UniClip

    encoder = load_encoder(f"uniclip:{tiny_uniclip}", device="cpu")
    pixels = encoder.pixels([Image.open(Path(demo_source()).parent / f"covers/{i:03d}.jpg") for i in (0, 7, 42)])
    want = encoder.match_and_presence(["大宅门演员表"] * 3, pixels)
    overflow_in_fp16(UniClip, "semantic_logits", 2)  # as the reranker's heads can on CUDA
    got = encoder.match_and_presence(["大宅门演员表"] * 3, pixels)
    for ours, theirs in zip(got, want):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
