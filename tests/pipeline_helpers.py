"""Tiny pipeline configurations for the flow/task tests: a registry of in-process python
experts (conftest BASE_REGISTRY without the HTTP expert 'llm' and the 'chat' skill) and a
JSONL file of arithmetic items."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from tests.conftest import BASE_REGISTRY

ITEMS = [
    {"id": "a1", "benchmark": "arith", "question": "What is 2 + 3?", "answer": "5", "scorer": "numeric"},
    {"id": "a2", "benchmark": "arith", "question": "What is 7 * 6?", "answer": "42", "scorer": "numeric"},
    {"id": "a3", "benchmark": "arith", "question": "What is 10 - 4?", "answer": "6", "scorer": "numeric"},
    {"id": "c1", "benchmark": "count", "question": "How many words are in 'the quick brown fox'?", "answer": "4",
     "scorer": "numeric"},
    {"id": "a4", "benchmark": "arith", "question": "What is 9 + 9?", "answer": "18", "scorer": "numeric"},
]


def tiny_registry_dict(name: str = "tiny", description: str = "exact arithmetic") -> dict:
    reg = copy.deepcopy(BASE_REGISTRY)
    reg["name"] = name
    reg["experts"] = [e for e in reg["experts"] if e["name"] != "llm"]
    reg["experts"][0]["description"] = description
    reg["skills"] = [s for s in reg["skills"] if s["name"] != "chat"]
    reg["capabilities"].pop("text", None)
    return reg


def write_registry(path: Path, **kw) -> Path:
    path.write_text(yaml.safe_dump(tiny_registry_dict(**kw), sort_keys=False))
    return path


def write_items(path: Path, n: int = 3) -> Path:
    path.write_text("".join(json.dumps(it) + "\n" for it in ITEMS[:n]))
    return path


def write_train_config(path: Path, registry: Path, *, iterations: int = 3, items_per_iteration: int = 4,
                       group: int = 4) -> Path:
    """A tiny training config: the math benchmark only (6 train items), a 64-wide policy, one
    item per rollout chunk."""
    cfg = {
        "registry": str(registry),
        "suite": {"train_per_benchmark": 6, "val_per_benchmark": 2, "test_per_benchmark": 2, "benchmarks": ["math"]},
        "train": {"iterations": iterations, "prompts_per_iteration": items_per_iteration, "chunk_size": 1,
                  "hidden": 64, "layers": 2, "heads": 2, "vocab_size": 512, "eval_every": 2, "val_items": 2,
                  "max_turns": 2, "pretrain_steps": 5,
                  "grpo": {"num_generations": group, "per_device_train_batch_size": 16, "learning_rate": 0.001}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path
