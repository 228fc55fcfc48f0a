"""Baselines on the shared harness: pair table, oracle, random, routers, metrics.json."""

import json

import pytest

from maestro_core.cache import ExpertCache
from maestro_core.dataset import Item
from maestro_core.evaluation import baseline_systems, level1_pairs, pair_table, write_outputs
from maestro_core.experts import build_experts
from maestro_core.registry import parse_registry


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


async def test_oracle_prefers_cheapest_correct(reg):
    # both pairs right -> the cheaper one (calc, $0.001 < counter $0.002)
    items = [Item("x", "arith", "What is 2 + 2? 'a b c d'", "4", "numeric")]
    table = await pair_table(reg, build_experts(reg), items, cache=ExpertCache(None), run_id="o")
    assert [t.outcome for t in (table["calc@@math"][0], table["counter@@text"][0])] == [1.0, 1.0]
    systems = baseline_systems(reg, items, table, routers=())
    assert systems["oracle"][1] == ["calc@@math"]
