"""The Maestro home folder: where the store, datasets, converted models and reports live."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_home(home: str | Path | None = None) -> Path:
    """`home` if given, else $MAESTRO_HOME, else ./.maestro (absolute; not created)."""
    if home is None:
        home = os.environ.get("MAESTRO_HOME") or Path.cwd() / ".maestro"
    return Path(home).expanduser().absolute()
