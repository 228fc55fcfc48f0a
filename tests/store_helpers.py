"""Test helpers for the store and object store tests: trajectory builders, a real S3 server
(moto, on 127.0.0.1) and the AWS environment it needs.

Importable from a subprocess run in the repository root (`from tests.store_helpers import ...`),
which is how the "another process wrote the shards" tests build their trajectories.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest

from maestro_core.trajectory import StepRecord, Trajectory, episode_id


def make_trajectory(run_id: str = "run-a", iteration: int = 0, chunk: int = 0, item: int = 0,
                    sample_index: int = 0, n_steps: int = 3) -> Trajectory:
    """A trajectory with `n_steps` turns: calls with observations, then an answer. Logprobs are
    exact in float32 so they survive the Parquet/DuckDB round trip unchanged."""
    steps = []
    for t in range(n_steps):
        last = t == n_steps - 1
        base = 100 * (item + 1) + 10 * t
        steps.append(StepRecord(
            turn=t,
            text=f"<answer>{item}</answer>" if last else f"<call>e1@@math: {item}+{t}</call>",
            action="answer" if last else "call",
            expert=None if last else "e1",
            skill=None if last else "math",
            solver=None if last else "direct",
            call_input=None if last else f"{item}+{t}",
            observation="" if last else f"<obs>{item + t}</obs>",
            error="timeout" if t == 1 else None,
            error_message="took too long" if t == 1 else None,
            completion_ids=(base, base + 1, base + 2),
            logprobs=(-0.5, -0.25, -0.125 * (t + 1)),
            observation_ids=() if last else (base + 5, base + 6),
            cost=0.0 if last else 0.001 * (t + 1),
            latency_s=0.0 if last else 0.5,
            spent_s=0.0 if last else 0.01,
            cache_hit=None if last else bool(t % 2),
            tokens_in=0 if last else 12,
            tokens_out=0 if last else 4,
            confidence=None if last else 0.75,
            expert_calls=0 if last else 1,
        ))
    return Trajectory(
        episode_id=episode_id(run_id, iteration, f"item-{item}", sample_index),
        run_id=run_id, iteration=iteration, chunk=chunk, item_id=f"item-{item}", benchmark="gsm8k",
        sample_index=sample_index, registry_version="9f249c14929d593a", checkpoint_id=f"ckpt-{iteration}",
        prompt_text=f"What is {item}?", prompt_ids=(1, 2, 3, item), steps=tuple(steps),
        final_answer=str(item), finish_reason="answer", reward=1.0 - 0.5 * (item % 2), outcome=1.0,
        format_score=1.0, cost_term=-0.01, cost_lambda=0.1, total_cost=0.003, total_latency_s=1.0,
        spent_s=0.02, n_calls=n_steps - 1, n_cache_hits=1, created_at=1_700_000_000.0 + item,
    )


def make_chunk(run_id: str = "run-a", iteration: int = 0, chunk: int = 0, n: int = 4, start: int = 0,
               n_steps: int = 3) -> list[Trajectory]:
    """`n` trajectories of one chunk, items start..start+n-1."""
    return [make_trajectory(run_id, iteration, chunk, item=i, n_steps=n_steps) for i in range(start, start + n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """A real S3 server (moto) on 127.0.0.1, one per test module; tests use their own buckets."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> str:
    """Fake AWS credentials and the moto endpoint in the environment; returns the endpoint."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # keep a developer's ~/.aws out of the tests
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("MAESTRO_S3_ENDPOINT_URL", moto_endpoint)
    return moto_endpoint


def new_bucket(endpoint: str) -> str:
    """Create a fresh bucket on the server (with plain boto3) and return its name."""
    import boto3

    name = f"maestro-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name
