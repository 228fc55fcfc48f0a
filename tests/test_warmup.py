"""Warm-up over a registry of the real in-process Python models (calculator, both OCR engines,
the digit CNN): loads, probes, measures and records per registry version."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from maestro_core.errors import ExpertError
from maestro_core.experts import build_experts
from maestro_core.registry import parse_registry
from maestro_core.store import Store
from maestro_core.warmup import ExpertStats, format_stats_table, probes_for, warm_up

REGISTRY = {
    "name": "warmup-test",
    "capabilities": {"arithmetic": "math", "ocr": "reads text in images", "digit": "reads one digit",
                     "text": "free text"},
    "experts": [
        {"name": "calc", "capabilities": ["arithmetic"], "price": {"per_call": 0.00001},
         "backend": {"kind": "python", "callable": "maestro_core.pymodels:calculator"}},
        {"name": "rapidocr", "capabilities": ["ocr"], "price": {"per_call": 0.0002},
         "backend": {"kind": "python", "callable": "maestro_core.ocr:rapidocr_model"}},
        {"name": "tesseract", "capabilities": ["ocr"], "price": {"per_call": 0.0001},
         "backend": {"kind": "python", "callable": "maestro_core.ocr:tesseract_model"}},
        {"name": "digit-cnn", "capabilities": ["digit"], "price": {"per_call": 0.00001},
         "backend": {"kind": "python", "callable": "maestro_core.digits:digit_cnn_model"}},
    ],
    "skills": [
        {"name": "math", "requires": ["arithmetic"], "solvers": [{"name": "calc", "steps": [{"prompt": "{input}"}]}]},
        {"name": "read", "requires": ["ocr"], "solvers": [{"name": "ocr", "steps": [{"prompt": "{input}"}]}]},
        {"name": "digit", "requires": ["digit"], "solvers": [{"name": "cnn", "steps": [{"prompt": "{input}"}]}]},
    ],
}


async def test_warm_up_measures_and_records(tmp_path: Path) -> None:
    reg = parse_registry(copy.deepcopy(REGISTRY), source="warmup.yaml")
    version = reg.version
    experts = build_experts(reg)
    with Store(tmp_path / "home") as store:
        stats = await warm_up(reg, experts, store, probes=3)
        rows = store.expert_stats(reg.version)
    table = format_stats_table(stats)
    print("\n" + table)

    assert [s.expert for s in stats] == list(reg.experts)
    assert reg.version == version == parse_registry(copy.deepcopy(REGISTRY), source="warmup.yaml").version
    by = {s.expert: s for s in stats}
    assert by["calc"].probe_kinds == ("arithmetic",) and by["calc"].probe_accuracy == 1.0
    assert by["rapidocr"].probe_kinds == ("ocr",) and by["rapidocr"].probe_accuracy == 1.0
    assert by["tesseract"].probe_accuracy == 1.0
    assert by["digit-cnn"].probe_kinds == ("digit",) and by["digit-cnn"].probe_accuracy == 1.0
    for s in stats:
        assert isinstance(s, ExpertStats) and s.n == 3
        assert 0 < s.latency_p50_s <= s.latency_p95_s
        assert s.tokens_in_mean == 0 and s.tokens_out_mean == 0
        assert s.cost_per_call == pytest.approx(reg.experts[s.expert].price.per_call)
        row = rows[s.expert]
        assert row["n"] == 3 and row["latency_p50_s"] == pytest.approx(s.latency_p50_s)
        assert row["latency_p95_s"] == pytest.approx(s.latency_p95_s)
        assert row["cost_per_call"] == pytest.approx(s.cost_per_call)
        assert f"| {s.expert} |" in table
    assert table.splitlines()[0].startswith("| expert |")


async def test_warm_up_without_store_and_one_probe() -> None:
    reg = parse_registry(copy.deepcopy(REGISTRY), source="warmup.yaml")
    stats = await warm_up(reg, build_experts(reg), probes=1)
    assert all(s.n == 1 and s.latency_p50_s == s.latency_p95_s for s in stats)


async def test_failing_expert_is_named() -> None:
    raw = copy.deepcopy(REGISTRY)
    raw["experts"][2]["backend"]["kwargs"] = {"binary": "/nonexistent/tesseract"}
    reg = parse_registry(raw, source="warmup.yaml")
    with pytest.raises(ExpertError, match="expert 'tesseract'"):
        await warm_up(reg, build_experts(reg), probes=1)

    raw = copy.deepcopy(REGISTRY)
    raw["experts"][0]["backend"]["callable"] = "maestro_core.pymodels:no_such_model"
    reg = parse_registry(raw, source="warmup.yaml")
    with pytest.raises(ExpertError, match="expert 'calc'"):
        await warm_up(reg, build_experts(reg), probes=1)

    reg = parse_registry(copy.deepcopy(REGISTRY), source="warmup.yaml")
    experts = build_experts(reg)
    del experts["digit-cnn"]
    with pytest.raises(ExpertError, match="digit-cnn"):
        await warm_up(reg, experts)


def test_probes_follow_capabilities() -> None:
    assert [p.kind for p in probes_for({"ocr"}, 3)] == ["ocr"] * 3
    assert len({p.image for p in probes_for({"ocr"}, 3)}) == 3
    assert [p.kind for p in probes_for({"text", "arithmetic"}, 4)] == ["arithmetic", "text"] * 2
    assert [p.kind for p in probes_for({"counting"}, 2)] == ["text", "text"]
