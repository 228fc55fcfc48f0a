"""ChartQA (Masry et al., 2022): questions about bar/line/pie charts.

Layouts read (``source``):

- Hub name, e.g. "HuggingFaceM4/ChartQA" (splits train/val/test), or a local copy of it:
  a folder with ``data/{split}-*.parquet`` or one such Parquet file. Columns: ``image``
  (embedded image struct), ``query`` (str), ``label`` (list of str: the gold answers),
  ``human_or_machine`` (class label 0 = human, 1 = machine/augmented).
  VERIFIED against the dataset card (dataset_info features) of HuggingFaceM4/ChartQA.
- The original release ("ChartQA Dataset/"): a ``{split}`` folder (or its parent) holding
  ``{split}_human.json`` and ``{split}_augmented.json`` (lists of {"imgname", "query",
  "label"}) and the images in ``png/``. VERIFIED only indirectly (evaluation configs of
  other projects that read ``test/test_human.json`` + ``test_augmented.json`` with
  images under ``png``).

Items: question = the query as is; answer = the first label; scorer ``numeric`` when the
label reads as a number, else ``exact``. ``metric`` is ChartQA's relaxed accuracy (see
``metrics.relaxed_accuracy``).
"""

from __future__ import annotations

from pathlib import Path

from maestro_core.benchmarks.public import _common as c
from maestro_core.benchmarks.public.metrics import _chartqa_float, relaxed_accuracy
from maestro_core.dataset import Item

BENCHMARK = "chartqa"
HUB_NAME = "HuggingFaceM4/ChartQA"
DEFAULT_SPLIT = "test"
SPLITS = ("train", "val", "test")


def load(source: str | Path, *, split: str | None = None, limit: int | None = None,
         image_dir: Path) -> list[Item]:
    c.check_limit(limit, BENCHMARK)
    split = split or DEFAULT_SPLIT
    path = c.local_path(source, BENCHMARK, HUB_NAME)
    if path is None:
        rows, sink, where = c.hub_source(source, benchmark=BENCHMARK, split=split, limit=limit,
                                             image_dir=image_dir)
    else:
        c.check_split(split, SPLITS, BENCHMARK)
        rows, bases = _local_rows(path, split, limit)
        sink = c.ImageSink(image_dir, BENCHMARK, bases=bases)
        where = str(path)
    items = []
    for i, row in enumerate(rows):
        label = row.get("label")
        labels = [c.text(x) for x in label] if isinstance(label, (list, tuple)) else [c.text(label)]
        answer = next((x for x in labels if x), "")
        source_kind = row.get("human_or_machine", row.get("_kind"))
        kind = {0: "human", 1: "augmented"}.get(source_kind, source_kind) if source_kind is not None else None
        item_id = f"{BENCHMARK}-{split}-{kind + '-' if kind else ''}{i:05d}"
        image = row.get("image") if "image" in row else row.get("imgname")
        items.append(c.make_item(
            id=item_id, benchmark=BENCHMARK, question=c.text(row.get("query")), answer=answer,
            scorer="numeric" if _chartqa_float(answer) is not None else "exact",
            images=[sink.put(image, item_id)], choices=None, split=split, where=where))
    return c.check_unique(items, BENCHMARK)


def _local_rows(path: Path, split: str, limit: int | None) -> tuple[list[dict], list[Path]]:
    if path.is_file():
        if path.suffix.lower() == ".json":
            return _original_rows([path], limit), [path.parent / "png", path.parent]
        return c.read_rows([path], limit, benchmark=BENCHMARK), [path.parent]
    for folder in (path / split, path):
        originals = [folder / f"{split}_human.json", folder / f"{split}_augmented.json"]
        if any(p.is_file() for p in originals):
            return _original_rows([p for p in originals if p.is_file()], limit), [folder / "png", folder]
    files = c.find_files(path, [f"data/{split}-*.parquet", f"{split}-*.parquet", f"data/{split}.parquet",
                                f"{split}.parquet"], benchmark=BENCHMARK, split=split)
    return c.read_rows(files, limit, benchmark=BENCHMARK), [path]


def _original_rows(files: list[Path], limit: int | None) -> list[dict]:
    rows: list[dict] = []
    for f in files:
        kind = "augmented" if f.stem.endswith("_augmented") else "human"
        left = None if limit is None else limit - len(rows)
        if left is not None and left <= 0:
            break
        rows += [dict(r, _kind=kind) for r in c.read_rows([f], left, benchmark=BENCHMARK)]
    return rows


def metric(prediction: str | None, item: Item) -> float:
    """ChartQA relaxed accuracy: numbers within 5% of the gold, else exact match."""
    return relaxed_accuracy(prediction, item.answer)
