"""Maestro-Mini `digits`: name the handwritten digit in a small image.

Images: 96x96 RGB PNG, DARK INK ON A WHITE BACKGROUND (the same rendering as the digit boxes
of `hires`): a scikit-learn `load_digits` 8x8 sample (values 0..16) upscaled bilinearly to
72x72 and centred with a 12 px white margin. Samples: the indices i with i % 4 != 3 (1347
samples; `hires` uses the others), in a seeded order, so items 0..1346 of a seed never repeat
a sample. Question: "What digit is shown in the image?"; answer "0".."9"; scorer exact.

What solves it: `digit-cnn` (an MNIST CNN): invert to white-on-black and resize to 28x28
(the digit then fills ~21x21 px with a ~3.5 px margin, close to MNIST's 20x20 in 28x28).
OCR engines and text LMs do poorly: this is the blurry, blocky 8x8 scikit-learn data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from maestro_core.benchmarks._common import (Progress, check_args, digit_sample, item_id, render_digit,
                                             sklearn_digits, write_png)
from maestro_core.dataset import Item

BENCHMARK = "digits"
ID_PREFIX = "digit"
SCORER = "exact"
SIZE = 96
DIGIT_SIZE = 72
QUESTION = "What digit is shown in the image?"


def render(pixels8) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    off = (SIZE - DIGIT_SIZE) // 2
    img.paste(render_digit(pixels8, DIGIT_SIZE), (off, off))
    return img


def generate_with_meta(n: int, seed: int, image_dir: Path, *, start: int = 0,
                       progress: Progress | None = None) -> list[tuple[Item, dict[str, Any]]]:
    """Items start..start+n-1 with their side-table metadata (the scikit-learn sample index)."""
    check_args(n, start)
    image_dir = Path(image_dir)
    images, targets = sklearn_digits()
    out = []
    for k, i in enumerate(range(start, start + n)):
        iid = item_id(ID_PREFIX, i)
        sample = digit_sample(seed, BENCHMARK, i)
        path = write_png(render(images[sample]), image_dir / f"{iid}.png")
        out.append((Item(id=iid, benchmark=BENCHMARK, question=QUESTION, answer=str(int(targets[sample])),
                         scorer=SCORER, images=(str(path),)), {"sklearn_index": sample}))
        if progress:
            progress(k + 1, n)
    return out


def generate(n: int, seed: int, image_dir: Path, *, start: int = 0,
             progress: Progress | None = None) -> list[Item]:
    """`n` digit items for `seed`, PNGs written to `image_dir/<id>.png`."""
    return [item for item, _ in generate_with_meta(n, seed, image_dir, start=start, progress=progress)]
