"""MathVista (Lu et al., 2024): mathematical reasoning in visual contexts.

Layouts read (``source``):

- Hub name "AI4Math/MathVista" (splits testmini, test; test has no public answers), or a
  local copy: a folder with ``data/{split}-*.parquet`` or one such Parquet file. Columns:
  ``pid``, ``question``, ``image`` (relative path, e.g. "images/1.jpg"), ``decoded_image``
  (embedded image struct), ``choices`` (list of str, None for free-form), ``unit``,
  ``precision`` (float, for float answers), ``answer`` (str; the option TEXT for multiple
  choice), ``question_type`` ("multi_choice" | "free_form"), ``answer_type`` ("text" |
  "integer" | "float" | "list"), ``metadata`` (struct), ``query`` (the official prompt:
  hint + question + choices). VERIFIED against the dataset card (dataset_info features)
  of AI4Math/MathVista.
- The JSON annotation file the dataset also ships (``annot_testmini.json``: a dict of
  the same records keyed by pid), with images at their ``image`` path relative to the
  file (unpack ``images.zip`` beside it). Record fields as above; NOT verified beyond the
  file's name and size on the Hub.

Items: question = ``query`` (the official prompt; rebuilt from question + choices when
missing); multiple choice -> answer = the gold option's letter, choices = the options,
scorer ``choice``; integer/float -> scorer ``numeric``, float golds written with exactly
``precision`` decimals; list/text -> ``exact``. ``metric`` = ``metrics.mathvista_accuracy``.
"""

from __future__ import annotations

from pathlib import Path

from maestro_core.benchmarks.public import _common as c
from maestro_core.benchmarks.public.metrics import format_with_precision, mathvista_accuracy
from maestro_core.dataset import Item
from maestro_core.errors import ConfigError

BENCHMARK = "mathvista"
HUB_NAME = "AI4Math/MathVista"
DEFAULT_SPLIT = "testmini"
SPLITS = ("testmini", "test")


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
        if path.is_file():
            files, bases = [path], [path.parent, path.parent.parent]
        else:
            files = c.find_files(path, [f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}.parquet",
                                        f"annot_{split}.json", f"{split}.json"], benchmark=BENCHMARK, split=split)
            bases = [path, files[0].parent]
        rows = c.read_rows(files, limit, benchmark=BENCHMARK)
        sink = c.ImageSink(image_dir, BENCHMARK, bases=bases)
        where = str(path)
    return c.check_unique([_item(row, i, split, sink, where) for i, row in enumerate(rows)], BENCHMARK)


def _item(row: dict, i: int, split: str, sink: c.ImageSink, where: str) -> Item:
    pid = c.text(row.get("pid")) or c.text(row.get("_key")) or str(i)
    item_id = f"{BENCHMARK}-{split}-{pid}"
    choices = [c.text(x) for x in (row.get("choices") or [])]
    answer = c.text(row.get("answer"))
    multi = c.text(row.get("question_type")) == "multi_choice" or bool(choices)
    answer_type = c.text(row.get("answer_type"))
    if multi:
        if answer and answer not in choices:
            raise ConfigError(f"gold answer {answer!r} is not one of the choices {choices}.", source=where,
                              entry=item_id, field="answer", fix="use the dataset's published rows unchanged.")
        gold = c.LETTERS[choices.index(answer)] if answer else ""
        scorer = "choice"
    else:
        gold = format_with_precision(answer, row["precision"]) if (
            answer_type == "float" and not c.blank(row.get("precision"))) else answer
        scorer = "numeric" if answer_type in ("integer", "float") else "exact"
    question = c.text(row.get("query"))
    if not question:
        question = c.text(row.get("question"))
        if multi:
            question = c.format_choices(question, choices, "Answer with the option's letter from the given choices.")
    image = row.get("decoded_image")
    if c.blank(image) or (isinstance(image, dict) and not image.get("bytes")):
        image = row.get("image")
    return c.make_item(id=item_id, benchmark=BENCHMARK, question=question, answer=gold, scorer=scorer,
                       images=[sink.put(image, item_id)], choices=choices if multi else None, split=split,
                       where=where)


def metric(prediction: str | None, item: Item) -> float:
    """MathVista: option match for multiple choice; integer/float/list rules for free-form."""
    return mathvista_accuracy(prediction, item)
