from __future__ import annotations

import contextlib
import functools
import http.server
import json
import platform
import random
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vsearch.cli import main
from vsearch.workspace import ENV_VAR, Workspace

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SKELETON = 200  # with `every_batch`, the vectors sampled across the files that a new hnswlib graph takes first
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


needs_huge_pages = pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
                                      reason="needs Linux with transparent huge pages")


can_collapse = pytest.mark.skipif(
    tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2]) < (6, 1),
    reason="moving written pages onto huge pages (MADV_COLLAPSE) needs Linux 6.1")


def huge_page_advised_bytes() -> int:
    """Bytes of this process's mappings that asked for transparent huge pages (VmFlags `hg`)."""
    total = size = 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1]) * 1024
        elif line.startswith("VmFlags:") and " hg" in line:
            total += size
    return total


def disk_with_free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """`shutil.disk_usage` says every disk has `free` bytes free."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own user cache (checkpoint fingerprints), never the real ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    root = tmp_path / "workspace"
    monkeypatch.setenv(ENV_VAR, str(root))
    return Workspace.resolve(root)


@pytest.fixture
def overflow_in_fp16(monkeypatch: pytest.MonkeyPatch):
    """`overflow(cls, name, row)`: the output of `cls.name` (a tensor, or its `vector` where it gives a
    dict) holds infinity at `row` while UniCLIP runs under autocast, and only then. Autocast is made
    to mark where it holds, as fp16 on CUDA would; on the CPU it changes nothing else."""
    from vsearch.embeddings.uniclip import UniClipEncoder

    in_fp16 = []

    @contextlib.contextmanager
    def autocast(self):
        in_fp16.append(True)
        yield
        in_fp16.pop()

    def overflow(cls: type, name: str, row: int) -> None:
        real = getattr(cls, name)

        def overflowing(self, *args):
            outputs = real(self, *args)
            if in_fp16:
                (outputs["vector"] if isinstance(outputs, dict) else outputs)[row] = float("inf")
            return outputs

        monkeypatch.setattr(cls, name, overflowing)

    monkeypatch.setattr(UniClipEncoder, "autocast", autocast)
    return overflow


@pytest.fixture
def every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint after each batch added to an hnswlib graph (an index build's record batch, the
    cbvs10m-HNSW job's batch of texts): one due every time, and the insertion windows a batch each,
    after a skeleton of SKELETON vectors (a build's first window, and checkpoint)."""
    from vsearch.indexes import resume
    from vsearch.indexes.backends import HnswlibBackend

    monkeypatch.setattr(resume, "CHECKPOINT_SHARE", 1e9)
    monkeypatch.setattr(HnswlibBackend, "insertion_window", 1)
    monkeypatch.setattr(HnswlibBackend, "skeleton", SKELETON)


