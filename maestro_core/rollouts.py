"""Rollout chunks: one chunk of items -> its episodes -> its Parquet shard (never the DuckDB
file, so a chunk can run in another process; one process loads the shards).

A chunk is described by a `ChunkSpec` (plain, picklable data) so that it can run in another
process (a Dask worker, a Prefect worker). Its policy is built from a `policy_spec` dict:

    {"kind": "fixed-route", "pair": "calc@@math"}               call the pair once, answer with its output
    {"kind": "scripted", "rules": [["letter", "counter@@text"]], "default": "calc@@math"}
                                                                 demo router: first regex matching the
                                                                 question picks the pair, else default
    {"kind": "learned", "checkpoint": "s3://.../ckpt-0003"}     the trained policy (not available yet:
                                                                 refused with a ConfigError)

The spec is data so that a run's config records exactly which policy collected it, and the
learned policy plugs in by adding one branch to `build_policy` (name + checkpoint path).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
from dataclasses import dataclass, field
from typing import Any, Coroutine

from maestro_core.cache import ExpertCache
from maestro_core.config import build
from maestro_core.dataset import Item
from maestro_core.episode import EpisodeConfig, EpisodeRunner
from maestro_core.errors import ConfigError
from maestro_core.evaluation import FixedRoutePolicy, level1_pairs
from maestro_core.experts import build_experts
from maestro_core.objectstore import open_object_store
from maestro_core.registry import DEFAULT_REGISTRY, Registry, load_registry
from maestro_core.shards import write_shard

POLICY_KINDS = ("fixed-route", "scripted", "learned")


@dataclass(frozen=True)
class ChunkSpec:
    """One rollout chunk: which items, which policy, where the shard goes. Picklable."""

    run_id: str
    iteration: int
    chunk: int
    items: tuple[Item, ...]
    policy_spec: dict[str, Any]
    object_store: str
    """Where shards go: a folder or s3://bucket/prefix (the store's object store)."""
    registry_path: str | None = None
    group_size: int = 1
    episode: dict[str, Any] = field(default_factory=dict)
    """EpisodeConfig fields (max_turns, call_timeout_s, ...)."""


def build_policy(spec: dict[str, Any], registry: Registry):
    """A policy from its spec (see the module docstring); ConfigError for a bad spec."""
    if not isinstance(spec, dict) or spec.get("kind") not in POLICY_KINDS:
        raise ConfigError(f"unknown policy spec {spec!r}.", field="policy_spec",
                          fix=f"use a dict with 'kind' one of {list(POLICY_KINDS)}.")
    pairs = set(level1_pairs(registry))

    def check(pair: Any, where: str) -> str:
        if pair not in pairs:
            raise ConfigError(f"{where} {pair!r} is not an expert@@skill pair of registry '{registry.name}'.",
                              field="policy_spec", fix=f"use one of {sorted(pairs)}.")
        return pair

    kind = spec["kind"]
    if kind == "fixed-route":
        pair = check(spec.get("pair"), "pair")
        return FixedRoutePolicy(lambda q: pair, checkpoint_id=f"fixed-route:{pair}")
    if kind == "scripted":
        default = check(spec.get("default"), "default")
        try:
            rules = [(re.compile(pat, re.IGNORECASE), check(pair, "rule pair")) for pat, pair in spec.get("rules", [])]
        except (TypeError, ValueError, re.error) as e:
            raise ConfigError(f"bad rules: {e}.", field="policy_spec.rules",
                              fix="write rules as [[regex, pair], ...].") from e

        def route(question: str) -> str:
            return next((pair for pat, pair in rules if pat.search(question)), default)
        return FixedRoutePolicy(route, checkpoint_id="scripted:demo-router")
    raise ConfigError("the learned policy cannot collect rollouts yet (maestro_core.lm_policy is not wired "
                      "into the pipeline).", field="policy_spec.kind", fix="use 'fixed-route' or 'scripted'.")


def run_chunk(spec: ChunkSpec) -> dict[str, Any]:
    """The chunk's episodes -> its shard (replaced when the chunk runs again). No DuckDB: the
    expert-call cache is memory-only here."""
    registry = load_registry(spec.registry_path or DEFAULT_REGISTRY)
    policy = build_policy(spec.policy_spec, registry)
    config = build(EpisodeConfig, dict(spec.episode), section="episode")

    async def go():
        experts = build_experts(registry)
        try:
            runner = EpisodeRunner(registry, experts, policy, cache=ExpertCache(None), config=config)
            return await runner.run(list(spec.items), group_size=spec.group_size, run_id=spec.run_id,
                                    iteration=spec.iteration, chunk=spec.chunk)
        finally:
            for e in experts.values():
                await e.aclose()

    trajectories = run_sync(go())
    objects = open_object_store(spec.object_store)
    key = write_shard(objects, trajectories, spec.run_id, spec.iteration, spec.chunk)
    return {"key": key, "uri": objects.uri(key), "episodes": len(trajectories), "chunk": spec.chunk,
            "accuracy": sum(t.outcome for t in trajectories) / max(1, len(trajectories)), "pid": os.getpid()}


def chunk_specs(items: list[Item], *, run_id: str, iteration: int, chunk_size: int, policy_spec: dict[str, Any],
                object_store: str, registry_path: str | None, group_size: int = 1,
                episode: dict[str, Any] | None = None) -> list[ChunkSpec]:
    """Split items into chunks of `chunk_size` (chunk = index; deterministic)."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}.", field="chunk_size", fix="use e.g. 16.")
    return [ChunkSpec(run_id=run_id, iteration=iteration, chunk=k, items=tuple(items[i:i + chunk_size]),
                      policy_spec=dict(policy_spec), object_store=object_store, registry_path=registry_path,
                      group_size=group_size, episode=dict(episode or {}))
            for k, i in enumerate(range(0, len(items), chunk_size))]


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion from sync code, whether or not this thread has a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a loop runs here: use a fresh thread
        return pool.submit(asyncio.run, coro).result()
