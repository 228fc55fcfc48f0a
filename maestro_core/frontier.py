"""The routing frontier by question template: the best accuracy that any routing which sees
only the benchmark and the wording of the question (not the item's image or its particular
names and numbers) can reach at a given cost per task, from an evaluation's pair table.

A policy or router that routes by the question's template cannot beat this curve on the same
items; a point above it needs per-item cues. It is computed on the evaluated items
themselves (an upper bound, fitted on the split it scores), by dynamic programming over the
templates with costs rounded to `unit`.

    templates = [question_template(it.benchmark, it.question) for it in items]
    points = template_frontier(table, templates, caps=[0.005, 0.01, 0.02])
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from maestro_core.errors import ConfigError
from maestro_core.trajectory import Trajectory

_WORD = re.compile(r"[A-Za-z]+")


def question_template(benchmark: str, question: str, *, words: int = 6) -> str:
    """`benchmark: first words` of the question's first line: its first word and the next
    lower-case words (names, numbers and symbols dropped), `words` in all; math questions,
    whose wording is the expression, are one template."""
    if benchmark == "math":
        return "math"
    found = _WORD.findall(question.split("\n")[0])
    kept = found[:1] + [w for w in found[1:] if w.islower()]
    return f"{benchmark}: {' '.join(kept[:words])}"


def template_frontier(table: Mapping[str, Sequence[Trajectory]], templates: Sequence[str],
                      caps: Sequence[float], *, unit: float = 0.0001) -> list[dict]:
    """For each cap (USD per task): the template -> pair choice with the most correct answers
    whose mean cost is at most the cap. Returns dicts with cap, accuracy, cost_per_task and
    routes (template -> pair), in the order of `caps`."""
    if not table:
        raise ConfigError("the pair table is empty.", fix="evaluate with --baselines first.")
    n = len(templates)
    if any(len(trajs) != n for trajs in table.values()):
        raise ConfigError("every pair needs one episode per item.", fix="pass the pair table of one evaluation.")
    if unit <= 0:
        raise ConfigError("unit must be > 0.", field="unit", fix="use e.g. 0.0001.")
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(templates):
        groups.setdefault(t, []).append(i)
    # per template and pair: (correct answers, total cost in units)
    options = {g: [(p, sum(table[p][i].outcome for i in idx), round(sum(table[p][i].total_cost for i in idx) / unit))
                   for p in sorted(table)] for g, idx in groups.items()}
    # one pass up to the largest cap: the best route set for each exact total cost; a cap then
    # takes the best state at or under it (costs are >= 0, so a smaller cap's states are a subset)
    limit = int(max(caps, default=0.0) * n / unit + 1e-9)
    best: dict[int, tuple[float, tuple[tuple[str, str], ...]]] = {0: (0.0, ())}
    for g in sorted(options):
        nxt: dict[int, tuple[float, tuple[tuple[str, str], ...]]] = {}
        for spent, (correct, routes) in best.items():
            for p, ok, cost in options[g]:
                c = spent + cost
                if c <= limit and (c not in nxt or nxt[c][0] < correct + ok):
                    nxt[c] = (correct + ok, routes + ((g, p),))
        best = nxt
    out = []
    for cap in caps:
        cap_units = int(cap * n / unit + 1e-9)
        within = [(c, v) for c, v in best.items() if c <= cap_units]
        if not within:
            out.append({"cap": cap, "accuracy": None, "cost_per_task": None, "routes": {}})
            continue
        spent, (correct, routes) = max(within, key=lambda kv: (kv[1][0], -kv[0]))
        out.append({"cap": cap, "accuracy": correct / n, "cost_per_task": spent * unit / n, "routes": dict(routes)})
    return out
