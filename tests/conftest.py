"""Shared fixtures. Every test runs with OMP_NUM_THREADS=1 and its own MAESTRO_HOME."""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
# converted LM weights are shared by every test's home: convert once per checkout, not per test
os.environ.setdefault("MAESTRO_MODELS", str(Path(__file__).resolve().parents[1] / ".maestro" / "test-models"))

import pytest  # noqa: E402

from maestro_core.registry import parse_registry  # noqa: E402

# A small registry used across unit tests: two python experts plus an HTTP one.
BASE_REGISTRY = {
    "name": "unit",
    "capabilities": {"arithmetic": "math", "counting": "counts", "text": "free text"},
    "experts": [
        {"name": "calc", "description": "exact arithmetic", "capabilities": ["arithmetic"],
         "backend": {"kind": "python", "callable": "maestro_core.pymodels:calculator"}, "price": {"per_call": 0.001}},
        {"name": "counter", "description": "counts", "capabilities": ["counting"],
         "backend": {"kind": "python", "callable": "maestro_core.pymodels:text_counter"}, "price": {"per_call": 0.002}},
        {"name": "llm", "description": "an LLM", "capabilities": ["text", "arithmetic"],
         "backend": {"kind": "http", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
         "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}},
    ],
    "skills": [
        {"name": "math", "requires": ["arithmetic"], "solvers": [
            {"name": "calculator", "steps": [{"prompt": "{input}"}]},
            {"name": "checked", "steps": [{"prompt": "{input}"}, {"tool": "extract_number"}]}]},
        {"name": "text", "requires": ["counting"], "default_solver": "words",
         "dispatch": [{"pattern": "letter", "solver": "letters"}], "solvers": [
            {"name": "words", "steps": [{"prompt": "count words in {input}"}]},
            {"name": "letters", "steps": [{"prompt": "{input}"}]}]},
        {"name": "chat", "requires": ["text"], "solvers": [{"name": "direct", "steps": [{"prompt": "{input}"}]}]},
    ],
}


def python_only_registry():
    """BASE_REGISTRY without the HTTP LLM expert and its chat skill: in-process experts only."""
    d = copy.deepcopy(BASE_REGISTRY)
    d["experts"] = [e for e in d["experts"] if e["name"] != "llm"]
    d["skills"] = [s for s in d["skills"] if s["name"] != "chat"]
    return parse_registry(d, source="unit.yaml")


@pytest.fixture
def registry_dict():
    return copy.deepcopy(BASE_REGISTRY)


@pytest.fixture
def registry(registry_dict):
    return parse_registry(registry_dict, source="unit.yaml")


@pytest.fixture(autouse=True)
def _maestro_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MAESTRO_HOME", str(tmp_path / "home"))
