"""Rollout chunks: one chunk of items -> its episodes -> its Parquet shard (never the DuckDB
file, so a chunk can run in another process; one process loads the shards).

A chunk is described by a `ChunkSpec` (plain, picklable data) so that it can run in another
process (a Dask worker, a Prefect worker). Its policy is built from a `policy_spec` dict:

    {"kind": "fixed-route", "pair": "calc@@math"}               call the pair once, answer with its output
    {"kind": "scripted", "rules": [["letter", "counter@@text"]], "default": "calc@@math"}
                                                                 demo router: first regex matching the
                                                                 question picks the pair, else default
    {"kind": "learned", "checkpoint": "/home/runs/r1/ckpt-3", "run_id": "r1", "temperature": 1.0, "seed": 7,
     "explore": 0.2}                                              (explore: optional, LMPolicy.explore;
                                                                   explore_within: LMPolicy.explore_within)
                                                                 the LM policy of a checkpoint folder
                                                                 (downloaded from the chunk's object
                                                                 store when the folder is missing)
    {"kind": "served", "base_url": "http://gpu:8000/v1", "model": "maestro-policy", "tokenizer": "/ckpt-0",
     "checkpoint_id": "r1/ckpt-3", "temperature": 1.0, "seed": 7, ...}
                                                                 OpenAIPolicy against a server that
                                                                 serves that checkpoint (the other keys:
                                                                 its keyword arguments; the API key is
                                                                 never in a spec: it is read from the
                                                                 environment where the chunk runs)

The spec is data so that a run's config records exactly which policy collected it.
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

POLICY_KINDS = ("fixed-route", "scripted", "learned", "served")


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
    cost_lambdas: tuple[float, ...] | None = None
    """Cost weight of each episode (items x group_size, in order), shown in its prompt; None: off."""
    cost_budgets: tuple[float | None, ...] | None = None
    """Cost budget of each episode (None inside: no budget), shown in its prompt and enforced by
    the grammar and the runner; None: the episode config's."""
    question_views: tuple[str | None, ...] | None = None
    """The question each episode's prompt shows (training-time question noise; None inside: the
    item's own); calls forward the item's question. None: every item's own."""


def build_policy(spec: dict[str, Any], registry: Registry, object_store: str | None = None):
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
    if kind == "served":
        return _served_policy(spec, registry)
    from pathlib import Path

    from maestro_core.checkpoints import download, load_checkpoint_policy

    path = Path(str(spec.get("checkpoint", "")))
    if not spec.get("checkpoint"):
        raise ConfigError("a learned policy spec needs 'checkpoint' (a checkpoint folder).",
                          field="policy_spec.checkpoint", fix="pass the folder written by maestro train.")
    if not (path / "config.json").exists():
        if not (object_store and spec.get("run_id")):
            raise ConfigError(f"checkpoint folder {path} does not exist.", field="policy_spec.checkpoint",
                              fix="pass an existing folder, or run_id + the chunk's object store to download it.")
        download(open_object_store(object_store), str(spec["run_id"]), path.name, path)
    policy = load_checkpoint_policy(path, registry, temperature=float(spec.get("temperature", 1.0)))
    policy.generator.manual_seed(int(spec.get("seed", 0)))
    policy.explore = float(spec.get("explore", 0.0))
    within = spec.get("explore_within")
    policy.explore_within = None if within is None else float(within)
    return policy


