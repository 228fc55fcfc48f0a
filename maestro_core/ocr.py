"""OCR experts as in-process Python models (`backend: {kind: python, callable: ...}`).

    backend: {kind: python, callable: "maestro_core.ocr:rapidocr_model"}
    backend: {kind: python, callable: "maestro_core.ocr:tesseract_model"}

Each factory returns `model(text, images) -> {"text", "confidence"}`:

- It reads the first image (all of them with the factory's `all_images=True`, their results
  joined by a blank line, or for boxes concatenated with an "image" index on each box).
- If the prompt text contains the marker "[boxes]", the answer text is a JSON list of
  {"text": str, "box": [x0, y0, x1, y1], "conf": float} (ints in the image's pixel
  coordinates, conf in [0, 1]) in reading order; otherwise it is the detected lines in reading
  order, one per line.
- Reading order: top to bottom, then left to right; lines whose vertical extents overlap by
  more than half the smaller height form one row.
- confidence is the mean of the line confidences; with nothing detected it is 0.0 and the
  text says "(no text found)" (or "[]" with "[boxes]").
- Images are read as they are (zooming is the solver's business), but one over
  MAX_PIXELS (50 megapixels) raises ValueError, and so does a call without an image.
- What an engine reads depends on the image alone, so each model keeps the lines it read for
  its last `memo` images (by file content; default 1024, 0: off): one image asked about by
  several skills (a chart's boxes, then its text lines) runs the engine once. The reply's
  `latency_s` is the engine time the answer took when it was read, so latency figures do not
  depend on which skill asked first.

RapidOCR (PP-OCRv4 ONNX models shipped in rapidocr_onnxruntime) gives line boxes directly and
reads small print well (8 px text exactly, where Tesseract garbles it), but its recogniser
often drops the spaces between words on dense lines ("Invoicetotal:") and it costs one
recognition pass per detected line: ~50-200 ms for a few lines, ~6 s for a 30-line page on one
core. Its engine loads once per model object (~0.3 s). Tesseract 5 runs as a subprocess of the
`tesseract` binary with TSV output, its words grouped into its lines: ~0.1-0.2 s for a few
lines, ~1.2 s for the same page, exact on clean print of 10 px and more.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from maestro_core.imagetools import image_digest

BOXES_MARKER = "[boxes]"
NO_TEXT = "(no text found)"
MAX_PIXELS = 50_000_000
"""Images larger than this (in pixels) are refused: a sign of a wrong file, and OCR on them
would take minutes."""


@dataclass(frozen=True)
class OcrLine:
    """One detected line: its text, its box (x0, y0, x1, y1) in pixels, its confidence in [0, 1]."""

    text: str
    box: tuple[int, int, int, int]
    conf: float

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "box": list(self.box), "conf": round(self.conf, 4)}


# ---------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------

def check_image(path: Path) -> tuple[int, int]:
    """(width, height) of the image at `path`, read from its header; ValueError if it is not
    an image or has more than MAX_PIXELS pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise ValueError(f"image file '{path}' does not exist") from None
    except Exception as e:  # noqa: BLE001  (PIL raises many kinds for a non-image)
        raise ValueError(f"'{path}' is not a readable image ({type(e).__name__}: {e})") from e
    if w * h > MAX_PIXELS:
        raise ValueError(f"image '{Path(path).name}' is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the "
                         f"limit of {MAX_PIXELS / 1e6:g} megapixels (MAX_PIXELS); crop or downscale it first")
    return w, h


def load_rgb(path: Path) -> Any:
    """The image as an RGB PIL image; transparency is composited onto white (as on paper)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, im).convert("RGB")
        return im.convert("RGB")


def reading_order(lines: Sequence[OcrLine]) -> list[OcrLine]:
    """Top to bottom, then left to right; lines overlapping vertically by more than half of
    the smaller height share a row."""
    rows: list[list[OcrLine]] = []
    for ln in sorted(lines, key=lambda ln: ((ln.box[1] + ln.box[3]) / 2, ln.box[0])):
        if rows:
            row = rows[-1]
            top = min(r.box[1] for r in row)
            bottom = max(r.box[3] for r in row)
            overlap = min(bottom, ln.box[3]) - max(top, ln.box[1])
            smaller = min(bottom - top, ln.box[3] - ln.box[1])
            if smaller > 0 and overlap > 0.5 * smaller:
                row.append(ln)
                continue
        rows.append([ln])
    return [ln for row in rows for ln in sorted(row, key=lambda ln: ln.box[0])]


def format_reply(results: Sequence[list[OcrLine]], prompt: str) -> dict[str, Any]:
    """The model's reply for the lines read from each image (already in reading order)."""
    all_lines = [ln for lines in results for ln in lines]
    conf = sum(ln.conf for ln in all_lines) / len(all_lines) if all_lines else 0.0
    if BOXES_MARKER in prompt:
        items = []
        for k, lines in enumerate(results):
            for ln in lines:
                d = ln.to_dict()
                if len(results) > 1:
                    d["image"] = k
                items.append(d)
        text = json.dumps(items, ensure_ascii=False)
    else:
        blocks = ["\n".join(ln.text for ln in lines) if lines else NO_TEXT for lines in results]
        text = "\n\n".join(blocks) if all_lines else NO_TEXT
    return {"text": text, "confidence": max(0.0, min(1.0, conf))}


