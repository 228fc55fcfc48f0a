"""Tasks and flows under the Prefect test harness (fast): chunk idempotence, local vs Dask
fan-out, shards on S3, the evaluation flow and its artifacts, publish_registry's event."""

from __future__ import annotations

import boto3
import pytest

from maestro_core.errors import ConfigError, ExpertError, ExpertHTTPError, StorageError
from maestro_core.registry import load_registry
from maestro_core.dataset import load_jsonl
from maestro_core.shards import list_shards
from maestro_core.store import Store
from tests.pipeline_helpers import ITEMS, write_items, write_registry
from tests.store_helpers import moto_endpoint, new_bucket, s3_env  # noqa: F401 - fixtures

POLICY = {"kind": "scripted", "rules": [["words|letter", "counter@@text"]], "default": "calc@@math"}


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(tmp_path_factory):
    import os
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tiny(tmp_path):
    reg = write_registry(tmp_path / "tiny.yaml")
    data = write_items(tmp_path / "items.jsonl", n=5)
    return {"registry": str(reg), "data": str(data), "home": str(tmp_path / "home")}


def _specs(tiny, run_id="r1", chunk_size=2, object_store=None):
    from maestro_core.rollouts import chunk_specs
    items = load_jsonl(tiny["data"])
    return chunk_specs(items, run_id=run_id, iteration=0, chunk_size=chunk_size, policy_spec=POLICY,
                       object_store=object_store or tiny["home"] + "/objects", registry_path=tiny["registry"])


def test_retry_condition_input_errors_fail_at_once():
    from tasks.retry import is_transient
    assert not is_transient(ConfigError("bad"))
    assert not is_transient(ValueError("bad"))
    assert not is_transient(ExpertError("cannot load", expert="calc"))
    assert not is_transient(ExpertHTTPError("nope", status=404, expert="x"))
    assert is_transient(ExpertHTTPError("busy", status=503, expert="x"))
    assert is_transient(StorageError("s3 hiccup"))
    assert is_transient(ConnectionError("reset"))


def test_build_policy_specs(tiny):
    from maestro_core.rollouts import build_policy
    reg = load_registry(tiny["registry"])
    assert build_policy({"kind": "fixed-route", "pair": "calc@@math"}, reg).checkpoint_id == "fixed-route:calc@@math"
    route = build_policy(POLICY, reg).route
    assert route("How many words are in 'a b'?") == "counter@@text" and route("What is 1+1?") == "calc@@math"
    for bad in ({"kind": "fixed-route", "pair": "nope@@math"}, {"kind": "x"}, {"kind": "learned", "checkpoint": "c"}):
        with pytest.raises(ConfigError):
            build_policy(bad, reg)


def test_collect_rollouts_chunk_is_idempotent(tiny):
    from tasks import collect_rollouts, load_shards
    spec = _specs(tiny)[0]
    first = collect_rollouts.fn(spec)
    loaded1 = load_shards.fn("r1", 0, home=tiny["home"])
    second = collect_rollouts.fn(spec)
    loaded2 = load_shards.fn("r1", 0, home=tiny["home"])
    assert first["key"] == second["key"] and first["episodes"] == 2
    with Store(tiny["home"]) as st:
        assert list_shards(st.objects, "r1") == [first["key"]]
        assert st.count_episodes("r1", 0) == 2
    assert loaded1["episodes"] == loaded2["episodes"] == 2 and loaded2["keys"] == [first["key"]]


def test_collect_rollouts_bad_policy_fails_without_retry(tiny):
    from prefect import flow
    from tasks import collect_rollouts
    import dataclasses
    spec = dataclasses.replace(_specs(tiny)[0], policy_spec={"kind": "fixed-route", "pair": "nope@@math"})

    @flow
    def one():
        state = collect_rollouts(spec, return_state=True)
        return state.is_failed(), state.state_details.task_run_id

    failed, task_run_id = one()
    assert failed
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as c:
        tr = c.read_task_run(task_run_id)
    assert tr.run_count == 1  # no retry for a ConfigError


