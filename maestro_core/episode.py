"""The episode runner (the environment): many episodes at once, every step recorded.

    runner = EpisodeRunner(registry, experts, policy, cache=ExpertCache(store))
    trajectories = await runner.run(items, group_size=8, run_id="r1", iteration=0, chunk=0)

Each episode: the policy reads the system catalogue and the question, then each turn writes
one action. A call runs the expert@@skill solver (through the cache) under a per-call timeout
and the episode's cost budget; its result comes back as an `<information>` observation. A
malformed turn, an expert failure, a timeout or a spent budget also come back as
observations: nothing the policy or an expert does crashes the episode. The episode ends at
an answer or at the turn limit, and is scored by the item's scorer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

from maestro_core.cache import ExpertCache
from maestro_core.dataset import Item
from maestro_core.errors import ConfigError, ExpertError, ExpertTimeout, ModelBehaviorError
from maestro_core.experts.base import ExpertBackend
from maestro_core.policy import EpisodeView, Policy
from maestro_core.protocol import PROTOCOL_TEXT, PROTOCOL_TEXT_COMPACT, Answer, Call, error_observation, observation, parse_action
from maestro_core.registry import Registry
from maestro_core.rewards import RewardConfig, compute_reward
from maestro_core.skills import SkillResult, resolve_solver, run_skill
from maestro_core.trajectory import StepRecord, Trajectory, episode_id


@dataclass(frozen=True)
class EpisodeConfig:
    """How episodes run."""

    max_turns: int = field(default=4, metadata={"help": "Policy turns per episode (the paper uses 4)."})
    call_timeout_s: float = field(default=60.0, metadata={"help": "Seconds one call (a whole solver) may take."})
    cost_budget: float | None = field(default=None, metadata={
        "help": "Per-episode cost budget; calls after it is spent are refused. None: no budget."})
    max_concurrency: int = field(default=256, metadata={"help": "Episodes in flight at once."})
    observation_max_chars: int = field(default=2000, metadata={"help": "Longer expert output is truncated."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "Reward terms."})
    compact_prompt: bool = field(default=False, metadata={
        "help": "Short system prompt (valid actions only): the CPU profile, where the prompt dominates the update."})

    def __post_init__(self):
        if self.max_turns < 1:
            raise ConfigError(f"max_turns must be >= 1, got {self.max_turns}.", field="max_turns", fix="set it to e.g. 4.")
        if self.call_timeout_s <= 0:
            raise ConfigError("call_timeout_s must be > 0.", field="call_timeout_s", fix="set it to e.g. 60.")
        if self.cost_budget is not None and self.cost_budget < 0:
            raise ConfigError("cost_budget must be >= 0 or None.", field="cost_budget", fix="remove it or set a positive number.")
        if self.max_concurrency < 1:
            raise ConfigError("max_concurrency must be >= 1.", field="max_concurrency", fix="set it to e.g. 256.")


def image_descriptor(index: int, path: str) -> str:
    """A neutral description of an image (order and size only, never content or metadata)."""
    try:
        from PIL import Image
        with Image.open(path) as im:
            return f"[image {index}: {im.width}x{im.height}]"
    except Exception:  # an unreadable image is described without a size; the expert will report it
        return f"[image {index}]"


def build_messages(registry: Registry, item: Item, *, cost_budget: float | None = None,
                   cost_lambda: float | None = None, compact: bool = False,
                   question: str | None = None) -> list[dict[str, str]]:
    """The policy's prompt: system = catalogue + protocol; user = question, image descriptors,
    the cost weight (when given, 0 included: a policy trained with weights sees one in every
    prompt) and the budget. `question` replaces the item's in the prompt only (training-time
    question noise); calls still forward the item's own question."""
    if compact:
        system = f"{registry.catalogue(compact=True)}\n{PROTOCOL_TEXT_COMPACT}"
    else:
        system = f"{registry.catalogue()}\n\n{PROTOCOL_TEXT}"
    user = f"Question: {item.question if question is None else question}"
    for i, p in enumerate(item.images, 1):
        user += "\n" + image_descriptor(i, p)
    if cost_lambda is not None:  # in the user message, next to the question the policy reads
        user += f"\nCost weight: {cost_lambda:g}" + ("" if compact else " (higher: cheaper routes are worth more)")
    if cost_budget is not None:
        user += f"\nBudget: ${cost_budget:g}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class EpisodeRunner:
    def __init__(self, registry: Registry, experts: Mapping[str, ExpertBackend], policy: Policy, *,
                 cache: ExpertCache | None = None, config: EpisodeConfig | None = None, sandbox_limits=None):
        missing = [e for e in registry.experts if e not in experts]
        if missing:
            raise ConfigError(f"no backend for expert(s) {missing}.", fix="build them with build_experts(registry).")
        self.registry, self.experts, self.policy = registry, experts, policy
        self.cache = cache if cache is not None else ExpertCache(None)
        self.config = config or EpisodeConfig()
        self.sandbox_limits = sandbox_limits

    async def run(self, items: Sequence[Item], *, group_size: int = 1, run_id: str = "adhoc", iteration: int = 0,
                  chunk: int = 0, cost_lambda: float | Callable[[int], float] | None = None,
                  cost_budget: Callable[[int], float | None] | None = None,
                  question_view: Callable[[int], str | None] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> list[Trajectory]:
        """Run `group_size` episodes per item, concurrently; results in (item, sample) order.
        `cost_lambda` is a number, or a function of the episode index (sampled per episode);
        `cost_budget` a function of the episode index giving its budget (None: the config's);
        `question_view` one giving the question its prompt shows (None: the item's)."""
        sem = asyncio.Semaphore(self.config.max_concurrency)
        total, done = len(items) * group_size, 0

        async def one(k: int, item: Item, s: int) -> Trajectory:
            nonlocal done
            lam = cost_lambda(k) if callable(cost_lambda) else cost_lambda
            budget = cost_budget(k) if cost_budget is not None else None
            view = question_view(k) if question_view is not None else None
            async with sem:
                t = await self.run_episode(item, run_id=run_id, iteration=iteration, chunk=chunk,
                                           sample_index=s, cost_lambda=lam, cost_budget=budget, question_view=view)
            done += 1
            if progress:
                progress(done, total)
            return t

        jobs = [one(k, it, s) for k, (it, s) in enumerate((it, s) for it in items for s in range(group_size))]
        try:
            return list(await asyncio.gather(*jobs))
        finally:
            self.cache.flush()

    async def run_episode(self, item: Item, *, run_id: str = "adhoc", iteration: int = 0, chunk: int = 0,
                          sample_index: int = 0, cost_lambda: float | None = None,
                          cost_budget: float | None = None, question_view: str | None = None) -> Trajectory:
        """One episode; `cost_budget` overrides the config's budget for it (None: the config's);
        `question_view` replaces the question in the policy's prompt (calls forward the item's)."""
        cfg = self.config
        lam = cfg.reward.cost_lambda if cost_lambda is None else cost_lambda
        budget = cfg.cost_budget if cost_budget is None else cost_budget
        eid = episode_id(run_id, iteration, item.id, sample_index)
        messages = build_messages(self.registry, item, cost_budget=budget,
                                  cost_lambda=lam if cost_lambda is not None else None, compact=cfg.compact_prompt,
                                  question=question_view)
        prompt_ids = tuple(self.policy.encode_prompt(messages))
        steps: list[StepRecord] = []
        answer: str | None = None
        finish = "max_turns"
        spent_cost = 0.0
        n_invalid = 0
        for turn in range(cfg.max_turns):
            left = None if budget is None else max(0.0, budget - spent_cost)
            pt = await self.policy.act(messages, EpisodeView(eid, sample_index, turn, cfg.max_turns, left,
                                                             images=tuple(item.images)))
            rec = dict(turn=turn, text=pt.text, completion_ids=tuple(pt.token_ids), logprobs=tuple(pt.logprobs))
            messages.append({"role": "assistant", "content": pt.text})
            try:
                action = parse_action(pt.text, self.registry)
            except ModelBehaviorError as e:
                n_invalid += 1
                rec.update(action="invalid", error=e.kind, error_message=str(e), observation=error_observation(e))
            else:
                if isinstance(action, Answer):
                    answer, finish = action.text, "answer"
                    steps.append(StepRecord(action="answer", **rec))
                    break
                if not action.input:  # a call without input forwards the task's question
                    action = replace(action, input=item.question)
                rec.update(await self._call(action, item.images, spent_cost, budget))
                spent_cost += rec.get("cost", 0.0)
            last = turn == cfg.max_turns - 1
            obs_msg = {"role": "user", "content": rec["observation"]}
            messages.append(obs_msg)
            # the observation after the last turn never enters the policy's context
            rec["observation_ids"] = () if last else tuple(self.policy.encode_observation(obs_msg))
            steps.append(StepRecord(**rec))
            if rec.get("error") == "budget":
                finish = "budget"
                break
        total_cost = sum(s.cost for s in steps)
        rb = compute_reward(answer, item.answer, item.scorer, n_invalid_turns=n_invalid, answered=answer is not None,
                            cost=total_cost, config=_with_lambda(cfg.reward, lam), choices=item.choices)
        calls = [s for s in steps if s.action == "call" and s.error != "budget"]
        return Trajectory(
            episode_id=eid, run_id=run_id, iteration=iteration, chunk=chunk, item_id=item.id,
            benchmark=item.benchmark, sample_index=sample_index, registry_version=self.registry.version,
            checkpoint_id=self.policy.checkpoint_id, prompt_text="\n".join(m["content"] for m in messages[:2]),
            prompt_ids=prompt_ids, steps=tuple(steps), final_answer=answer, finish_reason=finish,
            reward=rb.total, outcome=rb.outcome, format_score=rb.format_score, cost_term=rb.cost_term,
            cost_lambda=lam, total_cost=total_cost, total_latency_s=sum(s.latency_s for s in steps),
            spent_s=sum(s.spent_s for s in steps), n_calls=len(calls),
            n_cache_hits=sum(1 for s in calls if s.cache_hit), created_at=time.time())

    async def _call(self, call: Call, images: Sequence[str], spent_cost: float, budget: float | None) -> dict:
        """Run one call; return the step fields it decides (never raises for expert trouble)."""
        base = dict(action="call", expert=call.expert, skill=call.skill, call_input=call.input)
        if budget is not None and spent_cost >= budget:
            msg = f"the episode's budget (${budget:g}) is spent; answer now."
            return {**base, "error": "budget", "error_message": msg, "observation": error_observation(msg),
                    "cost": 0.0}
        solver = resolve_solver(self.registry, call)
        base["solver"] = solver.name
        t0 = time.perf_counter()
        try:
            key = self.cache.key(self.registry, call, solver, images)
            res, hit, spent = await asyncio.wait_for(
                self.cache.get_or_run(key, lambda: run_skill(self.registry, self.experts, call, images, solver=solver,
                                                             sandbox_limits=self.sandbox_limits),
                                      expert=call.expert, skill=call.skill),
                timeout=self.config.call_timeout_s)
        except (asyncio.TimeoutError, ExpertTimeout) as e:
            spent = time.perf_counter() - t0
            msg = f"{call.target} timed out" + (f": {e}" if str(e) else f" after {self.config.call_timeout_s:g} s")
            return {**base, "error": "timeout", "error_message": msg, "observation": error_observation(msg),
                    "spent_s": spent, "latency_s": spent}
        except (ExpertError, OSError) as e:
            # the expert's own time when it says (not our queue before it), else the time waited
            spent = getattr(e, "latency_s", None) or (time.perf_counter() - t0)
            return {**base, "error": "expert_error", "error_message": str(e),
                    "observation": error_observation(f"{call.target} failed: {e}"), "spent_s": spent, "latency_s": spent}
        return {**base, **_result_fields(res), "cache_hit": hit, "spent_s": spent,
                "observation": observation(res.text, confidence=res.confidence,
                                           max_chars=self.config.observation_max_chars)}


def _result_fields(res: SkillResult) -> dict:
    return dict(solver=res.solver, cost=res.cost, latency_s=res.latency_s, tokens_in=res.tokens_in,
                tokens_out=res.tokens_out, confidence=res.confidence, expert_calls=res.expert_calls)


def _with_lambda(cfg: RewardConfig, lam: float) -> RewardConfig:
    return cfg if lam == cfg.cost_lambda else replace(cfg, cost_lambda=lam)
