"""Maestro-Mini: build, store and load the embedded benchmark suite (the dataset-build stage).

    from maestro_core.suite import SuiteConfig, build_suite, load_suite, export_jsonl

    build = build_suite(SuiteConfig(seed=0), home)          # -> SuiteBuild(version, items, counts...)
    test = load_suite(home, split="test")                  # latest version; list[Item]
    export_jsonl(test, "out/test.jsonl")                   # readable by dataset.load_jsonl

Five benchmarks (`maestro_core.benchmarks.<name>`, see each module's docstring): math, charts,
text_reading, hires, digits. Each is generated deterministically from the seed, item by item.

Splits and contamination. Per benchmark one item stream is generated; its items fill `test`
first, then `val`, then `train`, in stream order. An item whose image bytes (SHA-256) or whose
problem text (question normalised: NFKC, casefold, whitespace collapsed, together with the
SHA-256s of its images) was already taken by an earlier item is DROPPED (deterministically,
reported in `SuiteBuild.dropped`, the manifest and, with `store=`, the store's quarantine) and
the stream continues until every split is full. Image benchmarks share one question template
("What digit is shown in the image?"), so for them the question text alone is not a problem's
identity: the normalised question plus its image hashes is; a text-only item's key is its
normalised question. `check_contamination` re-checks the final splits and raises
`ContaminationError` if any image or problem is shared between two splits.

Storage (a Hugging Face `datasets` dataset, Parquet with the PNG bytes embedded in an
`images: List(Image())` column), in the object store (`<home>/objects` unless given):

    datasets/maestro-mini/<version>/data/{train,val,test}-00000-of-00001.parquet
    datasets/maestro-mini/<version>/meta.jsonl      side table: per-item generator metadata
    datasets/maestro-mini/<version>/README.md       dataset card (configs -> the three splits)
    datasets/maestro-mini/<version>/manifest.json   written LAST: a version is complete iff present
    datasets/maestro-mini/builds/<build key>.json   config + code fingerprint -> version
    datasets/maestro-mini/LATEST                    the version built or reused most recently

`version` = SHA-256 (16 hex) over the items (id, benchmark, split, question, answer, scorer,
choices, image SHA-256s) and the side table: same config + same code + same libraries -> same
version. Images are also extracted to `<home>/datasets/<version>/images/<id>.png`, so Items
carry absolute paths; `load_suite` re-extracts whatever is missing (and, from S3, downloads the
Parquet files to `<home>/datasets/<version>/data/`). Building again with the same config finds
the build record and reuses the stored version (`reuse=False` regenerates, and still writes
nothing new when the version already exists).

The per-item side table (`load_suite_meta`) holds what the question must not leak: font size
class and noise of text images, the chart recipe and question kind, the hires box position...
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from maestro_core.dataset import Item
from maestro_core.home import resolve_home
from maestro_core.errors import ConfigError, StorageError
from maestro_core.objectstore import LocalObjectStore, ObjectNotFound, ObjectStore, open_object_store

NAME = "maestro-mini"
PREFIX = f"datasets/{NAME}"
SPLITS = ("train", "val", "test")
FILL_ORDER = ("test", "val", "train")
"""Each benchmark's item stream fills test first, so the test split is the stream's head."""
BENCHMARKS = ("math", "charts", "text_reading", "hires", "digits")
FORMAT_VERSION = 1
"""Bump when the stored layout or the version hash input changes."""

ProgressFn = Callable[[int, int, str], None]
"""`progress(done, total, stage)`."""

__all__ = ["BENCHMARKS", "ContaminationError", "SPLITS", "SuiteBuild", "SuiteConfig", "benchmark_module",
           "build_suite", "check_contamination", "ensure_suite", "export_jsonl", "list_versions", "load_suite",
           "load_suite_meta", "normalize_question"]


class ContaminationError(ConfigError):
    """An image or a problem is shared between two splits."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SuiteConfig:
    """What to build. The defaults give 5 x (60 + 20 + 40) = 600 items, 200 of them test."""

    seed: int = field(default=0, metadata={"help": "generation seed: same seed (and code) -> same items and version"})
    train_per_benchmark: int = field(default=60, metadata={"help": "train items per benchmark"})
    val_per_benchmark: int = field(default=20, metadata={"help": "validation items per benchmark"})
    test_per_benchmark: int = field(default=40, metadata={"help": "test items per benchmark"})
    benchmarks: tuple[str, ...] = field(default=BENCHMARKS, metadata={
        "help": f"benchmarks to include, a subset of {list(BENCHMARKS)} (kept in that order)"})

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"must be an integer >= 0, got {self.seed!r}.", entry="suite", field="seed",
                              fix="write e.g. seed: 0.")
        for name in ("train_per_benchmark", "val_per_benchmark", "test_per_benchmark"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 5000:
                raise ConfigError(f"must be an integer in 0..5000, got {v!r}.", entry="suite", field=name,
                                  fix=f"write e.g. {name}: 40.")
        if self.train_per_benchmark + self.val_per_benchmark + self.test_per_benchmark == 0:
            raise ConfigError("every split is empty.", entry="suite", field="test_per_benchmark",
                              fix="ask for at least one item per benchmark.")
        benches = self.benchmarks
        if isinstance(benches, str) or not all(isinstance(b, str) for b in benches):
            raise ConfigError(f"must be a list of benchmark names, got {benches!r}.", entry="suite",
                              field="benchmarks", fix=f"use some of {list(BENCHMARKS)}.")
        unknown = [b for b in benches if b not in BENCHMARKS]
        if unknown or not benches or len(set(benches)) != len(benches):
            raise ConfigError(f"unknown, repeated or no benchmarks: {list(benches)!r}.", entry="suite",
                              field="benchmarks", fix=f"use some of {list(BENCHMARKS)}, each once.")
        object.__setattr__(self, "benchmarks", tuple(b for b in BENCHMARKS if b in benches))

    def per_split(self) -> dict[str, int]:
        return {"train": self.train_per_benchmark, "val": self.val_per_benchmark, "test": self.test_per_benchmark}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["benchmarks"] = list(self.benchmarks)
        return d


@dataclass(frozen=True)
class SuiteBuild:
    """What `build_suite` made (or found)."""

    version: str
    items: tuple[Item, ...]
    counts: dict[str, int]
    """items per split."""
    counts_by_benchmark: dict[str, dict[str, int]]
    """benchmark -> split -> items."""
    dropped: tuple[tuple[str, str], ...]
    """(item id, reason) of generated items left out as duplicates."""
    location: str
    """object-store URI of the version's folder."""
    local_dir: Path
    """`<home>/datasets/<version>`: the extracted images (and downloaded Parquet)."""
    reused: bool
    """True when an existing build record made generation unnecessary."""
    seconds: float


def benchmark_module(name: str) -> ModuleType:
    """The generator module of a benchmark (imported on first use)."""
    import importlib

    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}.", field="benchmarks", fix=f"use some of {list(BENCHMARKS)}.")
    return importlib.import_module(f"maestro_core.benchmarks.{name}")