def _served_policy(spec: dict[str, Any], registry: Registry):
    import inspect

    from maestro_core.http_policy import OpenAIPolicy

    for key in ("base_url", "model"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise ConfigError(f"a served policy spec needs '{key}'.", field=f"policy_spec.{key}",
                              fix="build the spec from the policy section (PolicyConfig.openai_kwargs).")
    kw = {k: v for k, v in spec.items() if k not in ("kind", "base_url", "model")}
    allowed = set(inspect.signature(OpenAIPolicy).parameters) - {"base_url", "model", "registry"}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise ConfigError(f"unknown served policy spec key(s) {unknown}.", field=f"policy_spec.{unknown[0]}",
                          fix=f"use OpenAIPolicy's keyword arguments {sorted(allowed)}; an API key goes in the "
                              "environment (api_key_env names the variable).")
    return OpenAIPolicy(spec["base_url"], spec["model"], registry, **kw)


def run_chunk(spec: ChunkSpec, *, cache: ExpertCache | None = None, registry: Registry | None = None,
              experts: dict | None = None, skip_existing: bool = False) -> dict[str, Any]:
    """The chunk's episodes -> its shard (replaced when the chunk runs again, or kept as it is
    with `skip_existing`: a rerun after a crash collects only the chunks without a shard).
    The expert-call cache is memory-only unless `cache` is given (in the store's process);
    `registry`/`experts` reuse what the caller has loaded (same process)."""
    from maestro_core.shards import list_shards, shard_key

    objects = open_object_store(spec.object_store)
    key = shard_key(spec.run_id, spec.iteration, spec.chunk)
    if skip_existing and key in set(list_shards(objects, spec.run_id, spec.iteration)):
        return {"key": key, "uri": objects.uri(key), "episodes": None, "chunk": spec.chunk, "skipped": True,
                "pid": os.getpid()}
    registry = registry or load_registry(spec.registry_path or DEFAULT_REGISTRY)
    policy = build_policy(spec.policy_spec, registry, spec.object_store)
    config = build(EpisodeConfig, dict(spec.episode), section="episode")
    lams, budgets, views = spec.cost_lambdas, spec.cost_budgets, spec.question_views

    async def go():
        own = experts is None
        backends = build_experts(registry) if own else experts
        try:
            runner = EpisodeRunner(registry, backends, policy, cache=cache or ExpertCache(None), config=config)
            return await runner.run(list(spec.items), group_size=spec.group_size, run_id=spec.run_id,
                                    iteration=spec.iteration, chunk=spec.chunk,
                                    cost_lambda=(lambda k: lams[k]) if lams else None,
                                    cost_budget=(lambda k: budgets[k]) if budgets else None,
                                    question_view=(lambda k: views[k]) if views else None)
        finally:
            close = getattr(policy, "aclose", None)  # a served policy's HTTP client
            if close is not None:
                await close()
            if own:
                for e in backends.values():
                    await e.aclose()

    trajectories = run_sync(go())
    key = write_shard(objects, trajectories, spec.run_id, spec.iteration, spec.chunk)
    return {"key": key, "uri": objects.uri(key), "episodes": len(trajectories), "chunk": spec.chunk,
            "accuracy": sum(t.outcome for t in trajectories) / max(1, len(trajectories)), "pid": os.getpid(),
            "skipped": False}


def chunk_specs(items: list[Item], *, run_id: str, iteration: int, chunk_size: int, policy_spec: dict[str, Any],
                object_store: str, registry_path: str | None, group_size: int = 1,
                episode: dict[str, Any] | None = None, cost_lambdas: list[float] | None = None,
                cost_budgets: list[float | None] | None = None,
                question_views: list[str | None] | None = None) -> list[ChunkSpec]:
    """Split items into chunks of `chunk_size` (chunk = index; deterministic). `cost_lambdas`,
    `cost_budgets` and `question_views` (one per episode, items x group_size in order) are split along; a learned or
    served policy's seed is offset by the chunk index."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}.", field="chunk_size", fix="use e.g. 16.")
    out = []
    for k, i in enumerate(range(0, len(items), chunk_size)):
        spec = dict(policy_spec)
        if spec.get("kind") in ("learned", "served"):
            spec["seed"] = int(spec.get("seed", 0)) + k
        lams = tuple(cost_lambdas[i * group_size:(i + chunk_size) * group_size]) if cost_lambdas else None
        budgets = tuple(cost_budgets[i * group_size:(i + chunk_size) * group_size]) if cost_budgets else None
        views = tuple(question_views[i * group_size:(i + chunk_size) * group_size]) if question_views else None
        out.append(ChunkSpec(run_id=run_id, iteration=iteration, chunk=k, items=tuple(items[i:i + chunk_size]),
                             policy_spec=spec, object_store=object_store, registry_path=registry_path,
                             group_size=group_size, episode=dict(episode or {}), cost_lambdas=lams,
                             cost_budgets=budgets, question_views=views))
    return out


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion from sync code, whether or not this thread has a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a loop runs here: use a fresh thread
        return pool.submit(asyncio.run, coro).result()
