"""Cover and clip vectors from image models: the batch job end to end on the demo data and on
videos made here, with a small UniCLIP saved in the released format."""

import json
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import vsearch.embeddings.media as media
from vsearch.cli import _stage_line
from vsearch.embeddings import reader
from vsearch.embeddings import load_encoder
from vsearch.embeddings.datasets import open_dataset, url_id
from vsearch.embeddings.encoders import l2_normalise
from vsearch.embeddings.job import EmbedConfig, OomBackoff, StageTimes, run_embed, total_workers
from vsearch.embeddings.torch_encoder import PendingOutputs
from vsearch.embeddings.media import MediaError, decode_image, sample_frames
from vsearch.embeddings.shards import Manifest
from vsearch.errors import VsearchError
from vsearch.indexes import BuildConfig, append_index, build_index, load_index
from vsearch.indexes.vectors import open_source
from tests.conftest import closed_port, edit_lines, random_cover_line, write_video


def table(directory, kind):
    manifest = Manifest.read(directory)
    return pa.concat_tables(pq.read_table(directory / s["name"]) for s in manifest.shards if s["kind"] == kind)


def assert_same_covers(one, other) -> tuple[np.ndarray, np.ndarray]:
    """Two jobs' cover shards hold the same ids, in order, and vectors within a cosine of 0.995 of
    each other (JPEGs decoded or resized elsewhere); returns both sets of vectors."""
    a, b = table(one.directory, "cover"), table(other.directory, "cover")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    va = np.array(a.column("vector").to_pylist(), np.float32)
    vb = np.array(b.column("vector").to_pylist(), np.float32)
    assert (va * vb).sum(axis=1).min() > 0.995
    return va, vb


def embed_demo(workspace, tiny_uniclip, **options):
    config = EmbedConfig(dataset="demo", model=f"uniclip:{tiny_uniclip}", device="cpu", workers=0, **options)
    return run_embed(config, workspace)


def test_sampled_frames_sit_at_uniform_times_and_cost_about_one_gop_each(tmp_path, monkeypatch):
    video = write_video(tmp_path / "long.mp4", seconds=60, fps=10, gop=10)
    decoded = 0
    original = media._frames_from

    def counting(container, stream):
        nonlocal decoded
        for frame in original(container, stream):
            decoded += 1
            yield frame

    monkeypatch.setattr(media, "_frames_from", counting)
    frames = sample_frames(str(video), 12)
    grey = [round(np.asarray(frame).mean() / 2) % 128 for frame in frames]
    expected = [round((k + 0.5) * 60 / 12 * 10) % 128 for k in range(12)]
    assert np.abs(np.array(grey) - np.array(expected)).max() <= 1
    assert decoded <= 12 * (10 + 1)  # a seek and at most one GOP per frame, not all 600 frames


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_frames_of_a_video_stored_turned_come_out_as_a_player_shows_them(rotation, tmp_path):
    import av

    upright = np.zeros((64, 48, 3), np.uint8)  # a portrait picture: white top half, a red stripe on its left
    upright[:32] = 255
    upright[:, :8] = (255, 0, 0)
    stored = np.ascontiguousarray(np.rot90(upright, k=-rotation // 90))  # as a phone stores it, with the turn to undo
    with av.open(str(tmp_path / "phone.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = stored.shape[1], stored.shape[0], "yuv420p"
        stream.set_display_rotation(rotation)
        for index in range(20):
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    for frame in sample_frames(str(tmp_path / "phone.mp4"), 4):
        assert frame.size == (48, 64)
        assert np.abs(np.asarray(frame, np.int16) - upright).mean() < 8


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b"\x00\x00\x00\x18ftypmp42 not a real video"), "cannot decode video"),
    (lambda p: p.write_bytes(b""), "cannot decode video"),
    (lambda p: write_video(p, seconds=0.1), "video too short"),
])
def test_bad_videos_raise_a_media_error(make, reason, tmp_path):
    path = tmp_path / "bad.mp4"
    make(path)
    with pytest.raises(MediaError, match=reason):
        sample_frames(str(path), 12)


def test_demo_covers_and_clips_with_uniclip(workspace, tiny_uniclip):
    result = embed_demo(workspace, tiny_uniclip, kind="both")
    covers, clips = table(result.directory, "cover"), table(result.directory, "clip")
    assert covers.num_rows == 199 and clips.num_rows == 10
    assert set(clips.column("id").to_pylist()) <= set(covers.column("id").to_pylist())
    assert set(clips.column("kind").to_pylist()) == {"clip"}
    assert covers.schema.field("ocr_presence").type == pa.float32()
    presence = np.array(covers.column("ocr_presence").to_pylist())
    assert ((presence >= 0) & (presence <= 1)).all() and presence.std() > 0
    assert clips.column("ocr_presence").null_count == 10
    # A clip's uri is its video; its cover column is the cover image the same id has as a cover.
    assert all(uri.endswith(".mp4") for uri in clips.column("uri").to_pylist())
    cover_uris = dict(zip(covers.column("id").to_pylist(), covers.column("uri").to_pylist()))
    assert [cover_uris[i] for i in clips.column("id").to_pylist()] == clips.column("cover").to_pylist()
    assert covers.column("cover").null_count == 199
    manifest = json.loads((result.directory / "_manifest.json").read_text())
    assert manifest["encoder"]["spec"] == f"uniclip:{tiny_uniclip.resolve()}" and manifest["dim"] == 32
    assert manifest["failed"] == []


def test_clip_vectors_are_the_mean_of_normalised_frame_vectors(workspace, tiny_uniclip):
    result = embed_demo(workspace, tiny_uniclip, kind="clip", frames=6)
    clips = table(result.directory, "clip")
    encoder = load_encoder(f"uniclip:{tiny_uniclip}", device="cpu")
    first = clips.slice(0, 1).to_pylist()[0]
    frames = sample_frames(first["uri"], 6)
    want = l2_normalise(encoder.encode_images(frames).mean(axis=0, keepdims=True))[0]
    np.testing.assert_allclose(np.asarray(first["vector"], np.float32), want, atol=2e-3)


