"""Shared plumbing for the public-benchmark loaders: where rows come from, where images go.

A loader's ``source`` is either a Hugging Face Hub dataset name ("owner/name") or a local
path (a folder or a file in the dataset's published layout).

- Hub names go through ``datasets.load_dataset(name, split=...)``, the real hub code path.
  Image columns are cast to ``Image(decode=False)`` so rows carry the original encoded
  bytes ({"bytes", "path"}), never re-encoded pixels. Any failure (offline, unknown name,
  unknown split) becomes a ConfigError that says to pass a local path instead.
- Local files are read directly: Parquet with pyarrow (row batches, so ``limit`` stops
  early), JSON (a list, a dict of records keyed by id, or {"data": [...]}), JSONL, and
  TSV/CSV with pandas (every cell a string, no NaN guessing).

Images (``ImageSink``): embedded bytes (raw, {"bytes": ...} structs, base64 text, PIL
images) are written to ``image_dir`` as PNG or JPEG (other formats are converted to PNG);
images a row names by a relative path are used in place at their absolute path, never
copied (MME-RealWorld alone is >100 GB of images). Every Item holds absolute paths.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from maestro_core.dataset import Item, item_from_dict
from maestro_core.errors import ConfigError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"


# --------------------------------------------------------------------------- arguments

def check_limit(limit: int | None, benchmark: str) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}.", source=benchmark,
                          field="limit", fix="pass e.g. limit=100, or leave it out to load every row.")


def local_path(source: str | Path, benchmark: str, hub_example: str) -> Path | None:
    """The local path ``source`` names, or None when it is a Hub dataset name."""
    if isinstance(source, Path):
        path = source.expanduser()
    elif isinstance(source, str) and source.strip():
        path = Path(source.strip()).expanduser()
    else:
        raise ConfigError(f"source must be a Hub dataset name or a local path, got {source!r}.",
                          source=benchmark, field="source",
                          fix=f"pass e.g. \"{hub_example}\" or the path of a local copy.")
    if path.exists():
        return path
    if isinstance(source, str) and _HUB_NAME.fullmatch(source.strip()):
        return None
    raise ConfigError(f"local path not found: {path}.", source=benchmark, field="source",
                      fix=f"pass an existing folder/file in the dataset's published layout, or a Hub "
                          f"name such as \"{hub_example}\".")


def check_split(split: str, known: Sequence[str], benchmark: str) -> str:
    if split not in known:
        raise ConfigError(f"unknown split {split!r}.", source=benchmark, field="split",
                          fix=f"use one of {list(known)}.")
    return split


# --------------------------------------------------------------------------- reading rows

def load_hub_rows(name: str, *, benchmark: str, split: str, limit: int | None,
                  config: str | None = None, data_files: Any = None) -> list[dict]:
    """Rows of ``name``/``split`` from the Hub (or its local cache), images left encoded."""
    try:
        import datasets

        kwargs: dict[str, Any] = {"split": split}
        if data_files is not None:
            kwargs["data_files"] = data_files
        ds = datasets.load_dataset(name, config, **kwargs) if config else datasets.load_dataset(name, **kwargs)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        for column, feature in ds.features.items():
            if isinstance(feature, datasets.Image):
                ds = ds.cast_column(column, datasets.Image(decode=False))
        return ds.to_list()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, unknown repo/split, schema errors: all need the same fix
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"could not load '{name}' (split '{split}') from the Hugging Face Hub: "
            f"{type(e).__name__}: {reason} (and no local file or folder '{name}' exists)",
            source=benchmark, field="source",
            fix="pass the local path of a downloaded copy in the dataset's published layout "
                "(a folder or a Parquet/JSON/JSONL/TSV file, see the loader's docstring), or run "
                "where the Hub is reachable with HF_HUB_OFFLINE unset.") from e


def find_files(folder: Path, patterns: Sequence[str], *, benchmark: str, split: str) -> list[Path]:
    """Files of the first glob pattern (relative to ``folder``) that matches anything, sorted."""
    for pattern in patterns:
        hits = sorted(p for p in folder.glob(pattern) if p.is_file())
        if hits:
            return hits
    raise ConfigError(f"no data file for split '{split}' in {folder}.", source=benchmark, field="source",
                      fix=f"point at the dataset's folder or file; looked for {list(patterns)}.")


def read_rows(paths: Iterable[Path], limit: int | None, *, benchmark: str) -> list[dict]:
    rows: list[dict] = []
    for path in paths:
        left = None if limit is None else limit - len(rows)
        if left is not None and left <= 0:
            break
        try:
            rows.extend(_read_file(path, left))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: say which and why
            raise ConfigError(f"cannot read {path}: {type(e).__name__}: {e}.", source=benchmark,
                              fix="pass a file in the dataset's published layout (Parquet, JSON, JSONL, TSV).") from e
    return rows


def _read_file(path: Path, limit: int | None) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: list[dict] = []
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            rows.extend(batch.to_pylist())
            if limit is not None and len(rows) >= limit:
                break
        return rows[:limit] if limit is not None else rows
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
                    if limit is not None and len(rows) >= limit:
                        break
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if isinstance(data, dict):  # {id: record}: the original MathVista/CharXiv style
            data = [dict(v, _key=str(k)) if isinstance(v, dict) else v for k, v in data.items()]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError("expected a list of JSON objects or a dict of them")
        return data[:limit] if limit is not None else data
    if suffix in (".tsv", ".csv"):
        import pandas as pd

        df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                         nrows=limit)
        return df.to_dict(orient="records")
    raise ValueError(f"unsupported file type '{suffix}'")


# --------------------------------------------------------------------------- cell values

def blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def text(value: Any) -> str:
    """A cell as text: ints stay ints ("3", not "3.0"), None/NaN become ""."""
    if blank(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def format_choices(question: str, choices: Sequence[str], instruction: str | None = None) -> str:
    """``question`` followed by one "(A) option" line per choice, then ``instruction``."""
    lines = [question.rstrip()]
    lines += [f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


_CHOICE_LINE = re.compile(r"^\s*\(([A-Z])\)\s*(.*?)\s*$")
_CHOICE_INLINE = re.compile(r"\(([A-Z])\)\s*(.*?)(?=\s*\([A-Z]\)|\n|$)", re.DOTALL)


def parse_lettered_options(question: str) -> tuple[str, list[str]] | None:
    """Split "stem\\n(A) x\\n(B) y..." into (stem, [x, y]); None unless letters run A, B, C..."""
    lines = question.splitlines()
    found: list[tuple[int, str, str]] = []
    for i, line in enumerate(lines):
        if m := _CHOICE_LINE.match(line):
            found.append((i, m[1], m[2]))
    if len(found) < 2:
        start = question.find("(A)")
        if start < 0:
            return None
        inline = _CHOICE_INLINE.findall(question[start:])
        if len(inline) < 2 or [l for l, _ in inline] != list(LETTERS[:len(inline)]):
            return None
        return question[:start].strip(), [t.strip() for _, t in inline]
    if [l for _, l, _ in found] != list(LETTERS[:len(found)]):
        return None
    return "\n".join(lines[:found[0][0]]).strip(), [t for _, _, t in found]


# --------------------------------------------------------------------------- images

class ImageSink:
    """Turns a row's image cell into an absolute file path (see the module docstring)."""

    def __init__(self, image_dir: str | Path, benchmark: str, *, bases: Sequence[Path] = (),
                 hub_repo: str | None = None):
        if image_dir is None:
            raise ConfigError("image_dir is required.", source=benchmark, field="image_dir",
                              fix="pass image_dir=Path(...), the folder where embedded images are written.")
        self.dir = Path(image_dir).expanduser().resolve()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create image_dir {self.dir}: {e}.", source=benchmark, field="image_dir",
                              fix="pass a writable folder.") from e
        self.benchmark = benchmark
        self.bases = [Path(b).resolve() for b in bases]
        self.hub_repo = hub_repo

    def put(self, value: Any, key: str) -> str | None:
        """Absolute path of the image in ``value`` (written if embedded); None when there is none."""
        if blank(value):
            return None
        if isinstance(value, dict):
            data = value.get("bytes")
            if not blank(data) and data:
                return self._write(bytes(data), key)
            return None if blank(value.get("path")) else self._path(str(value["path"]), key)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self._write(bytes(value), key)
        if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image
            buf = io.BytesIO()
            fmt = "JPEG" if getattr(value, "format", None) == "JPEG" and value.mode in ("RGB", "L") else "PNG"
            value.save(buf, format=fmt)
            return self._write(buf.getvalue(), key)
        if isinstance(value, str):
            s = value.strip()
            data = _b64(s)  # only base64 whose bytes start like an image; paths never do
            return self._write(data, key) if data is not None else self._path(s, key)
        raise ConfigError(f"unsupported image value of type {type(value).__name__}.", source=self.benchmark,
                          entry=key, field="image", fix="use the dataset's published files unchanged.")

    def _path(self, name: str, key: str) -> str:
        p = Path(name).expanduser()
        candidates = [p] if p.is_absolute() else [b / p for b in self.bases]
        for c in candidates:
            if c.is_file():
                return str(c.resolve())
        if self.hub_repo and not p.is_absolute():
            try:
                from huggingface_hub import hf_hub_download

                return str(Path(hf_hub_download(self.hub_repo, name, repo_type="dataset")).resolve())
            except Exception as e:  # noqa: BLE001 - offline or missing file: same fix
                raise ConfigError(f"image '{name}' is not available locally and could not be fetched from "
                                  f"'{self.hub_repo}': {type(e).__name__}.", source=self.benchmark, entry=key,
                                  field="image", fix="pass the local path of a full copy (data + images).") from e
        where = ", ".join(str(b) for b in self.bases) or "(no base folder)"
        raise ConfigError(f"image file '{name}' not found under {where}.", source=self.benchmark, entry=key,
                          field="image", fix="keep the images beside the data file as the dataset publishes "
                                             "them (unpack its image archive there).")

    def _write(self, data: bytes, key: str) -> str:
        if data.startswith(_PNG):
            ext = "png"
        elif data.startswith(_JPEG):
            ext = "jpg"
        else:  # webp, gif, bmp...: convert, so every written image is PNG or JPEG
            try:
                from PIL import Image

                with Image.open(io.BytesIO(data)) as im:
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
            except Exception as e:  # noqa: BLE001 - not an image at all
                raise ConfigError(f"image bytes are not a readable image ({type(e).__name__}).",
                                  source=self.benchmark, entry=key, field="image",
                                  fix="use the dataset's published files unchanged.") from e
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80] or "image"
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
        path = self.dir / f"{safe}-{digest}.{ext}"
        if not (path.is_file() and path.read_bytes() == data):
            path.write_bytes(data)
        return str(path)


