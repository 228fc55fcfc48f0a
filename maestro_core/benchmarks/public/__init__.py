"""Loaders and official metrics of the public benchmarks in the Maestro paper's domains.

One module per benchmark, each with the same API::

    load(source, *, split=None, limit=None, image_dir) -> list[Item]
    metric(prediction, item) -> float            # the benchmark's official metric, 0.0 or 1.0
    BENCHMARK, HUB_NAME, DEFAULT_SPLIT, SPLITS   # constants

``source`` is a Hugging Face Hub name (loaded with ``datasets.load_dataset``; offline this
raises ConfigError saying to pass a local path) or a local folder/file in the dataset's
published layout (each module's docstring says which layout and how far it was verified).
Embedded images are written to ``image_dir``; Items hold absolute image paths.

    from maestro_core.benchmarks.public import load_public, PUBLIC_BENCHMARKS
    items = load_public("chartqa", "/data/ChartQA", split="test", image_dir=Path("/tmp/img"))
    PUBLIC_BENCHMARKS["chartqa"].metric("104", items[0])
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from maestro_core.benchmarks.public import (
    charxiv,
    chartqa,
    hrbench,
    mathverse,
    mathvision,
    mathvista,
    mme_realworld,
    vstar,
)
from maestro_core.dataset import Item
from maestro_core.errors import ConfigError

__all__ = ["PUBLIC_BENCHMARKS", "load_public", "get_benchmark"]

PUBLIC_BENCHMARKS: dict[str, ModuleType] = {
    "chartqa": chartqa,
    "mathvista": mathvista,
    "vstar": vstar,
    "hrbench": hrbench,
    "mme_realworld": mme_realworld,
    "charxiv": charxiv,
    "mathverse": mathverse,
    "mathvision": mathvision,
}

_ALIASES = {"v*": "vstar", "vstar_bench": "vstar", "v*bench": "vstar", "v*_bench": "vstar",
            "hr_bench": "hrbench", "mmerealworld": "mme_realworld", "math_vista": "mathvista",
            "math_verse": "mathverse", "math_vision": "mathvision", "chart_qa": "chartqa"}


def get_benchmark(name: str) -> ModuleType:
    """The loader module of benchmark ``name`` (case, '-' and ' ' do not matter)."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    try:
        return PUBLIC_BENCHMARKS[key]
    except KeyError:
        raise ConfigError(f"unknown public benchmark {name!r}.", field="benchmark",
                          fix=f"use one of {sorted(PUBLIC_BENCHMARKS)}.") from None


def load_public(name: str, source: str | Path, **kw: Any) -> list[Item]:
    """``PUBLIC_BENCHMARKS[name].load(source, **kw)`` (split=, limit=, image_dir=)."""
    return get_benchmark(name).load(source, **kw)
