"""V* Bench (Wu & Xie, 2023): visual search in high-resolution images (191 questions).

Layouts read (``source``):

- The official release, Hub repo "craigwu/vstar_bench" (split test), or a local copy:
  a folder with ``test_questions.jsonl`` and the image folders ``direct_attributes/``,
  ``relative_position/`` (or that JSONL file itself). One line per question:
  ``{"image": "direct_attributes/sa_4690.jpg", "text": "<question>\\n(A) ...\\n(B) ...\\n
  Answer with the option's letter from the given choices directly.", "category":
  "direct_attributes" | "relative_position", "question_id": ..., "label": "A"}``.
  VERIFIED against the repository file listing of craigwu/vstar_bench and several
  independent test fixtures that copy its rows; ``label`` exists since the May 2024
  "ground truth labels" revision.
- The Parquet re-upload "lmms-lab/vstar-bench" (same columns, ``image`` embedded):
  read the same way (a Parquet file or a folder with ``data/test-*.parquet``). Columns
  NOT verified beyond ``text``, ``label``, ``image``, ``category``, ``question_id``.

Items: question = ``text`` unchanged (it already lists the options and the official
instruction); choices parsed from its "(A) ..." lines; answer = ``label``; scorer
``choice``. ``metric`` = the option letter must match (``metrics.choice_accuracy``).
"""

from __future__ import annotations

from pathlib import Path

from maestro_core.benchmarks.public import _common as c
from maestro_core.benchmarks.public.metrics import choice_accuracy
from maestro_core.dataset import Item

BENCHMARK = "vstar"
HUB_NAME = "craigwu/vstar_bench"
DEFAULT_SPLIT = "test"
SPLITS = ("test",)
_INSTRUCTION = "Answer with the option's letter from the given choices directly."


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
        files = [path] if path.is_file() else c.find_files(
            path, ["test_questions.jsonl", f"data/{split}-*.parquet", f"{split}-*.parquet", "*.jsonl"],
            benchmark=BENCHMARK, split=split)
        rows = c.read_rows(files, limit, benchmark=BENCHMARK)
        sink = c.ImageSink(image_dir, BENCHMARK, bases=[files[0].parent])
        where = str(files[0])
    items = []
    for i, row in enumerate(rows):
        qid = c.text(row.get("question_id")) or str(i)
        item_id = f"{BENCHMARK}-{qid}"
        question = c.text(row.get("text")) or c.text(row.get("question"))
        parsed = c.parse_lettered_options(question)
        choices = parsed[1] if parsed else None
        if choices:  # the instruction line is not part of the last option
            choices[-1] = choices[-1].split("\n")[0].removesuffix(_INSTRUCTION).strip()
        answer = c.text(row.get("label")) or c.text(row.get("answer"))
        items.append(c.make_item(id=item_id, benchmark=BENCHMARK, question=question, answer=answer.strip("()"),
                                 scorer="choice", images=[sink.put(row.get("image"), item_id)], choices=choices,
                                 split=split, where=where))
    return c.check_unique(items, BENCHMARK)


def metric(prediction: str | None, item: Item) -> float:
    """V* Bench: 1.0 iff the prediction picks the gold option (letter or exact option text)."""
    return choice_accuracy(prediction, item)
