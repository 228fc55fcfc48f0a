"""Checkpoints: saved locally and to the object store, resolved by name, resumed after a crash,
and evaluated beside the untrained policy by `maestro eval --checkpoint`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from maestro_core.checkpoints import list_checkpoints, resolve_checkpoint, untrained_of
from maestro_core.dataset import Item
from maestro_core.errors import ConfigError
from maestro_core.experts import build_experts
from maestro_core.grpo import GRPOSettings
from maestro_core.registry import parse_registry
from maestro_core.store import Store
from maestro_core.training import TrainConfig, train_policy
from tests.conftest import BASE_REGISTRY

ROOT = Path(__file__).resolve().parents[1]
REG = dict(BASE_REGISTRY, experts=BASE_REGISTRY["experts"][:2], skills=BASE_REGISTRY["skills"][:2])
ITEMS = [Item(f"a{i}", "arith", f"What is {i} + {i}?", str(2 * i), "numeric") for i in range(6)]


def _cfg(iterations, **kw):
    return TrainConfig(iterations=iterations, prompts_per_iteration=2, hidden=64, layers=2, heads=2, vocab_size=512,
                       pretrain_steps=5,
                       eval_every=1, val_items=2, max_turns=2,
                       grpo=GRPOSettings.cpu_profile(num_generations=4, per_device_train_batch_size=8), **kw)


def _train(home, iterations, run_id="r1", log=lambda s: None, **kw):
    reg = parse_registry(REG)
    with Store(home) as store:
        res = train_policy(reg, ITEMS, ITEMS[:2], store=store, experts=build_experts(reg), config=_cfg(iterations, **kw),
                           out_dir=home / "runs" / run_id, run_id=run_id, log=log)
        n = store.count_episodes(run_id)
        objects = store.objects
        keys = objects.list(f"checkpoints/{run_id}/")
    return res, n, keys


def test_checkpoints_go_to_the_object_store_and_resolve_by_name(tmp_path):
    home = tmp_path / "home"
    res, n, keys = _train(home, 2)
    assert n == 2 * 2 * 4
    names = {k.split("/")[2] for k in keys}
    assert names == {"ckpt-0", "ckpt-1", "ckpt-2"}
    assert {"checkpoints/r1/ckpt-2/maestro.json", "checkpoints/r1/ckpt-2/config.json"} <= set(keys)
    meta = json.loads((home / "runs/r1/ckpt-2/maestro.json").read_text())
    assert meta["iteration"] == 2 and meta["registry_version"] and "val_accuracy" in meta["metrics"]
    assert meta["config"]["call_input"] == "question" and len(meta["curve"]) == 2
    png = (home / "runs/r1/curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # the training curves, drawn

    with Store(home) as store:
        objects = store.objects
    assert resolve_checkpoint("none", home=home) is None
    assert resolve_checkpoint("latest", home=home, objects=objects) == home / "runs/r1/ckpt-2"
    best = max((c for c in list_checkpoints(home, objects) if c.iteration > 0),
               key=lambda c: (c.val_accuracy, c.iteration))
    assert resolve_checkpoint("best", home=home, objects=objects) == best.path
    assert resolve_checkpoint("r1/ckpt-1", home=home, objects=objects) == home / "runs/r1/ckpt-1"
    assert untrained_of(home / "runs/r1/ckpt-2", home=home, objects=objects) == home / "runs/r1/ckpt-0"
    with pytest.raises(ConfigError, match="not found"):
        resolve_checkpoint("r1/ckpt-9", home=home, objects=objects)

    # the machine that trained it is gone: the object store copy is downloaded
    shutil.rmtree(home / "runs")
    path = resolve_checkpoint("latest", home=home, objects=objects)
    assert path == home / "runs/r1/ckpt-2" and (path / "model.safetensors").exists()
    assert json.loads((path / "maestro.json").read_text())["iteration"] == 2


def test_resume_after_a_crash_gives_the_same_count_and_curve(tmp_path):
    # uninterrupted reference
    ref, n_ref, _ = _train(tmp_path / "ref", 3)
    # "crash" after two iterations: the run stops, its local folders are lost too
    home = tmp_path / "home"
    first, _, _ = _train(home, 2)
    shutil.rmtree(home / "runs")
    again, n, _ = _train(home, 3)
    assert n == n_ref == 3 * 2 * 4  # no duplicated or lost trajectories
    assert [r["iteration"] for r in again.curve] == [0, 1, 2]
    assert again.curve[:2] == first.curve  # restored from the checkpoint, not recomputed
    # same items, same weights up to iteration 2: the resumed iteration 2 sees the reference's items
    with Store(home) as s1, Store(tmp_path / "ref") as s2:
        items1 = sorted(t.item_id for t in s1.trajectories("r1", 2))
        items2 = sorted(t.item_id for t in s2.trajectories("r1", 2))
    assert items1 == items2


def test_a_resume_under_a_changed_config_says_what_changed(tmp_path):
    """Continuing a run at, say, a new cost weight is allowed (the same run id); the log names each
    changed setting, and a resume under the same config names none."""
    home = tmp_path / "home"
    _train(home, 2)
    lines: list[str] = []
    _train(home, 2, log=lines.append)  # finished: nothing to do, and nothing changed
    assert any(s.startswith("resuming run r1 from ckpt-2") for s in lines)
    assert not any("changed config" in s for s in lines)
    lines.clear()
    _train(home, 3, log=lines.append, hidden_cost_lambda=0.5)
    changed = [s for s in lines if "changed config" in s]
    assert len(changed) == 1 and "from iteration 2" in changed[0]
    assert "iterations 2 -> 3" in changed[0] and "hidden_cost_lambda 0.0 -> 0.5" in changed[0]


def test_eval_with_a_checkpoint_adds_policy_and_untrained(tmp_path):
    home = tmp_path / "home"
    _train(home, 1, cost_lambdas=(0.0, 0.5))
    (tmp_path / "reg.yaml").write_text(yaml.safe_dump(REG))
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps({"id": it.id, "benchmark": it.benchmark, "question": it.question,
                                          "answer": it.answer, "scorer": it.scorer}) for it in ITEMS) + "\n")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(home), "eval", "--checkpoint", "latest",
                          "--cost-lambda", "0.5", "--data", str(data), "--registry", str(tmp_path / "reg.yaml"),
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["systems"]) == {"policy", "policy_untrained"}
    assert m["checkpoint"].endswith("ckpt-1") and m["cost_lambda"] == 0.5
    assert m["systems"]["policy"]["n_items"] == len(ITEMS)
    with Store(home) as store:
        trajs = store.trajectories(m["run_id"])
    assert {t.checkpoint_id for t in trajs} == {"r1/ckpt-1", "r1/ckpt-0"}
    assert all(t.cost_lambda == 0.5 for t in trajs)
    assert all(t.steps[0].action == "call" for t in trajs)  # no answer before an observation


def test_fresh_with_a_run_id_deletes_its_checkpoints_shards_and_episodes_only(tmp_path):
    """`maestro train --run-id R --fresh` starts R over: a chunk whose shard survived would be
    skipped as collected, and the new model would train on the old model's token ids."""
    from maestro_core.checkpoints import PREFIX
    from maestro_core.shards import list_shards
    from maestro_core.store import Store
    from maestro_core.training import TrainConfig, choose_run
    from tests.store_helpers import make_chunk

    with Store(tmp_path / "home") as store:
        for run in ("r", "other"):
            for it in (0, 1):
                store.write_and_ingest(make_chunk(run, it), run, it, 0)
            store.objects.put_bytes(f"{PREFIX}/{run}/ckpt-1/maestro.json", b"{}")
        (store.home / "runs" / "r" / "ckpt-1").mkdir(parents=True)
        run_id, out = choose_run(store, TrainConfig(), "r", fresh=True)
        assert run_id == "r" and not out.exists()
        assert list_shards(store.objects, "r") == [] and store.count_episodes("r") == 0 and store.count_steps("r") == 0
        assert store.objects.list(f"{PREFIX}/r/") == []
        assert len(list_shards(store.objects, "other")) == 2 and store.count_episodes("other") == 8
        assert store.objects.list(f"{PREFIX}/other/")


