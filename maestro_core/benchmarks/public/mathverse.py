"""MathVerse (Zhang et al., 2024): visual math problems in six text/vision versions.

Layouts read (``source``): the Hub repo "AI4Math/MathVerse" (subsets "testmini", 3,940
rows, and "testmini_text_only", 788 rows, each with the single split "testmini"; this
loader's ``split`` names the subset) or a local copy of its files: a folder
with ``testmini.parquet`` / ``testmini_text_only.parquet`` (or the ``.json`` twins with
the images unpacked from ``images.zip`` beside them), or one such file. Columns:
``sample_index``, ``problem_index``, ``problem_version`` ("Text Dominant", ...,
"Vision Only"), ``question``, ``image`` (embedded image struct in Parquet, a file name in
JSON; none in the text-only version), ``answer`` (a letter for multiple choice),
``question_type`` ("multi-choice" | "free-form"), ``metadata``, ``query_wo`` (the
official prompt without chain-of-thought), ``query_cot``, ``question_for_eval``.
VERIFIED: file names, subsets and split names from the Hub listing and dataset viewer;
``sample_index``, ``query_wo``, ``answer``, ``question_type``, ``problem_version``,
``problem_index`` and ``image`` from an independent benchmark manifest built on these
files; ``query_cot`` from a mirror's dataset card; ``question``, ``metadata`` and
``question_for_eval`` (a commit "Add question_for_eval") as remembered, not re-checked.

Items: question = ``query_wo`` (falls back to ``question``); multiple choice -> answer =
the letter, choices parsed from a "Choices:" block of "A: ..." lines when the text has
one (vision-heavy versions draw the options in the image: no choices then), scorer
``choice``; free-form -> scorer ``math``. ``metric`` = letter match or math equivalence
(``metrics.math_accuracy``; the official pipeline extracts and judges with an LLM).
"""

from __future__ import annotations

import re
from pathlib import Path

from maestro_core.benchmarks.public import _common as c
from maestro_core.benchmarks.public.metrics import math_accuracy
from maestro_core.dataset import Item

BENCHMARK = "mathverse"
HUB_NAME = "AI4Math/MathVerse"
DEFAULT_SPLIT = "testmini"
SPLITS = ("testmini", "testmini_text_only")
_OPTION = re.compile(r"^\s*\(?([A-H])\)?\s*[:.：)]\s*(.+?)\s*$")


def parse_choices(text: str) -> list[str] | None:
    """Options of a "Choices:" block ("A:30°", "B:60°" lines); None unless they run A, B, C..."""
    lines = text.splitlines()
    start = next((k for k, line in enumerate(lines) if line.strip().rstrip(":：").lower() in ("choices", "choice")),
                 None)
    if start is None:
        return None
    options: list[str] = []
    for line in lines[start + 1:]:
        m = _OPTION.match(line)
        if not m or m[1] != c.LETTERS[len(options)]:
            break
        options.append(m[2])
    return options if len(options) >= 2 else None


def load(source: str | Path, *, split: str | None = None, limit: int | None = None,
         image_dir: Path) -> list[Item]:
    c.check_limit(limit, BENCHMARK)
    split = split or DEFAULT_SPLIT
    path = c.local_path(source, BENCHMARK, HUB_NAME)
    if path is None:
        # two configs ("subsets"), testmini and testmini_text_only, each with one split "testmini"
        rows = c.load_hub_rows(str(source), benchmark=BENCHMARK, split="testmini", limit=limit, config=split)
        sink = c.ImageSink(image_dir, BENCHMARK, hub_repo=str(source))
        where = f"{source}:{split}"
    else:
        c.check_split(split, SPLITS, BENCHMARK)
        names = [split, split.replace("_text_only", "_text-only")]
        files = [path] if path.is_file() else c.find_files(
            path, [f"{n}.parquet" for n in names] + [f"{n}.json" for n in names] + [f"data/{split}-*.parquet"],
            benchmark=BENCHMARK, split=split)
        rows = c.read_rows(files, limit, benchmark=BENCHMARK)
        base = files[0].parent
        sink = c.ImageSink(image_dir, BENCHMARK, bases=[base, base / "images"])
        where = str(files[0])
    items = []
    for i, row in enumerate(rows):
        item_id = f"{BENCHMARK}-{split}-{c.text(row.get('sample_index')) or i}"
        multi = c.text(row.get("question_type")).lower().replace("_", "-") in ("multi-choice", "multiple-choice")
        question = c.text(row.get("query_wo")) or c.text(row.get("question"))
        choices = (parse_choices(c.text(row.get("question_for_eval")) or c.text(row.get("question")))
                   if multi else None)
        answer = c.text(row.get("answer"))
        if multi:
            answer = answer.strip().strip("()").strip()
        items.append(c.make_item(id=item_id, benchmark=BENCHMARK, question=question, answer=answer,
                                 scorer="choice" if multi else "math", images=[sink.put(row.get("image"), item_id)],
                                 choices=choices, split=split, where=where))
    return c.check_unique(items, BENCHMARK)


def metric(prediction: str | None, item: Item) -> float:
    """MathVerse: option letter for multiple choice, math equivalence for free-form."""
    return math_accuracy(prediction, item)
