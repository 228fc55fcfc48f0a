"""Skills: run a level-2 solver workflow for a policy's call.

A call names `EXPERT@@SKILL` or `EXPERT@@SKILL/SOLVER`. Without a solver, the level-1 skill
dispatches on the call input (its `dispatch` rules, else its default solver). The solver's
steps then run in order:

- prompt: render the template and ask an expert (the chosen one, or the helper the step
  names) with the episode's images;
- tool: run a Python tool from `maestro_core.tools` (it may replace the images, e.g. a crop;
  a tool with a `question` parameter also receives the call input);
- code: run the rendered text as Python in the sandbox (no network, unprivileged, limited).

Templates use `{input}`, `{prev}` and the `save_as` names of earlier steps. The result
carries the text, the last confidence seen, and the summed cost, latency and tokens.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from maestro_core.experts.base import ExpertBackend
from maestro_core.protocol import Call
from maestro_core.registry import Registry, Solver, Step
from maestro_core.tools import TOOLS, ToolOutput

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class SkillResult:
    """The outcome of one call action (a whole solver run)."""

    text: str
    solver: str
    confidence: float | None
    cost: float
    latency_s: float
    tokens_in: int
    tokens_out: int
    expert_calls: int


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill {name} fields; unknown fields and other braces stay as written (inputs may hold braces)."""
    return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def resolve_solver(registry: Registry, call: Call) -> Solver:
    skill = registry.skills[call.skill]
    if call.solver:
        return skill.solvers[call.solver]
    return skill.pick_solver(call.input, registry.runnable_solvers(call.expert, call.skill))


async def run_skill(registry: Registry, experts: Mapping[str, ExpertBackend], call: Call,
                    images: Sequence[str | Path] = (), *, solver: Solver | None = None,
                    sandbox_limits=None) -> SkillResult:
    """Run the solver for `call`. Expert failures propagate as ExpertError."""
    solver = solver or resolve_solver(registry, call)
    values: dict[str, str] = {"input": call.input, "prev": call.input}
    imgs = [Path(p) for p in images]
    cost = 0.0
    tokens_in = tokens_out = calls = 0
    confidence: float | None = None
    latency = 0.0  # the sum of the steps' own latencies, not wall time under a busy event loop
    for step in solver.steps:
        text = render(step.template, values)
        if step.kind == "prompt":
            reply = await experts[step.expert or call.expert].generate([{"role": "user", "content": text}], imgs)
            out, confidence = reply.text, reply.confidence
            latency += reply.latency_s
            cost += reply.cost
            tokens_in += reply.tokens_in
            tokens_out += reply.tokens_out
            calls += 1
        elif step.kind == "tool":
            res, took = await _run_tool(step, text, imgs, call.input)
            out = res.text
            confidence = res.confidence if res.confidence is not None else confidence
            if res.images is not None:
                imgs = list(res.images)
            latency += took
        else:
            t0 = time.perf_counter()
            out = await _run_code(text, sandbox_limits)
            latency += time.perf_counter() - t0
        values["prev"] = out
        if step.save_as:
            values[step.save_as] = out
    return SkillResult(text=values["prev"], solver=solver.name, confidence=confidence, cost=cost,
                       latency_s=latency, tokens_in=tokens_in, tokens_out=tokens_out,
                       expert_calls=calls)


async def _run_tool(step: Step, text: str, images: list[Path], call_input: str) -> tuple[ToolOutput, float]:
    """The tool's output and its own run time (timed inside the worker thread, not the queue)."""
    fn = TOOLS[step.tool]
    kwargs = dict(step.args)
    if "question" in inspect.signature(fn).parameters:
        kwargs["question"] = call_input  # tools that answer need what was asked

    def timed():
        t0 = time.perf_counter()
        return fn(text, images, **kwargs), time.perf_counter() - t0

    if inspect.iscoroutinefunction(fn):
        t0 = time.perf_counter()
        res = await fn(text, images, **kwargs)
        took = time.perf_counter() - t0
    else:
        # tools may do real work (image crops, OCR post-processing): keep the loop free
        res, took = await asyncio.to_thread(timed)
    return (res if isinstance(res, ToolOutput) else ToolOutput(str(res))), took


async def _run_code(code: str, limits) -> str:
    from maestro_core.sandbox import SandboxLimits, arun_code
    code = TOOLS["strip_code_fences"](code, []).text
    res = await arun_code(code, limits or SandboxLimits())
    if res.ok:
        return res.stdout.strip()
    reason = res.killed_reason or f"exit code {res.returncode}"
    tail = res.stderr.strip().splitlines()[-1:] if res.stderr.strip() else []
    return f"code failed ({reason}){': ' + tail[0] if tail else ''}"
