"""MATH-Vision (Wang et al., 2024): competition math problems with diagrams.

Layout read (``source``): the Hub repo "MathLLMs/MathVision" (splits test, testmini) or
a local copy: a folder with ``data/{split}-*.parquet`` or one such Parquet file. Columns:
``id`` (str), ``question`` (with "<image1>" markers), ``options`` (list of str; empty for
free-form), ``image`` (relative path, "images/1.jpg"), ``decoded_image`` (embedded image
struct), ``answer`` (a letter for multiple choice), ``solution``, ``level`` (1-5),
``subject``. PARTLY VERIFIED: file names and splits from the Hub listing; ``question``,
``options``, ``decoded_image`` and ``answer`` from two independent loaders of the
dataset; ``id``, ``image``, ``solution``, ``level``, ``subject`` as remembered from the
dataset card.

Items: question = the question, plus for multiple choice one "(A) ..." line per option and
a letter instruction; choices = the options; answer = the gold (letter for multiple
choice); scorer ``choice`` with options, else ``math``. ``metric`` = letter match or
math equivalence (``metrics.math_accuracy``).
"""

from __future__ import annotations

from pathlib import Path

from maestro_core.benchmarks.public import _common as c
from maestro_core.benchmarks.public.metrics import math_accuracy
from maestro_core.dataset import Item

BENCHMARK = "mathvision"
HUB_NAME = "MathLLMs/MathVision"
DEFAULT_SPLIT = "test"
SPLITS = ("test", "testmini")
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
        if path.is_file():
            files, bases = [path], [path.parent, path.parent.parent]
        else:
            files = c.find_files(path, [f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}.parquet"],
                                 benchmark=BENCHMARK, split=split)
            bases = [path, files[0].parent]
        rows = c.read_rows(files, limit, benchmark=BENCHMARK)
        sink = c.ImageSink(image_dir, BENCHMARK, bases=bases)
        where = str(files[0])
    items = []
    for i, row in enumerate(rows):
        item_id = f"{BENCHMARK}-{split}-{c.text(row.get('id')) or i}"
        options = [c.text(o) for o in (row.get("options") or [])]
        question = c.text(row.get("question"))
        answer = c.text(row.get("answer"))
        if options:
            question = c.format_choices(question, options, _INSTRUCTION)
            answer = answer.strip("() ")
        image = row.get("decoded_image")
        if c.blank(image) or (isinstance(image, dict) and not image.get("bytes")):
            image = row.get("image")
        items.append(c.make_item(id=item_id, benchmark=BENCHMARK, question=question, answer=answer,
                                 scorer="choice" if options else "math", images=[sink.put(image, item_id)],
                                 choices=options or None, split=split, where=where))
    return c.check_unique(items, BENCHMARK)


def metric(prediction: str | None, item: Item) -> float:
    """MATH-Vision: option letter for multiple choice, math equivalence for free-form."""
    return math_accuracy(prediction, item)
