"""`maestro eval --data FILE --registry FILE` end to end in a subprocess: outputs and scoring."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import BASE_REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def test_eval_on_a_jsonl_file_with_its_own_scorers(tmp_path):
    reg = dict(BASE_REGISTRY, experts=BASE_REGISTRY["experts"][:2], skills=BASE_REGISTRY["skills"][:2])
    (tmp_path / "reg.yaml").write_text(yaml.safe_dump(reg))
    rows = [
        {"id": "q1", "benchmark": "chartqa", "question": "What is 6 * 7?", "answer": "42", "scorer": "numeric"},
        {"id": "q2", "benchmark": "chartqa", "question": "How many words are in 'a b c'?", "answer": "3",
         "scorer": "exact"},
        {"id": "q3", "benchmark": "custom", "question": "What is 10 - 4?", "answer": "6.0", "scorer": "numeric"},
        {"id": "bad", "benchmark": "custom", "question": "broken", "answer": "1", "scorer": "fuzzy"},
    ]
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(tmp_path / "home"), "eval", "--baselines",
                          "--checkpoint", "none", "--data", str(data), "--registry", str(tmp_path / "reg.yaml"),
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_items"] == 3 and m["split"] == "data" and m["checkpoint"] == "none"
    assert m["systems"]["oracle"]["accuracy"] == 1.0
    # "6.0" scores against the calculator's "6" because q3 names the numeric scorer
    assert m["systems"]["expert:calc@@math"]["per_benchmark"] == {"chartqa": 0.5, "custom": 1.0}
    assert {"random", "expert:counter@@text"} <= set(m["systems"])
    assert (out / "results.csv").exists() and (out / "report.md").exists()


def test_eval_rejects_unknown_checkpoint(tmp_path):
    res = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(tmp_path / "home"), "eval", "--baselines",
                          "--checkpoint", "best", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode != 0 and "Fix:" in res.stderr


def _eval_one_item(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`maestro eval --baselines --data` on one arithmetic item with a two-expert registry."""
    reg = dict(BASE_REGISTRY, experts=BASE_REGISTRY["experts"][:2], skills=BASE_REGISTRY["skills"][:2])
    (tmp_path / "reg.yaml").write_text(yaml.safe_dump(reg))
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps({"id": "q", "benchmark": "m", "question": "What is 2 + 2?", "answer": "4",
                                "scorer": "numeric"}) + "\n")
    return subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(tmp_path / "home"), "eval", "--baselines",
                           *args, "--data", str(data), "--registry", str(tmp_path / "reg.yaml"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_eval_target_cost_needs_a_checkpoint_and_says_so(tmp_path):
    res = _eval_one_item(tmp_path, "--target-cost", "0.01")
    assert res.returncode != 0 and "--target-cost" in res.stderr and "Fix:" in res.stderr, res.stderr[-1500:]
    assert not (tmp_path / "out" / "metrics.json").exists()
    res = _eval_one_item(tmp_path, "--target-cost", "0.01", "--price-tilt", "2")
    assert res.returncode != 0 and "one of --price-tilt and --target-cost" in res.stderr, res.stderr[-1500:]


def test_eval_on_a_jsonl_file_trains_the_routers_on_the_suite_of_the_home(tmp_path):
    """A held-out file has no train split of its own: the routers learn on the home's suite."""
    from maestro_core.suite import SuiteConfig, build_suite

    home = tmp_path / "home"
    build_suite(SuiteConfig(seed=1, train_per_benchmark=6, val_per_benchmark=2, test_per_benchmark=2,
                            benchmarks=("math",)), home)
    reg = dict(BASE_REGISTRY, experts=BASE_REGISTRY["experts"][:2], skills=BASE_REGISTRY["skills"][:2])
    (tmp_path / "reg.yaml").write_text(yaml.safe_dump(reg))
    rows = [{"id": f"h{i}", "benchmark": "math", "question": f"Work out {i} + {i + 1}.", "answer": str(2 * i + 1),
             "scorer": "numeric"} for i in range(4)]
    data = tmp_path / "heldout.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(home), "eval", "--baselines",
                          "--checkpoint", "none", "--data", str(data), "--registry", str(tmp_path / "reg.yaml"),
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "routers: trained on the Maestro-Mini train split" in res.stdout + res.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_items"] == 4
    # every train item is math, labelled with the calculator: both routers send the file's items there
    for kind in ("knn", "mlp"):
        assert m["systems"][f"router:{kind}"]["accuracy"] == m["systems"]["expert:calc@@math"]["accuracy"] == 1.0


def test_eval_on_a_jsonl_file_without_a_suite_skips_the_routers_and_says_why(tmp_path):
    res = _eval_one_item(tmp_path, "--checkpoint", "none")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "routers skipped" in res.stdout + res.stderr and "maestro build-dataset" in res.stdout + res.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert not any(name.startswith("router:") for name in m["systems"])


def test_route_frontier_reads_the_pair_table_of_an_evaluation(tmp_path):
    reg = dict(BASE_REGISTRY, experts=BASE_REGISTRY["experts"][:2], skills=BASE_REGISTRY["skills"][:2])
    (tmp_path / "reg.yaml").write_text(yaml.safe_dump(reg))
    rows = [{"id": f"a{i}", "benchmark": "arith", "question": f"What is {i} * 3?", "answer": str(3 * i),
             "scorer": "numeric"} for i in range(3)]
    rows += [{"id": f"w{i}", "benchmark": "words", "question": f"How many words are in '{' '.join('ab'[:1] * i)}'?",
              "answer": str(i), "scorer": "exact"} for i in range(1, 4)]
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    home, out = tmp_path / "home", tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(home), "eval", "--baselines",
                          "--checkpoint", "none", "--data", str(data), "--registry", str(tmp_path / "reg.yaml"),
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "route_frontier.py"), "--home", str(home),
                          "--metrics", str(out / "metrics.json"), "--reward-optimal", "0", "1000",
                          "--splits", "random", "--shuffles", "200",
                          "--out", str(tmp_path / "frontier")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    f = json.loads((tmp_path / "frontier" / "frontier.json").read_text())
    free, dear = f["reward_optimal"]  # at weight 0 the reward wants every answer; at 1000, the least cost
    assert free["accuracy"] == 1.0 and dear["cost_per_task"] <= free["cost_per_task"]
    assert "weight 1000:" in res.stdout and set(free["routes"]) == set(f["templates"])
    # the random pair's routes, read from results.csv beside the metrics, split or not per template
    mix = f["splits"]["random"]
    assert set(mix["templates"]) | set(mix["skipped"]) == set(f["templates"]) and mix["shuffles"] == 200
    assert "random: split" in res.stdout
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "route_frontier.py"), "--home", str(home),
                          "--metrics", str(out / "metrics.json"), "--splits", "router:none",
                          "--out", str(tmp_path / "none")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2 and "router:none" in res.stderr and "its systems are" in res.stderr
    # those routings scored on a table (here the same one) give back what they reported
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "route_frontier.py"), "--home", str(home),
                          "--metrics", str(out / "metrics.json"), "--score-routes", str(tmp_path / "frontier" /
                                                                                        "frontier.json"),
                          "--out", str(tmp_path / "scored")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    scored = json.loads((tmp_path / "scored" / "frontier.json").read_text())["scored_routes"]
    assert [v for s in scored for v in (s["accuracy"], s["cost_per_task"])] == pytest.approx(
        [v for o in f["reward_optimal"] for v in (o["accuracy"], o["cost_per_task"])])
    assert (tmp_path / "frontier" / "frontier.png").exists() and f["n_items"] == 6
    assert f["templates"] == ["arith: What is", "words: How many words are in a"]
    m = json.loads((out / "metrics.json").read_text())["systems"]
    top = max(p["accuracy"] for p in f["points"] if p["accuracy"] is not None)
    # one pair for everything is a routing by template; the per-item oracle bounds any of them
    assert max(s["accuracy"] for n, s in m.items() if n.startswith("expert:")) <= top <= m["oracle"]["accuracy"]
    assert top == 1.0  # calc answers the products, the counter the word counts
    # with only the pairs a $0.0015 budget allows (the calculator), the word counts are lost
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "route_frontier.py"), "--home", str(home),
                          "--metrics", str(out / "metrics.json"), "--pairs-under", "0.0015", "--caps", "0.01",
                          "--template-words", "2",
                          "--out", str(tmp_path / "cheap")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    cheap = json.loads((tmp_path / "cheap" / "frontier.json").read_text())
    assert cheap["pairs"] == ["calc@@math"] and cheap["points"][0]["accuracy"] == 0.5
    assert cheap["templates"] == ["arith: What is", "words: How many"]  # the first two words name a template
