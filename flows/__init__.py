"""Prefect flows and the `maestro` command: the only place that knows the pipeline order."""
