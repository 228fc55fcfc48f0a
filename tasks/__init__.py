"""Prefect tasks: each a few lines that call maestro_core (build_dataset, warm_up_experts,
collect_rollouts, rl_update, evaluate, publish_registry). Tasks never import flows."""