def test_covers_and_clips_the_model_gives_no_finite_vector_are_recorded_as_failed(workspace, tiny_uniclip,
                                                                                   monkeypatch):
    from vsearch.embeddings.uniclip import UniClipEncoder

    real = UniClipEncoder._encode_pixels

    def overflowing(self, pixels):  # the first image of every batch, as an fp16 overflow would leave it
        outputs = real(self, pixels)
        outputs["vector"][0] = float("nan")
        return outputs

    monkeypatch.setattr(UniClipEncoder, "_encode_pixels", overflowing)
    result = embed_demo(workspace, tiny_uniclip, kind="both", batch_size=48, frames=4, shard_size=64)
    covers, clips = table(result.directory, "cover"), table(result.directory, "clip")
    demo = open_dataset("demo", workspace)
    ids = [row.id for row in demo.rows()]
    failed = {(f["kind"], f["id"]) for f in result.manifest.failed
              if f["reason"] == "the model gave a vector with NaN or infinite values"}
    # Batches of 48 covers never span a shard of 64; a batch of 48 // 4 clips holds all 10 of them.
    first_clip = next(demo.clip_rows()).id
    assert failed == {("cover", ids[i]) for i in (0, 48, 64, 112, 128, 176, 192)} | {("clip", first_clip)}
    assert covers.num_rows == 199 - 7 and clips.num_rows == 9 and len(result.manifest.failed) == 8
    assert np.isfinite(np.array(covers.column("vector").to_pylist())).all()
    assert covers.column("ocr_presence").null_count == 0
    assert not {ids[0], ids[48]} & set(covers.column("id").to_pylist())


def test_covers_and_clips_that_overflow_in_fp16_are_encoded_again_in_float32(workspace, tiny_uniclip,
                                                                              overflow_in_fp16):
    from vsearch.embeddings.uniclip import UniClipEncoder

    plain = embed_demo(workspace, tiny_uniclip, kind="both", batch_size=48, frames=4, shard_size=64,
                       out=workspace.root / "plain")
    overflow_in_fp16(UniClipEncoder, "_encode_pixels", 0)  # the first image of every batch
    redone = embed_demo(workspace, tiny_uniclip, kind="both", batch_size=48, frames=4, shard_size=64,
                        out=workspace.root / "redone")
    assert redone.manifest.failed == []
    for kind in ("cover", "clip"):
        ours, theirs = table(redone.directory, kind), table(plain.directory, kind)
        assert ours.column("id").equals(theirs.column("id"))
        np.testing.assert_allclose(np.array(ours.column("vector").to_pylist(), np.float32),
                                   np.array(theirs.column("vector").to_pylist(), np.float32), atol=1e-3)
    np.testing.assert_allclose(table(redone.directory, "cover").column("ocr_presence").to_numpy(),
                               table(plain.directory, "cover").column("ocr_presence").to_numpy(), atol=1e-5)


def test_dataloader_workers_give_the_same_shards(workspace, tiny_uniclip, tmp_path):
    serial = embed_demo(workspace, tiny_uniclip, limit=40, shard_size=16)
    parallel = run_embed(EmbedConfig(dataset="demo", model=f"uniclip:{tiny_uniclip}", device="cpu", workers=2,
                                     limit=40, shard_size=16, out=tmp_path / "parallel"), workspace)
    assert table(parallel.directory, "cover").equals(table(serial.directory, "cover"))


def test_corrupt_covers_and_videos_are_recorded_and_the_job_goes_on(tmp_path, workspace, tiny_uniclip):
    demo = open_dataset("demo", workspace)
    source = tmp_path / "mini.txt"
    rows = list(demo.rows())[:6]
    lines = [f"{r.title}\t{r.uri}\t{r.ocr}" for r in rows]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    lines.append(f"坏封面\t{tmp_path / 'broken.jpg'}\t坏")
    lines.append(f"没有封面\t{tmp_path / 'missing.jpg'}\t无")
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    videos = tmp_path / "mini-videos"
    videos.mkdir()
    for row, make in zip(open_dataset(str(source), workspace).rows(), ["good", "corrupt", "empty", "short"]):
        target = videos / f"{row.id}.mp4"
        if make == "good":
            write_video(target, seconds=2)
        elif make == "corrupt":
            target.write_bytes(b"not a video at all")
        elif make == "empty":
            target.write_bytes(b"")
        else:
            write_video(target, seconds=0.1)
    result = run_embed(EmbedConfig(dataset=str(source), model=f"uniclip:{tiny_uniclip}", kind="both",
                                   device="cpu", workers=0), workspace)
    assert table(result.directory, "cover").num_rows == 6 and table(result.directory, "clip").num_rows == 1
    reasons = sorted((f["kind"], re.match(r"\D+?(?= /|:)", f["reason"]).group(0)) for f in result.manifest.failed)
    assert reasons == [("clip", "cannot decode video"), ("clip", "cannot decode video"), ("clip", "video too short"),
                       ("cover", "cannot decode image"), ("cover", "image not found")]


def test_a_job_whose_first_thousand_rows_all_fail_says_so_while_it_goes_on(tmp_path, workspace, tiny_uniclip):
    source = tmp_path / "moved.txt"  # covers downloaded elsewhere: every row's image is missing
    source.write_text("".join(f"封面{i}\tcovers/{i}.jpg\t文字{i}\n" for i in range(1100)), encoding="utf-8")
    notes = []
    config = EmbedConfig(dataset=str(source), model=f"uniclip:{tiny_uniclip}", device="cpu", workers=0, shard_size=600)
    result = run_embed(config, workspace, note=notes.append)
    assert result.rows_failed == 1100 and result.rows_written == 0
    assert notes == ["the first 1,100 rows all failed, 1,100 of them for one reason: image not found: …. The job "
                     "goes on; Ctrl-C stops it, keeping what it wrote"]
    cover = tmp_path / "covers"
    cover.mkdir()
    shutil.copy(next(open_dataset("demo", workspace).rows()).uri, cover / "3.jpg")
    notes.clear()
    run_embed(replace(config, overwrite=True), workspace, note=notes.append)
    assert notes == []  # one cover of the first shard was read


