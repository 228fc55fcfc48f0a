"""Benchmark items and the JSONL dataset format.

One item per line: `id`, `benchmark`, `question`, `images` (paths relative to the file),
`answer`, `scorer` (exact | numeric | choice | math), optional `choices` and `split`.
`load_jsonl` validates every line; a bad line is reported with its line number, its id and
the fix, and (with `quarantine=`) set aside while the other items load. Every image must be
a file Pillow can identify, of at most `max_pixels` pixels (MAX_IMAGE_PIXELS, 50 megapixels,
the limit the OCR and zoom tools also enforce), checked from its header and checksums, never
decoded.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from maestro_core.errors import ConfigError

SCORER_NAMES = ("exact", "numeric", "choice", "math")
MAX_IMAGE_PIXELS = 50_000_000
"""Largest image (width x height) an item may have; like ocr.MAX_PIXELS and imagetools.MAX_PIXELS."""


@dataclass(frozen=True)
class Item:
    """One benchmark question. The policy sees `question` and image descriptors, never `answer`."""

    id: str
    benchmark: str
    question: str
    answer: str
    scorer: str
    images: tuple[str, ...] = ()
    """Absolute image paths."""
    choices: tuple[str, ...] | None = None
    split: str | None = None


def check_image(path: Path, *, max_pixels: int = MAX_IMAGE_PIXELS, where: str = "item", entry: str = "?") -> None:
    """Raise ConfigError unless `path` is an image Pillow can identify and verify, with at
    most `max_pixels` pixels. Nothing is decoded: a decompression bomb is refused by its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit
            with Image.open(path) as im:
                w, h = im.size
                if w * h <= max_pixels:
                    im.verify()  # PNG: every chunk's checksum, so a truncated file is caught; no decoding
    except Image.DecompressionBombError as e:
        raise ConfigError(f"image {path} is far over the pixel limit ({e}).", source=where, entry=entry,
                          field="images", fix=f"downscale or crop it to at most {max_pixels / 1e6:g} megapixels.") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ConfigError(f"image {path} is not a readable image ({type(e).__name__}: {e}).", source=where,
                          entry=entry, field="images",
                          fix="replace the file with a valid PNG or JPEG, or remove it from 'images'.") from e
    if w * h > max_pixels:
        raise ConfigError(f"image {path} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                          f"({max_pixels / 1e6:g} megapixels).", source=where, entry=entry, field="images",
                          fix=f"downscale or crop it to at most {max_pixels / 1e6:g} megapixels, or raise "
                              "max_pixels where the dataset is loaded.")


def item_from_dict(d: dict, *, base: Path | None = None, where: str = "item",
                   max_pixels: int = MAX_IMAGE_PIXELS) -> Item:
    if not isinstance(d, dict):
        raise ConfigError("must be a JSON object.", source=where, fix="write one JSON object per line.")
    for key in ("id", "benchmark", "question", "answer", "scorer"):
        if key not in d or not isinstance(d[key], (str, int, float)) or isinstance(d[key], bool) or str(d[key]).strip() == "":
            raise ConfigError("missing or empty.", source=where, entry=str(d.get("id", "?")), field=key,
                              fix=f"give every item a non-empty '{key}'.")
    if d["scorer"] not in SCORER_NAMES:
        raise ConfigError(f"unknown scorer '{d['scorer']}'.", source=where, entry=str(d["id"]), field="scorer",
                          fix=f"use one of {list(SCORER_NAMES)}.")
    images = d.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ConfigError("must be a list of image paths.", source=where, entry=str(d["id"]), field="images",
                          fix="write e.g. \"images\": [\"img/0001.png\"] (paths relative to the JSONL file).")
    paths = []
    for p in images:
        path = (base / p) if base is not None and not Path(p).is_absolute() else Path(p)
        if not path.is_file():
            raise ConfigError(f"image not found: {path}.", source=where, entry=str(d["id"]), field="images",
                              fix="put the image beside the JSONL file or correct the relative path.")
        check_image(path, max_pixels=max_pixels, where=where, entry=str(d["id"]))
        paths.append(str(path.resolve()))
    choices = d.get("choices")
    if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
        raise ConfigError("must be a list of strings.", source=where, entry=str(d["id"]), field="choices",
                          fix="write the options in letter order, e.g. [\"red\", \"blue\"].")
    split = d.get("split")
    if split is not None and not isinstance(split, str):
        raise ConfigError(f"must be a string, got {type(split).__name__}.", source=where, entry=str(d["id"]),
                          field="split", fix="write \"train\", \"val\" or \"test\", or leave it out.")
    return Item(id=str(d["id"]), benchmark=str(d["benchmark"]), question=str(d["question"]), answer=str(d["answer"]),
                scorer=d["scorer"], images=tuple(paths), choices=tuple(choices) if choices else None,
                split=split)


def load_jsonl(path: str | Path, *, quarantine: Callable[[str, str], None] | None = None,
               max_pixels: int = MAX_IMAGE_PIXELS) -> list[Item]:
    """Load items. Without `quarantine` the first bad line raises ConfigError; with it, bad
    lines go to `quarantine(item_id_or_line, reason)` and the rest load. An image over
    `max_pixels` pixels, or one that is not an image, makes its line bad."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("dataset file not found.", source=str(path), fix="pass the path of a JSONL file.")
    items, seen = [], set()
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"invalid JSON ({e.msg}).", source=where, fix="write one JSON object per line.") from e
                except RecursionError as e:  # e.g. "[[[[..." thousands deep
                    raise ConfigError("JSON nested too deeply.", source=where,
                                      fix="write one flat JSON object per line.") from e
                item = item_from_dict(d, base=path.parent, where=where, max_pixels=max_pixels)
                if item.id in seen:
                    raise ConfigError("duplicate id.", source=where, entry=item.id, field="id", fix="give every item a unique id.")
                seen.add(item.id)
                items.append(item)
            except (ConfigError, UnicodeDecodeError) as e:
                err = e if isinstance(e, ConfigError) else ConfigError(
                    "not UTF-8 text.", source=where, fix="save the file as UTF-8.")
                if quarantine is None:
                    raise err from e
                quarantine(where, str(err))
    if not items:
        raise ConfigError("no items.", source=str(path), fix="add at least one JSON line.")
    return items
