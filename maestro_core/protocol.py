"""The action protocol: what the policy writes each turn, and how observations come back.

One policy turn is an optional `<think>...</think>` followed by exactly one action:

    <call>EXPERT@@SKILL[/SOLVER]: input text</call>     or     <answer>...</answer>

A call without input (`<call>EXPERT@@SKILL</call>`) forwards the task's own question to the
expert (`Call.input` is then ""; the runner fills it in): a small policy can route without
having to copy the question.

`parse_action(text, registry)` returns a `Call` or an `Answer`, or raises a
`ModelBehaviorError` subclass (malformed text, two actions, unknown names, an incompatible
pair). The runner never lets that escape an episode: it shows `error_observation(err)` to the
policy and counts a format penalty.

The environment answers a call with `<information>...</information>`. `escape` makes expert
output inert (`&`, `<`, `>` become entities), so no expert can forge `<answer>`, `<call>` or a
closing `</information>` tag; `unescape` is its exact inverse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from maestro_core.errors import (IncompatiblePair, MalformedAction, ModelBehaviorError, MultipleActions,
                                 UnknownExpert, UnknownSkill, UnknownSolver)
from maestro_core.registry import Registry

PROTOCOL_TEXT = (
    "Solve the task step by step. Each turn, you may think inside <think>...</think>, then write exactly one "
    "action: <call>EXPERT@@SKILL: input</call> to ask an expert (optionally EXPERT@@SKILL/SOLVER to pick a "
    "solver), or <answer>final answer</answer> to finish. Results come back inside <information>...</information>."
)

PROTOCOL_TEXT_COMPACT = "One action per turn: <call>ACTION: input</call> or <answer>text</answer>."
ANSWER_FROM = ("any", "last")
"""Which observations a candidate-constrained answer may quote: every one's payload, or the latest's
(LMPolicy `answer_from`, TrainConfig.answer_from)."""

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_ACTION = re.compile(r"<(call|answer)>(.*?)</\1>", re.DOTALL)
_TAG = re.compile(r"</?(?:call|answer|think|information)>")
_TARGET = re.compile(r"^\s*([^\s@:/]+)@@([^\s@:/]+)(?:/([^\s@:/]+))?\s*(?::(.*))?$", re.DOTALL)


@dataclass(frozen=True)
class Call:
    """Call `expert` with `skill` (and `solver`, or None to let the skill dispatch)."""

    expert: str
    skill: str
    solver: str | None
    input: str

    @property
    def target(self) -> str:
        return f"{self.expert}@@{self.skill}" + (f"/{self.solver}" if self.solver else "")


@dataclass(frozen=True)
class Answer:
    text: str


Action = Call | Answer


def parse_action(text: str, registry: Registry) -> Action:
    """Parse one policy turn into exactly one action, or raise a ModelBehaviorError."""
    if not isinstance(text, str):
        raise MalformedAction("the turn is not text.")
    body = _THINK.sub("", text)
    if "<think>" in body or "</think>" in body:
        raise MalformedAction("unbalanced <think> tag.")
    actions = list(_ACTION.finditer(body))
    if not actions:
        raise MalformedAction("no action: write <call>EXPERT@@SKILL: input</call> or <answer>...</answer>.")
    if len(actions) > 1:
        raise MultipleActions(f"{len(actions)} actions in one turn: write exactly one <call> or <answer>.")
    m = actions[0]
    outside = (body[:m.start()] + body[m.end():]).strip()
    if outside:
        raise MalformedAction("text outside the action tags: put reasoning inside <think>...</think>.")
    kind, inner = m.group(1), m.group(2)
    if _TAG.search(inner):
        raise MalformedAction(f"a tag inside <{kind}>: write plain text.")
    if kind == "answer":
        ans = inner.strip()
        if not ans:
            raise MalformedAction("empty <answer>.")
        return Answer(ans)
    t = _TARGET.match(inner)
    if not t:
        raise MalformedAction("a call must look like <call>EXPERT@@SKILL: input</call>.")
    expert, skill, solver = t.group(1), t.group(2), t.group(3)
    forward = t.group(4) is None  # <call>EXPERT@@SKILL</call>: the expert gets the task's question
    call_input = "" if forward else t.group(4).strip()
    if expert not in registry.experts:
        raise UnknownExpert(f"unknown expert '{expert}'; experts: {', '.join(registry.experts)}.")
    if skill not in registry.skills:
        raise UnknownSkill(f"unknown skill '{skill}'; skills: {', '.join(registry.skills)}.")
    if solver is not None and solver not in registry.skills[skill].solvers:
        raise UnknownSolver(f"unknown solver '{skill}/{solver}'; solvers: "
                            f"{', '.join(registry.skills[skill].solvers)}.")
    if not registry.compatible(expert, skill, solver):
        raise IncompatiblePair(f"{expert} cannot run {skill}{'/' + solver if solver else ''}: it lacks a "
                               "capability this skill needs.")
    if not call_input and not forward:
        raise MalformedAction("empty call input: write the question for the expert after the colon.")
    return Call(expert, skill, solver, call_input)


def escape(text: str) -> str:
    """Make text inert inside an observation: no tag can survive."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def observation(text: str, *, confidence: float | None = None, max_chars: int | None = None) -> str:
    """The environment's reply to a call, as the policy sees it."""
    body = text if max_chars is None or len(text) <= max_chars else text[:max_chars] + " ...[truncated]"
    conf = f" (confidence {confidence:.2f})" if confidence is not None else ""
    return f"<information>{escape(body)}{conf}</information>"


def error_observation(err: ModelBehaviorError | Exception | str) -> str:
    """What the policy sees when its turn or the call failed."""
    kind = getattr(err, "kind", "error")
    return f"<information>error ({kind}): {escape(str(err))}</information>"