@pytest.mark.parametrize("workers", [0, 1])
def test_covers_are_fetched_over_http_and_unreachable_ones_recorded(workers, cover_server, tmp_path, workspace,
                                                                    tiny_uniclip, monkeypatch):
    # Silence of 1.5 s fails a request: /slow/ is silent for 3 s, /trickle/ for 0.3 s at a time
    # (margins wide enough for a loaded machine: the server shares this test's process).
    monkeypatch.setattr("vsearch.files.HTTP_TIMEOUT_SECONDS", 1.5)
    folder, base = cover_server
    rows = list(open_dataset("demo", workspace).rows())[:4]
    for number, row in enumerate(rows):
        shutil.copy(row.uri, folder / f"{number}.jpg")
    urls = [f"{base}/0.jpg", f"{base}/1.jpg?size=640", f"{base}/2.jpg", f"{base}/trickle/3.jpg",
            f"{base}/missing.jpg", f"http://127.0.0.1:{closed_port()}/4.jpg", f"{base}/slow/0.jpg"]
    source = tmp_path / "remote.txt"
    source.write_text("".join(f"封面{i}\t{url}\t文字{i}\n" for i, url in enumerate(urls)), encoding="utf-8")
    remote = run_embed(EmbedConfig(dataset=str(source), model=f"uniclip:{tiny_uniclip}", device="cpu",
                                   workers=workers, batch_size=4), workspace)
    local = embed_demo(workspace, tiny_uniclip, limit=4, out=tmp_path / "local")
    fetched, expected = table(remote.directory, "cover"), table(local.directory, "cover")
    assert fetched.column("uri").to_pylist() == urls[:4]
    assert fetched.column("vector").equals(expected.column("vector"))
    reasons = {f["uri"]: f["reason"] for f in remote.manifest.failed}
    assert reasons.keys() == set(urls[4:])
    assert reasons[urls[4]] == f"image not found: {urls[4]}"
    assert reasons[urls[5]].startswith(f"cannot read image {urls[5]}: Cannot connect")
    assert reasons[urls[6]].startswith(f"cannot read image {urls[6]}: ") and "timeout" in reasons[urls[6]].lower()


def test_resume_covers_both_kinds(workspace, tiny_uniclip):
    first = embed_demo(workspace, tiny_uniclip, kind="both", limit=60, shard_size=25)
    again = embed_demo(workspace, tiny_uniclip, kind="both", shard_size=25)
    assert first.shards_written == 4  # covers 25 + 25 + 10 of 25; all 10 clips in one shard
    assert again.shards_skipped == 3  # the two full cover shards and the clip shard; cover shard 2 is redone
    assert again.manifest.rows("cover") == 199 and again.manifest.rows("clip") == 10
    assert len(set(table(again.directory, "cover").column("id").to_pylist())) == 199


def test_out_of_memory_halves_the_batch_and_loses_nothing():
    class FlakyGpu:
        calls: list[int] = []

        def submit_pixels(self, pixels):
            self.calls.append(len(pixels))
            if len(pixels) > 8:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return PendingOutputs({"vector": pixels.reshape(len(pixels), -1)})

    gpu = FlakyGpu()
    backoff = OomBackoff(gpu, limit=64)
    pixels = torch.arange(1, 40 * 3 + 1, dtype=torch.float32).reshape(40, 3)
    out = backoff(pixels)()
    np.testing.assert_allclose(out["vector"], l2_normalise(pixels.numpy()), rtol=1e-6)
    assert backoff.limit == 5 and gpu.calls[:4] == [40, 20, 10, 5] and max(gpu.calls[4:]) == 5


def test_one_process_per_device_writes_the_same_shards(workspace, tiny_uniclip, tmp_path):
    single = embed_demo(workspace, tiny_uniclip, kind="both", shard_size=40)
    # A reader process each: device processes are spawned, so their readers are too.
    config = EmbedConfig(dataset="demo", model=f"uniclip:{tiny_uniclip}", kind="both", device="cpu,cpu",
                         workers=2, shard_size=40, out=tmp_path / "split")
    split = run_embed(config, workspace)
    assert split.shards_written == single.shards_written == 6
    assert split.times.model > 0  # the processes' own timings, summed
    for kind in ("cover", "clip"):
        assert table(split.directory, kind).equals(table(single.directory, kind))


def test_the_job_says_which_stage_bounds_it(workspace, tiny_uniclip, monkeypatch):
    from vsearch.embeddings.uniclip import UniClipEncoder

    read, submit = reader.MediaRows.__getitems__, UniClipEncoder.submit_pixels
    monkeypatch.setattr(reader.MediaRows, "__getitems__", lambda self, items: time.sleep(0.5) or read(self, items))
    monkeypatch.setattr(UniClipEncoder, "submit_pixels", lambda self, pixels: time.sleep(0.1) or submit(self, pixels))
    started = time.perf_counter()
    times = embed_demo(workspace, tiny_uniclip, batch_size=50).times  # 4 batches
    # The next batch is read while the model runs: the job waits 0.5 s for the first, then about 0.4 s.
    assert times.input >= 1.0 and 0.4 <= times.model < times.input
    assert times.input + times.model + times.output <= time.perf_counter() - started
    assert "reading bounds this job" in _stage_line(times)
    assert "bounds" not in _stage_line(StageTimes(input=1.0, model=9.0, output=0.5))


