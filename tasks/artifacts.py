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


@task(name="publish_training_artifacts")
def publish_training_artifacts(result: dict[str, Any], home: str | None = None, object_store: str | None = None,
                               key: str = "maestro-train") -> dict[str, Any]:
    """A table artifact of the training curve (one row per iteration) and a markdown artifact
    with the checkpoints, the curve plot and the trajectory shards."""
    cols = ("iteration", "mean_reward", "accuracy", "calls_per_task", "cost_per_task", "loss", "val_accuracy")
    rows = [{c: (round(r[c], 4) if isinstance(r.get(c), float) else r.get(c)) for c in cols} for r in result["curve"]]
    table_id = create_table_artifact(rows, key=f"{key}-curve", description=f"training run {result['run_id']}")
    shards = shard_links(result["run_id"], home, object_store)
    ckpts = "\n".join(f"- `{c}`" for c in result["checkpoints"]) or "- (none validated)"
    md = (f"# Training run {result['run_id']}\n\n- folder: `{result['out_dir']}`\n- curves: `{result['curve_png']}`\n"
          f"- best checkpoint (validation): `{result['best_checkpoint']}` "
          f"(accuracy {result['best_val_accuracy']})\n\n## Checkpoints\n\n{ckpts}\n\n"
          f"## Trajectory shards ({len(shards)})\n\n" + ("\n".join(f"- [{k}]({u})" for k, u in shards) or "- (none)"))
    md_id = create_markdown_artifact(md, key=f"{key}-report", description="training run")
    return {"table": str(table_id), "markdown": str(md_id)}