class ReadMemo:
    """The lines an engine read, per image content (`image_digest`: sha256 of the file), for
    the last `size` images, with the seconds each read took. A read of an image being read by
    another thread waits for that read instead of running the engine again; a read that raises
    is not kept."""

    def __init__(self, read: Callable[[Path], list[OcrLine]], size: int = 1024):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"memo must be a whole number of images >= 0, got {size!r}; use e.g. 1024, or 0 to "
                             "turn the memo off")
        self._read = read
        self.size = size
        self._lines: OrderedDict[str, tuple[list[OcrLine], float]] = OrderedDict()
        self._lock = threading.Lock()
        self._reading: dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def __call__(self, path: Path) -> tuple[list[OcrLine], float]:
        """(lines read from the image at `path`, seconds the engine took to read them)."""
        if self.size <= 0:
            t0 = time.perf_counter()
            lines = self._read(path)
            return lines, time.perf_counter() - t0
        key = image_digest(path)
        with self._lock:
            reading = self._reading.setdefault(key, threading.Lock())
        with reading:
            with self._lock:
                kept = self._lines.get(key)
                if kept is not None:
                    self._lines.move_to_end(key)
                    self.hits += 1
                    return list(kept[0]), kept[1]
            try:
                t0 = time.perf_counter()
                lines = self._read(path)
                seconds = time.perf_counter() - t0
                with self._lock:
                    self._lines[key] = (list(lines), seconds)
                    while len(self._lines) > self.size:
                        self._lines.popitem(last=False)
                    self.misses += 1
            finally:
                with self._lock:
                    self._reading.pop(key, None)
        return lines, seconds


def _make_model(read: Callable[[Path], list[OcrLine]], all_images: bool,
                memo: int) -> Callable[[str, list[Path]], dict]:
    reads = ReadMemo(read, memo)

    def model(text: str, images: list[Path]) -> dict[str, Any]:
        if not images:
            raise ValueError("no image given: an OCR model reads the text of an image; pass one")
        start = time.perf_counter()
        chosen = list(images) if all_images else list(images)[:1]
        for p in chosen:
            check_image(Path(p))
        results, waited, engine = [], 0.0, 0.0
        for p in chosen:
            t0 = time.perf_counter()
            lines, seconds = reads(Path(p))
            waited += time.perf_counter() - t0
            engine += seconds
            results.append(reading_order(lines))
        reply = format_reply(results, text)
        # this call's own work, with each image's engine time as it was when that image was read
        reply["latency_s"] = max(0.0, time.perf_counter() - start - waited) + engine
        return reply

    model.memo = reads  # type: ignore[attr-defined]  (hits and misses, for measurements and tests)
    return model


# ---------------------------------------------------------------------------------------
# RapidOCR
# ---------------------------------------------------------------------------------------

def rapidocr_model(*, all_images: bool = False, threads: int | None = None, text_score: float = 0.5,
                   memo: int = 1024, **params: Any) -> Callable[[str, list[Path]], dict]:
    """RapidOCR (PP-OCRv4 detection + recognition, ONNX Runtime), loaded once.

    threads: ONNX Runtime intra-op threads (default: $OMP_NUM_THREADS, else ONNX Runtime's
    choice). text_score: lines scoring below it are dropped. memo: images whose lines are kept
    (ReadMemo; 0: off). Other keyword arguments go to `RapidOCR(...)`. Two defaults differ
    from the package's: det_limit_type="max" (the detector never upscales; the package's
    "min"/736 upscales a 60-pixel-high line ~12x and was 10-20x slower and less accurate on
    rendered text) and width_height_ratio=-1 (no letterboxing of long single lines)."""
    from rapidocr_onnxruntime import RapidOCR

    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    kw = {"det_limit_type": "max", "width_height_ratio": -1, **params}
    if threads:
        kw.setdefault("intra_op_num_threads", int(threads))
        kw.setdefault("inter_op_num_threads", 1)
    engine = RapidOCR(text_score=text_score, **kw)
    lock = threading.Lock()  # one image at a time through the engine's sessions

    def read(path: Path) -> list[OcrLine]:
        import numpy as np

        img = np.asarray(load_rgb(path))[:, :, ::-1].copy()  # RGB -> BGR, as the engine expects
        h, w = img.shape[:2]
        with lock:
            result, _ = engine(img)
        lines = []
        for pts, txt, score in result or []:
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            box = (max(0, int(min(xs))), max(0, int(min(ys))), min(w, int(round(max(xs)))), min(h, int(round(max(ys)))))
            txt = str(txt).strip()
            if txt:
                lines.append(OcrLine(txt, box, float(score)))
        return lines

    return _make_model(read, all_images, memo)


