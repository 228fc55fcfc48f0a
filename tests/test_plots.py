"""The evaluation plots: three valid PNGs whatever the systems, and which systems each plot shows."""

import json
from pathlib import Path

import pytest
from PIL import Image

from maestro_core.plots import (PLOT_FILES, bar_systems, benchmark_bars, heatmap_systems, pareto_frontier,
                                pareto_plot, routing_heatmap, write_plots)

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 150, (path, im.size)


def system(acc, cost, per_benchmark, routes=None, routes_per_benchmark=None, calls=1.0):
    m = {"accuracy": acc, "cost_per_task": cost, "calls_per_task": calls, "turns_per_task": calls + 1,
         "latency_p50_s": 0.1, "latency_p95_s": 0.2, "error_rate": 0.0, "per_benchmark": per_benchmark}
    if routes is not None:
        m["routes"] = routes
    if routes_per_benchmark is not None:
        m["routes_per_benchmark"] = routes_per_benchmark
    return m


def real_metrics() -> dict:
    """The committed evaluation of the embedded default (14 systems, 200 items)."""
    return json.loads((ROOT / "docs" / "results" / "metrics.json").read_text())


@pytest.mark.parametrize("case", ["one_system", "one_system_no_routes", "no_systems", "many_real",
                                  "many_with_policies"])
def test_write_plots_always_writes_three_pngs(tmp_path, case):
    if case == "one_system":
        metrics = {"split": "data", "n_items": 3, "systems": {"expert:calc@@math": system(
            0.5, 0.001, {"arith": 0.5}, {"calc@@math": 3}, {"arith": {"calc@@math": 3}})}}
    elif case == "one_system_no_routes":
        metrics = {"split": "data", "n_items": 3, "systems": {"policy": system(1.0, 0.0, {"arith": 1.0})}}
    elif case == "no_systems":
        metrics = {"split": "test", "n_items": 0, "systems": {}}
    else:
        metrics = real_metrics()
        if case == "many_with_policies":
            for name, acc in (("policy", 0.85), ("policy_untrained", 0.05)):
                metrics["systems"][name] = system(
                    acc, 0.02, {"charts": acc, "math": acc}, {"calc@@math > rapidocr@@chart": 2, "answer": 1},
                    {"charts": {"rapidocr@@chart": 2, "calc@@math": 1}, "math": {"answer": 1}}, calls=1.5)
    out = tmp_path / "plots"
    assert write_plots(metrics, out) == list(PLOT_FILES) == ["pareto.png", "benchmark_accuracy.png",
                                                              "routing_heatmap.png"]
    for name in PLOT_FILES:
        assert_png(out / name)


def test_plot_functions_write_where_told(tmp_path):
    metrics = real_metrics()
    for fn, name in ((pareto_plot, "a.png"), (benchmark_bars, "sub/b.png"), (routing_heatmap, "c.png")):
        assert fn(metrics, tmp_path / name) == tmp_path / name
        assert_png(tmp_path / name)


def test_bar_systems_top_by_accuracy_plus_policies():
    systems = {f"expert:e{i}@@s": system(i / 20, 0.01, {}) for i in range(12)}
    systems["policy_untrained"] = system(0.0, 0.01, {})
    shown = bar_systems(systems)
    assert shown[:8] == [f"expert:e{i}@@s" for i in range(11, 3, -1)]
    assert shown[8:] == ["policy_untrained"]
    assert bar_systems({"oracle": system(1.0, 0.0, {})}) == ["oracle"]


def test_heatmap_systems_policies_first_else_oracle_and_routers():
    metrics = real_metrics()
    systems = metrics["systems"]
    assert heatmap_systems(systems) == ["oracle", "router:knn", "router:mlp"]
    systems["policy"] = system(0.8, 0.01, {}, {"calc@@math": 1})
    systems["policy_untrained"] = system(0.1, 0.01, {}, {"calc@@math": 1})
    assert heatmap_systems(systems) == ["policy", "policy_untrained"]
    only = {"expert:calc@@math": system(0.2, 0.001, {}, {"calc@@math": 3})}
    assert heatmap_systems(only) == ["expert:calc@@math"]
    assert heatmap_systems({"policy": system(0.2, 0.001, {})}) == []


def test_pareto_frontier():
    pts = [(0.01, 0.5), (0.001, 0.2), (0.02, 0.4), (0.001, 0.1), (0.05, 0.9), (0.05, 0.9)]
    assert pareto_frontier(pts) == [1, 0, 4]


def test_cost_knob_plot_draws_the_settings_and_baselines(tmp_path):
    from maestro_core.plots import cost_knob_plot

    points = [{"label": "no budget", "accuracy": 0.84, "cost_per_task": 0.024},
              {"label": "budget $0.02", "accuracy": 0.65, "cost_per_task": 0.0044},
              {"label": "budget $0.005", "accuracy": 0.40, "cost_per_task": 0.0}]  # a $0 point stays drawable
    base = {"oracle": {"accuracy": 0.93, "cost_per_task": 0.01}, "router:mlp": {"accuracy": 0.8, "cost_per_task": 0.009}}
    more = {"frontier": [{"accuracy": 0.5, "cost_per_task": 0.001}, {"accuracy": 0.9, "cost_per_task": 0.02}]}
    for name, pts in (("knob.png", points), ("empty.png", []), ("two.png", points)):
        out = cost_knob_plot(pts, base, tmp_path / name, more_curves=more if name == "two.png" else None)
        with Image.open(out) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 300
