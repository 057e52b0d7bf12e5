import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import Compose, Resize, ToTensor

from vsearch.embeddings import load_encoder
from vsearch.embeddings.job import EmbedConfig, run_embed
from vsearch.embeddings.torch_encoder import split_preprocess
from vsearch.errors import VsearchError


@pytest.fixture
def covers(tmp_path):
    folder = tmp_path / "covers"
    folder.mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (40 + 10 * i, 30), colour).save(folder / f"ok{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


def spec(tiny_open_clip):
    config, checkpoint = tiny_open_clip
    return f"open_clip:{config}:{checkpoint}"


def test_vectors_match_open_clip_called_directly(tiny_open_clip):
    encoder = load_encoder(spec(tiny_open_clip), device="cpu")
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(tiny_open_clip[1]))
    model.eval()
    images = [Image.new("RGB", (50, 40), "orange"), Image.new("RGB", (20, 60), "purple")]
    texts = ["a red cover", "大宅门"]
    with torch.no_grad():
        want_images = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1)
        want_texts = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer("tiny-clip")(texts)), dim=-1)
    np.testing.assert_allclose(encoder.encode_images(images), want_images.numpy(), atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts(texts), want_texts.numpy(), atol=1e-5)
    assert encoder.dim == 32 and len(encoder.fingerprint) == 16


def test_readers_send_uint8_pixels_that_the_device_finishes_exactly_as_the_preprocess_would(tiny_open_clip):
    encoder = load_encoder(spec(tiny_open_clip), device="cpu")
    _, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=None)
    noise = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    pixels = encoder.pixels([Image.fromarray(noise)])
    assert pixels.dtype == torch.uint8  # a quarter of the bytes float32 would take from reader to device
    assert torch.equal(encoder.model_input(pixels)[0], preprocess(Image.fromarray(noise)))
    unusual = Compose([Resize(32), ToTensor()])  # no Normalize to leave for the device: the readers run it all
    assert split_preprocess(unusual) == (unusual, None)


def test_corrupt_images_are_recorded_and_the_job_goes_on(tiny_open_clip, covers, workspace):
    result = run_embed(EmbedConfig(dataset=str(covers), model=spec(tiny_open_clip), device="cpu"), workspace)
    assert result.rows_written == 3
    (failure,) = result.manifest.failed
    assert failure["id"] == "broken" and failure["reason"].startswith("cannot decode image")
    manifest = json.loads((result.directory / "_manifest.json").read_text())
    assert manifest["dim"] == 32 and manifest["encoder"]["spec"].startswith("open_clip:")


def test_a_checkpoint_for_another_architecture_is_a_clear_error(tiny_open_clip):
    with pytest.raises(VsearchError, match=r"does not fit open_clip ViT-B-32: missing transformer\.resblocks\.\S+, .* \(\d+ in all\)$"):
        load_encoder(f"open_clip:ViT-B-32:{tiny_open_clip[1]}")


@pytest.mark.parametrize("bad, message", [
    ("open_clip:ViT-B-32", "expected open_clip:ARCH:PATH"),
    ("open_clip:No-Such-Arch:{ckpt}", "unknown open_clip architecture 'No-Such-Arch'"),
    ("open_clip:ViT-B-32:/no/such.pt", "open_clip checkpoint not found"),
])
def test_bad_open_clip_specs_are_clear_errors(bad, message, tiny_open_clip):
    with pytest.raises(VsearchError, match=message):
        load_encoder(bad.format(ckpt=tiny_open_clip[1]))


def test_text_only_encoder_refuses_a_dataset_without_text(covers, workspace):
    with pytest.raises(VsearchError, match="has no title or OCR text"):
        run_embed(EmbedConfig(model="lexical", dataset=str(covers)), workspace)