@pytest.fixture
def cli(workspace: Workspace, capsys: pytest.CaptureFixture):
    """Run `vsearch ARGS...` in-process against the test workspace; return code and output."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


def random_cover_line(pick: random.Random, title: int) -> str:
    """A CBVS-5M-format line whose url is one of 61, so that ids repeat and rows come and go as duplicates."""
    words = ["大宅门", "演员表", "原神", "攻略", "周杰伦", "免费观看", "完整版", "汪汪队"]
    return (f"{''.join(pick.sample(words, 2))} {title}\thttp://covers.example/{pick.randint(0, 60)}.jpg\t"
            f"{' '.join(pick.sample(words, 3))}\n")


def edit_lines(pick: random.Random, lines: list[str], step: int) -> tuple[str, list[str]]:
    """A random edit of a dataset file's `lines`: (what it did, the lines now): lines added at the
    end or inside, one dropped or rewritten, the text of one changed (its url, so its id, kept),
    the file cut short."""
    action = pick.choice(["grow", "insert", "drop", "rewrite", "retext", "cut"])
    lines = list(lines)
    if action == "grow":
        lines += [random_cover_line(pick, 100 * step + k) for k in range(pick.randint(1, 12))]
    elif action == "insert":
        lines.insert(pick.randint(0, len(lines)), random_cover_line(pick, 100 * step))
    elif action == "drop" and len(lines) > 2:
        del lines[pick.randrange(len(lines))]
    elif action == "rewrite":
        lines[pick.randrange(len(lines))] = random_cover_line(pick, 100 * step)
    elif action == "retext":
        at = pick.randrange(len(lines))
        title, url, ocr = random_cover_line(pick, 100 * step).split("\t")
        lines[at] = "\t".join([title, lines[at].split("\t")[1], ocr])
    elif action == "cut" and len(lines) > 3:
        lines = lines[:pick.randint(1, len(lines) - 1)]
    return action, lines


def write_cbvs_covers(path: Path, rows: int, seed: int = 0) -> Path:
    """A CBVS-5M-format file of `rows` covers with varied Chinese titles and OCR text."""
    rng = random.Random(seed)
    words = ["大宅门", "演员表", "原神", "攻略", "周杰伦", "免费观看", "完整版", "汪汪队", "王者荣耀", "第二部"]
    lines = []
    for i in range(rows):
        title = "".join(rng.sample(words, 2)) + f" 第{i}集"
        ocr = "\\N" if i % 7 == 0 else " ".join(rng.sample(words, 3))
        lines.append(f"{title}\thttp://covers.example/{i}.jpg\t{ocr}\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model config JSON, checkpoint) for a tiny open_clip CLIP with random weights.

    The checkpoint is saved as training scripts save it: under `state_dict`, keys with `module.`.
    """
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("tiny_open_clip")
    config = folder / "tiny-clip.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip", pretrained=None)
    checkpoint = folder / "tiny-clip.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    return config, checkpoint


TINY_UNICLIP = dict(embed_dim=32, image_size=32, patch_size=16, vision_width=64, vision_layers=2, text_width=64,
                    text_layers=2, text_intermediate=128, max_positions=64, presence_layers=1, semantic_layers=1)


def to_released_keys(state: dict) -> dict:
    """The inverse of the loader's renames: how UniCLIP's trainer names the keys it saves."""
    released = {f"module.{k.replace('presence', 'exist').replace('semantic', 'content')}": v for k, v in state.items()}
    width = state["bert.embeddings.word_embeddings.weight"].shape[1]
    released["module.bert.pooler.dense.weight"] = released["module.bert.embeddings.LayerNorm.weight"].new_zeros(width, width)
    released["module.bert.pooler.dense.bias"] = released["module.bert.embeddings.LayerNorm.bias"].new_zeros(width)
    return released


@pytest.fixture(scope="session")
def tiny_uniclip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small UniCLIP (same architecture, smaller sizes, random weights) saved in the released format."""
    import torch

    from vsearch.embeddings.uniclip import UniClip, UniClipConfig

    torch.manual_seed(0)
    model = UniClip(UniClipConfig(**TINY_UNICLIP))
    path = tmp_path_factory.mktemp("tiny_uniclip") / "tiny-uniclip.pt"
    torch.save({"state_dict": to_released_keys(model.state_dict()), "epoch": 1, "step": 10}, path)
    return path


def write_video(path: Path, seconds: float, fps: int = 10, gop: int = 10, size: tuple[int, int] = (64, 48)) -> Path:
    """An H.264 video whose frame i is a flat grey of level 2*i (mod 256), a keyframe every `gop` frames."""
    from fractions import Fraction

    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "crf": "10"}
        for index in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), (2 * index) % 256, np.uint8), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class CoverServer(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; a path under /slow/ answers after 3 s, one under /trickle/ sends its file in
    8 pieces 0.3 s apart."""

    def do_GET(self):
        if self.path.startswith("/slow/"):
            time.sleep(3)
        if not self.path.startswith("/trickle/"):
            return super().do_GET()
        data = Path(self.translate_path(self.path.replace("/trickle/", "/", 1))).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        step = len(data) // 8 + 1
        for start in range(0, len(data), step):
            time.sleep(0.3)
            self.wfile.write(data[start:start + step])
            self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def cover_server(tmp_path):
    """(folder, base url) of an http server on this machine serving the folder."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CoverServer, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