def test_a_cost_weight_is_refused_to_a_checkpoint_trained_without_one():
    """The 'Cost weight' line alone moves the routes of a policy that never saw it, so a request
    naming a weight is refused there, with the knobs to use instead; the grid's checkpoints
    take any weight, and without one they are shown their grid's smallest."""
    from maestro_core.training import request_cost_lambda

    plain, grid = {"cost_lambdas": []}, {"cost_lambdas": [0.3, 1.0]}
    assert request_cost_lambda(plain, None, checkpoint="c") is None
    with pytest.raises(ConfigError, match="trained without a cost weight") as e:
        request_cost_lambda(plain, 0.5, checkpoint="r/ckpt-3")
    assert "r/ckpt-3" in str(e.value) and "--target-cost" in e.value.fix
    with pytest.raises(ConfigError):
        request_cost_lambda({"hidden_cost_lambda": 1.2}, 0.0, checkpoint="c")  # priced, but never shown
    assert request_cost_lambda(grid, None, checkpoint="c") == 0.3
    assert request_cost_lambda(grid, 2.0, checkpoint="c") == 2.0


def test_eval_refuses_a_cost_weight_for_such_a_checkpoint_before_any_expert_runs(tmp_path):
    home = tmp_path / "home"
    _train(home, 1)
    (tmp_path / "reg.yaml").write_text(yaml.safe_dump(REG))
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps({"id": it.id, "benchmark": it.benchmark, "question": it.question,
                                          "answer": it.answer, "scorer": it.scorer}) for it in ITEMS) + "\n")
    with Store(home) as store:
        before = store.count_episodes()
    res = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(home), "eval", "--checkpoint", "latest",
                          "--cost-lambda", "0.5", "--data", str(data), "--registry", str(tmp_path / "reg.yaml"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode != 0
    assert "trained without a cost weight" in res.stderr and "--target-cost" in res.stderr
    with Store(home) as store:
        assert store.count_episodes() == before  # nothing ran, nothing stored
    res = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(home), "eval", "--checkpoint", "latest",
                          "--cost-lambda", "0.5", "--unseen-cost-weight", "--data", str(data), "--registry",
                          str(tmp_path / "reg.yaml"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]  # the diagnostic override
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["cost_lambda"] == 0.5 and m["unseen_cost_weight"] is True


def test_a_learned_chunk_policy_takes_its_exploration_from_the_spec(tmp_path):
    """train.explore / train.explore_within reach the rollout chunks' policies through the spec."""
    from maestro_core.rollouts import build_policy

    home = tmp_path / "home"
    _train(home, 1)
    path = home / "runs" / "r1" / "ckpt-1"
    reg = parse_registry(REG)
    spec = {"kind": "learned", "checkpoint": str(path), "explore": 0.3, "explore_within": 0.011}
    pol = build_policy(spec, reg)
    assert (pol.explore, pol.explore_within) == (0.3, 0.011)
    pol = build_policy({"kind": "learned", "checkpoint": str(path)}, reg)
    assert (pol.explore, pol.explore_within) == (0.0, None)


def test_an_unfinished_run_that_does_not_resume_is_named_with_why(tmp_path):
    """A config with a changed setting starts a new run; the unfinished one is named, with the
    settings that differ and the --run-id that resumes it, and nothing is said when it matches."""
    import json
    from dataclasses import asdict

    from maestro_core.store import Store
    from maestro_core.training import TrainConfig, choose_run

    old = TrainConfig(iterations=2, image_routing="any")
    new = TrainConfig(iterations=2)
    lines: list[str] = []
    with Store(tmp_path / "home") as store:
        store.record_run("r-old", "train", {"config": json.loads(json.dumps(asdict(old), default=str)),
                                            "policy": None}, "v1", status="running")
        assert choose_run(store, new, log=lines.append)[0] != "r-old"
        assert len(lines) == 1
        assert "unfinished run r-old is not resumed" in lines[0]
        assert "image_routing 'any' -> 'first'" in lines[0] and "--run-id r-old" in lines[0]
        lines.clear()
        assert choose_run(store, new, registry_version="v2", log=lines.append)[0] != "r-old"
        assert "registry version v1 -> v2" in lines[0]
        lines.clear()
        assert choose_run(store, old, registry_version="v1", log=lines.append)[0] == "r-old" and lines == []
