"""Trajectories: what an episode sampled, exactly, and what the environment answered.

A `Trajectory` holds the prompt token ids, each policy turn's completion token ids and
sampling logprobs, each observation's token ids, the actions, the observations, per-call
cost and latency, the final answer and the reward components. `completion_ids()` and
`env_mask()` interleave policy turns and observations exactly as they were in context
(1 = a policy token, trained; 0 = an environment token, masked out of the loss).

Token fields are empty tuples for policies that have no tokens (the scripted policy).
`to_row()` / `from_row()` convert to plain dicts whose layout is `TRAJECTORY_SCHEMA`
(Parquet shards and DuckDB rows use it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import pyarrow as pa


@dataclass(frozen=True)
class StepRecord:
    """One turn: what the policy wrote and what the environment answered."""

    turn: int
    """0-based turn index."""
    text: str
    """The policy's text for this turn, exactly as sampled (decoded)."""
    action: str
    """'call', 'answer' or 'invalid'."""
    expert: str | None = None
    skill: str | None = None
    solver: str | None = None
    """The level-2 solver that ran (named by the policy, or picked by the skill's dispatch)."""
    call_input: str | None = None
    observation: str = ""
    """The environment's reply as shown to the policy (escaped, inside its tags); '' after an answer."""
    error: str | None = None
    """Error kind when the turn failed: a ModelBehaviorError kind, 'expert_error', 'timeout', 'budget'."""
    error_message: str | None = None
    completion_ids: tuple[int, ...] = ()
    """Token ids the policy sampled this turn (ends with EOS where the policy emits one)."""
    logprobs: tuple[float, ...] = ()
    """Sampling logprob of each completion token (same length as completion_ids)."""
    observation_ids: tuple[int, ...] = ()
    """Token ids of the observation as it entered the policy's context (chat-template roles included)."""
    cost: float = 0.0
    """The call's cost (original cost even on a cache hit)."""
    latency_s: float = 0.0
    """The call's latency (original latency even on a cache hit)."""
    spent_s: float = 0.0
    """Expert compute this call actually cost now: the run time on a miss, the lookup time on a
    hit, 0 when it shared an identical call in flight."""
    cache_hit: bool | None = None
    """True/False for cached-or-not calls; None for turns without a call or uncacheable calls."""
    tokens_in: int = 0
    tokens_out: int = 0
    confidence: float | None = None
    expert_calls: int = 0
    """Expert calls made inside the solver (a solver may call helpers)."""


@dataclass(frozen=True)
class Trajectory:
    """One episode, exactly as sampled."""

    episode_id: str
    run_id: str
    iteration: int
    chunk: int
    item_id: str
    benchmark: str
    sample_index: int
    """Index of this sample within its GRPO group (0..G-1)."""
    registry_version: str
    checkpoint_id: str
    prompt_text: str
    prompt_ids: tuple[int, ...]
    steps: tuple[StepRecord, ...]
    final_answer: str | None
    finish_reason: str
    """'answer', 'max_turns', 'budget' or 'error'."""
    reward: float
    outcome: float
    format_score: float
    cost_term: float
    cost_lambda: float
    total_cost: float
    total_latency_s: float
    spent_s: float
    n_calls: int
    n_cache_hits: int
    created_at: float = 0.0

    def completion_ids(self) -> list[int]:
        out: list[int] = []
        for s in self.steps:
            out.extend(s.completion_ids)
            out.extend(s.observation_ids)
        return out

    def env_mask(self) -> list[int]:
        out: list[int] = []
        for s in self.steps:
            out.extend([1] * len(s.completion_ids))
            out.extend([0] * len(s.observation_ids))
        return out

    def completion_logprobs(self) -> list[float]:
        """Sampling logprobs aligned with completion_ids (0.0 at environment positions)."""
        out: list[float] = []
        for s in self.steps:
            out.extend(s.logprobs)
            out.extend([0.0] * len(s.observation_ids))
        return out

    def to_row(self) -> dict:
        # plain attribute reads: dataclasses.asdict deep-copies and is ~5x slower
        row = {n: getattr(self, n) for n in _TRAJ_FIELDS}
        row["steps"] = [{n: getattr(s, n) for n in _STEP_FIELDS} for s in self.steps]
        return row

    @classmethod
    def from_row(cls, row: dict) -> "Trajectory":
        steps = tuple(StepRecord(**{k: (tuple(v) if k in _TUPLE_STEP else v) for k, v in s.items()})
                      for s in row["steps"])
        kw = {f.name: row[f.name] for f in fields(cls) if f.name in row}
        kw["steps"], kw["prompt_ids"] = steps, tuple(row["prompt_ids"])
        return cls(**kw)


_TUPLE_STEP = {"completion_ids", "logprobs", "observation_ids"}
_STEP_FIELDS = tuple(f.name for f in fields(StepRecord))
_TRAJ_FIELDS = tuple(f.name for f in fields(Trajectory))


def episode_id(run_id: str, iteration: int, item_id: str, sample_index: int) -> str:
    """Deterministic id, so a rerun of the same episode replaces rather than duplicates."""
    key = f"{run_id}\x1f{iteration}\x1f{item_id}\x1f{sample_index}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


STEP_SCHEMA = pa.struct([
    ("turn", pa.int32()), ("text", pa.string()), ("action", pa.string()), ("expert", pa.string()),
    ("skill", pa.string()), ("solver", pa.string()), ("call_input", pa.string()), ("observation", pa.string()),
    ("error", pa.string()), ("error_message", pa.string()), ("completion_ids", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())), ("observation_ids", pa.list_(pa.int32())), ("cost", pa.float64()),
    ("latency_s", pa.float64()), ("spent_s", pa.float64()), ("cache_hit", pa.bool_()), ("tokens_in", pa.int64()),
    ("tokens_out", pa.int64()), ("confidence", pa.float64()), ("expert_calls", pa.int32()),
])

TRAJECTORY_SCHEMA = pa.schema([
    ("episode_id", pa.string()), ("run_id", pa.string()), ("iteration", pa.int32()), ("chunk", pa.int32()),
    ("item_id", pa.string()), ("benchmark", pa.string()), ("sample_index", pa.int32()),
    ("registry_version", pa.string()), ("checkpoint_id", pa.string()), ("prompt_text", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())), ("steps", pa.list_(STEP_SCHEMA)), ("final_answer", pa.string()),
    ("finish_reason", pa.string()), ("reward", pa.float64()), ("outcome", pa.float64()),
    ("format_score", pa.float64()), ("cost_term", pa.float64()), ("cost_lambda", pa.float64()),
    ("total_cost", pa.float64()), ("total_latency_s", pa.float64()), ("spent_s", pa.float64()),
    ("n_calls", pa.int32()), ("n_cache_hits", pa.int32()), ("created_at", pa.float64()),
])

assert [f.name for f in fields(StepRecord)] == STEP_SCHEMA.names
assert [f.name for f in fields(Trajectory)] == TRAJECTORY_SCHEMA.names


def to_arrow(trajectories: list[Trajectory]) -> pa.Table:
    return pa.Table.from_pylist([t.to_row() for t in trajectories], schema=TRAJECTORY_SCHEMA)


def from_arrow(table: pa.Table) -> list[Trajectory]:
    return [Trajectory.from_row(r) for r in table.to_pylist()]