def test_the_next_batch_is_queued_before_this_ones_outputs_are_waited_for(workspace, tiny_uniclip, monkeypatch):
    from vsearch.embeddings.uniclip import UniClipEncoder

    events, submit = [], UniClipEncoder.submit_pixels

    def logged(self, pixels):
        pending, number = submit(self, pixels), sum(event == "submit" for event, _ in events)
        events.append(("submit", number))
        result = pending.result
        pending.result = lambda: events.append(("result", number)) or result()
        return pending

    monkeypatch.setattr(UniClipEncoder, "submit_pixels", logged)
    result = embed_demo(workspace, tiny_uniclip, batch_size=50, shard_size=100)  # 4 batches across 2 shards
    # The GPU is never left without work while the host reads a batch's outputs back.
    assert events == [("submit", 0), ("submit", 1), ("result", 0), ("submit", 2), ("result", 1),
                      ("submit", 3), ("result", 2), ("result", 3)]
    assert result.rows_written == 199 and result.shards_written == 2


def test_covers_are_decoded_by_the_readers_where_torchvision_no_longer_decodes_jpegs(workspace, tiny_uniclip,
                                                                                     monkeypatch):
    import torchvision.io

    monkeypatch.delattr(torchvision.io, "decode_jpeg")  # deprecated since 0.29, to be removed
    result = embed_demo(workspace, tiny_uniclip, decode="device", limit=20)
    assert (result.rows_written, result.rows_failed, result.times.decoding) == (20, 0, 0)


def test_device_processes_bring_the_shards_up_to_date_with_a_changed_dataset(workspace, tiny_uniclip, tmp_path):
    rows = list(open_dataset("demo", workspace).rows())[:40]
    source = tmp_path / "covers.txt"

    def embed(selected, on_done=lambda rows: None):
        source.write_text("".join(f"{r.title}\t{r.uri}\t{r.ocr}\n" for r in selected), encoding="utf-8")
        return run_embed(EmbedConfig(dataset=str(source), model=f"uniclip:{tiny_uniclip}", device="cpu,cpu",
                                     workers=0, shard_size=10), workspace, on_done=on_done)

    embed(rows)
    kept = rows[:20] + rows[32:]  # shard 2 now holds other rows, and shard 3 is past the end
    done = []  # the shards found done say how many rows they hold
    again = embed(kept, done.append)
    assert (again.shards_skipped, again.shards_redone, again.shards_written, again.shards_removed) == (2, 1, 1, 1)
    assert sum(done) == 20
    expected = sorted(r.id for r in open_dataset(str(source), workspace).rows())
    assert len(expected) == 28 and sorted(table(again.directory, "cover").column("id").to_pylist()) == expected


def test_each_gpu_gets_its_own_readers_unless_told_otherwise(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 96)
    assert total_workers(None, 1) == 16 and total_workers(None, 4) == 64  # not 16 shared by 4 GPUs
    assert total_workers(None, 8) == 96
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert total_workers(None, 2) == 4
    assert total_workers(3, 2) == 3


def test_text_only_encoders_cannot_make_clip_vectors(workspace):
    with pytest.raises(VsearchError, match="clip vectors need an image model"):
        run_embed(EmbedConfig(dataset="demo", model="lexical", kind="clip"), workspace)


def test_a_dataset_without_videos_says_where_to_put_them(tmp_path, workspace, tiny_uniclip):
    source = tmp_path / "novideo.txt"
    source.write_text("标题\tx.jpg\t文字\n", encoding="utf-8")
    with pytest.raises(VsearchError, match="no videos folder .*novideo-videos"):
        run_embed(EmbedConfig(dataset=str(source), model=f"uniclip:{tiny_uniclip}", kind="clip", device="cpu"),
                  workspace)


def test_jpegs_decoded_on_the_device_give_the_same_vectors(workspace, tiny_uniclip, tmp_path):
    # The GPU path (nvjpeg + resize on the device) run on the CPU device: same code, other device.
    on_workers = embed_demo(workspace, tiny_uniclip, limit=30, decode="workers")
    on_device = run_embed(EmbedConfig(dataset="demo", model=f"uniclip:{tiny_uniclip}", device="cpu", workers=0,
                                      limit=30, decode="device", out=tmp_path / "device"), workspace)
    assert_same_covers(on_workers, on_device)
    assert on_device.times.decoding > 0 == on_workers.times.decoding  # the job's time split says which ran


def test_readers_and_device_share_the_jpegs_and_give_the_same_vectors(workspace, tiny_uniclip, tmp_path):
    on_workers = embed_demo(workspace, tiny_uniclip, limit=64, batch_size=8, decode="workers")
    shared = run_embed(EmbedConfig(dataset="demo", model=f"uniclip:{tiny_uniclip}", device="cpu", workers=2, limit=64,
                                   batch_size=8, decode="both", out=tmp_path / "both"), workspace)
    assert_same_covers(on_workers, shared)
    # The readers start with half of each batch's JPEGs: some of the 64 covers went each way.
    assert 0 < shared.times.decoded_on_device < 64 and on_workers.times.decoded_on_device == 0
    assert "decoding" in _stage_line(shared.times) and "covers on the device" in _stage_line(shared.times)


def a_batch(reader_jpegs: int, device_jpegs: int, seconds_a_jpeg: float, other_seconds: float) -> reader.Batch:
    return reader.Batch(number=0, rows=[], pixels=None, jpeg_bytes=torch.empty(0, dtype=torch.uint8),
                        jpeg_sizes=[1] * device_jpegs, failed=[],
                        reader_seconds=other_seconds + reader_jpegs * seconds_a_jpeg, reader_jpegs=reader_jpegs,
                        reader_jpeg_seconds=reader_jpegs * seconds_a_jpeg)


