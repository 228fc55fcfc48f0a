"""Paired comparison of two systems on the same items (maestro_core/comparison.py) and its
script, benchmarks/compare_systems.py."""

from __future__ import annotations

import csv
import json

import pytest

from benchmarks.compare_systems import main as compare_main
from maestro_core.comparison import mcnemar_exact_p, paired_difference, system_rows
from maestro_core.errors import ConfigError


def _rows(system: str, correct: list[int], cost: list[float]) -> list[dict]:
    return [{"system": system, "item_id": f"it-{i:03d}", "correct": str(c), "cost": f"{k:.5f}"}
            for i, (c, k) in enumerate(zip(correct, cost))]


def test_mcnemar_exact_p_matches_the_binomial_tails():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 7) == pytest.approx(2 / 2 ** 7)  # all 7 discordant items one way
    assert mcnemar_exact_p(7, 6) == 1.0
    assert mcnemar_exact_p(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact_p(10, 2) == mcnemar_exact_p(2, 10)


def test_a_clearly_better_and_dearer_system_gets_intervals_that_say_so():
    n = 200
    b_correct = [1 if i % 2 else 0 for i in range(n)]  # B: 0.50
    a_correct = [1 if i % 2 or i % 4 == 0 else 0 for i in range(n)]  # A: B's items and 50 more, 0.75
    a = system_rows(_rows("a", a_correct, [0.02] * n), "a")
    b = system_rows(_rows("b", b_correct, [0.01] * n), "b")
    d = paired_difference(a, b, system_a="a", system_b="b", resamples=2000, seed=1)
    assert d.n == n and d.accuracy_a == 0.75 and d.accuracy_b == 0.5
    assert d.accuracy_diff == pytest.approx(0.25) and d.only_a == 50 and d.only_b == 0
    lo, hi = d.accuracy_ci
    assert 0.15 < lo < 0.25 < hi < 0.35  # the interval holds the difference and excludes 0
    assert d.cost_ratio == pytest.approx(2.0) and d.cost_ratio_ci == pytest.approx((2.0, 2.0))
    assert d.cost_diff == pytest.approx(0.01) and d.mcnemar_p < 1e-10


def test_a_system_against_itself_differs_by_nothing():
    rows = _rows("p", [1, 0, 1, 1, 0] * 20, [0.01, 0.03, 0.0005, 0.01, 0.001] * 20)
    a = system_rows(rows, "p")
    d = paired_difference(a, dict(a), resamples=500)
    assert d.accuracy_diff == 0 and d.accuracy_ci == (0.0, 0.0) and d.cost_ratio == 1.0
    assert d.only_a == d.only_b == 0 and d.mcnemar_p == 1.0


def test_bad_input_names_the_fix():
    rows = _rows("p", [1, 0], [0.01, 0.01])
    with pytest.raises(ConfigError, match=r"no rows of system 'router:mlp' \(the file has \['p'\]\)"):
        system_rows(rows, "router:mlp")
    with pytest.raises(ConfigError, match="appears twice"):
        system_rows(rows + rows[:1], "p")
    a = system_rows(rows, "p")
    with pytest.raises(ConfigError, match="scored different items"):
        paired_difference(a, {"other": (1.0, 0.01)})
    with pytest.raises(ConfigError, match="resamples"):
        paired_difference(a, a, resamples=10)


def test_the_script_writes_a_table_and_json(tmp_path, capsys):
    path = tmp_path / "results.csv"
    rows = (_rows("policy", [1, 1, 0, 1] * 10, [0.01] * 40) + _rows("router:mlp", [1, 0, 0, 1] * 10, [0.005] * 40))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["system", "item_id", "correct", "cost"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "cmp"
    assert compare_main(["--system", str(path), "policy", "--system", str(path), "router:mlp", "--resamples", "200",
                         "--out", str(out)]) == 0
    got = json.loads((out / "compare.json").read_text())["comparisons"][0]
    assert got["accuracy_diff"] == pytest.approx(0.25) and got["cost_ratio"] == pytest.approx(2.0)
    assert got["only_a"] == 10 and got["only_b"] == 0
    assert "| policy | router:mlp | 40 | 0.750 | 0.500 | +0.250" in (out / "compare.md").read_text()
    # two As against one B: one row each
    assert compare_main(["--system", str(path), "router:mlp", "--system", str(path), "policy", "--system", str(path),
                         "policy", "--label", "r", "--label", "p1", "--label", "p", "--baselines", "1",
                         "--resamples", "200", "--out", str(out)]) == 0
    rows = json.loads((out / "compare.json").read_text())["comparisons"]
    assert [(r["system_a"], r["system_b"], r["accuracy_diff"]) for r in rows] == [("r", "p", -0.25), ("p1", "p", 0.0)]
    assert compare_main(["--system", str(path), "policy", "--system", str(path), "router:knn", "--out", str(out)]) == 2
    assert "no rows of system 'router:knn'" in capsys.readouterr().err