def _trajectory_view(st: Store, run_id: str):
    return [(t.episode_id, t.item_id, t.reward, t.outcome, t.final_answer, tuple(s.text for s in t.steps),
             tuple(s.observation for s in t.steps)) for t in st.trajectories(run_id)]


def test_local_and_dask_runners_give_the_same_trajectories(tiny):
    from flows.pipeline import collect_and_store
    common = dict(policy_spec=POLICY, data=tiny["data"], registry=tiny["registry"], chunk_size=2, home=tiny["home"])
    local = collect_and_store(run_id="same", **common)
    with Store(tiny["home"]) as st:
        view_local = _trajectory_view(st, "same")
        st.query("DELETE FROM steps")
        st.query("DELETE FROM episodes")
    import shutil
    shutil.rmtree(tiny["home"] + "/objects/trajectories")
    dask = collect_and_store(run_id="same", runner="dask", dask_workers=2, **common)
    assert local["episodes"] == dask["episodes"] == 5
    assert len(dask["chunks"]) == 3 and len(dask["shards"]) == 3
    with Store(tiny["home"]) as st:
        assert _trajectory_view(st, "same") == view_local
    assert [c["accuracy"] for c in local["chunks"]] == [c["accuracy"] for c in dask["chunks"]]
    import os
    assert {c["pid"] for c in local["chunks"]} == {os.getpid()}
    assert os.getpid() not in {c["pid"] for c in dask["chunks"]}  # ran in the cluster's worker processes


def test_shards_on_s3_listable_with_boto3_and_read_through_the_store(tiny, s3_env):
    from flows.pipeline import collect_and_store
    bucket = new_bucket(s3_env)
    uri = f"s3://{bucket}/maestro"
    res = collect_and_store(policy_spec=POLICY, run_id="s3run", data=tiny["data"], registry=tiny["registry"],
                            chunk_size=2, home=tiny["home"], object_store=uri)
    assert res["episodes"] == 5
    listed = boto3.client("s3", endpoint_url=s3_env).list_objects_v2(Bucket=bucket, Prefix="maestro/trajectories/")
    keys = sorted(o["Key"] for o in listed.get("Contents", []))
    assert keys == [f"maestro/trajectories/run=s3run/iteration=000000/chunk={k:06d}.parquet" for k in range(3)]
    # a report from another store (fresh DuckDB file) reading the S3 shards through Arrow, not httpfs
    with Store(tiny["home"] + "-reader", object_store=uri) as st:
        assert len(st.load_shards("s3run")) == 3
        rows = st.query("SELECT benchmark, count(*) AS n, avg(outcome) AS acc FROM episodes "
                        "WHERE run_id = 's3run' GROUP BY benchmark ORDER BY benchmark").to_pylist()
    assert [(r["benchmark"], r["n"]) for r in rows] == [("arith", 4), ("count", 1)]
    assert all(r["acc"] == 1.0 for r in rows)


def test_evaluate_flow_writes_outputs_and_artifacts(tiny, tmp_path):
    from prefect.client.orchestration import get_client
    from flows.pipeline import evaluate_orchestrator
    out = tmp_path / "eval"
    res = evaluate_orchestrator(data=tiny["data"], registry=tiny["registry"], out=str(out), home=tiny["home"])
    for name in ("metrics.json", "report.md", "results.csv"):
        assert (out / name).is_file()
    assert res["systems"]["expert:calc@@math"] == pytest.approx(4 / 5)
    assert res["systems"]["oracle"] == 1.0
    with get_client(sync_client=True) as c:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["maestro-eval-report"])))
    assert arts and "Trajectory shards (2)" in arts[0].data and "chunk=000000.parquet" in arts[0].data
    from maestro_core.shards import read_shard
    with Store(tiny["home"]) as st:
        keys = list_shards(st.objects, res["run_id"])
        assert [read_shard(st.objects, k).num_rows for k in keys] == [5, 5]  # one shard per pair
        assert st.count_episodes(res["run_id"]) == 10  # every pair's episodes, none moved by another


