"""Regenerate the embedded demo data in vsearch/demo_data/.

    python scripts/make_demo_data.py [--cbvs20k ../shared/data/cbvs20k.txt] [--font PATH]

Needs the CBVS-20K file (for real queries) and a CJK font (Debian: fonts-wqy-zenhei).
Writes, deterministically:

* covers/NNN.jpg: about 200 covers of varied sizes and backgrounds with Chinese text drawn on
  them. The texts come from real CBVS-20K queries, grouped in families that share wording
  (e.g. every "...演员表" query), so that decoys compete with the right answers: per query a
  main cover, a variant with extra words, and for some a near-duplicate (same text, another
  layout); per family a few decoys that share only the family's keyword.
* demo.txt: the manifest in the CBVS-5M format, `title \\t covers/NNN.jpg \\t ocr`, where the
  OCR column is the text drawn on the cover (what a perfect OCR would read).
* demo-videos/<id>.mp4: ten 2-second H.264 clips, each a slow zoom over one cover, named by the
  cover's vsearch id as the dataset convention wants (covers and clips of one video share it).
"""

from __future__ import annotations

import argparse
import random
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from vsearch.embeddings.datasets import url_id

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "vsearch" / "demo_data"
FAMILIES = {  # keyword -> how many of its CBVS-20K queries to use
    "演员表": 7, "艾尔登法环": 4, "仙剑": 2, "汪汪队": 2, "周杰伦": 5, "王者荣耀": 6, "原神": 6,
    "怎么制作": 3, "攻略": 6, "免费观看": 6, "学院": 5, "猫": 5, "完整版": 4, "大学": 4,
}
# The headline example gets a hand-written group about its cast, plus a decoy on its first two characters.
DAZHAIMEN = [
    ("大宅门演员表 现在都怎么样了", "大宅门 演员表"),
    ("大宅门 主要演员介绍", "大宅门 主要演员"),
    ("大宅门 白景琦 陈宝国", "大宅门 白景琦 演员"),
    ("大宅门演员今昔对比", "大宅门 演员 今昔对比"),
    ("大宅门 二奶奶 斯琴高娃", "大宅门 二奶奶 演员"),
]
HAND_DECOYS = [("中式大宅院装修效果图", "大宅院 装修效果图"), ("陈宝国新剧定档", "陈宝国 新剧")]
EXTRAS = ["高清", "合集", "解说", "精彩片段", "第2期", "独家", "最新"]
TOPICS = ["新手教程", "精彩集锦", "幕后花絮", "最新消息", "搞笑合集", "深度盘点"]
TITLES = ["{t}", "【高清】{t}", "{t}｜一口气看完", "{t}，看完你就懂了", "盘点：{t}", "{t} 合集"]
SIZES = [(480, 270), (270, 360), (240, 426), (320, 320), (400, 300), (360, 240)]
EXAMPLE_QUERIES = ["大宅门演员表", "艾尔登法环马怎么获得", "周杰伦个人资料"]


def family_queries(cbvs20k: Path) -> list[str]:
    queries = sorted({line.split("\t")[0].strip() for line in cbvs20k.read_text(encoding="utf-8").splitlines()})
    chosen: list[str] = []
    for keyword, count in FAMILIES.items():
        members = [q for q in queries if keyword in q and q not in chosen and "大宅门" not in q]
        chosen += members[:count]
    return chosen


def cover_texts(queries: list[str], rng: random.Random) -> list[tuple[str, str, bool]]:
    """(title, ocr, near_duplicate_of_previous) for every cover, in generation order."""
    covers: list[tuple[str, str, bool]] = []
    for title, ocr in DAZHAIMEN:
        covers.append((title, ocr, False))
    covers.append((DAZHAIMEN[0][0] + " 完整版", DAZHAIMEN[0][1], True))
    covers += [(title, ocr, False) for title, ocr in HAND_DECOYS]
    for number, query in enumerate(queries):
        covers.append((rng.choice(TITLES).format(t=query), query, False))
        if number % 2 == 0:
            covers.append((rng.choice(TITLES).format(t=query), query, True))
        extra = rng.choice(EXTRAS)
        covers.append((f"{query} {extra}", f"{query} {extra}", False))
    for keyword in FAMILIES:
        for topic in rng.sample(TOPICS, 2):
            text = f"{keyword} {topic}"
            covers.append((rng.choice(TITLES).format(t=text), text, False))
    return covers


