"""The expert interface: `await backend.generate(messages, images) -> ExpertReply`.

Every call of every backend passes the expert's circuit breaker (`backend.breaker`, set by the
registry entry's `breaker:`): while it is open, `generate` raises ExpertUnavailable at once.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from maestro_core.breaker import CircuitBreaker
from maestro_core.errors import ExpertError
from maestro_core.registry import Expert, Registry


@dataclass(frozen=True)
class ExpertReply:
    """What one expert call returned."""

    text: str
    """The expert's answer text (not yet escaped)."""
    tokens_in: int
    """Input (prompt) tokens billed; 0 for models without tokens."""
    tokens_out: int
    """Output tokens billed; 0 for models without tokens."""
    latency_s: float
    """Wall-clock seconds of the call, retries included."""
    cost: float
    """Price of the call from the registry (tokens x price + per-call price)."""
    confidence: float | None = None
    """The expert's own confidence in [0, 1] where it has one (OCR scores, softmax)."""
    attempts: int = 1
    """How many tries it took (HTTP retries)."""


class ExpertBackend(abc.ABC):
    """One frozen model. Subclasses implement `_generate`; `generate` adds cost."""

    def __init__(self, spec: Expert):
        self.spec = spec
        self.breaker = CircuitBreaker(spec.name, spec.breaker)

    @property
    def name(self) -> str:
        return self.spec.name

    async def generate(self, messages: Sequence[Mapping[str, str]], images: Sequence[str | Path] = ()) -> ExpertReply:
        """Answer a chat (`[{"role": "user", "content": "..."}]`) about `images` (file paths).

        Raises ExpertError (ExpertTimeout, ExpertHTTPError, ExpertReplyError) on failure, and
        ExpertUnavailable without calling the model while the expert's breaker is open."""
        breaker = self.breaker
        trial = breaker.before_call()
        try:
            reply = await self._generate(list(messages), [Path(p) for p in images])
        except ExpertError as e:
            breaker.record_failure(e, trial)
            raise
        except BaseException:
            breaker.release(trial)  # cancelled (the episode's call timeout) or a bug: no verdict
            raise
        breaker.record_success(trial)
        return reply

    @abc.abstractmethod
    async def _generate(self, messages: list[Mapping[str, str]], images: list[Path]) -> ExpertReply: ...

    def reply(self, text: str, tokens_in: int, tokens_out: int, latency_s: float, *,
              confidence: float | None = None, attempts: int = 1) -> ExpertReply:
        """Build a reply priced from the registry."""
        return ExpertReply(text=text, tokens_in=tokens_in, tokens_out=tokens_out, latency_s=latency_s,
                           cost=self.spec.price.cost(tokens_in, tokens_out), confidence=confidence, attempts=attempts)

    async def aclose(self) -> None:
        """Release connections or models."""


def build_expert(spec: Expert) -> ExpertBackend:
    """Make the backend a registry entry names. Models load lazily on first call."""
    if spec.kind == "http":
        from maestro_core.experts.http import HTTPExpert
        return HTTPExpert(spec)
    if spec.kind == "transformers":
        from maestro_core.experts.transformers import TransformersExpert
        return TransformersExpert(spec)
    if spec.kind == "python":
        from maestro_core.experts.python import PythonExpert
        return PythonExpert(spec)
    raise ValueError(f"unknown backend kind {spec.kind!r}")  # the registry validated it already


def build_experts(registry: Registry) -> dict[str, ExpertBackend]:
    return {name: build_expert(spec) for name, spec in registry.experts.items()}