def test_publish_registry_records_and_emits(tiny):
    from flows.pipeline import publish_registry_flow
    res = publish_registry_flow(tiny["registry"], home=tiny["home"])
    reg = load_registry(tiny["registry"])
    assert res["version"] == reg.version and res["new"] is True and res["event_id"]
    with Store(tiny["home"]) as st:
        assert [r["version"] for r in st.registries()] == [reg.version]
    again = publish_registry_flow(tiny["registry"], home=tiny["home"])
    assert again["new"] is False and again["event_id"] != res["event_id"]  # re-publishing emits again


def test_publish_registry_fails_when_no_event_is_emitted(tiny, monkeypatch):
    import tasks.registry as tr
    monkeypatch.setattr(tr, "emit_event", lambda *a, **k: None)
    with pytest.raises(tr.EventNotEmitted):
        tr.publish_registry.fn(tiny["registry"], home=tiny["home"])


def test_items_fixture_is_consistent():
    assert len({it["id"] for it in ITEMS}) == len(ITEMS)


def test_build_dataset_is_cached_on_its_inputs_and_the_stores_content(tmp_path, monkeypatch):
    import shutil

    from prefect import flow
    from tasks import build_dataset
    import uuid

    cfg = {"benchmarks": ["math"], "train_per_benchmark": 2, "val_per_benchmark": 1, "test_per_benchmark": 1}
    # a home path no earlier session used: Prefect's result cache outlives the test session, and
    # pytest can hand out a tmp_path again once an earlier one is gone
    home = str(tmp_path / f"home-{uuid.uuid4().hex[:12]}")

    @flow
    def three(home=None):
        states = [build_dataset(cfg, home=home, return_state=True) for _ in range(3)]
        return [s.name for s in states], [s.result() for s in states]

    names, res = three(home)
    # the 2nd call sees a store that now holds the version (reused by build_suite), the 3rd is cached
    assert names == ["Completed", "Completed", "Cached"] and res[1]["reused"] and res[1] == res[2]
    assert res[0]["counts"] == {"train": 2, "val": 1, "test": 1} and res[0]["version"] == res[2]["version"]
    # the store is wiped: the cached result would point at nothing, so the build runs again
    shutil.rmtree(home)
    names, res = three(home)
    assert names[0] == "Completed" and not res[0]["reused"]
    # home=None resolves through MAESTRO_HOME: another home is another key
    monkeypatch.setenv("MAESTRO_HOME", str(tmp_path / "other"))
    names, res = three(None)
    assert names[0] == "Completed" and not res[0]["reused"]


def test_warm_up_fails_fast_naming_the_expert(tmp_path):
    import yaml
    from prefect import flow
    from tasks import warm_up_experts
    from tests.pipeline_helpers import tiny_registry_dict
    reg = tiny_registry_dict()
    reg["experts"][1]["backend"]["callable"] = "maestro_core.pymodels:no_such_model"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(reg))

    @flow
    def warm():
        s = warm_up_experts(str(path), home=str(tmp_path / "home"), return_state=True)
        return s.is_failed(), str(s.message), s.state_details.task_run_id

    failed, message, task_run_id = warm()
    assert failed and "counter" in message
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as c:
        assert c.read_task_run(task_run_id).run_count == 1  # not retried


@pytest.mark.slow
def test_retrain_flow_trains_a_policy_for_the_registry(tiny, tmp_path):
    import json
    from pathlib import Path

    from flows.pipeline import retrain_on_registry_update
    from tests.pipeline_helpers import write_train_config
    version = load_registry(tiny["registry"]).version
    cfg = write_train_config(tmp_path / "train.yaml", Path(tiny["registry"]), iterations=2)
    res = retrain_on_registry_update(tiny["registry"], version, config_path=str(cfg), home=tiny["home"],
                                     out=str(tmp_path / "retrain"))
    assert res["registry_version"] == version and res["best_checkpoint"]
    m = json.loads((tmp_path / "retrain" / "metrics.json").read_text())
    assert {"policy", "policy_untrained", "oracle", "random"} <= set(m["systems"])  # policy beside the baselines
    with Store(tiny["home"]) as st:
        assert set(st.expert_stats(version)) == {"calc", "counter"}  # warmed up
        run = st.runs("train")[-1]
        assert run["status"] == "completed" and run["registry_version"] == version
        assert st.count_episodes(run["run_id"]) == 2 * 4 * 4


