"""End to end on a real Prefect server (slow): `prefect server start` on a loopback port,
a process work pool, `prefect deploy --all --no-prompt --prefect-file infra/prefect.yaml`, a
worker, `prefect deployment run 'evaluate-orchestrator/evaluate' --watch` on a tiny
configuration, then `maestro registry publish` of a changed registry, whose event must start
a flow run of `retrain-on-registry-update/on-registry-update`. Everything is torn down in a
finally, workers before the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from maestro_core.registry import load_registry
from maestro_core.store import Store
from tests.pipeline_helpers import write_train_config, write_items, write_registry
from tests.store_helpers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "maestro-process"


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    f = log.open("wb")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """Stop a process we started, and its process group (the flow runs a worker started)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=grace)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _run(cmd: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _flow_runs(api: str, flow: str, deployment: str) -> list[dict]:
    dep = httpx.get(f"{api}/deployments/name/{flow}/{deployment}", timeout=10).json()
    r = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [dep["id"]]}}}, timeout=10)
    r.raise_for_status()
    return r.json()


def test_deploy_run_and_registry_event_trigger(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api, "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "MAESTRO_HOME": str(home), "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
    })
    registry = write_registry(tmp_path / "tiny.yaml")
    data = write_items(tmp_path / "items.jsonl", n=3)
    out = tmp_path / "eval-out"
    server = worker = None
    try:
        server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                        env, tmp_path / "server.log")
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not start in 90 s"
            time.sleep(0.5)

        r = _run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], env)
        assert r.returncode == 0, r.stdout + r.stderr
        r = _run([str(BIN / "prefect"), "deploy", "--all", "--no-prompt", "--prefect-file", "infra/prefect.yaml"], env)
        assert r.returncode == 0, r.stdout + r.stderr
        worker = _start([str(BIN / "prefect"), "worker", "start", "--pool", POOL], env, tmp_path / "worker.log")

        t0 = time.monotonic()
        r = _run([str(BIN / "prefect"), "deployment", "run", "evaluate-orchestrator/evaluate",
                  "--param", f"data={data}", "--param", f"registry={registry}", "--param", f"out={out}",
                  "--watch"], env, timeout=150)
        assert r.returncode == 0, r.stdout + r.stderr + (tmp_path / "worker.log").read_text()[-4000:]
        print(f"evaluate deployment run: {time.monotonic() - t0:.1f} s")
        runs = _flow_runs(api, "evaluate-orchestrator", "evaluate")
        assert [fr["state"]["type"] for fr in runs] == ["COMPLETED"]
        assert (out / "metrics.json").is_file() and (out / "report.md").is_file()
        with Store(home) as st:
            eval_runs = [x["run_id"] for x in st.runs("eval")]
            assert len(eval_runs) == 1 and st.run(eval_runs[0])["status"] == "completed"
            assert st.count_episodes(eval_runs[0]) >= 3  # trajectories are in the store

        # the training deployment on a tiny configuration, through `prefect deployment run`
        cfg = write_train_config(tmp_path / "train.yaml", registry, iterations=2)
        t0 = time.monotonic()
        r = _run([str(BIN / "prefect"), "deployment", "run", "train-orchestrator/train",
                  "--param", f"config_path={cfg}", "--watch"], env, timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr + (tmp_path / "worker.log").read_text()[-4000:]
        print(f"train deployment run: {time.monotonic() - t0:.1f} s")
        assert [fr["state"]["type"] for fr in _flow_runs(api, "train-orchestrator", "train")] == ["COMPLETED"]
        with Store(home) as st:
            train_runs = st.runs("train")
            assert len(train_runs) == 1 and train_runs[0]["status"] == "completed"
            assert st.count_episodes(train_runs[0]["run_id"]) == 2 * 4 * 4  # the trajectories exist

        # a changed registry -> new version -> the event starts the triggered deployment
        changed = write_registry(tmp_path / "tiny-v2.yaml", description="exact arithmetic, v2")
        version = load_registry(changed).version
        t0 = time.monotonic()
        r = _run([str(BIN / "maestro"), "registry", "publish", str(changed)], env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"published new version {version}" in r.stdout
        deadline = time.monotonic() + 60
        triggered: list[dict] = []
        while not triggered and time.monotonic() < deadline:
            triggered = _flow_runs(api, "retrain-on-registry-update", "on-registry-update")
            time.sleep(1)
        assert triggered, "the registry event started no flow run in 60 s"
        print(f"publish -> triggered flow run: {time.monotonic() - t0:.1f} s")
        params = triggered[0]["parameters"]
        assert params["version"] == version and params["registry_path"] == str(changed.resolve())
    finally:
        _stop(worker)
        _stop(server)
