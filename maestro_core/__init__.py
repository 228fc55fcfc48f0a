"""Maestro core: the orchestration library (registry, action protocol, experts, skills,
episode runner, trajectories, expert-call cache, store, rewards). Pure Python, no Prefect.

Everything here is testable alone; Prefect tasks (tasks/) and flows (flows/) call into it.
"""

__version__ = "0.1.0"