def test_cli_publish_and_collect(tiny, capsys):
    from flows.cli import main
    assert main(["--home", tiny["home"], "registry", "publish", tiny["registry"]]) == 0
    out = capsys.readouterr().out
    version = load_registry(tiny["registry"]).version
    assert f"published new version {version} of 'tiny'" in out and "emitted maestro.registry.updated" in out
    assert main(["--home", tiny["home"], "registry", "publish", tiny["registry"]]) == 0
    assert f"already published {version}" in capsys.readouterr().out
    assert main(["--home", tiny["home"], "collect", "--policy", "fixed-route:calc@@math", "--data", tiny["data"],
                 "--registry", tiny["registry"], "--chunk-size", "2", "--run-id", "cli1"]) == 0
    assert "run cli1 iteration 0: 5 episodes in 3 shards" in capsys.readouterr().out
    assert main(["--home", tiny["home"], "collect", "--policy", "{not json", "--data", tiny["data"]]) == 2


def test_transient_errors_are_retried():
    from prefect import flow, task
    from tasks.retry import RETRY
    calls = []

    @task(**{**RETRY, "retry_delay_seconds": 0, "retry_jitter_factor": None})
    def flaky():
        calls.append(1)
        if len(calls) < 2:
            raise StorageError("object store hiccup")
        return len(calls)

    @flow
    def run():
        return flaky()

    assert run() == 2


@pytest.mark.slow
def test_train_flow_on_a_dask_cluster(tiny, tmp_path):
    """Rollout chunks of the learned policy in 2 Dask worker processes (checkpoint folders read
    there, shards written there), ingest and updates in the flow's process."""
    from pathlib import Path

    from flows.pipeline import train_orchestrator
    from tests.pipeline_helpers import write_train_config
    cfg = write_train_config(tmp_path / "train.yaml", Path(tiny["registry"]), iterations=2)
    res = train_orchestrator(config_path=str(cfg), home=tiny["home"], runner="dask", dask_workers=2,
                             evaluate_test=False)
    with Store(tiny["home"]) as st:
        trajs = st.trajectories(res["run_id"])
        assert st.run(res["run_id"])["status"] == "completed"
    assert len(trajs) == 2 * 4 * 4
    assert len({(t.iteration, t.item_id, t.sample_index) for t in trajs}) == len(trajs)
    assert {t.checkpoint_id for t in trajs} == {f"{res['run_id']}/ckpt-0", f"{res['run_id']}/ckpt-1"}


def test_progress_goes_to_the_run_logger_and_leaves_dills_stdout_capture_alone(capsys):
    """The flows log progress through tasks.run_log, not print + log_prints: with log_prints,
    Prefect logged the bytecode that dill prints into its own stdout capture while `datasets`
    and TRL fingerprint functions (hundreds of lines per run), and dill then found no globals."""
    import dill.detect
    from prefect import flow, task

    from flows import pipeline
    from tasks.run_log import run_log

    def reads_globals():
        return ITEMS and len(ITEMS)

    @task
    def step():
        run_log("iteration 0: progress")
        return sorted(dill.detect.nestedglobals(reads_globals))

    @flow
    def run():
        return step()

    import logging

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    seen, prefect_logger = Lines(), logging.getLogger("prefect")
    prefect_logger.addHandler(seen)
    try:
        names = run()
    finally:
        prefect_logger.removeHandler(seen)
    assert {"ITEMS", "len"} <= set(names)  # dill read its own capture
    assert "iteration 0: progress" in seen.lines and not any("LOAD_GLOBAL" in x for x in seen.lines)
    for f in (pipeline.train_orchestrator, pipeline.evaluate_orchestrator, pipeline.collect_and_store,
              pipeline.retrain_on_registry_update):
        assert not f.log_prints, f.name
    run_log("outside a run")  # prints instead
    assert "outside a run" in capsys.readouterr().out
