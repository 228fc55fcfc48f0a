"""build_dataset: build (or find) the Maestro-Mini suite of a config."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import timedelta
from typing import Any

from prefect import get_run_logger, task

from maestro_core.config import build
from maestro_core.dataset import Item, load_jsonl
from maestro_core.store import Store
from maestro_core.suite import SuiteConfig, build_suite, load_suite
from tasks.retry import RETRY


def dataset_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """The config, the home it resolves to (MAESTRO_HOME included) and the suite versions that
    home holds now: a cached build is reused only while what it built is still there. None (no
    caching) while the home holds no version."""
    from maestro_core.home import resolve_home
    from maestro_core.suite import list_versions

    home = resolve_home(parameters.get("home"))
    try:
        versions = list_versions(home=home)
    except Exception:  # noqa: BLE001 - an unreadable store: no reuse
        return None
    if not versions:
        return None
    blob = json.dumps([parameters.get("config"), str(home), versions], sort_keys=True, default=str)
    return "build_dataset-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


@task(name="build_dataset", cache_key_fn=dataset_cache_key, cache_expiration=timedelta(days=7), **RETRY)
def build_dataset(config: dict[str, Any] | None = None, home: str | None = None) -> dict[str, Any]:
    """Build the suite of `config` (the 'suite' section as a dict; the defaults when None) into
    the store of `home`. Cached on the config, the resolved home and the versions stored there
    (see dataset_cache_key); build_suite itself reuses a stored version."""
    suite_cfg = build(SuiteConfig, dict(config or {}), section="suite")
    logger = get_run_logger()
    last = [0.0]

    def progress(done: int, total: int, what: str = "") -> None:  # a line every 5 s at most
        if done == total or time.monotonic() - last[0] > 5:
            last[0] = time.monotonic()
            logger.info(f"building the suite: {what} {done}/{total}")

    with Store(home) as store:
        res = build_suite(suite_cfg, store.home, store.objects, store=store, progress=progress)
    return {"version": res.version, "counts": dict(res.counts), "location": res.location, "reused": res.reused}


@task(name="load_items", **RETRY)
def load_items(data: str | None = None, split: str = "train", home: str | None = None,
               object_store: str | None = None, limit: int | None = None) -> list[Item]:
    """Items of a JSONL file (every item) or of the stored suite's split (the latest version)."""
    items = load_jsonl(data) if data else load_suite(home, split=split, object_store=object_store)
    return list(items[:limit] if limit else items)
