"""Maestro-Mini `text_reading`: read a word or a code printed in an image.

Images: 800x300 RGB PNG, dark text (grey level 0-70) on a light background (225-255), drawn
with PIL in a DejaVu font bundled with matplotlib (Sans, Sans Bold, Serif, Sans Mono), then
optionally blurred (Gaussian, radius <= 1.0) and given grey Gaussian pixel noise (sigma <= 18).
Font sizes (PIL pixel sizes) come in three classes: large 28-40 px, medium 15-18 px and SMALL
8-10 px (small text gets at most sigma 8 noise and radius 0.4 blur, and only the Sans fonts).

Layouts:
  - single line (55%): one word ("lantern") or one code ("K7Q-42": three letters/digits from an
    alphabet without O/0, I/1, S/5, Z/2, B, a hyphen, two digits) at any size class;
    "What is the word in the image?" / "What is the code in the image?"
  - several lines (45%): 2-4 words, one per line; the lines above are large or medium, the
    LAST line is small in about half of the items (else medium or large);
    "What is the word on the last line?"
  - item 3 of every seed (when generated): a real photographed book page,
    skimage.data.page() (384x191), "What is the title at the top of the page?" ->
    "Region-based segmentation" (read by hand from the image).
Size, noise and blur never appear in the question or the id; they are in the side table
(`generate_with_meta`) for analysis. Answers are lower-case words or upper-case codes; the
`exact` scorer ignores case.

What solves it: OCR. tesseract reads clean large and medium text but misses small or noisy
text; rapidocr reads small (>= 9 px) and noisy text but is slower; upscaling the image (or
the crop around the small line) before OCR helps both. For "last line", take the lowest OCR
box (by y), not the last token of a merged text.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from maestro_core.benchmarks._common import (TEXT_FONTS, WORDS, Progress, add_noise, check_args, font, item_id,
                                             item_np_rng, item_rng, random_code, write_png)
from maestro_core.dataset import Item

BENCHMARK = "text_reading"
ID_PREFIX = "text"
SCORER = "exact"
WIDTH, HEIGHT = 800, 300
SIZE_CLASSES = {"large": (28, 40), "medium": (15, 18), "small": (8, 10)}
PAGE_INDEX = 3
PAGE_QUESTION = "What is the title at the top of the page?"
PAGE_ANSWER = "Region-based segmentation"
"""Hand-verified: the heading of skimage.data.page() reads "Region-based segmentation"."""

Q_WORD = "What is the word in the image?"
Q_CODE = "What is the code in the image?"
Q_LAST = "What is the word on the last line?"


def _size(rng: random.Random, cls: str) -> int:
    lo, hi = SIZE_CLASSES[cls]
    return rng.randint(lo, hi)


def _plan(rng: random.Random) -> dict[str, Any]:
    """The item's text, sizes, font and degradations (everything but pixels)."""
    if rng.random() < 0.55:
        is_code = rng.random() < 0.5
        text = random_code(rng) if is_code else rng.choice(WORDS)
        cls = rng.choices(["large", "medium", "small"], weights=[30, 35, 35])[0]
        lines = [(text, cls)]
        question, answer, layout = (Q_CODE if is_code else Q_WORD), text, "single"
    else:
        n = rng.randint(2, 4)
        words = rng.sample(WORDS, n)
        last = rng.choices(["small", "medium", "large"], weights=[55, 30, 15])[0]
        lines = [(w, rng.choice(["large", "medium"])) for w in words[:-1]] + [(words[-1], last)]
        question, answer, layout = Q_LAST, words[-1], "lines"
    small = any(c == "small" for _, c in lines)
    fonts = TEXT_FONTS[:2] if small else TEXT_FONTS
    return {
        "layout": layout, "question": question, "answer": answer,
        "lines": [{"text": t, "size_class": c, "size": _size(rng, c)} for t, c in lines],
        "font": rng.choice(fonts),
        "noise_sigma": rng.choice([0, 0, 4, 8] if small else [0, 0, 6, 12, 18]),
        "blur_radius": rng.choice([0.0, 0.4] if small else [0.0, 0.0, 0.6, 1.0]),
        "background": rng.randint(225, 255), "ink": rng.randint(0, 70),
        "target_size_class": lines[-1][1],
    }


def render(plan: dict[str, Any], rng: random.Random, np_rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (WIDTH, HEIGHT), (plan["background"],) * 3)
    draw = ImageDraw.Draw(img)
    boxes = []
    for line in plan["lines"]:
        f = font(plan["font"], line["size"])
        x0, y0, x1, y1 = draw.textbbox((0, 0), line["text"], font=f)
        boxes.append((f, x0, y0, x1 - x0, y1 - y0))
    # lines form a left-aligned block (x jitter <= 12 px); the gap above a line is at least
    # half the taller of the two lines, so "last line" (lowest) is never ambiguous
    gaps = [0] + [max(10, int(0.5 * max(boxes[k - 1][4], boxes[k][4]))) for k in range(1, len(boxes))]
    total = sum(h for *_, h in boxes) + sum(gaps)
    widest = max(w for _, _, _, w, _ in boxes)
    y = rng.randint(15, max(15, HEIGHT - 15 - total))
    left = rng.randint(32, max(32, WIDTH - 32 - widest))
    for k, (line, (f, ox, oy, w, h)) in enumerate(zip(plan["lines"], boxes)):
        y += gaps[k]
        x = left + rng.randint(-12, 12)
        draw.text((x - ox, y - oy), line["text"], font=f, fill=(plan["ink"],) * 3)
        line["box"] = [x, y, x + w, y + h]
        y += h
    if plan["blur_radius"] > 0:
        img = img.filter(ImageFilter.GaussianBlur(plan["blur_radius"]))
    return add_noise(img, np_rng, plan["noise_sigma"])


def page_image() -> Image.Image:
    from skimage import data

    return Image.fromarray(np.asarray(data.page(), dtype=np.uint8), "L").convert("RGB")


def generate_with_meta(n: int, seed: int, image_dir: Path, *, start: int = 0,
                       progress: Progress | None = None) -> list[tuple[Item, dict[str, Any]]]:
    """Items start..start+n-1 with their side-table metadata (sizes, noise, blur, font, boxes)."""
    check_args(n, start)
    image_dir = Path(image_dir)
    out = []
    for k, i in enumerate(range(start, start + n)):
        iid = item_id(ID_PREFIX, i)
        if i == PAGE_INDEX:
            img = page_image()
            question, answer = PAGE_QUESTION, PAGE_ANSWER
            meta: dict[str, Any] = {"layout": "page", "source": "skimage.data.page", "target_size_class": "real"}
        else:
            rng = item_rng(seed, BENCHMARK, i)
            plan = _plan(rng)
            img = render(plan, rng, item_np_rng(seed, BENCHMARK, i))
            question, answer = plan["question"], plan["answer"]
            meta = {key: v for key, v in plan.items() if key not in ("question", "answer")}
        path = write_png(img, image_dir / f"{iid}.png")
        out.append((Item(id=iid, benchmark=BENCHMARK, question=question, answer=answer, scorer=SCORER,
                         images=(str(path),)), meta))
        if progress:
            progress(k + 1, n)
    return out


def generate(n: int, seed: int, image_dir: Path, *, start: int = 0,
             progress: Progress | None = None) -> list[Item]:
    """`n` text-reading items for `seed`, PNGs written to `image_dir/<id>.png`."""
    return [item for item, _ in generate_with_meta(n, seed, image_dir, start=start, progress=progress)]