def test_the_readers_get_the_share_of_jpegs_they_can_decode_while_the_device_does_a_batch():
    split = reader.JpegSplit(readers=4)
    assert split.readers_take(100) == 50  # unmeasured: half
    # 10 ms a JPEG and 100 ms a batch for reading, 200 ms of the device's a batch: of 100 JPEGs,
    # 4 readers at 85% of their pace decode (0.85 * 4 * 0.2 - 0.1) / 0.01 = 58 in that time.
    for _ in range(50):
        split.observe(a_batch(split.readers_take(100), 100 - split.readers_take(100), 0.01, 0.1), device_seconds=0.2)
    assert split.readers_take(100) == 58
    # A shard's last batch is a short one: the readers do not take the next ones whole for it (on an
    # H200 the batch a reader took whole arrived half a second late).
    split.observe(a_batch(split.readers_take(30), 30 - split.readers_take(30), 0.01, 0.1), device_seconds=0.2)
    assert split.readers_take(100) < 70
    # Slower readers (a busier machine) get fewer, down to a floor that keeps them measured.
    for _ in range(50):
        split.observe(a_batch(split.readers_take(100), 100 - split.readers_take(100), 0.05, 0.1), device_seconds=0.2)
    assert split.readers_take(100) == round((0.85 * 4 * 0.2 - 0.1) / 0.05)
    for _ in range(50):
        split.observe(a_batch(split.readers_take(100), 100 - split.readers_take(100), 1.0, 0.1), device_seconds=0.2)
    assert split.readers_take(100) == 2
    # Fast readers take them all; without readers the device decodes every JPEG.
    for _ in range(50):
        split.observe(a_batch(split.readers_take(100), 100 - split.readers_take(100), 0.001, 0.0), device_seconds=0.2)
    assert split.readers_take(100) == 100
    alone = reader.JpegSplit(readers=0)
    alone.observe(a_batch(0, 100, 0.0, 0.0), device_seconds=1.0)
    assert alone.readers_take(100) == 0


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_a_cover_stored_turned_is_read_upright_as_its_exif_says(decode, workspace, tiny_uniclip, tmp_path):
    from PIL import Image

    covers = tmp_path / "covers"
    covers.mkdir()
    cover = Image.open(next(open_dataset("demo", workspace).rows()).uri).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: turn a quarter clockwise to show it
    cover.save(covers / "turned.jpg", exif=exif, quality=95)
    stored = Image.open(covers / "turned.jpg").convert("RGB")
    stored.transpose(Image.Transpose.ROTATE_270).save(covers / "upright.png")  # the same pixels, shown as is
    result = run_embed(EmbedConfig(dataset=str(covers), model=f"uniclip:{tiny_uniclip}", device="cpu", workers=0,
                                   decode=decode), workspace)
    vectors = {row["id"]: np.asarray(row["vector"], np.float32) for row in table(result.directory, "cover").to_pylist()}
    np.testing.assert_allclose(vectors["turned"], vectors["upright"], atol=1e-3)


def test_jpegs_for_the_device_cross_from_reader_processes_in_few_file_descriptors(workspace, tiny_uniclip, tmp_path):
    # Each tensor a reader process hands over costs a file descriptor while in flight; JPEGs sent
    # one tensor each ran a 16-core GPU machine out of them (batches of 512). Here: batches of 199
    # covers, two readers, 128 descriptors.
    script = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from pathlib import Path
from vsearch.embeddings.job import EmbedConfig, run_embed
from vsearch.workspace import Workspace
result = run_embed(EmbedConfig(dataset="demo", model="uniclip:{tiny_uniclip}", device="cpu", workers=2, batch_size=199,
                               decode="device", out=Path(sys.argv[1])), Workspace.resolve(Path(sys.argv[2])))
print(result.rows_written, result.rows_failed)
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out"), str(workspace.root)],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["199", "0"]


def test_files_that_are_not_images_fail_for_one_reason_that_names_each_file(tmp_path):
    reasons = []
    for name, data in (("a.jpg", b"not an image"), ("b.png", b"<html>404</html>")):
        with pytest.raises(MediaError) as raised:
            decode_image(data, str(tmp_path / name))
        reasons.append(str(raised.value).replace(str(tmp_path / name), "…"))
    assert reasons == ["cannot decode image …: not in an image format Pillow reads"] * 2


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_too_large_to_decode_safely_is_recorded_and_the_job_goes_on(workers, tmp_path, workspace,
                                                                             tiny_uniclip):
    folder = tmp_path / "covers"
    folder.mkdir()
    for row in list(open_dataset("demo", workspace).rows())[:3]:
        shutil.copy(row.uri, folder / Path(row.uri).name)
    # 225 million pixels in 27 KB: past Pillow's decompression-bomb limit, which it raises as no OSError.
    PIL.Image.new("1", (15000, 15000)).save(folder / "huge.png")
    result = run_embed(EmbedConfig(dataset=str(folder), model=f"uniclip:{tiny_uniclip}", device="cpu",
                                   workers=workers), workspace)
    assert table(result.directory, "cover").num_rows == 3
    [failed] = result.manifest.failed
    assert failed["id"] == "huge" and "225000000 pixels" in failed["reason"] and "exceeds limit" in failed["reason"]