def background(size: tuple[int, int], rng: random.Random) -> Image.Image:
    width, height = size
    top, bottom = (np.array([rng.randrange(256) for _ in range(3)]) for _ in range(2))
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp).repeat(width, axis=1)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(2, 6)):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(min(size) // 8, min(size) // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - r, y - r, x + r, y + r], fill=colour)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(2, 6)))


def wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines: list[str] = []
    for part in text.split(" "):
        line = ""
        for char in part:
            if line and font.getlength(line + char) > width:
                lines.append(line)
                line = ""
            line += char
        lines.append(line)
    return lines


def draw_cover(ocr: str, size: tuple[int, int], font_path: Path, rng: random.Random) -> Image.Image:
    image = background(size, rng)
    width, height = size
    font = ImageFont.truetype(str(font_path), max(16, int(min(width, height) * rng.uniform(0.09, 0.13))))
    lines = wrap(ocr, font, int(width * 0.88))
    line_height = int(font.size * 1.25)
    y = rng.choice([int(height * 0.08), (height - line_height * len(lines)) // 2,
                    height - line_height * len(lines) - int(height * 0.08)])
    fill = rng.choice([(255, 255, 255), (255, 230, 0), (255, 80, 60), (20, 20, 20)])
    stroke = (0, 0, 0) if sum(fill) > 300 else (255, 255, 255)
    draw = ImageDraw.Draw(image)
    for line in lines:
        x = (width - font.getlength(line)) / 2
        draw.text((x, y), line, font=font, fill=fill, stroke_width=max(1, font.size // 12), stroke_fill=stroke)
        y += line_height
    return image


def write_clip(cover: Image.Image, path: Path, seconds: float = 2.0, fps: int = 12) -> None:
    """A slow zoom into the cover: frames differ, so pooled clip vectors are not one frame's."""
    width = 240
    height = int(round(cover.height * width / cover.width / 2)) * 2
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"crf": "32", "preset": "veryslow", "threads": "1"}  # bit-exact reruns
        frames = int(seconds * fps)
        for index in range(frames):
            zoom = 1.0 + 0.25 * index / frames
            w, h = cover.width / zoom, cover.height / zoom
            box = ((cover.width - w) / 2, (cover.height - h) / 2, (cover.width + w) / 2, (cover.height + h) / 2)
            frame = av.VideoFrame.from_image(cover.resize((width, height), Image.BICUBIC, box=box))
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def check_headline(manifest: list[tuple[str, str, str]]) -> None:
    """The demo's promise: for 大宅门演员表 the lexical encoder ranks every 大宅门 cover first."""
    from vsearch.embeddings.encoders import load_encoder

    encoder = load_encoder("lexical")
    vectors = encoder.encode_texts([f"{title}\n{ocr}" for title, _, ocr in manifest])
    scores = vectors @ encoder.encode_texts(["大宅门演员表"])[0]
    relevant = sum("大宅门" in title + ocr for title, _, ocr in manifest)
    top = [manifest[i] for i in np.argsort(-scores)[:relevant]]
    assert all("大宅门" in title + ocr for title, _, ocr in top), top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cbvs20k", type=Path, default=ROOT.parent / "shared" / "data" / "cbvs20k.txt")
    parser.add_argument("--font", type=Path, default=Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"))
    args = parser.parse_args()
    rng = random.Random(20260522)
    queries = family_queries(args.cbvs20k)
    for example in EXAMPLE_QUERIES[1:]:
        assert example in queries, f"example query {example} is not among the chosen CBVS-20K queries"
    covers = cover_texts(queries, rng)

    manifest = [(title, f"covers/{number:03d}.jpg", ocr) for number, (title, ocr, _) in enumerate(covers)]
    check_headline(manifest)

    for folder in ("covers", "demo-videos"):
        shutil.rmtree(OUT / folder, ignore_errors=True)
        (OUT / folder).mkdir(parents=True)
    images: list[Image.Image] = []
    for title, relative, ocr in manifest:
        image = draw_cover(ocr, rng.choice(SIZES), args.font, rng)
        image.save(OUT / relative, quality=rng.randrange(70, 86), optimize=True)
        images.append(image)

    order = list(range(len(manifest)))
    rng.shuffle(order)
    (OUT / "demo.txt").write_text("".join("\t".join(manifest[i]) + "\n" for i in order), encoding="utf-8")
    clip_sources = [0, 2] + [i for i, (_, _, duplicate) in enumerate(covers) if not duplicate][8:80:9]
    for number in clip_sources[:10]:
        write_clip(images[number], OUT / "demo-videos" / f"{url_id(manifest[number][1])}.mp4")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{len(manifest)} covers, {len(clip_sources[:10])} clips, {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
