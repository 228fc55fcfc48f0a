"""Chart reading from OCR boxes: the tool behind the chart/{value_lookup, extremum, difference}
solvers.

It works from what an OCR expert read on the rendered chart (`[boxes]` JSON: text, box,
confidence) and the image size, never from the chart's data: it finds the category labels
(a row under the plot, or a column left of it), pairs each with the printed value label
nearest to it along the category axis, then answers the question from those pairs.

    pairs = read_chart(boxes, width, height)        # {"setosa": "1.5", ...}
    chart_answer(ocr_json, [image], question=..., kind="value")
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from maestro_core.tools import ToolOutput

_NUM = re.compile(r"^-?\d+(?:[.,]\d+)?$")


@dataclass(frozen=True)
class Box:
    text: str
    x0: float
    y0: float
    x1: float
    y1: float
    conf: float

    @property
    def cx(self) -> float:
        return (self.x0 + self.x1) / 2

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2

    @property
    def number(self) -> float | None:
        t = self.text.strip().rstrip(".").replace(" ", "")
        return float(t.replace(",", ".")) if _NUM.match(t) else None


def parse_boxes(text: str) -> list[Box]:
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return []
    out = []
    for b in raw if isinstance(raw, list) else []:
        try:
            x0, y0, x1, y1 = (float(v) for v in b["box"])
            out.append(Box(str(b["text"]).strip(), x0, y0, x1, y1, float(b.get("conf", 1.0))))
        except (KeyError, TypeError, ValueError):
            continue
    return [b for b in out if b.text]


def _cluster(boxes: list[Box], key, tol: float) -> list[list[Box]]:
    groups: list[list[Box]] = []
    for b in sorted(boxes, key=key):
        if groups and abs(key(b) - key(groups[-1][-1])) <= tol:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def read_chart(boxes: list[Box], width: int, height: int) -> dict[str, str]:
    """Category label -> printed value text, for vertical bars/lines or horizontal bars."""
    # the title sits at the top; rotated axis titles are taller than wide
    body = [b for b in boxes if b.cy > 0.09 * height and (b.y1 - b.y0) < 1.5 * (b.x1 - b.x0)]
    rows = [g for g in _cluster([b for b in body if b.cy > 0.7 * height], lambda b: b.cy, 8) if len(g) >= 2]
    cols = [g for g in _cluster([b for b in body if b.cx < 0.35 * width], lambda b: b.x1, 10) if len(g) >= 2]
    row = max(rows, key=len, default=[])
    col = max(cols, key=len, default=[])
    if len(row) >= len(col) and row:
        cats, along = sorted(row, key=lambda b: b.cx), (lambda b: b.cx)
        values = [b for b in body if b not in row and b.number is not None and b.cy < min(c.cy for c in row)]
    elif col:
        cats, along = sorted(col, key=lambda b: b.cy), (lambda b: b.cy)
        values = [b for b in body if b not in col and b.number is not None and b.x0 > max(c.x1 for c in col)]
    else:
        return {}
    spacing = min((along(b) - along(a) for a, b in zip(cats, cats[1:])), default=width)
    out: dict[str, str] = {}
    for c in cats:
        near = [v for v in values if abs(along(v) - along(c)) < 0.6 * spacing]
        if near:
            best = min(near, key=lambda v: abs(along(v) - along(c)))
            out[c.text] = best.text.strip().rstrip(".").replace(",", ".")
    return out


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", s.lower())


def match_category(name: str, labels: list[str]) -> str | None:
    """The OCR label that names `name` (exact after normalisation, else a close spelling)."""
    target = _norm(name)
    by_norm = {_norm(lab): lab for lab in labels}
    if target in by_norm:
        return by_norm[target]
    close = difflib.get_close_matches(target, list(by_norm), n=1, cutoff=0.75)
    return by_norm[close[0]] if close else None


def _fmt(x: float, decimals: int) -> str:
    return f"{x:.{decimals}f}" if decimals else str(int(round(x)))


def _decimals(*texts: str) -> int:
    return max((len(t.split(".")[1]) if "." in t else 0) for t in texts)


def chart_answer(text: str, images: list[Path], question: str = "", kind: str = "value") -> ToolOutput:
    """Answer a chart question of one `kind` (value | extremum | difference) from OCR boxes."""
    if not images:
        return ToolOutput("no chart image", confidence=0.0)
    from PIL import Image
    with Image.open(images[0]) as im:
        width, height = im.size
    boxes = parse_boxes(text)
    pairs = read_chart(boxes, width, height)
    if not pairs:
        return ToolOutput("could not read the chart's labels", confidence=0.0)
    conf = sum(b.conf for b in boxes) / len(boxes)
    vals = {k: float(v) for k, v in pairs.items()}
    q = question.lower()
    if kind == "extremum":
        low = any(w in q for w in ("lowest", "smallest", "least", "minimum", "fewest"))
        pick = (min if low else max)(vals, key=vals.get)
        return ToolOutput(pick, confidence=conf)
    if kind == "difference":
        m = re.search(r"between (?:the values for )?(.+?) and (.+?)(?: \(|\?|$)", question, flags=re.IGNORECASE)
        if not m:
            return ToolOutput("could not find the two categories in the question", confidence=0.0)
        a, b = match_category(m.group(1), list(pairs)), match_category(m.group(2), list(pairs))
        if a is None or b is None:
            return ToolOutput("category not found on the chart", confidence=0.0)
        return ToolOutput(_fmt(vals[a] - vals[b], _decimals(pairs[a], pairs[b])), confidence=conf)
    m = re.search(r"(?:value|values?) (?:for|of) (.+?)\??$", question.strip(), flags=re.IGNORECASE)
    name = match_category(m.group(1), list(pairs)) if m else None
    if name is None:
        return ToolOutput("category not found on the chart", confidence=0.0)
    return ToolOutput(pairs[name], confidence=conf)
