"""Benchmark items and the JSONL dataset format.

One item per line: `id`, `benchmark`, `question`, `images` (paths relative to the file),
`answer`, `scorer` (exact | numeric | choice | math), optional `choices` and `split`.
`load_jsonl` validates every line; a bad line is reported with its line number, its id and
the fix, and (with `quarantine=`) set aside while the other items load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from maestro_core.errors import ConfigError

SCORER_NAMES = ("exact", "numeric", "choice", "math")


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


def item_from_dict(d: dict, *, base: Path | None = None, where: str = "item") -> Item:
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
        paths.append(str(path.resolve()))
    choices = d.get("choices")
    if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
        raise ConfigError("must be a list of strings.", source=where, entry=str(d["id"]), field="choices",
                          fix="write the options in letter order, e.g. [\"red\", \"blue\"].")
    return Item(id=str(d["id"]), benchmark=str(d["benchmark"]), question=str(d["question"]), answer=str(d["answer"]),
                scorer=d["scorer"], images=tuple(paths), choices=tuple(choices) if choices else None,
                split=d.get("split"))


def load_jsonl(path: str | Path, *, quarantine: Callable[[str, str], None] | None = None) -> list[Item]:
    """Load items. Without `quarantine` the first bad line raises ConfigError; with it, bad
    lines go to `quarantine(item_id_or_line, reason)` and the rest load."""
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
                item = item_from_dict(d, base=path.parent, where=where)
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
