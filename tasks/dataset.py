"""build_dataset: build (or find) the Maestro-Mini suite of a config."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import contextlib
import io
import time

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS

from maestro_core.config import build
from maestro_core.dataset import Item, load_jsonl
from maestro_core.store import Store
from maestro_core.suite import SuiteConfig, build_suite, load_suite
from tasks.retry import RETRY


@task(name="build_dataset", cache_policy=INPUTS, cache_expiration=timedelta(days=7), **RETRY)
def build_dataset(config: dict[str, Any] | None = None, home: str | None = None) -> dict[str, Any]:
    """Build the suite of `config` (the 'suite' section as a dict; the defaults when None) into
    the store of `home`. Cached on its inputs; build_suite itself reuses a stored version."""
    suite_cfg = build(SuiteConfig, dict(config or {}), section="suite")
    logger = get_run_logger()
    last = [0.0]

    def progress(done: int, total: int, what: str = "") -> None:  # a line every 5 s at most
        if done == total or time.monotonic() - last[0] > 5:
            last[0] = time.monotonic()
            logger.info(f"building the suite: {what} {done}/{total}")

    # `datasets` fingerprints tables with dill, which under Prefect's print capture dumps
    # bytecode to stdout: the build reports through `progress`, so its stdout is dropped
    with Store(home) as store, contextlib.redirect_stdout(io.StringIO()):
        res = build_suite(suite_cfg, store.home, store.objects, store=store, progress=progress)
    return {"version": res.version, "counts": dict(res.counts), "location": res.location, "reused": res.reused}


@task(name="load_items", **RETRY)
def load_items(data: str | None = None, split: str = "train", home: str | None = None,
               object_store: str | None = None, limit: int | None = None) -> list[Item]:
    """Items of a JSONL file (every item) or of the stored suite's split (the latest version)."""
    items = load_jsonl(data) if data else load_suite(home, split=split, object_store=object_store)
    return list(items[:limit] if limit else items)
