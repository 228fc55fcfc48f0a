"""Image tools for solver steps: find a small bordered region and zoom into it.

`zoom_box` looks for the most box-like closed rectangle that is small relative to the image
(a label, a sticker, a framed code) with OpenCV contours, crops it with a margin and upscales
it, so an OCR or digit expert can read what full-image reading misses. It computes only from
the pixels. Crops are written content-addressed under $MAESTRO_HOME/tmp/crops, so the same
input gives the same file.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from maestro_core.tools import ToolOutput
from maestro_core.weights import maestro_home

MAX_PIXELS = 50_000_000


def image_digest(path: str | Path) -> str:
    """sha256 of the file's bytes, read once per (path, modification time, size) in this
    process (the expert cache's keys and the OCR models' ReadMemo both ask for it per call)."""
    st = os.stat(path)
    return _file_digest(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=65536)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def find_box(gray: np.ndarray, *, min_frac: float = 1e-4, max_frac: float = 0.08) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the best small rectangular frame in a grayscale image, or None."""
    import cv2

    h, w = gray.shape
    # dark strokes on a light page; Otsu picks the ink threshold per image
    _, ink = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    contours, _ = cv2.findContours(ink, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    best, best_score = None, 0.0
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        area = bw * bh
        if not (min_frac * h * w <= area <= max_frac * h * w) or bw < 12 or bh < 12:
            continue
        peri = cv2.arcLength(c, True)
        approx = cv2.approxPolyDP(c, 0.02 * peri, True)
        if len(approx) != 4 or not cv2.isContourConvex(approx):
            continue
        rect = cv2.contourArea(approx) / area  # 1.0 for an axis-aligned rectangle
        inside = ink[y + 3:y + bh - 3, x + 3:x + bw - 3]
        fill = float(inside.mean()) / 255 if inside.size else 0.0
        if rect < 0.85 or not 0.005 < fill < 0.6:  # a frame with something (not solid) inside
            continue
        score = rect * min(fill * 10, 1.0)
        if score > best_score:
            best, best_score = (x, y, x + bw, y + bh), score
    return best


def zoom_box(text: str, images: list[Path], scale: float = 3.0, margin: int = 4) -> ToolOutput:
    """Crop the first image to its small framed region and upscale it; the crop replaces the
    images for the next steps. Without a region, the images stay and the text says so."""
    if not images:
        return ToolOutput("no image to zoom into", confidence=0.0)
    path = Path(images[0])
    with Image.open(path) as im:
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"image {path.name} has {im.width * im.height} pixels, over the {MAX_PIXELS} limit")
        rgb = im.convert("RGB")
    gray = np.asarray(rgb.convert("L"))
    box = find_box(gray)
    if box is None:
        return ToolOutput("no framed region found", confidence=0.0)
    x0, y0, x1, y1 = box
    # inside the frame: the border itself confuses OCR
    x0, y0, x1, y1 = x0 + margin, y0 + margin, x1 - margin, y1 - margin
    crop = rgb.crop((x0, y0, x1, y1))
    crop = crop.resize((max(1, int(crop.width * scale)), max(1, int(crop.height * scale))), Image.LANCZOS)
    digest = hashlib.sha256(path.read_bytes() + repr((box, scale, margin)).encode()).hexdigest()[:24]
    out = maestro_home().resolve() / "tmp" / "crops" / f"{digest}.png"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        crop.save(tmp, format="PNG")
        os.replace(tmp, out)
    return ToolOutput(f"zoomed into region {box}", confidence=1.0, images=(out,))
