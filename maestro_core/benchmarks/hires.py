"""Maestro-Mini `hires`: find one small bordered box on a large cluttered canvas and read it.

Images: RGB PNG, 2400x1800 or 3000x2000, light background (grey 238-255) with light clutter:
faint lines, circle/ellipse outlines and pale filled rectangles (all lighter than grey 185, no
dark borders), and in about half of the items one or two large distractor words in mid grey
(grey 110-170, 30-90 px, never in a box). Exactly ONE small box is drawn on top: a white
rectangle with a dark (grey 0-50) border 2-3 px wide, holding either
  - a code (60%): "K7Q-42" style (alphabet without O/0, I/1, S/5, Z/2, B) in 14-18 px text;
    "What is the code written in the small box?"; 70% of these items also print one or two
    OTHER codes (14-40 px, mid grey, unboxed) elsewhere, so reading every code on the canvas
    is not enough: the answer is the one inside the box;
  - a handwritten digit (40%): a scikit-learn 8x8 digit upscaled bilinearly to 36-44 px, DARK
    INK ON WHITE like the `digits` benchmark (its own pool of samples, disjoint from
    `digits`); "What digit is drawn in the small box?" -> "0".."9"; half of these items also
    print a large unboxed OTHER digit (40-90 px, mid grey) elsewhere.
The box covers well under 1% of the canvas; its position is in the side table
(`generate_with_meta`: box [x0, y0, x1, y1]), never in the question.

What solves it: full-image OCR at a reduced resolution misses the small text (and may return
a distractor instead). A zoom solver finds the box (threshold dark pixels, e.g. grey < 100,
then the rectangular contour with a white interior; the clutter is never that dark), crops it
with a small margin, upscales the crop and sends it to OCR (codes) or to `digit-cnn` (digits,
after inverting to white-on-black and resizing to 28x28 as for MNIST).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from maestro_core.benchmarks._common import (WORDS, Progress, check_args, digit_sample, font, item_id, item_rng,
                                             random_code, render_digit, sklearn_digits, write_png)
from maestro_core.dataset import Item

BENCHMARK = "hires"
ID_PREFIX = "hires"
SCORER = "exact"
CANVAS_SIZES = ((2400, 1800), (3000, 2000))
CODE_TEXT_PX = (14, 18)
DIGIT_PX = (36, 44)
Q_CODE = "What is the code written in the small box?"
Q_DIGIT = "What digit is drawn in the small box?"
EDGE_MARGIN = 80


def _overlaps(a: list[int], b: list[int], pad: int = 0) -> bool:
    return a[0] - pad < b[2] and b[0] - pad < a[2] and a[1] - pad < b[3] and b[1] - pad < a[3]


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int) -> int:
    n = rng.randint(20, 40)
    for _ in range(n):
        shade = rng.randint(185, 235)
        tint = tuple(min(255, shade + rng.randint(-12, 12)) for _ in range(3))
        kind = rng.random()
        x0, y0 = rng.randint(0, w), rng.randint(0, h)
        x1, y1 = x0 + rng.randint(-600, 600), y0 + rng.randint(-600, 600)
        box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        if kind < 0.4:
            draw.line([x0, y0, x1, y1], fill=tint, width=rng.randint(1, 4))
        elif kind < 0.7:
            draw.ellipse(box, outline=tint, width=rng.randint(1, 3))
        else:
            pale = tuple(min(255, c + 15) for c in tint)
            draw.rectangle(box, fill=pale)
    return n


def _place(rng: random.Random, w: int, h: int, bw: int, bh: int, avoid: list[list[int]]) -> list[int]:
    for _ in range(200):
        x = rng.randint(EDGE_MARGIN, w - EDGE_MARGIN - bw)
        y = rng.randint(EDGE_MARGIN, h - EDGE_MARGIN - bh)
        box = [x, y, x + bw, y + bh]
        if not any(_overlaps(box, a, pad=40) for a in avoid):
            return box
    raise RuntimeError("no free place for the box")  # pragma: no cover - the canvas is mostly empty


def make_item(seed: int, index: int) -> tuple[Image.Image, str, str, dict[str, Any]]:
    """(image, question, answer, metadata) of item `index`; a pure function of (seed, index)."""
    rng = item_rng(seed, BENCHMARK, index)
    w, h = rng.choice(CANVAS_SIZES)
    bg = rng.randint(238, 255)
    img = Image.new("RGB", (w, h), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    n_clutter = _clutter(draw, rng, w, h)

    is_code = rng.random() < 0.6
    images, targets = sklearn_digits()
    sample = None if is_code else digit_sample(seed, BENCHMARK, index)
    answer = random_code(rng) if is_code else str(int(targets[sample]))
    distractors: list[dict[str, Any]] = []
    occupied: list[list[int]] = []
    texts = []  # (text, pixel size)
    if rng.random() < 0.5:
        texts += [(rng.choice(WORDS).capitalize(), rng.randint(30, 90)) for _ in range(rng.randint(1, 2))]
    if is_code:
        for _ in range(rng.choices([0, 1, 2], weights=[30, 40, 30])[0]):
            code = random_code(rng)
            while code == answer:
                code = random_code(rng)
            texts.append((code, rng.randint(CODE_TEXT_PX[0], 40)))
    elif rng.random() < 0.5:
        texts.append((rng.choice([d for d in "0123456789" if d != answer]), rng.randint(40, 90)))
    for text, px in texts:
        f = font("DejaVuSans-Bold.ttf" if rng.random() < 0.5 else "DejaVuSans.ttf", px)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=f)
        box = _place(rng, w, h, x1 - x0, y1 - y0, occupied)
        grey = rng.randint(110, 170)
        draw.text((box[0] - x0, box[1] - y0), text, font=f, fill=(grey, grey, grey))
        occupied.append(box)
        distractors.append({"text": text, "box": box})

    border = rng.randint(2, 3)
    ink = rng.randint(0, 50)
    edge = rng.randint(0, 50)
    if is_code:
        size = rng.randint(*CODE_TEXT_PX)
        f = font(rng.choice(["DejaVuSans.ttf", "DejaVuSans-Bold.ttf"]), size)
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), answer, font=f)
        pad = rng.randint(8, 14)
        bw, bh = tx1 - tx0 + 2 * (pad + border), ty1 - ty0 + 2 * (pad + border)
        box = _place(rng, w, h, bw, bh, occupied)
        draw.rectangle(box, fill=(255, 255, 255), outline=(edge,) * 3, width=border)
        draw.text((box[0] + border + pad - tx0, box[1] + border + pad - ty0), answer, font=f, fill=(ink,) * 3)
        question, content = Q_CODE, {"kind": "code", "text_px": size}
    else:
        size = rng.randint(*DIGIT_PX)
        pad = rng.randint(8, 14)
        side = size + 2 * (pad + border)
        box = _place(rng, w, h, side, side, occupied)
        draw.rectangle(box, fill=(255, 255, 255), outline=(edge,) * 3, width=border)
        img.paste(render_digit(images[sample], size), (box[0] + border + pad, box[1] + border + pad))
        question, content = Q_DIGIT, {"kind": "digit", "digit_px": size, "sklearn_index": sample}
    meta = {**content, "canvas": [w, h], "box": box, "border_px": border, "clutter_shapes": n_clutter,
            "distractors": distractors}
    return img, question, answer, meta


def generate_with_meta(n: int, seed: int, image_dir: Path, *, start: int = 0,
                       progress: Progress | None = None) -> list[tuple[Item, dict[str, Any]]]:
    """Items start..start+n-1 with their side-table metadata (box position, kind, sizes)."""
    check_args(n, start)
    image_dir = Path(image_dir)
    out = []
    for k, i in enumerate(range(start, start + n)):
        iid = item_id(ID_PREFIX, i)
        img, question, answer, meta = make_item(seed, i)
        path = write_png(img, image_dir / f"{iid}.png")
        out.append((Item(id=iid, benchmark=BENCHMARK, question=question, answer=answer, scorer=SCORER,
                         images=(str(path),)), meta))
        if progress:
            progress(k + 1, n)
    return out


def generate(n: int, seed: int, image_dir: Path, *, start: int = 0,
             progress: Progress | None = None) -> list[Item]:
    """`n` hires items for `seed`, PNGs written to `image_dir/<id>.png`."""
    return [item for item, _ in generate_with_meta(n, seed, image_dir, start=start, progress=progress)]
