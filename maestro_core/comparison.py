"""Paired comparison of two systems scored on the same items: how much more accurate, and how
much dearer, one is than the other, with bootstrap confidence intervals, and the items only
one of them got right (an exact McNemar test on those).

On Maestro-Mini's 200 test items one item is 0.005 accuracy, so a bar such as "as accurate as
the routers at no higher cost" is read against these intervals, not the point figures alone:

    rows = list(csv.DictReader(open("results.csv")))     # `maestro eval`'s per-item rows
    a, b = system_rows(rows, "policy"), system_rows(rows, "router:mlp")
    d = paired_difference(a, b, system_a="policy", system_b="router:mlp")
    d.accuracy_diff, d.accuracy_ci, d.cost_ratio, d.cost_ratio_ci, d.mcnemar_p
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import numpy as np

from maestro_core.errors import ConfigError


@dataclass(frozen=True)
class PairedDifference:
    """System A against system B on the same `n` items (A minus B, A over B)."""

    system_a: str
    system_b: str
    n: int
    accuracy_a: float
    accuracy_b: float
    cost_a: float  # mean USD per task
    cost_b: float
    accuracy_diff: float
    accuracy_ci: tuple[float, float]
    cost_diff: float
    cost_diff_ci: tuple[float, float]
    cost_ratio: float  # cost_a / cost_b
    cost_ratio_ci: tuple[float, float]
    only_a: int  # items A got right and B did not
    only_b: int
    mcnemar_p: float  # two-sided exact test that only_a and only_b are equally likely
    level: float
    resamples: int

    def as_dict(self) -> dict:
        return asdict(self)


def system_rows(rows: Iterable[Mapping[str, str]], system: str) -> dict[str, tuple[float, float]]:
    """{item_id: (correct, cost)} of one system in `maestro eval`'s results.csv rows."""
    out: dict[str, tuple[float, float]] = {}
    seen: set[str] = set()
    for row in rows:
        seen.add(row["system"])
        if row["system"] != system:
            continue
        if row["item_id"] in out:
            raise ConfigError(f"item {row['item_id']} appears twice for system {system}.",
                              fix="pass one evaluation's results.csv per system.")
        out[row["item_id"]] = (float(row["correct"] or 0), float(row["cost"] or 0))
    if not out:
        raise ConfigError(f"no rows of system '{system}' (the file has {sorted(seen)}).", field="system",
                          fix="name a system from the results' system column, e.g. policy or router:mlp.")
    return out


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact binomial p-value of only_a vs only_b discordant items under p = 1/2."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def paired_difference(a: Mapping[str, tuple[float, float]], b: Mapping[str, tuple[float, float]], *,
                      system_a: str = "a", system_b: str = "b", resamples: int = 10_000, level: float = 0.95,
                      seed: int = 0) -> PairedDifference:
    """A against B from {item_id: (correct, cost)} of each (`system_rows`). Both must score the
    same items; the intervals are percentile intervals over `resamples` item resamples drawn
    with replacement (the same items for both systems, so the pairing is kept)."""
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))
        raise ConfigError(f"{system_a} and {system_b} scored different items ({len(missing)} differ, e.g. "
                          f"{missing[:3]}).", fix="compare evaluations of the same split (the same --data).")
    if not 0.0 < level < 1.0 or resamples < 100:
        raise ConfigError(f"level {level} must be in (0, 1) and resamples {resamples} >= 100.", field="level",
                          fix="use e.g. level 0.95 and 10000 resamples.")
    ids = sorted(a)
    ca, ka = np.array([a[i][0] for i in ids]), np.array([a[i][1] for i in ids])
    cb, kb = np.array([b[i][0] for i in ids]), np.array([b[i][1] for i in ids])
    idx = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))
    acc_d = ca[idx].mean(1) - cb[idx].mean(1)
    cost_a, cost_b = ka[idx].mean(1), kb[idx].mean(1)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def ci(x: np.ndarray) -> tuple[float, float]:
        return float(np.percentile(x, lo)), float(np.percentile(x, hi))

    ratio = cost_a / np.where(cost_b > 0, cost_b, np.nan)
    only_a = int(((ca > 0.5) & (cb <= 0.5)).sum())
    only_b = int(((cb > 0.5) & (ca <= 0.5)).sum())
    return PairedDifference(
        system_a=system_a, system_b=system_b, n=len(ids), accuracy_a=float(ca.mean()), accuracy_b=float(cb.mean()),
        cost_a=float(ka.mean()), cost_b=float(kb.mean()), accuracy_diff=float(ca.mean() - cb.mean()),
        accuracy_ci=ci(acc_d), cost_diff=float(ka.mean() - kb.mean()), cost_diff_ci=ci(cost_a - cost_b),
        cost_ratio=float(ka.mean() / kb.mean()) if kb.mean() > 0 else float("nan"),
        cost_ratio_ci=ci(ratio[~np.isnan(ratio)]) if np.any(~np.isnan(ratio)) else (float("nan"), float("nan")),
        only_a=only_a, only_b=only_b, mcnemar_p=mcnemar_exact_p(only_a, only_b), level=level, resamples=resamples)
