"""The policy protocol: what the episode runner asks of an orchestrator policy.

A policy sees the chat so far (system catalogue, user question, its own turns, the
environment's observations) and writes the next turn. It never sees the item's answer.

    class Policy(Protocol):
        checkpoint_id: str
        async def act(self, messages, view) -> PolicyTurn
        def encode_prompt(self, messages) -> tuple[int, ...]
        def encode_observation(self, message) -> tuple[int, ...]

Policies with tokens (the learned policy) return the sampled token ids and logprobs in
`PolicyTurn`, and encode the prompt and each observation exactly as they enter their
context; policies without tokens return empty tuples. `ScriptedPolicy` is the deterministic
policy for tests and the demo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class PolicyTurn:
    text: str
    """The turn as decoded text."""
    token_ids: tuple[int, ...] = ()
    """The sampled token ids (ending with EOS where the policy emits one)."""
    logprobs: tuple[float, ...] = ()
    """The sampling logprob of each token."""


@dataclass(frozen=True)
class EpisodeView:
    """What a policy may know about the episode besides the chat: never the answer."""

    episode_id: str
    sample_index: int
    turn: int
    max_turns: int = 0
    """The episode's turn limit (0: unknown). On the last turn only an answer can still score."""
    budget_left: float | None = None
    """What the episode's cost budget still allows (None: no budget). A constrained policy
    offers only the actions whose call cost estimate fits (Registry.affordable)."""
    images: tuple[str, ...] = ()
    """The item's image files (item.images, in order): inputs the policy may see, as the
    question is (a vision-language policy reads them; never the answer)."""


def offered_actions(registry, actions: Sequence[str], image_routing: str, view: EpisodeView | None
                    ) -> tuple[str, ...]:
    """The actions a constrained turn offers: those the task's images allow (`image_routing`,
    Registry.for_images) that the budget left can pay for (Registry.affordable); all of
    `actions` without a view."""
    if view is None:
        return tuple(actions)
    ok = registry.for_images(actions, image_routing, has_images=bool(view.images), first_call=view.turn == 0)
    return registry.affordable(ok, view.budget_left)


@runtime_checkable
class Policy(Protocol):
    checkpoint_id: str

    async def act(self, messages: Sequence[Mapping[str, str]], view: EpisodeView) -> PolicyTurn: ...

    def encode_prompt(self, messages: Sequence[Mapping[str, str]]) -> tuple[int, ...]: ...

    def encode_observation(self, message: Mapping[str, str]) -> tuple[int, ...]: ...


Script = Callable[[str, list[str], EpisodeView], str]
"""(question, observations so far, view) -> the next turn's text."""


class ScriptedPolicy:
    """A deterministic policy driven by a function of the question and the observations.

    For tests and the demo only: it has no tokens, so its trajectories carry text but empty
    token ids."""

    def __init__(self, script: Script, *, checkpoint_id: str = "scripted"):
        self.script = script
        self.checkpoint_id = checkpoint_id

    @classmethod
    def from_turns(cls, turns: Mapping[str, Sequence[str]] | Sequence[str], **kw) -> "ScriptedPolicy":
        """Fixed turns: one list for every question, or a dict question -> list of turns.
        Past the end of the list it repeats the last turn."""
        def script(question: str, observations: list[str], view: EpisodeView) -> str:
            seq = turns[question] if isinstance(turns, Mapping) else turns
            return seq[min(view.turn, len(seq) - 1)]
        return cls(script, **kw)

    async def act(self, messages: Sequence[Mapping[str, str]], view: EpisodeView) -> PolicyTurn:
        question = question_of(messages)
        observations = [m["content"] for m in messages[2:] if m["role"] != "assistant"]
        return PolicyTurn(self.script(question, observations, view))

    def encode_prompt(self, messages: Sequence[Mapping[str, str]]) -> tuple[int, ...]:
        return ()

    def encode_observation(self, message: Mapping[str, str]) -> tuple[int, ...]:
        return ()


_QUESTION = re.compile(r"^Question: (.*?)(?:\n\[image|\nBudget:|\Z)", re.DOTALL)


def question_of(messages: Sequence[Mapping[str, str]]) -> str:
    """The question text from the runner's user message."""
    m = _QUESTION.match(messages[1]["content"])
    return m.group(1) if m else messages[1]["content"]


_INFO = re.compile(r"<information>(.*?)(?: \(confidence [0-9.]+\))?</information>", re.DOTALL)


def information_text(observation: str) -> str | None:
    """The escaped payload of an `<information>` observation (None for other text)."""
    m = _INFO.fullmatch(observation.strip())
    return m.group(1) if m else None
