"""Helpers shared by the Maestro-Mini generators: per-item random streams, fonts, PNG output,
word and code vocabularies, the handwritten-digit renderer.

Determinism: every item is a pure function of (seed, benchmark, index). Randomness comes from
`item_rng` (Python's `random.Random`, for discrete choices) and `item_np_rng` (NumPy's PCG64,
for noise arrays), both seeded from a SHA-256 of those three values, so item i never depends on
how many items were generated before it (`generate(n, seed, dir, start=k)` gives the items
k..k+n-1 of the same stream). Fonts are the DejaVu files bundled with matplotlib, never system
fonts, so the pixels do not depend on the machine.
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFont

Progress = Callable[[int, int], None]
"""`progress(done, total)` called by a generator after each item."""


def stable_int(*parts: object, bits: int = 63) -> int:
    """A non-negative integer from a SHA-256 of the parts (stable across runs and machines)."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") & ((1 << bits) - 1)


def item_rng(seed: int, benchmark: str, index: int, *extra: object) -> random.Random:
    return random.Random(stable_int("maestro-mini", seed, benchmark, index, *extra))


def item_np_rng(seed: int, benchmark: str, index: int, *extra: object) -> np.random.Generator:
    return np.random.default_rng(stable_int("maestro-mini-np", seed, benchmark, index, *extra))


def item_id(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}"


def check_args(n: int, start: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an integer >= 0, got {start!r}")


# --------------------------------------------------------------------------- images

def font_path(name: str = "DejaVuSans.ttf") -> Path:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise FileNotFoundError(f"font {name} not found in matplotlib's data folder ({path.parent})")
    return path


@functools.lru_cache(maxsize=256)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(name)), size)


TEXT_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
"""Fonts the text generators draw with (all bundled with matplotlib)."""


def png_bytes(img: Image.Image) -> bytes:
    """PNG bytes of an RGB image, without metadata (same pixels -> same bytes)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def write_png(img: Image.Image, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(img))
    return path.resolve()


def add_noise(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    """Gaussian pixel noise (the same value on the three channels: grey noise)."""
    if sigma <= 0:
        return img
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    noise = rng.normal(0.0, sigma, size=a.shape[:2]).astype(np.float32)[..., None]
    return Image.fromarray(np.clip(np.rint(a + noise), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=1)
def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float in 0..16, targets (1797,) int) from scikit-learn (offline)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float64), d.target.astype(np.int64)


def digit_pool(benchmark: str) -> np.ndarray:
    """Indices of the scikit-learn digits a benchmark may use. `digits` and `hires` use
    disjoint pools, so no handwritten sample appears in both."""
    images, _ = sklearn_digits()
    idx = np.arange(len(images))
    if benchmark == "hires":
        return idx[idx % 4 == 3]
    return idx[idx % 4 != 3]


@functools.lru_cache(maxsize=64)
def _pool_order(seed: int, benchmark: str) -> tuple[int, ...]:
    pool = [int(i) for i in digit_pool(benchmark)]
    random.Random(stable_int("digit-pool", seed, benchmark)).shuffle(pool)
    return tuple(pool)


def digit_sample(seed: int, benchmark: str, index: int) -> int:
    """The scikit-learn digit used by item `index`: a seeded permutation of the benchmark's
    pool, so items 0..len(pool)-1 never share a sample (then the order repeats)."""
    order = _pool_order(seed, benchmark)
    return order[index % len(order)]


def render_digit(pixels8: np.ndarray, size: int) -> Image.Image:
    """An 8x8 scikit-learn digit (0..16, 16 = ink) as DARK INK ON A WHITE background, upscaled
    bilinearly to size x size. Shared by `digits` and `hires` so both look the same."""
    ink = np.clip(pixels8 / 16.0, 0.0, 1.0)
    small = Image.fromarray(np.rint(255.0 * (1.0 - ink)).astype(np.uint8), "L")
    return small.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


# --------------------------------------------------------------------------- vocabularies

WORDS: tuple[str, ...] = tuple("""
anchor apple arrow autumn bakery balloon bamboo banner barrel basket beacon bicycle blanket
bottle bridge bronze bucket butter cabin cactus camera candle canyon carpet castle cattle
cellar cement chalk cherry chimney circus cloud clover cobalt coffee copper cotton cradle
crystal curtain dagger desert diamond dolphin donkey dragon drawer eagle elbow engine falcon
feather fender ferry fiddle finger forest fossil fountain garden garlic ginger glacier glove
goblet granite gravel guitar hammer harbor harvest helmet hollow honey horizon insect island
jacket jungle kettle kitten ladder lantern lemon lizard locket magnet mango marble meadow
melon mirror monkey mortar muffin napkin needle nickel noodle oyster paddle palace panther
parcel pebble pepper pillow pirate planet pocket potato powder puzzle rabbit radish rocket
saddle salmon sandal saucer scarf shadow shovel silver sparrow spider spinach sponge statue
steeple summit sunset swallow tablet teapot temple thistle thunder timber tomato tower
tractor trumpet tulip tunnel turnip valley velvet violin walnut wander whistle willow window
winter wizard wagon yellow zipper almond beaver biscuit blossom cabbage canvas chestnut
compass cricket dimple elephant emerald gazelle hedgehog jasmine juniper kayak lagoon
lobster mantle meteor mitten nutmeg orchard pelican pumpkin quartz raccoon sapphire
scooter sequoia trellis tundra upland vessel walrus
""".split())
"""Common English nouns (4-8 letters, lower case) for the text-reading images."""

CODE_LETTERS = "ACDEFGHJKMNPQRTUVWXY"
"""Letters used in codes: no O/I/L/S/Z/B, which OCR confuses with digits."""
CODE_DIGITS = "346789"
"""Digits used in codes: no 0/1/2/5 (O, I/L, Z, S look-alikes); 8 stays because B is excluded."""


def random_code(rng: random.Random) -> str:
    """A short code like 'K7Q-42': three letters/digits (at least one letter and one digit),
    a hyphen, two digits."""
    while True:
        head = "".join(rng.choice(CODE_LETTERS + CODE_DIGITS) for _ in range(3))
        if any(c in CODE_LETTERS for c in head) and any(c in CODE_DIGITS for c in head):
            break
    return f"{head}-{rng.choice(CODE_DIGITS)}{rng.choice(CODE_DIGITS)}"
