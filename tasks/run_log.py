"""run_log: a progress line to the Prefect run's logger (the task's or flow's that is running
when it is called), or to stdout outside a run.

The flows do not turn on `log_prints`: with it Prefect logs every print to stdout, including
the bytecode listings that `dill` prints into a captured stdout while `datasets` and TRL
fingerprint functions (hundreds of lines per run). Progress goes through this instead.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def run_log(message: str) -> None:
    """Log `message` at INFO on the current Prefect run; print it when no run is active."""
    try:
        logger = get_run_logger()
    except MissingContextError:
        print(message)
        return
    logger.info(message)
