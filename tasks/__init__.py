"""Prefect tasks: each a few lines that call maestro_core (build_dataset, warm_up_experts,
collect_rollouts, load_shards, evaluate, publish_registry, and the training tasks
open_training_run, collect_chunk, ingest_iteration, rl_update, finish_training). Tasks never
import flows.

    from tasks import build_dataset, warm_up_experts, collect_rollouts, load_shards, evaluate, publish_registry
"""

from tasks.dataset import build_dataset
from tasks.evaluate import evaluate
from tasks.experts import warm_up_experts
from tasks.registry import REGISTRY_EVENT, publish_registry
from tasks.retry import is_transient
from tasks.rollouts import collect_rollouts, load_shards
from tasks.training import collect_chunk, finish_training, ingest_iteration, open_training_run, rl_update

__all__ = ["REGISTRY_EVENT", "build_dataset", "collect_chunk", "collect_rollouts", "evaluate", "finish_training",
           "ingest_iteration", "is_transient", "load_shards", "open_training_run", "publish_registry", "rl_update",
           "warm_up_experts"]
