"""MME-RealWorld (Zhang et al., 2024): high-resolution real-world multiple choice (A-E).

Layouts read (``source``):

- The official release (Hub repo "yifanzhang114/MME-RealWorld", also MME-RealWorld-Lite):
  ``MME_RealWorld.json`` (split "en", default) or ``MME_RealWorld_CN.json`` (split "cn"),
  a JSON list of {"Question_id", "Image" (path relative to the image root), "Text",
  "Question Type", "Answer choices" (["(A) ...", ..., "(E) ..."]), "Ground truth"
  (letter), "Task", "Subtask", "Category", ...}; images unpacked from the tarballs
  beside the JSON (paths are looked up relative to the JSON's folder). A local
  ``source`` is that folder or the JSON file. VERIFIED against the official repository's
  evaluation script (evaluation/eval_your_results.py) and output template, and the Hub
  file listing.
- The lmms-eval Parquet ("yifanzhang114/MME-RealWorld-Lmms-eval"): columns ``question``,
  ``multi-choice options`` (the "(A) ..." strings), ``answer`` (letter), ``bytes``
  (base64 image) and an id (``question_id`` or ``index``). Only the columns its
  lmms-eval task reads were verified; the split name ("train") was NOT verified. This is
  also the layout assumed for Hub names.

Items: question = the official prompt's shape (Text, " The choices are listed below:",
one "(X) option" per line, then an instruction to answer with only the letter A-E);
choices = the options without their "(X) " prefixes; answer = the ground-truth letter;
scorer ``choice``. ``metric`` = the letter must match (``metrics.choice_accuracy``; stricter than
the official regex, which takes the first capital A-E anywhere in the response).
"""

from __future__ import annotations

import re
from pathlib import Path

from maestro_core.benchmarks.public import _common as c
from maestro_core.benchmarks.public.metrics import choice_accuracy
from maestro_core.dataset import Item

BENCHMARK = "mme_realworld"
HUB_NAME = "yifanzhang114/MME-RealWorld-Lmms-eval"
DEFAULT_SPLIT = "en"
SPLITS = ("en", "cn")
_FILES = {"en": ["MME_RealWorld.json", "MME-RealWorld.json", "*[Ll]ite*.json"],
          "cn": ["MME_RealWorld_CN.json", "MME-RealWorld-CN.json", "*_CN.json"]}
_INSTRUCTION = ("Choose the best answer to the multiple-choice question above, based on the image. "
                "Reply with only the letter (A, B, C, D or E) of the correct option.")
_PREFIX = re.compile(r"^\s*\(([A-Z])\)\s*")


def load(source: str | Path, *, split: str | None = None, limit: int | None = None,
         image_dir: Path) -> list[Item]:
    c.check_limit(limit, BENCHMARK)
    path = c.local_path(source, BENCHMARK, HUB_NAME)
    if path is None:
        split = split or "train"
        rows, sink, where = c.hub_source(source, benchmark=BENCHMARK, split=split, limit=limit,
                                             image_dir=image_dir)
    else:
        split = c.check_split(split or DEFAULT_SPLIT, SPLITS, BENCHMARK)
        files = [path] if path.is_file() else c.find_files(path, _FILES[split], benchmark=BENCHMARK, split=split)
        files = files[:1]
        rows = c.read_rows(files, limit, benchmark=BENCHMARK)
        base = files[0].parent
        sink = c.ImageSink(image_dir, BENCHMARK, bases=[base, base / "data", base / "images"])
        where = str(files[0])
    items = []
    for i, row in enumerate(rows):
        official = "Text" in row or "Answer choices" in row
        qid = c.text(row.get("Question_id") if official else (row.get("question_id") or row.get("index"))) or str(i)
        item_id = f"{BENCHMARK}-{qid}"
        options = row.get("Answer choices") if official else row.get("multi-choice options")
        options = [c.text(o) for o in (options or [])]
        choices = []
        for k, option in enumerate(options):
            m = _PREFIX.match(option)
            choices.append(option[m.end():].strip() if m and m[1] == c.LETTERS[k] else option)
        text = c.text(row.get("Text") if official else row.get("question"))
        lines = "\n".join(f"({c.LETTERS[k]}) {choice}" for k, choice in enumerate(choices))
        question = f"{text} The choices are listed below:\n{lines}\n{_INSTRUCTION}"
        answer = c.text(row.get("Ground truth") if official else row.get("answer")).strip("() ")
        image = row.get("Image") if official else (row.get("bytes") if "bytes" in row else row.get("image"))
        items.append(c.make_item(id=item_id, benchmark=BENCHMARK, question=question, answer=answer,
                                 scorer="choice", images=[sink.put(image, item_id)], choices=choices,
                                 split=split, where=where))
    return c.check_unique(items, BENCHMARK)


def metric(prediction: str | None, item: Item) -> float:
    """MME-RealWorld: 1.0 iff the prediction picks the gold option among A-E."""
    return choice_accuracy(prediction, item)
