"""Retry policy shared by every task: transient errors retry with backoff, input errors fail at once.

`retry_condition_fn(task, task_run, state) -> bool` is how Prefect 3 asks whether a failed
run should go on to its retry policy (prefect/task_engine.py `can_retry`)."""

from __future__ import annotations

from typing import Any

from maestro_core.errors import ConfigError, ExpertError, ModelBehaviorError, SchemaMismatch, StorageError

RETRIES = 2
RETRY_DELAYS = [2, 10]
"""Seconds before retry 1 and 2 (backoff)."""
RETRY_JITTER = 0.5

_PERMANENT = (ConfigError, ModelBehaviorError, SchemaMismatch, ValueError, TypeError, KeyError, LookupError,
              AttributeError, ImportError, NotImplementedError, FileNotFoundError)


def is_transient(exc: BaseException | None) -> bool:
    """Could trying again help? Input errors (ConfigError and the other ValueErrors, bad types,
    missing files, a store of another schema) cannot; an expert error only when it says so
    (429/5xx, timeouts); storage and network trouble can."""
    if exc is None:
        return True
    if isinstance(exc, ExpertError):
        return bool(getattr(exc, "retryable", False))
    if isinstance(exc, StorageError) and not isinstance(exc, SchemaMismatch):
        return True
    return not isinstance(exc, _PERMANENT)


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    try:
        exc = state.result(raise_on_failure=False)
    except BaseException as e:  # noqa: BLE001 - the state's own exception
        exc = e
    return is_transient(exc if isinstance(exc, BaseException) else None)


RETRY = dict(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_jitter_factor=RETRY_JITTER,
             retry_condition_fn=retry_condition)
"""`@task(**RETRY)`."""