# ---------------------------------------------------------------------------------------
# Tesseract
# ---------------------------------------------------------------------------------------

TESSERACT = "/usr/bin/tesseract"


def tesseract_model(*, all_images: bool = False, lang: str = "eng", psm: int = 3, oem: int = 1,
                    binary: str | None = None, threads: int = 1, timeout_s: float = 60.0,
                    memo: int = 1024) -> Callable[[str, list[Path]], dict]:
    """Tesseract 5 through its command line (TSV output), one subprocess per image.

    psm 3 (fully automatic page segmentation) suits pages, charts and single lines alike;
    when it finds nothing, the image is read again with psm 11 (sparse text: isolated words
    anywhere), which rescues lone words and labels. oem 1 is the LSTM engine. threads sets
    OMP_THREAD_LIMIT for the subprocess (tesseract's OpenMP threads only slow small images).
    memo: images whose lines are kept (ReadMemo; 0: off)."""
    exe = binary or (TESSERACT if Path(TESSERACT).exists() else shutil.which("tesseract"))
    if not exe or not Path(exe).exists():
        raise FileNotFoundError("the tesseract binary is not installed. Fix: apt-get install tesseract-ocr "
                                "tesseract-ocr-eng, or pass binary=PATH.")
    env = {**os.environ, "OMP_THREAD_LIMIT": str(threads)}

    def run(path: Path, mode: int) -> list[OcrLine]:
        cmd = [exe, str(path), "stdout", "-l", lang, "--oem", str(oem), "--psm", str(mode), "tsv"]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, env=env, check=False)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"tesseract took longer than {timeout_s:g} s on '{path.name}'") from None
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"tesseract failed (exit {proc.returncode}) on '{path.name}': "
                               f"{err[-1] if err else 'no message'}")
        return parse_tsv(proc.stdout.decode("utf-8", errors="replace"))

    def read(path: Path) -> list[OcrLine]:
        path = _tesseract_readable(path)
        try:
            lines = run(path, psm)
            if not lines and psm != 11:
                lines = run(path, 11)
            return lines
        finally:
            if path.name.startswith(".maestro-ocr-"):
                path.unlink(missing_ok=True)

    return _make_model(read, all_images, memo)


def _tesseract_readable(path: Path) -> Path:
    """`path` itself, or a temporary flattened RGB PNG (in the temp folder) for images that
    Leptonica reads badly (transparency, palette, 16-bit, other formats)."""
    from PIL import Image

    with Image.open(path) as im:
        fmt, mode = im.format, im.mode
    if fmt in ("PNG", "JPEG", "TIFF", "BMP") and mode in ("RGB", "L", "1"):
        return path
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=".maestro-ocr-", suffix=".png")
    os.close(fd)
    load_rgb(path).save(tmp)
    return Path(tmp)


def parse_tsv(tsv: str) -> list[OcrLine]:
    """Tesseract's TSV words grouped into lines (block, paragraph, line): text joined by
    spaces, box = union of the word boxes, conf = mean word confidence / 100."""
    lines: dict[tuple[int, int, int, int], list[tuple[str, int, int, int, int, float]]] = {}
    for row in csv.DictReader(io.StringIO(tsv), delimiter="\t", quoting=csv.QUOTE_NONE):
        try:
            if int(row["level"]) != 5:
                continue
            word = (row.get("text") or "").strip()
            conf = float(row["conf"])
            if not word or conf < 0:
                continue
            x, y, w, h = (int(row[k]) for k in ("left", "top", "width", "height"))
            key = (int(row["page_num"]), int(row["block_num"]), int(row["par_num"]), int(row["line_num"]))
        except (KeyError, TypeError, ValueError):
            continue
        lines.setdefault(key, []).append((word, x, y, x + w, y + h, conf))
    out = []
    for words in lines.values():
        words.sort(key=lambda t: t[1])
        # tesseract joins words far apart on one baseline (a chart's axis labels, a label and
        # its value): split where the gap is wider than the line is tall
        height = max(t[4] - t[2] for t in words)
        groups = [[words[0]]]
        for w in words[1:]:
            if w[1] - groups[-1][-1][3] > 1.5 * height:
                groups.append([w])
            else:
                groups[-1].append(w)
        for g in groups:
            text = " ".join(t[0] for t in g)
            box = (min(t[1] for t in g), min(t[2] for t in g), max(t[3] for t in g), max(t[4] for t in g))
            conf = sum(t[5] for t in g) / len(g) / 100.0
            out.append(OcrLine(text, box, max(0.0, min(1.0, conf))))
    return out
