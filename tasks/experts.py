"""warm_up_experts: load and probe every expert of a registry; fails fast naming the expert."""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import task

from maestro_core.experts import build_experts
from maestro_core.registry import DEFAULT_REGISTRY, load_registry
from maestro_core.store import Store
from maestro_core.warmup import warm_up
from maestro_core.rollouts import run_sync
from tasks.retry import RETRY


async def _warm(registry, store, probes: int):
    experts = build_experts(registry)
    try:
        return await warm_up(registry, experts, store, probes=probes)
    finally:
        for e in experts.values():
            await e.aclose()


@task(name="warm_up_experts", **RETRY)
def warm_up_experts(registry_path: str | None = None, home: str | None = None, probes: int = 3) -> list[dict[str, Any]]:
    """The warm-up measurements, one dict per expert. An expert that cannot load or answer
    raises ExpertError naming it (retried only when the error says it is transient)."""
    registry = load_registry(registry_path or DEFAULT_REGISTRY)
    with Store(home) as store:
        store.record_registry(registry)
        stats = run_sync(_warm(registry, store, probes))
    return [dataclasses.asdict(s) for s in stats]