def test_a_corrupt_jpeg_decoded_on_the_device_is_recorded(tmp_path, workspace, tiny_uniclip):
    covers = tmp_path / "covers"
    covers.mkdir()
    shutil.copy(open_dataset("demo", workspace).rows().__next__().uri, covers / "good.jpg")
    (covers / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    result = run_embed(EmbedConfig(dataset=str(covers), model=f"uniclip:{tiny_uniclip}", device="cpu", workers=0,
                                   decode="device"), workspace)
    assert table(result.directory, "cover").column("id").to_pylist() == ["good"]
    (failure,) = result.manifest.failed
    assert failure["id"] == "bad" and failure["reason"].startswith("cannot decode image")


def test_a_jpeg_the_device_cannot_decode_is_decoded_on_the_host(tmp_path, workspace, tiny_uniclip, monkeypatch):
    # nvjpeg rejects some JPEGs that PIL reads (unusual chroma subsampling); here the device decoder
    # is made to reject one cover, which must then be read as the workers read it, not recorded as failed.
    import torchvision.io

    real_decode = torchvision.io.decode_jpeg
    rejected = open_dataset("demo", workspace).rows().__next__().uri
    rejected_bytes = Path(rejected).read_bytes()

    def picky_decode(data, *args, **kwargs):
        files = data if isinstance(data, list) else [data]
        if any(bytes(f.numpy()) == rejected_bytes for f in files):
            raise RuntimeError("nvjpeg: unsupported chroma subsampling")
        return real_decode(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky_decode)
    on_device = run_embed(EmbedConfig(dataset="demo", model=f"uniclip:{tiny_uniclip}", device="cpu", workers=0,
                                      limit=5, decode="device", out=tmp_path / "device"), workspace)
    monkeypatch.undo()
    on_workers = embed_demo(workspace, tiny_uniclip, limit=5, decode="workers")
    assert on_device.manifest.failed == []
    va, vb = assert_same_covers(on_workers, on_device)
    assert np.allclose(va[0], vb[0], atol=2e-3)  # the rejected cover went the workers' way exactly


def test_covers_of_one_size_are_resized_together_and_come_back_in_order(monkeypatch, tiny_uniclip):
    import vsearch.embeddings.reader as reader

    encoder = load_encoder(f"uniclip:{tiny_uniclip}", "cpu")
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator)
              for size in [(36, 64), (64, 36), (36, 64), (48, 48), (36, 64), (64, 36)]]
    calls = []

    def counted(batch):
        calls.append(len(batch))
        return encoder.tensor_transform(batch)

    one_by_one = torch.cat([encoder.tensor_transform(image[None]) for image in images])
    assert torch.equal(reader.transform_by_size(images, counted), one_by_one)
    assert sorted(calls) == [1, 2, 3]  # one call a size
    monkeypatch.setattr(reader, "TRANSFORM_VALUES", 2 * 3 * 36 * 64)  # at most two such images a call
    calls.clear()
    assert torch.equal(reader.transform_by_size(images, counted), one_by_one)
    assert sorted(calls) == [1, 1, 2, 2]


def test_an_image_models_vectors_are_kept_when_only_a_title_or_ocr_text_changes(workspace, tiny_uniclip, tmp_path):
    source = tmp_path / "covers.txt"
    demo = list(open_dataset("demo", workspace).rows())[:20]
    lines = [f"{r.title}\t{r.uri}\t{r.ocr}\n" for r in demo]
    source.write_text("".join(lines), encoding="utf-8")
    config = EmbedConfig(dataset=str(source), model=f"uniclip:{tiny_uniclip}", device="cpu", workers=0, shard_size=10)
    first = run_embed(config, workspace)
    before = {r["id"]: r for r in table(first.directory, "cover").to_pylist()}
    build_index(BuildConfig(type="hnsw"), open_source(first.directory), tmp_path / "index")
    lines[3] = f"改过的标题\t{demo[3].uri}\t改过的字幕\n"  # the creator retitled the video
    source.write_text("".join(lines), encoding="utf-8")
    again = run_embed(config, workspace)
    assert (again.shards_refreshed, again.shards_skipped, again.shards_redone, again.rows_written) == (1, 1, 0, 0)
    after = {r["id"]: r for r in table(again.directory, "cover").to_pylist()}
    edited = url_id(demo[3].uri)
    assert (after[edited]["title"], after[edited]["ocr"]) == ("改过的标题", "改过的字幕")
    assert all({**after[i], "title": row["title"], "ocr": row["ocr"]} == row for i, row in before.items())
    # and the index takes up the new text in place, its vectors as they were
    appended = append_index(tmp_path / "index", open_source(again.directory))
    assert (appended["appends"][-1]["refreshed"], appended["count"]) == (["cover-00000.parquet"], 20)
    rows = load_index(tmp_path / "index").rows.table()
    assert rows.filter(pc.equal(rows.column("id"), edited)).column("title").to_pylist() == ["改过的标题"]


def test_covers_moved_to_another_folder_keep_their_vectors_and_take_their_new_paths(workspace, tiny_uniclip, tmp_path):
    source, first = tmp_path / "covers.txt", tmp_path / "first"
    demo = list(open_dataset("demo", workspace).rows())[:30]
    source.write_text("".join(f"{r.title}\t{r.uri}\t{r.ocr}\n" for r in demo), encoding="utf-8")
    first.mkdir()
    ids = [url_id(r.uri) for r in demo]
    for row, id_ in list(zip(demo, ids))[:-1]:  # the last cover not downloaded yet
        shutil.copy(row.uri, first / f"{id_}.jpg")
    config = EmbedConfig(dataset=str(source), images=str(first), model=f"uniclip:{tiny_uniclip}", device="cpu",
                         workers=0, shard_size=10)

    def vectors(result):
        return {r["id"]: (r["vector"], r["uri"]) for r in table(result.directory, "cover").to_pylist()}

    before = vectors(run_embed(config, workspace))
    second = first.rename(tmp_path / "second")  # moved as mv and rsync -a move files: sizes and times kept
    shutil.copy(demo[-1].uri, second / f"{ids[-1]}.jpg")  # and the missing cover is there now
    moved = run_embed(replace(config, images=str(second)), workspace)
    assert (moved.shards_refreshed, moved.shards_redone, moved.rows_written, moved.rows_retried) == (3, 0, 1, 1)
    after = vectors(moved)
    assert after.keys() == {*before, ids[-1]} and moved.manifest.failed == []
    assert all(after[i] == (vector, str(second / f"{i}.jpg")) for i, (vector, _) in before.items())

    copied = shutil.copytree(second, tmp_path / "third", copy_function=shutil.copyfile)  # new times: as make,
    again = run_embed(replace(config, images=str(copied)), workspace)  # vsearch takes them for new covers
    assert (again.shards_refreshed, again.shards_redone, again.rows_written) == (0, 3, 30)