def _b64(s: str) -> bytes | None:
    """Decoded bytes when ``s`` is base64 of an image, else None."""
    if len(s) < 16:
        return None
    try:
        data = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if data.startswith((_PNG, _JPEG, b"GIF8", b"RIFF", b"BM")) else None


# --------------------------------------------------------------------------- items

def make_item(*, id: str, benchmark: str, question: str, answer: str, scorer: str, images: Sequence[str | None],
              choices: Sequence[str] | None, split: str | None, where: str) -> Item:
    """A validated Item (the project's own rules: non-empty fields, existing images)."""
    d: dict[str, Any] = {"id": id, "benchmark": benchmark, "question": question, "answer": answer,
                         "scorer": scorer, "images": [p for p in images if p], "split": split}
    if choices:
        d["choices"] = [str(c) for c in choices]
    if not answer.strip():
        raise ConfigError("the row has no gold answer.", source=where, entry=id, field="answer",
                          fix="use a split that ships answers (e.g. the validation/testmini split).")
    return item_from_dict(d, where=where)


def check_unique(items: Sequence[Item], benchmark: str) -> list[Item]:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ConfigError("duplicate id.", source=benchmark, entry=item.id, field="id",
                              fix="load each split from its own file; ids must be unique.")
        seen.add(item.id)
    return list(items)


def hub_source(source: str | Path, *, benchmark: str, split: str, limit: int | None,
               image_dir: Path) -> tuple[list, "ImageSink", str]:
    """A hub dataset's rows, the image sink for them, and the 'where' label errors name."""
    rows = load_hub_rows(str(source), benchmark=benchmark, split=split, limit=limit)
    return rows, ImageSink(image_dir, benchmark, hub_repo=str(source)), f"{source}:{split}"
