"""HR-Bench (Wang et al., 2024): multiple-choice perception on 4K and 8K images.

Layouts read (``source``):

- The official files of the Hub repo "DreamMr/HR-Bench": ``hr_bench_4k.parquet`` /
  ``hr_bench_8k.parquet`` and the same tables as ``hr_bench_4k.tsv`` / ``hr_bench_8k.tsv``
  (VLMEvalKit TSV). Columns: ``index`` (int), ``question``, ``answer`` (letter),
  ``category`` ("single" | "cross" instance), ``A``, ``B``, ``C``, ``D`` (option texts),
  ``cycle_category``, ``image`` (base64-encoded image). A local ``source`` is a folder
  holding them or one such file. VERIFIED against the repository file listing of
  DreamMr/HR-Bench and the dataset card (dataset_info features) of its Parquet mirror
  ohjoonhee/HR-Bench (splits hrbench_4k / hrbench_8k).
- Hub name: "DreamMr/HR-Bench" is loaded with ``data_files`` naming the split's Parquet
  file (the repo has no split config); other names (e.g. the mirror) with their own
  split names ("hrbench_4k").

Splits: "4k" (default) and "8k" ("hrbench_4k", "hr_bench_8k"... are accepted too).
Items: question = the question, then "(A) ..." lines for the non-empty options, then the
letter instruction; choices = those options; answer = the letter; scorer ``choice``.
``metric`` = the option letter must match (``metrics.choice_accuracy``).
"""

from __future__ import annotations

import re
from pathlib import Path

from maestro_core.benchmarks.public import _common as c
from maestro_core.benchmarks.public.metrics import choice_accuracy
from maestro_core.dataset import Item
from maestro_core.errors import ConfigError

BENCHMARK = "hrbench"
HUB_NAME = "DreamMr/HR-Bench"
DEFAULT_SPLIT = "4k"
SPLITS = ("4k", "8k")
_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _resolution(split: str) -> str:
    m = re.fullmatch(r"(?:hr_?bench_)?([48]k)", split.strip().lower())
    if not m:
        raise ConfigError(f"unknown split {split!r}.", source=BENCHMARK, field="split",
                          fix=f"use one of {list(SPLITS)}.")
    return m[1]


def load(source: str | Path, *, split: str | None = None, limit: int | None = None,
         image_dir: Path) -> list[Item]:
    c.check_limit(limit, BENCHMARK)
    split = split or DEFAULT_SPLIT
    path = c.local_path(source, BENCHMARK, HUB_NAME)
    if path is None:
        if str(source) == HUB_NAME:
            res = _resolution(split)
            rows = c.load_hub_rows(HUB_NAME, benchmark=BENCHMARK, split=res, limit=limit,
                                   data_files={res: f"hr_bench_{res}.parquet"})
        else:
            res = split
            rows = c.load_hub_rows(str(source), benchmark=BENCHMARK, split=split, limit=limit)
        where = f"{source}:{split}"
    else:
        res = _resolution(split)
        files = [path] if path.is_file() else c.find_files(
            path, [f"hr_bench_{res}.parquet", f"hr_bench_{res}.tsv", f"data/hrbench_{res}-*.parquet",
                   f"hrbench_{res}-*.parquet"], benchmark=BENCHMARK, split=split)
        rows = c.read_rows(files, limit, benchmark=BENCHMARK)
        where = str(files[0])
    sink = c.ImageSink(image_dir, BENCHMARK)
    items = []
    for i, row in enumerate(rows):
        item_id = f"{BENCHMARK}-{res}-{c.text(row.get('index')) or i}"
        choices = []
        for letter in "ABCD":
            option = c.text(row.get(letter))
            if not option:
                break
            choices.append(option)
        question = c.format_choices(c.text(row.get("question")), choices, _INSTRUCTION)
        items.append(c.make_item(id=item_id, benchmark=BENCHMARK, question=question,
                                 answer=c.text(row.get("answer")), scorer="choice",
                                 images=[sink.put(row.get("image"), item_id)], choices=choices, split=res,
                                 where=where))
    return c.check_unique(items, BENCHMARK)


def metric(prediction: str | None, item: Item) -> float:
    """HR-Bench: 1.0 iff the prediction picks the gold option (letter or exact option text)."""
    return choice_accuracy(prediction, item)
