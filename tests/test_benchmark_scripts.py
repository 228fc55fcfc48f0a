"""The performance benchmarks in benchmarks/ run: each script with --small exits 0 and writes
its JSON result (to a temporary folder, never over benchmarks/results) with the expected keys.
The figures themselves depend on the machine and are not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
COMMON_KEYS = {"benchmark", "small", "command", "machine", "wall_s"}


def run_small(name: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), "--small", "--out", str(out)],
                          capture_output=True, text=True, timeout=180, cwd=BENCHMARKS.parent)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result = json.loads((out / f"{name}.json").read_text())
    assert COMMON_KEYS <= set(result), set(result)
    assert result["benchmark"] == name and result["small"] is True
    assert result["machine"]["cpus"] >= 1
    return result


def test_rollout_throughput(tmp_path):
    r = run_small("rollout_throughput", tmp_path)
    assert {"definition", "calls_per_episode", "rows", "target"} <= set(r)
    assert [row["concurrency"] for row in r["rows"]] == [16, 64]
    for row in r["rows"]:
        assert row["errors"] == 0 and row["episodes_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["episodes_per_s"] / row["limit_episodes_per_s"])
        assert row["server_max_in_flight"] <= row["concurrency"]
    assert {"metric", "min", "value", "met"} <= set(r["target"])


def test_step_overhead(tmp_path):
    r = run_small("step_overhead", tmp_path)
    assert set(r["parts_us"]) == {"parse_action (call)", "registry lookup (resolve_solver)",
                                  "cache key (sha256 of the call)", "cache get_or_run (hit)",
                                  "store write_and_ingest per step"}
    assert r["total_us"] == pytest.approx(sum(r["parts_us"].values()))
    assert all(v > 0 for v in [*r["parts_us"].values(), *r["context_us"].values()])
    assert {"metric", "max", "value", "met"} <= set(r["target"])


def test_ingest(tmp_path):
    r = run_small("ingest", tmp_path)
    assert {"episodes", "steps", "bare_s", "ours_s", "ratio_bare_over_ours", "target"} <= set(r)
    assert set(r["ours_s"]) == set(r["ratio_bare_over_ours"])
    assert "ingest_trajectories(arrow table)" in r["ours_s"] and "write_and_ingest(objects)" in r["ours_s"]
    assert r["steps"] > r["episodes"] > 0 and r["bare_s"] > 0


def test_cache_savings(tmp_path):
    r = run_small("cache_savings", tmp_path)
    for key in ("no_cache", "iteration_1", "iteration_2"):
        assert {"calls", "requests", "calls_saved", "expert_s_saved", "wall_s"} <= set(r[key])
    assert r["no_cache"]["requests"] == r["no_cache"]["calls"]
    # identical calls inside a group run once; a second pass over the same items is (almost) all hits
    assert 0 < r["within_iteration_calls_saved"] < 1
    assert r["second_iteration_calls_saved"] > r["within_iteration_calls_saved"]


def test_sampling_draw(tmp_path):
    r = run_small("sampling_draw", tmp_path)
    assert [row["vocab"] for row in r["rows"]] == [1543, 8233, 49152]
    assert all(row["whole_row_ms"] > 0 and row["allowed_columns_ms"] > 0 for row in r["rows"])


@pytest.mark.slow
def test_policy_speed(tmp_path):
    r = run_small("policy_speed", tmp_path)
    assert r["generation"] and r["update"]
    assert all(g["tokens_per_s"] > 0 for g in r["generation"])
    for u in r["update"]:
        assert {"grpo_tokens_per_s", "plain_tokens_per_s", "overhead_ratio", "grpo_first_s"} <= set(u)
        assert u["overhead_ratio"] > 0


@pytest.mark.slow
def test_scaling(tmp_path):
    r = run_small("scaling", tmp_path)
    assert len(r["rows"]) == 2
    for row in r["rows"]:
        assert {"items", "group_size", "episodes", "collect_s", "store_s", "update_s", "total_s",
                "s_per_episode"} <= set(row)
        assert row["episodes"] == row["items"] * row["group_size"] and row["params_changed"]


def test_vlm_sampling(tmp_path):
    r = run_small("vlm_sampling", tmp_path)
    assert [row["max_batch_size"] for row in r["rows"]] == [1, r["episodes"]]
    assert r["rows"][0]["mean_batch"] == 1 and r["rows"][1]["mean_batch"] > 1
    assert r["same_tokens"] is True and r["max_abs_logprob_diff"] < 2e-3
    assert r["speedup"] == pytest.approx(r["rows"][1]["turns_per_s"] / r["rows"][0]["turns_per_s"], rel=0.01)


def test_pretrained_training(tmp_path):
    r = run_small("pretrained_training", tmp_path)
    assert [row["iteration"] for row in r["rows"]] == [0, 1]
    assert all(row["episodes"] == 16 and row["collect_s"] > 0 and row["update_s"] > 0 for row in r["rows"])
    assert r["rows"][-1]["val_accuracy"] is not None and r["parameters"] > 0


@pytest.mark.slow
def test_lm_experts(tmp_path):
    r = run_small("lm_experts", tmp_path)
    assert r["items"] == 4 and set(r["dtypes"]) == {"float32", "bfloat16"}
    for dt in r["dtypes"].values():
        assert dt["seconds"] > 0 and list(dt["pairs"]) == ["smollm2-135m@@math"]
        assert 0 <= dt["pairs"]["smollm2-135m@@math"]["accuracy"] <= 1
    assert r["dtypes"]["float32"]["pairs"]["smollm2-135m@@math"]["answers_differing_from_float32"] == 0
    assert r["float32_over_bfloat16_time"] == pytest.approx(
        r["dtypes"]["float32"]["seconds"] / r["dtypes"]["bfloat16"]["seconds"], rel=0.01)
