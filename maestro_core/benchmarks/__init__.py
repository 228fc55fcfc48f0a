"""Benchmarks: loaders and metrics (public benchmarks live in ``maestro_core.benchmarks.public``)."""