# --------------------------------------------------------------------------- keys and checks


def normalize_question(text: str) -> str:
    """NFKC, casefold, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _item_keys(item: Item, hashes: dict[str, str]) -> list[tuple[str, str]]:
    img = [hashes[p] for p in item.images]
    problem = normalize_question(item.question) + ("|" + ",".join(img) if img else "")
    return [("image", h) for h in img] + [("question", problem)]


def check_contamination(items: Sequence[Item], *, image_hashes: dict[str, str] | None = None) -> None:
    """Raise ContaminationError when two splits share an image (by content) or a problem
    (normalised question + image hashes), or when an id repeats. Items without a split are
    ignored."""
    hashes = dict(image_hashes or {})
    seen: dict[tuple[str, str], Item] = {}
    ids: dict[str, Item] = {}
    problems = []
    for it in items:
        if it.split is None:
            continue
        if it.id in ids:
            problems.append(f"id {it.id} appears twice ({ids[it.id].split}, {it.split})")
        ids[it.id] = it
        for p in it.images:
            if p not in hashes:
                hashes[p] = _sha256_file(p)
        for key in _item_keys(it, hashes):
            other = seen.get(key)
            if other is None:
                seen[key] = it
            elif other.split != it.split:
                what = "the same image" if key[0] == "image" else "the same question"
                problems.append(f"{other.id} ({other.split}) and {it.id} ({it.split}) share {what}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ContaminationError("splits are contaminated: " + "; ".join(problems[:5]) + more + ".",
                                 source=NAME, fix="drop one item of each pair, or rebuild the suite with "
                                 "build_suite (it drops duplicates before assigning splits).")


# --------------------------------------------------------------------------- build




def _code_fingerprint() -> str:
    """SHA-256 of the generator sources and the versions of the libraries that shape the
    pixels or the text, so a build record is reused only by the same code."""
    import importlib.metadata as md

    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for p in [here / "suite.py"] + sorted((here / "benchmarks").glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    for dist in ("numpy", "pillow", "matplotlib", "reasoning-gym", "scikit-learn", "scikit-image",
                 "vega-datasets", "pandas"):
        try:
            h.update(f"{dist}={md.version(dist)}".encode())
        except md.PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    return h.hexdigest()


def build_key(config: SuiteConfig) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "config": config.to_dict(), "code": _code_fingerprint()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if hasattr(o, "isoformat"):
        return o.isoformat()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def _item_row(it: Item, hashes: Sequence[str]) -> dict[str, Any]:
    return {"id": it.id, "benchmark": it.benchmark, "split": it.split, "question": it.question,
            "answer": it.answer, "scorer": it.scorer, "choices": list(it.choices) if it.choices else None,
            "images": list(hashes)}


def compute_version(items: Sequence[Item], hashes: dict[str, str], meta: dict[str, dict]) -> str:
    blob = _canon({"name": NAME, "format": FORMAT_VERSION,
                   "items": [_item_row(it, [hashes[p] for p in it.images]) for it in items],
                   "meta": {it.id: meta.get(it.id, {}) for it in items}})
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


PARALLEL_MIN_ITEMS = 200
"""Suites with fewer items than this are generated in process (workers' start-up would cost more)."""
CHUNK_ITEMS = 30
"""Items per worker task when the first batches are generated in parallel."""


def _generate_chunk(name: str, seed: int, image_dir: str, start: int, n: int) -> list[tuple[Item, dict]]:
    """Items start..start+n-1 of one benchmark (a worker process's task)."""
    return benchmark_module(name).generate_with_meta(n, seed, Path(image_dir), start=start)


def _first_batches(config: SuiteConfig, scratch: Path, workers: int,
                   progress: ProgressFn | None) -> dict[str, list[tuple[Item, dict]]]:
    """Every benchmark's first batch (its items 0..total-1, what one build almost always uses
    alone), generated in `workers` processes in chunks. A benchmark's item i depends only on
    the seed and i, so the items, images and version are those of generating in process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    total = sum(config.per_split().values())
    parts: dict[str, dict[int, list]] = {name: {} for name in config.benchmarks}
    # spawned, not forked: the caller may run threads (Prefect, the store), which a fork copies mid-state
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_generate_chunk, name, config.seed, str(scratch / name), start,
                               min(CHUNK_ITEMS, total - start)): (name, start)
                   for start in range(0, total, CHUNK_ITEMS) for name in config.benchmarks}
        for fut in as_completed(futures):
            name, start = futures[fut]
            parts[name][start] = fut.result()
            if progress:
                progress(sum(map(len, parts[name].values())), total, f"generate {name}")
    return {name: [x for start in sorted(chunks) for x in chunks[start]] for name, chunks in parts.items()}


def _generate_benchmark(name: str, config: SuiteConfig, scratch: Path, claimed: dict[tuple[str, str], str],
                        progress: ProgressFn | None, first: list[tuple[Item, dict]] | None = None
                        ) -> tuple[list[Item], dict[str, dict], list[tuple[str, str]]]:
    """Fill test, val, train (in that order) from the benchmark's item stream, dropping
    duplicates (`first`: its first batch, already generated). Returns (items with split set,
    side table, dropped)."""
    module = benchmark_module(name)
    need = config.per_split()
    total = sum(need.values())
    accepted: dict[str, list[Item]] = {s: [] for s in SPLITS}
    meta: dict[str, dict] = {}
    dropped: list[tuple[str, str]] = []
    start, batch = 0, total
    image_dir = scratch / name
    limit = 4 * total + 64
    while True:
        todo = [s for s in FILL_ORDER if len(accepted[s]) < need[s]]
        if not todo:
            break
        if start >= limit:
            raise ConfigError(f"benchmark {name}: only {sum(len(v) for v in accepted.values())} distinct items "
                              f"after {start} generated, {total} wanted.", source=NAME, field="benchmarks",
                              fix="ask for fewer items per benchmark or use another seed.")
        stage = f"generate {name}"
        done0 = sum(len(v) for v in accepted.values())

        def report(done: int, n: int, _stage=stage, _d0=done0) -> None:
            if progress:
                progress(min(total, _d0 + done), total, _stage)

        if start == 0 and first is not None:
            generated = first
        else:
            generated = module.generate_with_meta(batch, config.seed, image_dir, start=start, progress=report)
        for item, item_meta in generated:
            todo = [s for s in FILL_ORDER if len(accepted[s]) < need[s]]
            if not todo:
                _remove_images(item)
                continue
            hashes = {p: _sha256_file(p) for p in item.images}
            keys = _item_keys(item, hashes)
            clash = next((k for k in keys if k in claimed), None)
            if clash is not None:
                what = "same image" if clash[0] == "image" else "same question"
                dropped.append((item.id, f"duplicate of {claimed[clash]} ({what})"))
                _remove_images(item)
                continue
            for k in keys:
                claimed[k] = item.id
            split = todo[0]
            accepted[split].append(dataclasses.replace(item, split=split))
            meta[item.id] = json.loads(_canon(item_meta))
        start += batch
        missing = sum(need.values()) - sum(len(v) for v in accepted.values())
        batch = missing + 4
    items = [it for s in SPLITS for it in accepted[s]]
    return items, meta, dropped


def _remove_images(item: Item) -> None:
    for p in item.images:
        Path(p).unlink(missing_ok=True)


@contextmanager
def _quiet_datasets():
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _features():
    from datasets import Features, Image, List, Value

    return Features({"id": Value("string"), "benchmark": Value("string"), "split": Value("string"),
                     "question": Value("string"), "answer": Value("string"), "scorer": Value("string"),
                     "choices": List(Value("string")), "images": List(Image())})


def _parquet_bytes(items: Sequence[Item]) -> bytes:
    from datasets import Dataset

    cols: dict[str, list] = {k: [] for k in ("id", "benchmark", "split", "question", "answer", "scorer",
                                             "choices", "images")}
    for it in items:
        for k in ("id", "benchmark", "split", "question", "answer", "scorer"):
            cols[k].append(getattr(it, k))
        cols["choices"].append(list(it.choices) if it.choices else None)
        cols["images"].append([{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p in it.images])
    with _quiet_datasets():
        ds = Dataset.from_dict(cols, features=_features())
        buf = io.BytesIO()
        ds.to_parquet(buf)
    return buf.getvalue()


def _split_key(version: str, split: str) -> str:
    return f"{PREFIX}/{version}/data/{split}-00000-of-00001.parquet"


def _dataset_card(version: str, counts: dict[str, dict[str, int]], config: SuiteConfig) -> str:
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for s in SPLITS:
        lines += [f"  - split: {s}", f"    path: data/{s}-*"]
    lines += ["---", "", f"# Maestro-Mini {version}", "",
              "Embedded benchmark suite of Maestro (built by `maestro_core.suite.build_suite`).", "",
              f"Config: `{_canon(config.to_dict())}`", "", "| benchmark | " + " | ".join(SPLITS) + " |",
              "|---|" + "---|" * len(SPLITS)]
    for b, c in counts.items():
        lines.append(f"| {b} | " + " | ".join(str(c.get(s, 0)) for s in SPLITS) + " |")
    lines += ["", "Columns: id, benchmark, split, question, answer, scorer (exact | numeric | choice | math), "
              "choices, images (PNG bytes). Side table per item: meta.jsonl.", ""]
    return "\n".join(lines)


def _counts(items: Iterable[Item], benchmarks: Sequence[str]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    by_split = {s: 0 for s in SPLITS}
    by_bench = {b: {s: 0 for s in SPLITS} for b in benchmarks}
    for it in items:
        by_split[it.split] += 1
        by_bench.setdefault(it.benchmark, {s: 0 for s in SPLITS})[it.split] += 1
    return by_split, by_bench


def _read_json(objects: ObjectStore, key: str) -> dict | None:
    try:
        return json.loads(objects.get_bytes(key).decode("utf-8"))
    except ObjectNotFound:
        return None


def _put_json(objects: ObjectStore, key: str, obj: Any) -> None:
    objects.put_bytes(key, json.dumps(obj, indent=1, sort_keys=True, default=_json_default).encode("utf-8"))


def build_suite(config: SuiteConfig | None = None, home: str | Path | None = None,
                object_store: str | Path | ObjectStore | None = None, *, progress: ProgressFn | None = None,
                store: Any = None, reuse: bool = True, workers: int | None = None) -> SuiteBuild:
    """Generate the suite, check it, store it (object store + local images) and return it.

    `home`: the Maestro home ($MAESTRO_HOME or ./.maestro when None). `object_store`: where the
    dataset goes (default `store.objects` when `store` is given, else `<home>/objects`).
    `store`: optional `Store`; dropped duplicates are recorded in its quarantine.
    `reuse`: when this config was already built by the same code, load it instead of
    generating again. Idempotent: the same config gives the same version and nothing is
    written twice. `workers`: processes that generate the benchmarks' first batches (the same
    items and version as 1, which generates in process); None: the cores (at most 4), or 1 for
    a suite under PARALLEL_MIN_ITEMS items.
    """
    t0 = time.monotonic()
    config = config or SuiteConfig()
    home = resolve_home(home if home is not None else getattr(store, "home", None))
    if object_store is None:
        object_store = store.objects if store is not None else home / "objects"
    objects = open_object_store(object_store)
    key = build_key(config)
    record_key = f"{PREFIX}/builds/{key}.json"

    if reuse:
        record = _read_json(objects, record_key)
        if record and objects.exists(f"{PREFIX}/{record['version']}/manifest.json"):
            version = record["version"]
            items = load_suite(home, version, object_store=objects, progress=progress)
            manifest = _read_json(objects, f"{PREFIX}/{version}/manifest.json") or {}
            objects.put_bytes(f"{PREFIX}/LATEST", version.encode())
            by_split, by_bench = _counts(items, config.benchmarks)
            return SuiteBuild(version, tuple(items), by_split, by_bench,
                              tuple(tuple(d) for d in manifest.get("dropped", ())), objects.uri(f"{PREFIX}/{version}"),
                              home / "datasets" / version, True, time.monotonic() - t0)

    datasets_dir = home / "datasets"
    scratch = datasets_dir / f".build-{uuid.uuid4().hex[:12]}"
    try:
        claimed: dict[tuple[str, str], str] = {}
        items: list[Item] = []
        meta: dict[str, dict] = {}
        dropped: list[tuple[str, str]] = []
        if workers is None:
            n_items = sum(config.per_split().values()) * len(config.benchmarks)
            workers = min(os.cpu_count() or 1, 4) if n_items >= PARALLEL_MIN_ITEMS else 1
        first = _first_batches(config, scratch, workers, progress) if workers > 1 else {}
        for name in config.benchmarks:
            b_items, b_meta, b_dropped = _generate_benchmark(name, config, scratch, claimed, progress,
                                                             first.pop(name, None))
            items += b_items
            meta.update(b_meta)
            dropped += b_dropped
        order = {s: k for k, s in enumerate(SPLITS)}
        bench_order = {b: k for k, b in enumerate(config.benchmarks)}
        items.sort(key=lambda it: (order[it.split], bench_order[it.benchmark]))  # stable: stream order kept
        hashes = {p: _sha256_file(p) for it in items for p in it.images}
        check_contamination(items, image_hashes=hashes)
        version = compute_version(items, hashes, meta)

        # move the images to their final place; the same version always has the same bytes
        local_dir = datasets_dir / version
        img_dir = local_dir / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        final: list[Item] = []
        final_hashes: dict[str, str] = {}
        for it in items:
            paths = []
            for p in it.images:
                dest = (img_dir / Path(p).name).resolve()
                if dest.is_file() and _sha256_file(dest) == hashes[p]:
                    Path(p).unlink()
                else:
                    os.replace(p, dest)
                paths.append(str(dest))
                final_hashes[str(dest)] = hashes[p]
            final.append(dataclasses.replace(it, images=tuple(paths)))
        by_split, by_bench = _counts(final, config.benchmarks)

        manifest_key = f"{PREFIX}/{version}/manifest.json"
        if not objects.exists(manifest_key):
            files = {}
            for n_split, split in enumerate(SPLITS):
                if progress:
                    progress(n_split, len(SPLITS) + 1, "write")
                data = _parquet_bytes([it for it in final if it.split == split])
                objects.put_bytes(_split_key(version, split), data)
                files[split] = {"key": _split_key(version, split), "sha256": hashlib.sha256(data).hexdigest(),
                                "bytes": len(data)}
            meta_lines = "".join(_canon({"id": it.id, "benchmark": it.benchmark, "split": it.split,
                                         "meta": meta.get(it.id, {})}) + "\n" for it in final)
            objects.put_bytes(f"{PREFIX}/{version}/meta.jsonl", meta_lines.encode("utf-8"))
            objects.put_bytes(f"{PREFIX}/{version}/README.md", _dataset_card(version, by_bench, config).encode())
            _put_json(objects, manifest_key, {
                "name": NAME, "version": version, "format": FORMAT_VERSION, "config": config.to_dict(),
                "build_key": key, "created_at": time.time(), "splits": files, "counts": by_bench,
                "dropped": [list(d) for d in dropped],
                "image_sha256": {Path(p).name: h for p, h in final_hashes.items()}})
            if progress:
                progress(len(SPLITS) + 1, len(SPLITS) + 1, "write")
        if not objects.exists(record_key):
            _put_json(objects, record_key, {"version": version, "config": config.to_dict(), "created_at": time.time()})
        objects.put_bytes(f"{PREFIX}/LATEST", version.encode())
        if store is not None:
            for item_id, reason in dropped:
                store.record_quarantine(f"{NAME}/{version}", item_id, reason)
        return SuiteBuild(version, tuple(final), by_split, by_bench, tuple(dropped),
                          objects.uri(f"{PREFIX}/{version}"), local_dir, False, time.monotonic() - t0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------- load


def list_versions(object_store: str | Path | ObjectStore | None = None, home: str | Path | None = None) -> list[str]:
    """Complete versions in the object store (those with a manifest), oldest first."""
    objects = open_object_store(object_store if object_store is not None else resolve_home(home) / "objects")
    found = []
    for key in objects.list(f"{PREFIX}/"):
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == "manifest.json":
            m = _read_json(objects, key) or {}
            found.append((m.get("created_at", 0.0), parts[2]))
    return [v for _, v in sorted(found)]


def _resolve_version(objects: ObjectStore, version: str | None) -> str:
    if version is None:
        try:
            version = objects.get_bytes(f"{PREFIX}/LATEST").decode().strip()
        except ObjectNotFound:
            versions = list_versions(objects)
            if not versions:
                raise ConfigError(f"no Maestro-Mini dataset in {objects.uri(PREFIX)}.", source=NAME,
                                  fix="build it first: `maestro build-dataset` or maestro_core.suite.build_suite.")
            version = versions[-1]
    if not objects.exists(f"{PREFIX}/{version}/manifest.json"):
        raise ConfigError(f"version {version!r} not found (or incomplete) in {objects.uri(PREFIX)}.", source=NAME,
                          fix=f"use one of {list_versions(objects)} or build the suite again.")
    return version


def _parquet_source(objects: ObjectStore, key: str, info: dict, cache: Path) -> Any:
    """A path or buffer to read the split's Parquet from: in place for a local object store,
    else downloaded (once, checked against the manifest's SHA-256) into `cache`."""
    import pyarrow as pa

    if isinstance(objects, LocalObjectStore):
        return str(objects.root.joinpath(*key.split("/")))
    dest = cache / Path(key).name
    if dest.is_file() and _sha256_file(dest) == info.get("sha256"):
        return str(dest)
    data = objects.get_bytes(key)
    if info.get("sha256") and hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise StorageError(f"{objects.uri(key)} does not match its manifest (SHA-256). Fix: rebuild the suite.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return pa.BufferReader(data)


def _write_if_changed(dest: Path, data: bytes) -> None:
    if dest.is_file() and dest.stat().st_size == len(data) and dest.read_bytes() == data:
        return
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def load_suite(home: str | Path | None = None, version: str | None = None, split: str | Sequence[str] | None = None,
               *, object_store: str | Path | ObjectStore | None = None,
               progress: ProgressFn | None = None) -> list[Item]:
    """Items of a stored version (the latest when None): all splits in order train, val, test,
    or only `split` (a name or a list of names). Images are extracted to
    `<home>/datasets/<version>/images/` when missing or different, so every Item has
    absolute image paths. Works from a local or an S3 object store."""
    import pyarrow.parquet as pq

    home = resolve_home(home)
    objects = open_object_store(object_store if object_store is not None else home / "objects")
    version = _resolve_version(objects, version)
    manifest = _read_json(objects, f"{PREFIX}/{version}/manifest.json") or {}
    wanted = SPLITS if split is None else ((split,) if isinstance(split, str) else tuple(split))
    bad = [s for s in wanted if s not in SPLITS]
    if bad:
        raise ConfigError(f"unknown split(s) {bad}.", field="split", fix=f"use some of {list(SPLITS)}.")
    local_dir = home / "datasets" / version
    img_dir = local_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    items: list[Item] = []
    for n_split, s in enumerate(s for s in SPLITS if s in wanted):
        info = manifest.get("splits", {}).get(s, {"key": _split_key(version, s)})
        table = pq.read_table(_parquet_source(objects, info["key"], info, local_dir / "data"))
        rows = table.to_pylist()
        for k, row in enumerate(rows):
            paths = []
            for image in row["images"] or []:
                name = Path(image["path"]).name
                dest = img_dir / name
                _write_if_changed(dest, image["bytes"])
                paths.append(str(dest.resolve()))
            items.append(Item(id=row["id"], benchmark=row["benchmark"], question=row["question"],
                              answer=row["answer"], scorer=row["scorer"], images=tuple(paths),
                              choices=tuple(row["choices"]) if row["choices"] else None, split=row["split"]))
            if progress and (k + 1 == len(rows) or (k + 1) % 50 == 0):
                progress(k + 1, len(rows), f"extract {s}")
    return items


def load_suite_meta(home: str | Path | None = None, version: str | None = None, *,
                    object_store: str | Path | ObjectStore | None = None) -> dict[str, dict]:
    """The side table of a version: item id -> generator metadata (font size class, noise,
    chart recipe, box position...). For analysis only; never show it to a policy."""
    home = resolve_home(home)
    objects = open_object_store(object_store if object_store is not None else home / "objects")
    version = _resolve_version(objects, version)
    out = {}
    for line in objects.get_bytes(f"{PREFIX}/{version}/meta.jsonl").decode("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["id"]] = row["meta"]
    return out


def ensure_suite(store: Any, config: SuiteConfig | None = None, *, log: Callable[[str], None] | None = None,
                 progress: ProgressFn | None = None) -> list[Item]:
    """All items of the suite in `store`'s object store: with `config`, that config's build
    (made now when missing); without, the latest version, or the default config built now."""
    if config is None:
        try:
            return load_suite(store.home, object_store=store.objects, progress=progress)
        except ConfigError as e:
            if isinstance(e, ContaminationError) or "no Maestro-Mini dataset" not in str(e):
                raise
    if log:
        log("building the Maestro-Mini suite (first use; about 30 s on 2 cores)...")
    res = build_suite(config or SuiteConfig(), store.home, store.objects, progress=progress, store=store)
    if log:
        log(f"suite version {res.version}: " + ", ".join(f"{k} {v}" for k, v in res.counts.items()))
    return list(res.items)


# --------------------------------------------------------------------------- JSONL export


def export_jsonl(items: Iterable[Item], path: str | Path, *, copy_images: bool = False) -> Path:
    """Write items in the DESIGN JSONL format (id, benchmark, question, images, answer, scorer,
    choices, split), image paths relative to the file, so `dataset.load_jsonl` reads them back.
    `copy_images=True` copies the images into `<file's folder>/images/` first, making the file
    and that folder a self-contained dataset."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for it in items:
        rel = []
        for p in it.images:
            src = Path(p)
            if copy_images:
                dest = path.parent / "images" / src.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not (dest.is_file() and dest.stat().st_size == src.stat().st_size
                        and dest.read_bytes() == src.read_bytes()):
                    shutil.copyfile(src, dest)
                src = dest
            rel.append(Path(os.path.relpath(src, path.parent)).as_posix())
        row: dict[str, Any] = {"id": it.id, "benchmark": it.benchmark, "question": it.question, "images": rel,
                               "answer": it.answer, "scorer": it.scorer}
        if it.choices:
            row["choices"] = list(it.choices)
        if it.split is not None:
            row["split"] = it.split
        lines.append(json.dumps(row, ensure_ascii=False))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return path
