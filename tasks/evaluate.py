"""evaluate: the evaluation harness (maestro_core.evaluation.run_evaluation) as a task."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from maestro_core.config import build
from maestro_core.evaluation import EvalConfig, run_evaluation
from tasks.retry import RETRY


@task(name="evaluate", **RETRY)
def evaluate(out: str, registry_path: str | None = None, home: str | None = None, split: str = "test",
             data: str | None = None, checkpoint: str = "none", baselines: bool = True,
             config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate on the suite's split or a JSONL file; writes metrics.json, report.md, results.csv
    into `out` and returns the metrics."""
    ev = dict(config or {})
    ev.setdefault("split", split)
    logger = get_run_logger()
    return run_evaluation(out=out, registry_path=registry_path, home=home, split=split, data=data,
                          checkpoint=checkpoint, baselines=baselines,
                          config=build(EvalConfig, ev, section="eval"), log=logger.info)
