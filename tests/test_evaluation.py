"""Baselines on the shared harness: pair table, oracle, random, routers, metrics.json."""

import json

import pytest

from maestro_core.cache import ExpertCache
from maestro_core.dataset import Item
from maestro_core.evaluation import (baseline_systems, expensive_experts, level1_pairs, pair_table, system_metrics,
                                     write_outputs)
from maestro_core.experts import build_experts
from maestro_core.registry import parse_registry
from maestro_core.trajectory import StepRecord, Trajectory


@pytest.fixture
def reg(registry_dict):
    registry_dict["experts"] = registry_dict["experts"][:2]
    registry_dict["skills"] = registry_dict["skills"][:2]
    return parse_registry(registry_dict)


def make_items(n, offset=0, split="test"):
    items = []
    for i in range(offset, offset + n):
        if i % 2:
            items.append(Item(f"a{i}", "arith", f"What is {i} * 3?", str(3 * i), "numeric", split=split))
        else:
            words = " ".join(["x"] * (i % 5 + 1))
            items.append(Item(f"c{i}", "count", f"How many words are in '{words}'?", str(i % 5 + 1), "numeric",
                              split=split))
    return items


async def test_pair_table_and_baselines(reg, tmp_path):
    items, train = make_items(12), make_items(20, offset=100, split="train")
    experts = build_experts(reg)
    cache = ExpertCache(None)
    assert level1_pairs(reg) == ["calc@@math", "counter@@text"]
    table = await pair_table(reg, experts, items, cache=cache, run_id="ev")
    train_table = await pair_table(reg, experts, train, cache=cache, run_id="ev-train")
    # each pair solves exactly its own half
    assert [t.outcome for t in table["calc@@math"]] == [float(i % 2) for i in range(12)]
    assert [t.outcome for t in table["counter@@text"]] == [float(1 - i % 2) for i in range(12)]

    systems = baseline_systems(reg, items, table, train_items=train, train_table=train_table)
    assert set(systems) == {"expert:calc@@math", "expert:counter@@text", "oracle", "random", "router:knn", "router:mlp"}
    metrics = write_outputs(tmp_path, systems=systems, items=items, split="test", registry=reg, checkpoint="none")
    s = metrics["systems"]
    assert s["oracle"]["accuracy"] == 1.0 and s["expert:calc@@math"]["accuracy"] == 0.5
    assert s["router:knn"]["accuracy"] >= 0.9 and s["router:mlp"]["accuracy"] >= 0.9
    assert s["oracle"]["calls_per_task"] == 1.0 and s["oracle"]["turns_per_task"] == 2.0
    assert s["oracle"]["per_benchmark"] == {"arith": 1.0, "count": 1.0}
    assert metrics["oracle_gap"] == pytest.approx(0.5)

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for name, m in on_disk["systems"].items():
        for k in ("accuracy", "cost_per_task", "calls_per_task", "turns_per_task", "latency_p50_s", "latency_p95_s",
                  "error_rate", "per_benchmark"):
            assert k in m, (name, k)
    assert {"split", "n_items", "registry_version", "checkpoint"} <= set(on_disk)
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 * 12
    assert "oracle" in (tmp_path / "report.md").read_text()

    # the issue-6 outputs: normalised gain, expensive share, per-benchmark routes, plots
    best = metrics["best_single"]["system"]
    assert metrics["normalised_gain"]["oracle"] == 1.0 and metrics["normalised_gain"][best] == 0.0
    assert on_disk["normalised_gain"] == metrics["normalised_gain"]
    assert metrics["expensive_experts"] == ["counter"]  # $0.002 per call > calc's $0.001
    assert s["expert:counter@@text"]["expensive_share"] == 1.0 and s["expert:calc@@math"]["expensive_share"] == 0.0
    assert s["oracle"]["expensive_share"] == 0.5  # the count half of the items
    assert s["oracle"]["routes_per_benchmark"] == {"arith": {"calc@@math": 6}, "count": {"counter@@text": 6}}
    # one call per item: each benchmark's routes add up to its 6 items, and to the overall routes
    rpb = s["random"]["routes_per_benchmark"]
    assert {b: sum(c.values()) for b, c in rpb.items()} == {"arith": 6, "count": 6}
    assert {r: sum(c.get(r, 0) for c in rpb.values()) for r in s["random"]["routes"]} == s["random"]["routes"]
    assert on_disk["plots"] == ["pareto.png", "benchmark_accuracy.png", "routing_heatmap.png"]
    for name in on_disk["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "| norm. gain |" in report and "| expensive share |" in report and "(counter)" in report
    oracle_row = next(ln for ln in report.splitlines() if ln.startswith("| oracle |"))
    assert oracle_row.split(" | ")[1:4] == ["1.000", "1.000", f"{s['oracle']['cost_per_task']:.6f}"]


async def test_oracle_prefers_cheapest_correct(reg):
    # both pairs right -> the cheaper one (calc, $0.001 < counter $0.002)
    items = [Item("x", "arith", "What is 2 + 2? 'a b c d'", "4", "numeric")]
    table = await pair_table(reg, build_experts(reg), items, cache=ExpertCache(None), run_id="o")
    assert [t.outcome for t in (table["calc@@math"][0], table["counter@@text"][0])] == [1.0, 1.0]
    systems = baseline_systems(reg, items, table, routers=())
    assert systems["oracle"][1] == ["calc@@math"]


def call_step(turn, expert, skill="math", cost=0.001):
    return StepRecord(turn=turn, text=f"<call>{expert}@@{skill}: q</call>", action="call", expert=expert, skill=skill,
                      solver="direct", call_input="q", observation="<information>1</information>", cost=cost)


def hand_trajectory(k, benchmark, experts, outcome=1.0):
    """An episode that calls `experts` (one call each, skill math), then answers."""
    steps = [call_step(i, e) for i, e in enumerate(experts)]
    steps.append(StepRecord(turn=len(steps), text="<answer>1</answer>", action="answer"))
    return Trajectory(
        episode_id=f"ep{k}", run_id="r", iteration=0, chunk=0, item_id=f"i{k}", benchmark=benchmark, sample_index=0,
        registry_version="v", checkpoint_id="c", prompt_text="Question: q", prompt_ids=(), steps=tuple(steps),
        final_answer="1", finish_reason="answer", reward=outcome, outcome=outcome, format_score=0.0, cost_term=0.0,
        cost_lambda=0.0, total_cost=sum(s.cost for s in steps), total_latency_s=0.1, spent_s=0.0,
        n_calls=len(experts), n_cache_hits=0)


def test_expensive_experts_ranks_token_and_call_prices_on_one_scale(registry, registry_dict):
    # llm: 1k tokens in at $1/1M + 1k out at $2/1M = $0.003 > counter $0.002 per call > calc $0.001
    assert expensive_experts(registry) == {"llm"}
    for e in registry_dict["experts"]:
        e["price"] = {"per_call": 0.002} if e["name"] != "calc" else {}
    assert expensive_experts(parse_registry(registry_dict)) == {"counter", "llm"}  # a tie: both count
    for e in registry_dict["experts"]:
        e["price"] = {}
    assert expensive_experts(parse_registry(registry_dict)) == frozenset()  # all free: none is expensive


def test_expensive_share_and_routes_per_benchmark_on_hand_built_trajectories():
    trajs = [
        hand_trajectory(0, "arith", ["llm"]),
        hand_trajectory(1, "arith", ["calc", "llm", "llm"]),  # a multi-call episode: every call counts
        hand_trajectory(2, "count", ["counter"], outcome=0.0),
        hand_trajectory(3, "count", []),  # answered without a call
    ]
    routes = ["llm@@math", "calc@@math > llm@@math > llm@@math", "counter@@math", "answer"]
    m = system_metrics(trajs, routes, expensive={"llm"})
    assert m["expensive_share"] == pytest.approx(3 / 5)  # 5 calls, 3 of them to llm
    assert m["routes_per_benchmark"] == {"arith": {"calc@@math": 1, "llm@@math": 3},
                                         "count": {"answer": 1, "counter@@math": 1}}
    assert m["routes"] == {r: 1 for r in routes}
    assert m["calls_per_task"] == 5 / 4 and m["accuracy"] == 0.75
    assert system_metrics(trajs, routes, expensive=set())["expensive_share"] == 0.0
    assert system_metrics([hand_trajectory(9, "x", [])], expensive={"llm"})["expensive_share"] == 0.0  # no calls
    plain = system_metrics(trajs)  # without routes and prices: only the old keys
    assert "expensive_share" not in plain and "routes_per_benchmark" not in plain and "routes" not in plain


async def test_write_outputs_with_one_system_still_writes_the_plots(reg, tmp_path):
    items = make_items(3)
    table = await pair_table(reg, build_experts(reg), items, cache=ExpertCache(None), run_id="one",
                             pairs=["calc@@math"])
    metrics = write_outputs(tmp_path, systems={"expert:calc@@math": (table["calc@@math"], ["calc@@math"] * 3)},
                            items=items, split="test", registry=reg, checkpoint="none")
    assert "normalised_gain" not in metrics and "best_single" not in metrics  # no oracle: no gain
    assert metrics["systems"]["expert:calc@@math"]["expensive_share"] == 0.0
    for name in metrics["plots"]:
        data = (tmp_path / name).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| expert:calc@@math | 0.333 | - |" in (tmp_path / "report.md").read_text()


async def test_the_report_pairs_the_policy_with_each_router_and_the_best_single_pair(reg, tmp_path):
    items, train = make_items(12), make_items(20, offset=100, split="train")
    experts, cache = build_experts(reg), ExpertCache(None)
    table = await pair_table(reg, experts, items, cache=cache, run_id="ev")
    train_table = await pair_table(reg, experts, train, cache=cache, run_id="ev-train")
    systems = baseline_systems(reg, items, table, train_items=train, train_table=train_table)
    systems["policy"] = systems["oracle"]  # a policy that routes as the oracle does
    metrics = write_outputs(tmp_path, systems=systems, items=items, split="test", registry=reg, checkpoint="none")
    best = metrics["best_single"]["system"]
    assert set(metrics["paired"]) == {"router:knn", "router:mlp", best}
    d = metrics["paired"][best]  # the oracle gets all 12, one pair only its 6
    assert (d["accuracy_a"], d["accuracy_b"], d["only_a"], d["only_b"]) == (1.0, 0.5, 6, 0)
    assert d["accuracy_ci"][0] > 0 and d["mcnemar_p"] == pytest.approx(2 / 2 ** 6)
    for name, d in metrics["paired"].items():
        s = metrics["systems"]
        assert d["accuracy_diff"] == pytest.approx(s["policy"]["accuracy"] - s[name]["accuracy"])
        assert d["cost_ratio"] == pytest.approx(s["policy"]["cost_per_task"] / s[name]["cost_per_task"])
    report = (tmp_path / "report.md").read_text()
    assert "Paired on the same items" in report and f"| {best} | +0.500" in report
    assert json.loads((tmp_path / "metrics.json").read_text())["paired"][best]["only_a"] == 6
    # without a policy there is nothing to pair
    del systems["policy"]
    assert "paired" not in write_outputs(tmp_path / "b", systems=systems, items=items, split="test", registry=reg,
                                         checkpoint="none")
