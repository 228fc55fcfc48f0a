"""CharXiv (Wang et al., 2024): reasoning questions about charts from arXiv papers.

Layout read (``source``): the Hub repo "princeton-nlp/CharXiv" (splits validation, test)
or a local copy of its files: a folder with ``val.parquet`` / ``test.parquet`` (or
``data/{split}-*.parquet``), or one such file. One row per chart, columns used:
``image`` (embedded image struct), ``reasoning_q`` (str), ``reasoning_a`` (str),
``reasoning_q_source`` (int: 1 text-in-chart, 2 text-in-general, 3 number-in-chart,
4 number-in-general); optional ``figure_path`` / ``original_id``. The per-chart
descriptive questions (``descriptive_q1..4`` / ``descriptive_a1..4``) are not loaded:
their official grading is an LLM judge with per-question rubrics. PARTLY VERIFIED: the
file names and split names from the Hub listing; the column names from the CharXiv task
of lmms-eval, which reads ``reasoning_q``, ``reasoning_a``, ``reasoning_q_source``,
``descriptive_q{n}``, ``subplot_loc/row/col`` and ``image`` from these files.

Items (one per chart): question = the reasoning question plus the answer-format
instructions of its source category (paraphrasing the official response instructions;
for category 4 the required integer / number of decimal places, from the gold answer);
answer = ``reasoning_a``; scorer ``numeric`` for number answers (categories 3/4 whose
gold is one number), else ``exact``. ``metric`` = ``metrics.charxiv_accuracy``.
"""

from __future__ import annotations

from pathlib import Path

from maestro_core.benchmarks.public import _common as c
from maestro_core.benchmarks.public.metrics import charxiv_accuracy
from maestro_core.dataset import Item
from maestro_core.rewards import _single_number

BENCHMARK = "charxiv"
HUB_NAME = "princeton-nlp/CharXiv"
DEFAULT_SPLIT = "validation"
SPLITS = ("validation", "test")
_FILE_STEM = {"validation": "val", "test": "test"}

_INSTRUCTIONS = {
    1: ("* Your final answer must be text that is explicitly written in the chart and relevant to the question.\n"
        "* If the answer has several terms, separate them with commas.\n"
        "* Unless the question asks otherwise (e.g. for a letter), give the full names of subplots and labels."),
    2: ("* If the question lists options, your final answer must be one of them.\n"
        "* Follow any further instructions in the question.\n"
        "* Otherwise answer with a short phrase only."),
    3: ("* Your final answer must be a number that is explicitly written in the chart and relevant to the "
        "question, even if it is an approximate value.\n"
        "* You may take the number out of surrounding text."),
}


def _number_instruction(answer: str) -> str:
    _, _, decimals = answer.strip().partition(".")
    if not decimals:
        return "* Your final answer must be an exact integer."
    return f"* Your final answer must be a number with {len(decimals)} decimal places."


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
        stem = _FILE_STEM[split]
        files = [path] if path.is_file() else c.find_files(
            path, [f"{stem}.parquet", f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}.parquet"],
            benchmark=BENCHMARK, split=split)
        rows = c.read_rows(files, limit, benchmark=BENCHMARK)
        sink = c.ImageSink(image_dir, BENCHMARK, bases=[files[0].parent])
        where = str(files[0])
    items = []
    for i, row in enumerate(rows):
        item_id = f"{BENCHMARK}-{split}-{i:04d}"
        answer = c.text(row.get("reasoning_a"))
        try:
            category = int(float(c.text(row.get("reasoning_q_source")) or 0))
        except ValueError:
            category = 0
        instruction = _number_instruction(answer) if category == 4 else _INSTRUCTIONS.get(category, "")
        question = c.text(row.get("reasoning_q"))
        if instruction:
            question = f"{question}\n{instruction}"
        numeric = category in (3, 4) and _single_number(answer) is not None
        items.append(c.make_item(id=item_id, benchmark=BENCHMARK, question=question, answer=answer,
                                 scorer="numeric" if numeric else "exact",
                                 images=[sink.put(row.get("image"), item_id)], choices=None, split=split,
                                 where=where))
    return c.check_unique(items, BENCHMARK)


def metric(prediction: str | None, item: Item) -> float:
    """CharXiv reasoning accuracy: equal value for numbers, same term(s) for text."""
    return charxiv_accuracy(prediction, item)