def test_a_cover_replaced_or_put_in_place_is_embedded_again(workspace, tiny_uniclip, tmp_path):
    source, covers = tmp_path / "covers.txt", tmp_path / "covers-images"  # covers named by id, by convention
    demo = list(open_dataset("demo", workspace).rows())[:30]
    source.write_text("".join(f"{r.title}\t{r.uri}\t{r.ocr}\n" for r in demo), encoding="utf-8")
    covers.mkdir()
    ids = [url_id(r.uri) for r in demo]
    for row, id_ in zip(demo, ids):
        shutil.copy(row.uri, covers / f"{id_}.jpg")
    config = EmbedConfig(dataset=str(source), model=f"uniclip:{tiny_uniclip}", device="cpu", workers=0, shard_size=10)

    def vectors(result):
        return {r["id"]: r["vector"] for r in table(result.directory, "cover").to_pylist()}

    before = vectors(run_embed(config, workspace))
    shutil.copy(covers / f"{ids[3]}.jpg", covers / f"{ids[15]}.jpg")  # a cover replaced under its name
    (covers / f"{ids[25]}.jpg").rename(tmp_path / "away.jpg")  # and one gone
    again = run_embed(config, workspace)
    assert (again.shards_skipped, again.shards_redone) == (1, 2)
    after = vectors(again)
    assert after[ids[15]] == before[ids[3]] != before[ids[15]]
    assert after.keys() == before.keys() - {ids[25]} and [f["id"] for f in again.manifest.failed] == [ids[25]]
    assert all(after[i] == before[i] for i in after.keys() - {ids[15]})
    assert again.manifest.failed[0]["version"] == "missing"
    (tmp_path / "away.jpg").rename(covers / f"{ids[25]}.jpg")  # put in place: it alone is encoded
    back = run_embed(config, workspace)
    assert (back.shards_skipped, back.shards_redone, back.rows_retried, back.rows_written) == (2, 0, 1, 1)
    assert back.manifest.failed == []
    assert vectors(back)[ids[25]] == before[ids[25]]

    manifest = json.loads((back.directory / "_manifest.json").read_text())
    for entry in manifest["shards"]:  # as vsearch wrote it before it looked at the files
        del entry["media_digest"]
    (back.directory / "_manifest.json").write_text(json.dumps(manifest))
    (covers / f"{ids[5]}.jpg").touch()
    assert run_embed(config, workspace).shards_skipped == 3


def test_a_text_encoder_reads_no_cover_so_a_replaced_one_costs_nothing(workspace, tmp_path):
    rows = list(open_dataset("demo", workspace).rows())[:20]
    source = tmp_path / "covers.txt"
    source.write_text("".join(f"{r.title}\tc/{r.id}.jpg\t{r.ocr}\n" for r in rows), encoding="utf-8")
    (tmp_path / "c").mkdir()
    for row in rows:
        shutil.copy(row.uri, tmp_path / "c" / f"{row.id}.jpg")
    config = EmbedConfig(dataset=str(source), model="lexical", shard_size=10)
    run_embed(config, workspace)
    shutil.copy(rows[0].uri, tmp_path / "c" / f"{rows[1].id}.jpg")
    assert run_embed(config, workspace).shards_skipped == 2


@pytest.mark.parametrize("device", ["cpu", "cpu,cpu"])
def test_retry_failed_encodes_the_covers_a_server_did_not_send_once_it_does(device, cover_server, tmp_path, workspace,
                                                                            tiny_uniclip):
    folder, base = cover_server
    demo = list(open_dataset("demo", workspace).rows())[:12]
    source = tmp_path / "remote.txt"
    source.write_text("".join(f"{r.title}\t{base}/{n}.jpg\t{r.ocr}\n" for n, r in enumerate(demo)), encoding="utf-8")
    for n, row in enumerate(demo):
        if n not in (2, 7):
            shutil.copy(row.uri, folder / f"{n}.jpg")
    config = EmbedConfig(dataset=str(source), model=f"uniclip:{tiny_uniclip}", device="cpu", workers=0, shard_size=5)
    first = run_embed(config, workspace)
    assert (first.rows_written, first.rows_failed) == (10, 2)
    for n in (2, 7):  # the server sends them now
        shutil.copy(demo[n].uri, folder / f"{n}.jpg")
    assert run_embed(config, workspace).shards_skipped == 3  # a plain re-run trusts what it recorded

    done, encoded = [], []
    before = (first.directory / "_manifest.json").read_bytes()
    again = run_embed(replace(config, retry_failed=True, device=device), workspace, on_rows=encoded.append,
                      on_done=done.append)
    assert (again.rows_retried, again.rows_written, again.rows_failed, again.manifest.failed) == (2, 2, 0, [])
    assert (sum(encoded), sum(done)) == (2, 10)
    fresh = table(run_embed(replace(config, out=tmp_path / "fresh"), workspace).directory, "cover")
    retried = table(again.directory, "cover")
    model_outputs = ["vector", "ocr_presence"]  # a batch of one computes them a rounding apart from a batch of five
    assert retried.drop(model_outputs).equals(fresh.drop(model_outputs))  # every row, in the dataset's order
    for name in model_outputs:
        np.testing.assert_allclose(np.asarray(retried.column(name).to_pylist(), np.float32),
                                   np.asarray(fresh.column(name).to_pylist(), np.float32), atol=2e-3)
    assert run_embed(replace(config, retry_failed=True), workspace).rows_retried == 0

    (first.directory / "_manifest.json").write_bytes(before)  # as if the job died before it said what it rewrote
    resumed = run_embed(replace(config, retry_failed=True), workspace)
    assert (resumed.shards_skipped, resumed.shards_written, resumed.rows_retried) == (1, 2, 0)
    assert table(resumed.directory, "cover").drop(model_outputs).equals(fresh.drop(model_outputs))


