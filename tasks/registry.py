"""publish_registry: record a registry version in the store and emit `maestro.registry.updated`
(the core knows no Prefect; this task is where the event is sent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.events import emit_event

from maestro_core.registry import load_registry
from maestro_core.store import Store
from tasks.retry import RETRY

REGISTRY_EVENT = "maestro.registry.updated"
RESOURCE_PREFIX = "maestro.registry."


class EventNotEmitted(RuntimeError):
    """emit_event returned None: the event was not sent (no events client, or invalid event)."""


@task(name="publish_registry", **RETRY)
def publish_registry(path: str, home: str | None = None) -> dict[str, Any]:
    """Record the registry at `path` in the store, then emit `maestro.registry.updated` with
    resource `maestro.registry.<name>` and payload {version, path}. The event is sent on every
    publish (also when the version was already recorded: `new` says which), so re-publishing
    re-triggers on purpose; `maestro registry publish` prints which it was."""
    registry = load_registry(path)
    with Store(home) as store:
        new = store.record_registry(registry)
    resolved = str(Path(path).resolve())
    event = emit_event(
        REGISTRY_EVENT,
        resource={"prefect.resource.id": f"{RESOURCE_PREFIX}{registry.name}",
                  "prefect.resource.name": registry.name},
        payload={"version": registry.version, "path": resolved, "name": registry.name, "new": new},
    )
    if event is None:
        raise EventNotEmitted(f"emit_event returned None for {REGISTRY_EVENT} (registry '{registry.name}' "
                              f"{registry.version}): no Prefect events client is active. Fix: run inside a "
                              "flow or with PREFECT_API_URL set.")
    return {"name": registry.name, "version": registry.version, "path": resolved, "new": new,
            "event_id": str(event.id)}


@task(name="registry_version")
def registry_version(path: str) -> str:
    """The content-hash version of the registry file now (it may have changed since an event)."""
    return load_registry(path).version
