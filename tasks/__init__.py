"""Prefect tasks: each a few lines that call maestro_core (build_dataset, warm_up_experts,
collect_rollouts, load_shards, evaluate, publish_registry). Tasks never import flows.

    from tasks import build_dataset, warm_up_experts, collect_rollouts, load_shards, evaluate, publish_registry
"""

from tasks.dataset import build_dataset
from tasks.evaluate import evaluate
from tasks.experts import warm_up_experts
from tasks.registry import REGISTRY_EVENT, publish_registry
from tasks.retry import is_transient
from tasks.rollouts import collect_rollouts, load_shards

__all__ = ["REGISTRY_EVENT", "build_dataset", "collect_rollouts", "evaluate",
           "is_transient", "load_shards", "publish_registry", "warm_up_experts"]
