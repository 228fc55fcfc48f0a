"""OCR experts on real rendered images: RapidOCR (PP-OCRv4, ONNX) and Tesseract (subprocess)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from maestro_core.ocr import (
    MAX_PIXELS, NO_TEXT, OcrLine, ReadMemo, parse_tsv, rapidocr_model, reading_order, tesseract_model,
)
from maestro_core.warmup import render_text_image

SMALL_LINE = "Meet me at the station at 7:45 tomorrow."


def iou(a: list[int] | tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area else 0.0


@pytest.fixture(scope="module")
def rapid():
    return rapidocr_model()


@pytest.fixture(scope="module")
def tess():
    return tesseract_model()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ocr")
    return {
        "word": render_text_image("Orchestra", d / "word.png", size=64),
        "lines": render_text_image("Invoice total: $1,234.56\nDue date: 2024-03-15\nThank you", d / "lines.png", size=24),
        "small": render_text_image(SMALL_LINE, d / "small.png", size=8, pad=20),
        "blank": render_text_image(" ", d / "blank.png", size=24),
    }


@pytest.mark.parametrize("engine", ["rapid", "tess"])
def test_large_word_is_read_exactly(engine: str, images: dict[str, Path], request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(engine)
    start = time.perf_counter()
    out = model("Read the text in the image.", [images["word"]])
    print(f"{engine}: {out} in {time.perf_counter() - start:.3f}s")
    assert out["text"] == "Orchestra"
    assert 0.5 < out["confidence"] <= 1.0


@pytest.mark.parametrize("engine", ["rapid", "tess"])
def test_lines_in_reading_order_and_boxes(engine: str, images: dict[str, Path], request: pytest.FixtureRequest) -> None:
    import numpy as np
    from PIL import Image

    model = request.getfixturevalue(engine)
    plain = model("Read it.", [images["lines"]])
    print(f"{engine}: {plain['text']!r}")
    lines = plain["text"].split("\n")
    assert len(lines) == 3
    assert "1,234.56" in lines[0] and "2024-03-15" in lines[1] and "Thank" in lines[2]

    boxed = model("Read it. [boxes]", [images["lines"]])
    items = json.loads(boxed["text"])
    w, h = Image.open(images["lines"]).size
    assert [it["text"] for it in items] == lines
    for it in items:
        x0, y0, x1, y1 = it["box"]
        assert all(isinstance(v, int) for v in it["box"])
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert 0.0 <= it["conf"] <= 1.0
    tops = [it["box"][1] for it in items]
    assert tops == sorted(tops)
    # each box covers the ink of its rendered line (pad 16 px, line height 1.4 x 24 px)
    ink = np.asarray(Image.open(images["lines"]).convert("L")) < 128
    for k, it in enumerate(items):
        band = np.zeros_like(ink)
        band[16 + k * 33:16 + (k + 1) * 33] = True
        ys, xs = np.nonzero(ink & band)
        truth = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert iou(it["box"], truth) > 0.6, (it, truth)
    assert boxed["confidence"] == pytest.approx(sum(it["conf"] for it in items) / 3, abs=1e-3)


def test_small_font_rapidocr_reads_it_tesseract_may_not(rapid, tess, images: dict[str, Path]) -> None:
    r = rapid("Read the text.", [images["small"]])
    t = tess("Read the text.", [images["small"]])
    print(f"8 px font: rapidocr {r['text']!r} ({r['confidence']:.2f}); tesseract {t['text']!r} ({t['confidence']:.2f})")
    assert r["text"] == SMALL_LINE
    assert 0.0 <= t["confidence"] <= 1.0  # tesseract misreads 8 px text (observed: garbled words)


@pytest.mark.parametrize("engine", ["rapid", "tess"])
def test_nothing_found(engine: str, images: dict[str, Path], request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(engine)
    for prompt, text in (("Read.", NO_TEXT), ("Read. [boxes]", "[]")):
        reply = model(prompt, [images["blank"]])
        assert (reply["text"], reply["confidence"]) == (text, 0.0) and reply["latency_s"] >= 0


def test_first_image_or_all_images(tess, images: dict[str, Path]) -> None:
    assert tess("Read.", [images["word"], images["lines"]])["text"] == "Orchestra"
    both = tesseract_model(all_images=True)("Read.", [images["word"], images["lines"]])["text"]
    assert both.startswith("Orchestra\n\nInvoice total")
    boxed = json.loads(tesseract_model(all_images=True)("[boxes]", [images["word"], images["lines"]])["text"])
    assert [it["image"] for it in boxed] == [0, 1, 1, 1]


def test_transparent_png_is_read_on_white(tess, rapid, tmp_path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    from maestro_core.warmup import font_path

    img = Image.new("RGBA", (420, 100), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((16, 16), "Harbour", font=ImageFont.truetype(str(font_path()), 56), fill=(0, 0, 0, 255))
    img.save(tmp_path / "alpha.png")
    assert tess("Read.", [tmp_path / "alpha.png"])["text"] == "Harbour"
    assert rapid("Read.", [tmp_path / "alpha.png"])["text"] == "Harbour"


def test_guards(tess, tmp_path: Path) -> None:
    from PIL import Image

    with pytest.raises(ValueError, match="no image"):
        tess("Read.", [])
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 7000)).save(huge)  # 56 MP, tiny on disk
    with pytest.raises(ValueError, match="50 megapixels"):
        tess("Read.", [huge])
    (tmp_path / "not.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        tess("Read.", [tmp_path / "not.png"])
    assert MAX_PIXELS == 50_000_000


def test_an_image_read_for_one_skill_is_not_read_again_for_another(tmp_path: Path) -> None:
    """The engine runs once per image content: a second prompt (boxes after lines), a copy at
    another path, reuse its lines, with the first read's engine time as latency; another
    image, or a model with memo 0, reads again."""
    import shutil

    page = render_text_image("Invoice total: 318\nDue 2024-03-15", tmp_path / "page.png", size=24)
    shutil.copy(page, tmp_path / "copy.png")
    other = render_text_image("Harbour", tmp_path / "other.png", size=48)
    model = tesseract_model()
    lines = model("Read the text.", [page])
    boxes = model("Where is the total? [boxes]", [page])
    again = model("Read the text.", [tmp_path / "copy.png"])
    assert (model.memo.misses, model.memo.hits) == (1, 2)
    assert again["text"] == lines["text"] and lines["text"].startswith("Invoice total")
    assert again["latency_s"] == pytest.approx(lines["latency_s"], abs=0.05)
    assert [b["text"] for b in json.loads(boxes["text"])] == lines["text"].splitlines()
    assert boxes["latency_s"] == pytest.approx(lines["latency_s"], abs=0.05)  # the read's time, not the lookup's
    assert lines["latency_s"] > 0.05
    assert model("Read.", [other])["text"] == "Harbour" and model.memo.misses == 2
    fresh = tesseract_model(memo=0)
    assert fresh("Read the text.", [page]) | {"latency_s": 0} == lines | {"latency_s": 0}
    fresh("Read the text.", [page])
    assert (fresh.memo.misses, fresh.memo.hits) == (0, 0)


def test_the_read_memo_reads_an_image_once_across_threads_keeps_no_failure_and_forgets_the_oldest(
        tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    reads: list[str] = []
    gate = threading.Event()

    def read(path: Path) -> list[OcrLine]:
        reads.append(path.name)
        gate.wait(5)
        if path.read_text() == "bad":
            raise RuntimeError("engine failed")
        return [OcrLine(path.read_text(), (0, 0, 1, 1), 0.9)]

    for name, body in (("a", "A"), ("a2", "A"), ("b", "B"), ("c", "C"), ("bad", "bad")):
        (tmp_path / name).write_text(body)
    memo = ReadMemo(read, size=2)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(memo, tmp_path / n) for n in ("a", "a2", "a", "a2")]
        time.sleep(0.2)
        gate.set()
        got = [f.result() for f in futures]
    assert len(reads) == 1 and {g[0][0].text for g in got} == {"A"}  # one engine run for four calls
    assert len({g[1] for g in got}) == 1 and (memo.misses, memo.hits) == (1, 3)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="engine failed"):
            memo(tmp_path / "bad")
    assert reads.count("bad") == 2  # a failure is not kept
    memo(tmp_path / "b")
    memo(tmp_path / "c")  # size 2: "A" is forgotten
    memo(tmp_path / "a")
    assert reads[-1] == "a" and len(reads) == 6  # read again (the first read was of "a" or of its copy "a2")
    for bad in (-1, "many", 2.5):
        with pytest.raises(ValueError, match="memo must be a whole number"):
            ReadMemo(read, size=bad)


def test_reading_order_groups_rows_then_left_to_right() -> None:
    a = OcrLine("right", (300, 12, 400, 40), 0.9)
    b = OcrLine("left", (10, 10, 100, 38), 0.9)
    c = OcrLine("below", (10, 60, 100, 90), 0.9)
    assert [ln.text for ln in reading_order([c, a, b])] == ["left", "right", "below"]


def test_parse_tsv_groups_words_into_lines() -> None:
    tsv = ("level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext\n"
           "1\t1\t0\t0\t0\t0\t0\t0\t200\t100\t-1\t\n"
           "5\t1\t1\t1\t1\t2\t60\t10\t40\t20\t80\tworld\n"
           "5\t1\t1\t1\t1\t1\t10\t12\t40\t20\t90\tHello\n"
           "5\t1\t1\t1\t2\t1\t10\t50\t30\t20\t70\tbye\n")
    lines = parse_tsv(tsv)
    assert lines[0] == OcrLine("Hello world", (10, 10, 100, 32), pytest.approx(0.85))
    assert lines[1].text == "bye" and lines[1].box == (10, 50, 40, 70)


async def test_as_registry_python_experts(images: dict[str, Path]) -> None:
    from types import MappingProxyType

    from maestro_core.experts import build_expert
    from maestro_core.registry import Expert, Price

    for target in ("maestro_core.ocr:rapidocr_model", "maestro_core.ocr:tesseract_model"):
        spec = Expert(name=target.split(":")[1], description="", kind="python",
                      backend=MappingProxyType({"kind": "python", "callable": target}),
                      capabilities=frozenset({"ocr"}), price=Price(per_call=0.001), timeout_s=30)
        reply = await build_expert(spec).generate([{"role": "user", "content": "Read."}], [images["word"]])
        assert reply.text == "Orchestra" and reply.cost == pytest.approx(0.001) and reply.confidence > 0.5
