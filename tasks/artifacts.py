"""publish_eval_artifacts: the evaluation as Prefect artifacts (a table and report.md with
links to the run's trajectory shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from maestro_core.home import resolve_home
from maestro_core.objectstore import open_object_store
from maestro_core.shards import list_shards

METRIC_COLUMNS = ("accuracy", "cost_per_task", "calls_per_task", "turns_per_task", "latency_p50_s",
                  "latency_p95_s", "error_rate")


def shard_links(run_id: str, home: str | None = None, object_store: str | None = None) -> list[tuple[str, str]]:
    """(key, uri) of every shard of the run."""
    objects = open_object_store(object_store or (resolve_home(home) / "objects"))
    return [(k, objects.uri(k)) for k in list_shards(objects, run_id)]


@task(name="publish_eval_artifacts")
def publish_eval_artifacts(metrics: dict[str, Any], out: str, home: str | None = None,
                           object_store: str | None = None, key: str = "maestro-eval") -> dict[str, Any]:
    """A table artifact (one row per system) and a markdown artifact (report.md + shard links)."""
    rows = [{"system": name, **{c: round(float(m[c]), 6) for c in METRIC_COLUMNS},
             **{f"bench:{b}": round(a, 4) for b, a in m["per_benchmark"].items()}}
            for name, m in sorted(metrics["systems"].items(), key=lambda kv: -kv[1]["accuracy"])]
    table_id = create_table_artifact(rows, key=f"{key}-table",
                                     description=f"{metrics.get('run_id', '')}: split {metrics['split']}, "
                                                 f"{metrics['n_items']} items, registry {metrics['registry_version']}")
    shards = shard_links(metrics["run_id"], home, object_store) if metrics.get("run_id") else []
    report = (Path(out) / "report.md").read_text(encoding="utf-8")
    links = "\n".join(f"- [{key}]({uri})" for key, uri in shards) or "- (none)"
    md = f"{report}\n## Outputs\n\n- folder: `{out}`\n\n## Trajectory shards ({len(shards)})\n\n{links}\n"
    md_id = create_markdown_artifact(md, key=f"{key}-report", description="report.md")
    return {"table": str(table_id), "markdown": str(md_id), "shards": [uri for _, uri in shards]}