def random_media_changes(seeds, tmp_path, workspace, tiny_uniclip):
    """For each seed, a dataset whose covers and videos come from folders, some missing, some
    broken, through random edits of its lines and its media files, and moves of those folders,
    embedded after each (covers and clips, retrying failed rows or not): the folder then holds what
    a fresh embed of the dataset and its media as they are holds."""
    demo = [row.uri for row in open_dataset("demo", workspace).rows()][:30]

    def held(result, kind):
        files = [result.directory / s["name"] for s in result.manifest.shards if s["kind"] == kind]
        shards = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("id") if files else None
        vectors = np.asarray(shards.column("vector").to_pylist(), np.float32) if files else np.zeros((0,))
        failed = sorted((f["id"], f["reason"]) for f in result.manifest.failed if f["kind"] == kind)
        return (shards.select(["id", "title", "ocr", "uri", "cover"]).to_pylist() if files else []), failed, vectors

    for seed in seeds:
        pick = random.Random(seed)
        mover = random.Random(-seed)  # apart, so that each seed's other edits stay what they were
        source, covers, videos = tmp_path / f"{seed}.txt", tmp_path / f"{seed}-images", tmp_path / f"{seed}-videos"
        covers.mkdir()
        videos.mkdir()
        ids = [url_id(f"http://covers.example/{n}.jpg") for n in range(61)]  # as random_cover_line names them

        def put_video(id_):
            made = pick.choice(["good", "good", "good", "broken", "short"])
            if made == "broken":
                (videos / f"{id_}.mp4").write_bytes(b"not a video" * pick.randint(1, 9))
            else:
                write_video(videos / f"{id_}.mp4", seconds=0.1 if made == "short" else pick.choice([1, 2]),
                            size=pick.choice([(64, 48), (48, 64)]))

        for id_ in ids:
            if pick.random() < 0.8:
                shutil.copy(pick.choice(demo), covers / f"{id_}.jpg")
            if pick.random() < 0.4:
                put_video(id_)
        lines = [random_cover_line(pick, i) for i in range(pick.randint(1, 30))]
        config = EmbedConfig(model=f"uniclip:{tiny_uniclip}", dataset=str(source), kind="both", frames=4,
                             shard_size=pick.choice([3, 8]), workers=0, device="cpu")
        log = []
        for step in range(6):
            in_use = [url_id(line.split("\t")[1]) for line in lines]  # mostly the media of rows there are
            change = pick.choice(["lines", "lines", "cover", "video", "no video"])
            id_ = pick.choice(in_use if pick.random() < 0.7 else ids)
            cover = covers / f"{id_}.jpg"
            if change == "lines":
                change, lines = edit_lines(pick, lines, step)
            elif change == "cover" and cover.exists() and pick.random() < 0.5:
                cover.unlink()
            elif change == "cover":
                cover.write_bytes(Path(pick.choice(demo)).read_bytes())
            elif change == "video":
                put_video(id_)
            else:
                (videos / f"{id_}.mp4").unlink(missing_ok=True)
            retry = pick.random() < 0.5
            if mover.random() < 0.3:  # as mv moves them: sizes and times kept
                covers, videos = covers.rename(f"{covers}-{step}"), videos.rename(f"{videos}-{step}")
                config = replace(config, images=str(covers), videos=str(videos))
                change += " +moved"
            log.append(change + " +retry" * retry)
            source.write_text("".join(lines), encoding="utf-8")
            updated = run_embed(replace(config, retry_failed=retry), workspace)
            fresh = run_embed(replace(config, out=tmp_path / f"fresh-{seed}-{step}"), workspace)
            for kind in ("cover", "clip"):
                (rows, failed, vectors), (fresh_rows, fresh_failed, fresh_vectors) = held(updated, kind), held(fresh, kind)
                assert (rows, failed) == (fresh_rows, fresh_failed), f"seed {seed}, {kind}: {log}"
                assert vectors.shape == fresh_vectors.shape, f"seed {seed}, {kind}: {log}"
                np.testing.assert_allclose(vectors, fresh_vectors, atol=3e-3, err_msg=f"seed {seed}: {log}")  # batches differ


def test_random_edits_of_lines_and_media_embed_as_a_fresh_embed_would(tmp_path, workspace, tiny_uniclip):
    random_media_changes([0, 27], tmp_path, workspace, tiny_uniclip)  # 27 retries a clip shard's failed rows


@pytest.mark.slow
def test_long_random_edits_of_lines_and_media_embed_as_a_fresh_embed_would(tmp_path, workspace, tiny_uniclip):
    random_media_changes(set(range(40)) - {0, 27}, tmp_path, workspace, tiny_uniclip)


def test_a_broken_video_replaced_is_encoded_into_its_clip_shard_beside_the_rows_kept(tmp_path, workspace,
                                                                                     tiny_uniclip):
    source, videos = tmp_path / "c.txt", tmp_path / "c-videos"
    source.write_text("".join(f"{r.title}\t{r.uri}\t{r.ocr}\n" for r in list(open_dataset("demo", workspace).rows())[:4]),
                      encoding="utf-8")
    videos.mkdir()
    ids = [row.id for row in open_dataset(str(source), workspace).rows()]
    for id_ in ids:
        write_video(videos / f"{id_}.mp4", seconds=2)
    (videos / f"{ids[1]}.mp4").write_bytes(b"not a video")
    config = EmbedConfig(dataset=str(source), model=f"uniclip:{tiny_uniclip}", kind="clip", device="cpu", workers=0)
    assert run_embed(config, workspace).rows_failed == 1
    write_video(videos / f"{ids[1]}.mp4", seconds=2)
    again = run_embed(config, workspace)
    assert (again.rows_retried, again.rows_written, again.rows_failed) == (1, 1, 0)
    clips = table(again.directory, "clip")
    assert clips.column("id").to_pylist() == ids
    assert clips.column("ocr_presence").null_count == 4  # clips have no presence, kept rows or retried
