"""The training loop: collect episodes with checkpoint k, store them, GRPO update to k+1.

    result = train_policy(registry, train_items, val_items, store=store, experts=experts,
                          config=TrainConfig(iterations=40), out_dir=home / "runs" / run_id)

Each iteration samples `prompts_per_iteration` train items, runs `num_generations` episodes
per item with the current weights (the LM policy, grammar-constrained, the compact prompt),
writes them as shards and into DuckDB, then makes one GRPO optimizer step from exactly
those episodes (on-policy: collect once per step) and saves the next checkpoint. Every
`eval_every` iterations the greedy policy is scored on validation items; a curve row is kept
per iteration. `TrainingRun` holds the steps (chunk specs -> shards, ingest, update) so the
pipeline runs them as separate retryable tasks; `train_policy` runs them in a plain loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from maestro_core.cache import ExpertCache
from maestro_core.dataset import Item
from maestro_core.episode import EpisodeConfig, EpisodeRunner
from maestro_core.errors import ConfigError
from maestro_core.grpo import GRPOSettings, grpo_update, shared_prefix_token_logps
from maestro_core.protocol import ANSWER_FROM
from maestro_core.question_noise import QuestionNoise
from maestro_core.registry import Registry, check_image_routing
from maestro_core.rewards import RewardConfig
from maestro_core.trajectory import Trajectory


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = field(default=60, metadata={"help": "GRPO iterations (one collect + one update each)."})
    prompts_per_iteration: int = field(default=16, metadata={"help": "Train items per iteration."})
    max_turns: int = field(default=2, metadata={
        "help": "Policy turns per episode (CPU default 2: one routed call, then the answer; the paper uses 4)."})
    max_turn_tokens: int = field(default=12, metadata={"help": "Tokens per policy turn (constrained decoding)."})
    answer_from: str = field(default="any", metadata={
        "help": "Which observations the answer may quote: 'any' (every observation's payload) or 'last' (the "
                "latest only, so a second call replaces the first reply: a cascade that escalates to a dearer "
                "expert when the first fails; with max_turns 3 or more). It constrains the in-process policy's "
                "answer to those payloads; a served policy (policy.backend: openai) writes its answer freely."})
    hidden: int = field(default=128, metadata={"help": "Policy model width (a Llama built from a config)."})
    layers: int = field(default=2, metadata={"help": "Policy model layers."})
    heads: int = field(default=4, metadata={"help": "Attention heads."})
    tie_embeddings: bool = field(default=False, metadata={
        "help": "Share the input embedding with the output layer. Off on CPU: the action tokens also appear in "
                "the catalogue of every prompt, and with a shared matrix each RL step on an action moved the "
                "prompt's representation for every benchmark."})
    vocab_size: int = field(default=2048, metadata={
        "help": "Policy tokenizer size: trained on the suite, or with vocab_from the pretrained vocabulary cut to "
                "its first vocab_size tokens (0: all of it; TRL scores every completion token over the whole "
                "vocabulary in each update, so on CPU a 49k vocabulary made the first update ~20x slower, unless "
                "grpo.score_policy_tokens_only)."})
    vocab_from: str = field(default="", metadata={
        "help": "'' (default): the policy's byte-level BPE is trained on the suite's texts (vocab_size). "
                "'expert:NAME': the tokenizer of that registry expert's transformers LM (e.g. "
                "expert:smollm2-135m), and its input embeddings, projected on their `hidden` leading principal "
                "components, as the policy's; or a local model folder. Words the suite never uses then start "
                "where the pretrained model puts them."})
    vocab_scale: float = field(default=1.0, metadata={
        "help": "With vocab_from: standard deviation of the projected embeddings (one factor for the whole "
                "matrix)."})
    call_input: str = field(default="question", metadata={
        "help": "'question': a call forwards the task's question (the policy routes; the CPU default, whose "
                "~5M-parameter policy cannot write useful inputs); 'free': it may also write the input."})
    actions: str = field(default="level1", metadata={
        "help": "'level1': the policy picks EXPERT@@SKILL and the skill picks its solver (the paper's action "
                "space; 10 actions on Maestro-Mini); 'all': level-2 EXPERT@@SKILL/SOLVER actions too."})
    image_routing: str = field(default="first", metadata={
        "help": "Which actions a turn offers given the task's images (the registry's skill `images:`; "
                "Registry.for_images): 'any': every action on every turn (the paper's setting); 'match': no "
                "image-reading skill ('required') on a task without images; 'first' (CPU default): also, on a "
                "task with images, the first call goes to a skill that sees them, and text-only skills "
                "('ignored') are offered from the second call on: a text LM asked about a chart it cannot see "
                "only guesses."})
    pretrain_steps: int = field(default=300, metadata={
        "help": "Label-free warm-up steps before RL (pretrain_reader: the first action's position predicts "
                "the question's words; no answers, routes or rewards), so the random-init policy reads its "
                "question; 0: off."})
    pretrain_contrast: float = field(default=0.0, metadata={
        "help": "Weight of a contrastive term in the warm-up (pretrain_reader's `contrast`): the first action's "
                "state of two noisy views of a prompt must pick each other out among the batch's, so prompts "
                "that say different things get different states (label-free). 0: off."})
    pretrain_views: str = field(default="prompt", metadata={
        "help": "The contrastive term's views: 'prompt' drops each prompt token (p 0.1); 'question' drops "
                "(p 0.3) or replaces (p 0.2) only the question's tokens, as question noise does."})
    rl_contrast_lr: float = field(default=0.0, metadata={
        "help": "Keep the contrastive term during RL: after each GRPO update, `rl_contrast_steps` steps of the "
                "warm-up's InfoNCE term alone (views as pretrain_views, on the warm-up's prompts), with their own "
                "AdamW at this learning rate (ContrastRegulariser). RL updates tend to pull the first action's "
                "states of all image questions back together, so a route learned for one benchmark spreads to "
                "the others and is lost. Label-free. 0: off."})
    rl_contrast_steps: int = field(default=1, metadata={"help": "Contrastive steps after each GRPO update."})
    temperature: float = field(default=1.5, metadata={
        "help": "Sampling temperature of rollouts (= grpo.temperature). 1.5 on CPU: the routing of minority "
                "benchmarks keeps being explored."})
    explore: float = field(default=0.0, metadata={
        "help": "Share of uniform exploration over the call targets in training rollouts (LMPolicy.explore): a "
                "target is drawn from (1 - explore) x policy + explore x uniform, so a route the policy rates "
                "low keeps being tried; validation and evaluation are greedy. 0: off."})
    explore_within: float | None = field(default=None, metadata={
        "help": "With explore: the uniform share goes only to the call targets whose call costs at most this "
                "(USD) more than the cheapest (LMPolicy.explore_within), e.g. 0.011 for the calculator, the CNN "
                "and tesseract on Maestro-Mini; none: every target (docs/POLICY.md: tried, not the default)."})
    eval_every: int = field(default=10, metadata={"help": "Validate and checkpoint every N iterations."})
    val_items: int = field(default=100, metadata={"help": "Validation items scored at each evaluation (spread over the benchmarks; 100 = the whole Maestro-Mini val split)."})
    collect_threads: int = field(default=0, metadata={
        "help": "Torch CPU threads while a chunk is collected in this process (restored after): the in-process "
                "experts generate at once (on Maestro-Mini the two LMs and OCR), and one thread each on a 2-core "
                "machine avoids oversubscribing it. 0: auto, half the cores (at least 1); -1: torch's own setting."})
    chunk_size: int = field(default=0, metadata={
        "help": "Items per rollout chunk (one task and one shard each); 0: the whole iteration in one chunk, "
                "which batches the policy best on one machine."})
    cost_lambdas: tuple[float, ...] = field(default=(), metadata={
        "help": "Cost weights to train with: one drawn per GROUP (the G episodes of an item share it, so their "
                "advantages compare routes at one price; repeat a value to draw it more often) and shown in the "
                "user message, so the policy can be steered at request time (`maestro eval --cost-lambda`). "
                "() or (0,): off, the CPU default (docs/POLICY.md: the ~1M-parameter policy did not learn to read "
                "the weight; use the request-time budget instead). With cost_scale 0.05 the best route of a "
                "Maestro-Mini benchmark changes between 0 and 2."})
    hidden_cost_lambda: float = field(default=0.0, metadata={
        "help": "A fixed cost weight in every episode's reward that the prompt does not show (RewardConfig."
                "cost_lambda), unlike cost_lambdas: to continue a checkpoint trained without a weight at a price, "
                "since a new 'Cost weight' line would itself move its routes (docs/POLICY.md). 0: off."})
    hidden_cost_warmup: int = field(default=0, metadata={
        "help": "Iterations over which hidden_cost_lambda rises linearly from 0 (iteration i of a run uses "
                "hidden_cost_lambda * min(1, i / hidden_cost_warmup)), so the policy first learns which routes "
                "answer right, while every route is still sampled, and then which are worth their price. "
                "0: the full weight from the first iteration."})
    cost_scale: float = field(default=0.05, metadata={"help": "Cost (USD) that counts as 1.0 in the cost term."})
    cost_on_success: bool = field(default=False, metadata={
        "help": "Charge the cost term only on right answers (RewardConfig.cost_on_success): with cost_lambdas, "
                "the cost then breaks ties between right routes (the cheapest right one wins) and a cheap "
                "failure never scores above a dear one."})
    cost_budgets: tuple[float, ...] = field(default=(0.02, 0.005), metadata={
        "help": "Per-task cost budgets (USD) to train with, so the request-time budget knob (`maestro eval "
                "--budget`) meets prompts the policy knows: a group gets one of them (drawn uniformly) with "
                "probability budget_share, shown in its prompt ('Budget: $0.02') and enforced by the grammar (only "
                "calls it can pay for are offered); other groups have no budget. (): off."})
    budget_share: float = field(default=0.25, metadata={
        "help": "Share of training groups with a budget from cost_budgets. 0.25 on CPU: with 0.5, the "
                "unbudgeted chart groups (the only ones where rapidocr@@chart can be tried) were too few to "
                "pull charts off text OCR at 1 seed in 2 (docs/POLICY.md, run to run)."})
    cost_prior: float = field(default=0.0, metadata={
        "help": "Strength beta of a label-free cost prior fitted after the warm-up: the first call's target "
                "distribution starts at p(a) ~ exp(-beta x min(call cost estimate / cost_scale, 2)) (output layer "
                "only; action_prior / fit_action_prior), so RL starts from the cheap routes and moves to a dearer "
                "one where the outcome pays for it (GRPO keeps the incumbent on ties). 0: off."})
    start_uniform: bool = field(default=False, metadata={
        "help": "After the warm-up, fit the first call's target distribution to uniform (fit_action_prior with "
                "the prior at strength 0; output layer only), so RL starts with no route preferred and, with "
                "grpo.beta > 0, the KL reference (ckpt-0) is uniform over the routes: the KL term then keeps "
                "every route's log-probability tied to its advantage instead of letting the first winner "
                "saturate. cost_prior > 0 fits its price prior instead."})
    question_noise_share: float = field(default=0.5, metadata={
        "help": "Share of training groups whose prompt shows a noisy question (question_noise.py: words dropped "
                "with probability question_drop, replaced by random letters with probability question_replace; "
                "one noisy version per group). Experts still get the item's own question. Makes the words an "
                "unreliable cue, so the policy also reads the image descriptors and copes with unseen wordings "
                "(held-out set 0.56 at seeds 0 and 1 against 0.40-0.51 without; docs/POLICY.md). 0: off."})
    question_drop: float = field(default=0.3, metadata={"help": "Per-word drop probability of question noise."})
    question_replace: float = field(default=0.2, metadata={
        "help": "Per-word probability that question noise replaces a word by random letters."})
    balanced_batches: bool = field(default=True, metadata={
        "help": "Draw each iteration's items benchmark by benchmark in turn (the same number from each, give or "
                "take one) instead of uniformly from the train split, so no iteration lacks a benchmark."})
    batch_weights: dict[str, float] = field(default_factory=dict, metadata={
        "help": "Benchmark -> weight of its share of each iteration's items with balanced_batches (a benchmark "
                "not named: 1; 0 leaves it out), e.g. {charts: 2, text_reading: 2} draws twice as many of those "
                "as of each other benchmark: more groups per batch where the best route differs by question "
                "template. {}: the same number from each."})
    seed: int = field(default=0, metadata={"help": "Seed of item sampling, model init and sampling."})
    grpo: GRPOSettings = field(default_factory=GRPOSettings.cpu_profile, metadata={"help": "GRPO settings."})

    def __post_init__(self):
        for name in ("iterations", "prompts_per_iteration", "max_turns", "eval_every", "val_items"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1.", field=name, fix=f"set {name} to a positive integer.")
        if self.temperature != self.grpo.temperature:
            raise ConfigError(f"temperature {self.temperature} differs from grpo.temperature {self.grpo.temperature}: "
                              "TRL recomputes logprobs at grpo.temperature, so the sampler must use the same.",
                              field="temperature", fix="set train.temperature and train.grpo.temperature equal.")
        if self.actions not in ("level1", "all"):
            raise ConfigError(f"actions '{self.actions}' is unknown.", field="actions", fix="use 'level1' or 'all'.")
        if not self.pretrain_contrast >= 0:
            raise ConfigError(f"pretrain_contrast must be >= 0, got {self.pretrain_contrast}.",
                              field="pretrain_contrast", fix="use e.g. 1.0, or 0 to switch it off.")
        if self.pretrain_views not in ("prompt", "question"):
            raise ConfigError(f"pretrain_views '{self.pretrain_views}' is unknown.", field="pretrain_views",
                              fix="use 'prompt' or 'question'.")
        if not (0.0 <= self.rl_contrast_lr < float("inf")):
            raise ConfigError(f"rl_contrast_lr must be finite and >= 0, got {self.rl_contrast_lr}.",
                              field="rl_contrast_lr", fix="use e.g. 1e-3, or 0 to switch it off.")
        if self.rl_contrast_steps < 1:
            raise ConfigError("rl_contrast_steps must be >= 1.", field="rl_contrast_steps",
                              fix="use 1 or more (rl_contrast_lr: 0 switches the term off).")
        if self.collect_threads < -1:
            raise ConfigError(f"collect_threads {self.collect_threads} is not a thread count.", field="collect_threads",
                              fix="use a number >= 1, 0 for half the cores, or -1 for torch's own setting.")
        if self.pretrain_steps < 0:
            raise ConfigError("pretrain_steps must be >= 0.", field="pretrain_steps", fix="use 0 to switch it off.")
        if self.answer_from not in ANSWER_FROM:
            raise ConfigError(f"answer_from '{self.answer_from}' is unknown.", field="answer_from",
                              fix="use 'any' or 'last'.")
        if self.answer_from == "last" and self.max_turns < 3:
            raise ConfigError(f"answer_from 'last' with max_turns {self.max_turns}: an episode has one call, so it "
                              "answers from that call either way.", field="answer_from",
                              fix="set max_turns: 3 (call, call again or answer, answer), or leave answer_from out.")
        check_image_routing(self.image_routing)
        if self.call_input not in ("question", "free"):
            raise ConfigError(f"call_input '{self.call_input}' is unknown.", field="call_input",
                              fix="use 'question' or 'free'.")
        if not 0.0 <= self.explore < 1.0:
            raise ConfigError(f"explore must be in [0, 1), got {self.explore}.", field="explore",
                              fix="use e.g. 0.2, or 0 to switch it off.")
        if self.explore_within is not None and not self.explore_within >= 0:
            raise ConfigError(f"explore_within must be >= 0 (USD), got {self.explore_within}.",
                              field="explore_within", fix="use e.g. 0.011, or leave it out for every target.")
        if any(not (b > 0) for b in self.cost_budgets) or not 0.0 <= self.budget_share <= 1.0:
            raise ConfigError(f"cost_budgets {self.cost_budgets} / budget_share {self.budget_share} out of range.",
                              field="cost_budgets", fix="use budgets > 0 (USD per task) and a share in [0, 1].")
        if not 0.0 <= self.question_noise_share <= 1.0:
            raise ConfigError(f"question_noise_share must be in [0, 1], got {self.question_noise_share}.",
                              field="question_noise_share", fix="use e.g. 0.5, or 0 to switch it off.")
        QuestionNoise(self.question_drop, self.question_replace)  # validates both
        if not (self.cost_prior >= 0):
            raise ConfigError(f"cost_prior must be >= 0, got {self.cost_prior}.", field="cost_prior",
                              fix="use 0 (off) or a positive strength such as 2.")
        if not (0.0 < self.vocab_scale < float("inf")):
            raise ConfigError(f"vocab_scale {self.vocab_scale} must be finite and > 0.", field="vocab_scale",
                              fix="use e.g. 1.0.")
        if not (0.0 <= self.hidden_cost_lambda < float("inf")):
            raise ConfigError(f"hidden_cost_lambda {self.hidden_cost_lambda} must be finite and >= 0.",
                              field="hidden_cost_lambda", fix="use e.g. 1.0, or 0 to switch it off.")
        if self.hidden_cost_warmup < 0:
            raise ConfigError(f"hidden_cost_warmup {self.hidden_cost_warmup} must be >= 0.", field="hidden_cost_warmup",
                              fix="use a number of iterations, e.g. 30, or 0 for the full weight from the start.")
        if self.hidden_cost_warmup and not self.hidden_cost_lambda:
            raise ConfigError(f"hidden_cost_warmup {self.hidden_cost_warmup} ramps up a hidden_cost_lambda of 0: it "
                              "would do nothing.", field="hidden_cost_warmup",
                              fix="set hidden_cost_lambda (e.g. 1.1), or remove hidden_cost_warmup.")
        if self.hidden_cost_lambda and any(lam > 0 for lam in self.cost_lambdas):
            raise ConfigError("both hidden_cost_lambda and cost_lambdas set a cost weight.", field="hidden_cost_lambda",
                              fix="use cost_lambdas for a weight shown in the prompt, or hidden_cost_lambda for one "
                                  "that is not, not both.")
        bad_weights = {b: w for b, w in self.batch_weights.items()
                       if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w < float("inf")}
        if bad_weights:
            raise ConfigError(f"batch_weights {bad_weights} are not finite numbers >= 0.", field="batch_weights",
                              fix="give each benchmark a weight such as 2 (0 leaves it out), e.g. {charts: 2}.")
        if self.batch_weights and not self.balanced_batches:
            raise ConfigError("batch_weights set with balanced_batches off: the uniform draw has no shares.",
                              field="batch_weights", fix="set balanced_batches: true, or remove batch_weights.")
        if any(not (lam >= 0) for lam in self.cost_lambdas):
            raise ConfigError(f"cost_lambdas {self.cost_lambdas} has a negative value.", field="cost_lambdas",
                              fix="use weights >= 0, e.g. [0, 1, 2], or [] to switch it off.")


@dataclass
class TrainResult:
    run_id: str
    curve: list[dict]
    checkpoints: list[str]
    best_checkpoint: str | None
    best_val_accuracy: float | None


def spread(items: Sequence[Item], n: int, *, seed: int | str = 0,
           weights: Mapping[str, float] | None = None) -> list[Item]:
    """Up to `n` items taken in turn from each benchmark (shuffled within each, seeded): the
    suite is stored benchmark by benchmark, so its first n items would cover one or two.
    `weights` (benchmark -> weight, 1 for one not named, 0 to leave it out): each benchmark's
    share of the n is in proportion to its weight (largest remainders, ties to the first name);
    a benchmark short of its share leaves the rest to the others, in proportion too."""
    rng = random.Random(seed)
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(it.benchmark, []).append(it)
    for g in groups.values():
        rng.shuffle(g)
    quota = _quotas({b: len(g) for b, g in groups.items()}, n, weights or {})
    out: list[Item] = []
    while any(quota.values()):  # in turn, one item per benchmark with some of its share left
        for b in sorted(groups):
            if quota[b]:
                out.append(groups[b].pop())
                quota[b] -= 1
    return out


def check_batch_weights(weights: Mapping[str, float], items: Sequence[Item]) -> None:
    """ConfigError when `weights` (TrainConfig.batch_weights) name a benchmark that `items` lack
    or leave every benchmark out."""
    benchmarks = sorted({it.benchmark for it in items})
    unknown = sorted(set(weights) - set(benchmarks))
    if unknown or (weights and not any(weights.get(b, 1.0) for b in benchmarks)):
        raise ConfigError(f"batch_weights {dict(weights)} " + (
            f"name benchmarks the train split lacks: {unknown}." if unknown else "leave out every benchmark."),
            field="batch_weights", fix=f"weigh some of the train split's benchmarks {benchmarks} above 0.")


def _quotas(sizes: Mapping[str, int], n: int, weights: Mapping[str, float]) -> dict[str, int]:
    """How many of `n` items each benchmark gives (at most its size), in proportion to its weight."""
    quota = {b: 0 for b in sizes}
    left = min(n, sum(size for b, size in sizes.items() if weights.get(b, 1.0) > 0))
    while left > 0:
        open_ = [b for b in sorted(sizes) if quota[b] < sizes[b] and weights.get(b, 1.0) > 0]
        total = sum(weights.get(b, 1.0) for b in open_)
        share = {b: left * weights.get(b, 1.0) / total for b in open_}
        whole = {b: min(int(share[b]), sizes[b] - quota[b]) for b in open_}
        given = sum(whole.values())
        for b in sorted(open_, key=lambda b: -(share[b] - int(share[b]))):  # largest remainders first
            if given < left and quota[b] + whole[b] < sizes[b] and share[b] > whole[b]:
                whole[b] += 1
                given += 1
        for b in open_:
            quota[b] += whole[b]
        left -= given
    return quota


def trained_with_cost(config: dict) -> bool:
    """Whether a training config (a stored dict) put a cost weight in every prompt; then
    validation and evaluation show the weight too (0 unless asked). Reads older configs'
    `cost_lambda_max` as well."""
    lams = config.get("cost_lambdas") or ()
    return any(float(x) > 0 for x in lams) or float(config.get("cost_lambda_max", 0) or 0) > 0


def default_cost_lambda(config: dict) -> float | None:
    """The cost weight a checkpoint's prompt shows when the request names none: None for a
    policy trained without one; else the smallest weight of its training grid (0 when the grid
    has 0), never a weight the policy has not seen in training (a grid of [0.3] validated at 0
    would read an unseen prompt)."""
    if not trained_with_cost(config):
        return None
    lams = [float(x) for x in (config.get("cost_lambdas") or ())]
    return min(lams) if lams else 0.0


def request_cost_lambda(config: dict, cost_lambda: float | None, *, checkpoint: str,
                        unseen_ok: bool = False) -> float | None:
    """The cost weight a checkpoint's prompt shows at request time: `cost_lambda` when one is
    asked for, else `default_cost_lambda`. A weight is refused for a policy trained without one
    in its prompts (the line alone moves its routes: x1 went from 0.875 at $0.0157 to 0.765 at
    $0.0225 on test, docs/POLICY.md) unless `unseen_ok` (a diagnostic of just that)."""
    if cost_lambda is None:
        return default_cost_lambda(config)
    if not trained_with_cost(config) and not unseen_ok:
        raise ConfigError(f"checkpoint {checkpoint} was trained without a cost weight in its prompts, so a "
                          "'Cost weight' line would be one it never saw, and would move its routes unpredictably.",
                          field="--cost-lambda", fix="leave --cost-lambda out; make it spend less with --target-cost, "
                          "--price-tilt or --budget, or use a checkpoint trained with train.cost_lambdas.")
    return cost_lambda


def policy_kwargs(config: TrainConfig | dict, registry: Registry) -> dict:
    """LMPolicy decoding settings of a training config (a TrainConfig or its stored dict)."""
    cfg = asdict(config) if isinstance(config, TrainConfig) else dict(config)
    actions = registry.grammar().actions
    if cfg.get("actions", "all") == "level1":
        actions = tuple(a for a in actions if "/" not in a)
    return dict(max_turn_tokens=int(cfg.get("max_turn_tokens", 24)), constrained=True, forward_question=True,
                free_input=cfg.get("call_input", "free") == "free", answer_candidates=True, answer_on_last_turn=True,
                answer_from=cfg.get("answer_from", "any"), actions=actions,
                # a config stored before image routing existed offered every action
                image_routing=cfg.get("image_routing", "any"))


def pretrain_reader(model, tokenizer, examples: Sequence[tuple[str, str]], *, steps: int, lr: float = 1e-3,
                    batch_size: int = 16, seed: int = 0, contrast: float = 0.0, views: str = "prompt") -> list[float]:
    """Label-free warm-up of a random-init policy: for (rendered prompt, user message) pairs,
    the position where the first action is sampled (right after the prompt and the `<call>`
    opener) is trained to predict a random token of the user's message (a bag-of-words
    objective). No answers, routes or rewards are involved: it makes that position's state
    carry what the question says, which RL then maps to actions. With `contrast` > 0 the loss
    also holds contrast x an InfoNCE term over two noisy views of each prompt (`_contrast_loss`;
    `views`: "prompt" drops each prompt token with probability 0.1, "question" drops (0.3) or
    replaces (0.2, by another question token) only the user message's tokens, as question noise
    does in training): word prediction alone can leave that state mostly shared by all prompts
    (a bias that every RL update on one prompt also applies to the others); the contrastive term
    keeps prompts that say different things apart. Returns the loss per step."""
    import torch

    if steps <= 0 or not examples:
        return []
    rng = random.Random(seed)
    enc, spans, pool = _view_examples(tokenizer, examples, views, contrast > 0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = []
    model.train()
    for _ in range(steps):
        batch, where = [], []
        for _ in range(batch_size):
            k = rng.randrange(len(enc))
            p, q = enc[k]
            batch.append(p + [q[rng.randrange(len(q))]])
            where.append(spans[k])
        # the next-token loss at each row's last position only: logits for that position alone
        # (the whole sequence's would be batch x length x vocabulary, large for a pretrained vocabulary);
        # the system prompt every row shares runs once (shared_prefix_token_logps), else each row whole
        shared = shared_prefix_token_logps(model, *_left_padded(batch, pad), 1, 1.0)
        if shared is not None:
            loss = -shared[0][:, 0].mean()
        else:
            ids, att = _right_padded(batch, pad)
            out = model(input_ids=ids, attention_mask=att, output_hidden_states=True, logits_to_keep=1)
            h = out.hidden_states[-1][torch.arange(len(batch)), torch.tensor([len(b) - 2 for b in batch])]
            loss = torch.nn.functional.cross_entropy(model.get_output_embeddings()(h).float(),
                                                     torch.tensor([b[-1] for b in batch]))
        if contrast > 0:
            loss = loss + contrast * _contrast_loss(model, [b[:-1] for b in batch], pad, rng, where, pool)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _view_examples(tokenizer, examples: Sequence[tuple[str, str]], views: str, contrast: bool = True):
    """For (rendered prompt, user message) pairs: the token ids of prompt + `<call>` and of the
    message (pairs with an empty message left out); with `contrast` and `views` 'question', the
    (start, end) of each message in its prompt and the pool of message tokens (else None spans
    and an empty pool: views that drop prompt tokens)."""
    if views not in ("prompt", "question"):
        raise ConfigError(f"contrastive views '{views}' are unknown.", field="pretrain_views",
                          fix="use 'prompt' or 'question'.")
    opener = tokenizer("<call>", add_special_tokens=False)["input_ids"]
    enc = [(tokenizer(p, add_special_tokens=False)["input_ids"] + opener, tokenizer(q, add_special_tokens=False)["input_ids"])
           for p, q in examples]
    enc = [(p, q) for p, q in enc if q]
    question = contrast and views == "question"
    starts = [_last_index(p, q) for p, q in enc] if question else [None] * len(enc)
    spans = [None if a is None else (a, a + len(q)) for a, (_, q) in zip(starts, enc)]
    pool = sorted({t for _, q in enc for t in q}) if question else []
    return enc, spans, pool


class ContrastRegulariser:
    """The warm-up's contrastive term kept during RL (TrainConfig.rl_contrast_lr): after each
    GRPO update, `steps` steps of `_contrast_loss` alone on random batches of the warm-up's
    prompts, with an AdamW of its own. RL moves the first action's state of all image questions
    together (the route learned for one benchmark then spreads to the others); this keeps prompts
    that say different things apart. Label-free: no answer, route or reward is read.

        reg = ContrastRegulariser(model, tokenizer, examples, lr=1e-3, steps=1, seed=0)
        loss = reg.step(iteration)      # after the GRPO update of that iteration
    """

    def __init__(self, model, tokenizer, examples: Sequence[tuple[str, str]], *, lr: float, steps: int = 1,
                 views: str = "prompt", seed: int = 0, batch_size: int = 16):
        import torch

        enc, self.spans, self.pool = _view_examples(tokenizer, examples, views)
        if not enc:
            raise ConfigError("no prompt with a question to contrast.", field="rl_contrast_lr",
                              fix="train on items with questions, or set rl_contrast_lr: 0.")
        self.prompts = [p for p, _ in enc]
        self.model, self.steps, self.seed, self.batch_size = model, steps, seed, batch_size
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def step(self, iteration: int) -> float:
        """`steps` optimizer steps (batches seeded by seed and iteration); the mean loss."""
        import torch

        rng = random.Random(f"{self.seed}-contrast-{iteration}")
        was_training = self.model.training
        self.model.train()
        losses = []
        for _ in range(self.steps):
            ks = [rng.randrange(len(self.prompts)) for _ in range(self.batch_size)]
            loss = _contrast_loss(self.model, [self.prompts[k] for k in ks], self.pad, rng,
                                  [self.spans[k] for k in ks], self.pool)
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            losses.append(float(loss.detach()))
        self.opt.zero_grad(set_to_none=True)
        self.model.train(was_training)
        return sum(losses) / len(losses)


def _left_padded(seqs: Sequence[list[int]], pad: int) -> tuple[Any, Any]:
    """input_ids and attention_mask of token lists padded on the left (last tokens aligned)."""
    import torch

    n = max(len(v) for v in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, v in enumerate(seqs):
        ids[i, n - len(v):] = torch.tensor(v)
        att[i, n - len(v):] = 1
    return ids, att


def _right_padded(seqs: Sequence[list[int]], pad: int) -> tuple[Any, Any]:
    """input_ids and attention_mask of token lists padded on the right."""
    import torch

    n = max(len(v) for v in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, v in enumerate(seqs):
        ids[i, :len(v)] = torch.tensor(v)
        att[i, :len(v)] = 1
    return ids, att


def _last_index(seq: Sequence[int], sub: Sequence[int]) -> int | None:
    """Start of the last occurrence of `sub` in `seq`, or None."""
    for i in range(len(seq) - len(sub), -1, -1):
        if list(seq[i:i + len(sub)]) == list(sub):
            return i
    return None


def _noisy_view(p: Sequence[int], span: tuple[int, int] | None, rng: random.Random, pool: Sequence[int]) -> list[int]:
    """One view of prompt `p` for the contrastive warm-up: without `span`, each token but the
    last two dropped with probability 0.1; with `span` (the user message), only its tokens are
    dropped (0.3) or replaced by a random `pool` token (0.2)."""
    if span is None:
        return [t for j, t in enumerate(p) if j >= len(p) - 2 or rng.random() >= 0.1]
    out = []
    for j, t in enumerate(p):
        if span[0] <= j < span[1]:
            r = rng.random()
            if r < 0.3:
                continue
            if r < 0.5:
                t = pool[rng.randrange(len(pool))]
        out.append(t)
    return out


def _contrast_loss(model, prompts: Sequence[list[int]], pad: int, rng: random.Random,
                   spans: Sequence[tuple[int, int] | None], pool: Sequence[int]) -> Any:
    """InfoNCE between two noisy views of each prompt (`_noisy_view`, independently per view):
    the first action's state of a view must pick out the other view of its own prompt among the
    batch's, so it has to depend on what the prompt says (label-free)."""
    import torch

    views = [_noisy_view(p, span, rng, pool) for _ in range(2) for p, span in zip(prompts, spans)]
    ids, att = _right_padded(views, pad)
    out = model(input_ids=ids, attention_mask=att, output_hidden_states=True, logits_to_keep=1)  # states only
    last = torch.tensor([len(v) - 1 for v in views])
    h = torch.nn.functional.normalize(out.hidden_states[-1][torch.arange(len(views)), last], dim=-1)
    b = len(prompts)
    sim = h[:b] @ h[b:].T / 0.1
    target = torch.arange(b)
    return (torch.nn.functional.cross_entropy(sim, target) + torch.nn.functional.cross_entropy(sim.T, target)) / 2


def action_prior(registry: Registry, actions: Sequence[str], beta: float, cost_scale: float) -> list[float]:
    """p(a) ~ exp(-beta x min(call cost estimate of a's expert / cost_scale, 2)) over `actions`:
    the prices alone (Expert.call_cost_estimate), no outcome or label."""
    import math

    w = [math.exp(-beta * min(registry.call_price(a) / cost_scale, 2.0)) for a in actions]
    z = sum(w)
    return [x / z for x in w]


def fit_action_prior(model, tokenizer, prompts: Sequence[str], actions: Sequence[str], prior: Sequence[float], *,
                     steps: int = 100, lr: float = 1e-2, batch_size: int = 16, seed: int = 0) -> list[float]:
    """Fit the first call's target distribution (right after the prompt and `<call>`, restricted
    to the action tokens, as constrained decoding samples it) to `prior`, for every prompt alike,
    by training the output layer only (the reader warm-up's state is kept). Returns the KL per
    step. Needs each action to start with its own token (the CPU policy's tokenizer)."""
    import torch

    first = [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in actions]
    if len(set(first)) != len(first):
        raise ConfigError("the actions do not start with distinct tokens, so a prior over them cannot be fitted.",
                          field="cost_prior", fix="use the policy tokenizer built by build_policy (one token per "
                                                  "action), or cost_prior: 0 and start_uniform: false.")
    opener = tokenizer("<call>", add_special_tokens=False)["input_ids"]
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] + opener for p in prompts]
    head = model.get_output_embeddings()
    for prm in model.parameters():
        prm.requires_grad_(False)
    for prm in head.parameters():
        prm.requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    target = torch.tensor(list(prior), dtype=torch.float32)
    idx = torch.tensor(first)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(seed)
    kls = []
    try:
        for _ in range(steps):
            batch = [enc[rng.randrange(len(enc))] for _ in range(batch_size)]
            n = max(len(b) for b in batch)
            ids = torch.full((len(batch), n), pad, dtype=torch.long)
            att = torch.zeros((len(batch), n), dtype=torch.long)
            for i, b in enumerate(batch):  # left padding: the last position is every row's first-action position
                ids[i, n - len(b):] = torch.tensor(b)
                att[i, n - len(b):] = 1
            pos = (att.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=1).logits[:, -1, :].float()
            logp = torch.log_softmax(logits[:, idx], dim=-1)
            kl = (target * (target.clamp_min(1e-12).log() - logp)).sum(-1).mean()
            opt.zero_grad()
            kl.backward()
            opt.step()
            kls.append(float(kl.detach()))
    finally:
        for prm in model.parameters():
            prm.requires_grad_(True)
    model.eval()
    return kls


def warmup_messages(registry: Registry, items: Sequence[Item], config: TrainConfig) -> list[list[dict]]:
    """The first-turn prompts the warm-up reads, as RL will show them: each item with every
    cost weight of the grid (when trained with one) and without and with each training budget."""
    from maestro_core.episode import build_messages

    lams = config.cost_lambdas if trained_with_cost(asdict(config)) else (None,)
    budgets = (None, *config.cost_budgets) if config.budget_share else (None,)
    return [build_messages(registry, it, compact=True, cost_lambda=lam, cost_budget=b)
            for it in items for lam in lams for b in budgets]


def warmup_examples(tokenizer, messages: Sequence[Sequence[dict]]) -> list[tuple[str, str]]:
    """(rendered first-turn prompt, user message) pairs of `messages`, as the warm-up reads them."""
    return [(tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True), m[-1]["content"])
            for m in messages]


def vocab_source(spec: str, registry: Registry) -> Path:
    """The model folder `train.vocab_from` names: 'expert:NAME' -> that expert's transformers
    LM (a GGUF file: its converted copy), else a local folder."""
    from maestro_core.weights import resolve_model

    if spec.startswith("expert:"):
        name = spec.split(":", 1)[1]
        expert = registry.experts.get(name)
        if expert is None or expert.kind != "transformers":
            lms = sorted(n for n, e in registry.experts.items() if e.kind == "transformers")
            raise ConfigError(f"vocab_from '{spec}': no transformers expert '{name}' in registry '{registry.name}'.",
                              field="vocab_from", fix=f"use one of {['expert:' + n for n in lms]} or a model folder.")
        return Path(resolve_model(expert.backend).loadable())
    if not Path(spec).is_dir():
        raise ConfigError(f"vocab_from '{spec}' is not a folder.", field="vocab_from",
                          fix="name a local model folder (config.json, safetensors weights, tokenizer) or "
                              "expert:NAME for a registry LM expert.")
    return Path(spec)


def build_policy(registry: Registry, texts: Sequence[str], config: TrainConfig, *, temperature: float | None = None,
                 messages: Sequence[Sequence[dict]] = ()):
    """A fresh tokenizer (trained on `texts`; with `config.vocab_from`, a pretrained LM's cut to
    `config.vocab_size`, whose input embeddings, projected, start the model's) and a random-init
    policy model from a config,
    warmed up for `config.pretrain_steps` steps (pretrain_reader) on the first-turn prompts of
    `messages` (system catalogue + user question, as the policy will read them), then, with
    `config.cost_prior` or `config.start_uniform`, its first call's targets fitted to the price
    prior or to uniform (fit_action_prior)."""
    from maestro_core.lm_policy import LMPolicy
    from maestro_core.policy_model import build_tiny_model, init_input_embeddings, projected_embeddings
    from maestro_core.tokenizer import (policy_corpus, policy_extra_tokens, pretrained_policy_tokenizer,
                                        train_policy_tokenizer)

    if config.vocab_from:
        folder = vocab_source(config.vocab_from, registry)
        tok = pretrained_policy_tokenizer(folder, extra_tokens=policy_extra_tokens(registry),
                                          max_vocab=config.vocab_size)
    else:
        tok = train_policy_tokenizer(policy_corpus(registry, texts), vocab_size=config.vocab_size,
                                     extra_tokens=policy_extra_tokens(registry))
    model = build_tiny_model(tok, hidden=config.hidden, layers=config.layers, heads=config.heads, seed=config.seed,
                             tie_embeddings=config.tie_embeddings)
    if config.vocab_from:
        init_input_embeddings(model, projected_embeddings(folder, config.hidden, config.vocab_scale,
                                                          rows=config.vocab_size),
                              scale=config.vocab_scale, seed=config.seed)
    if (config.pretrain_steps or config.cost_prior or config.start_uniform) and messages:
        import torch
        examples = warmup_examples(tok, messages)
        state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        try:
            pretrain_reader(model, tok, examples, steps=config.pretrain_steps, seed=config.seed,  # 0 steps: none
                            contrast=config.pretrain_contrast, views=config.pretrain_views)
            if config.cost_prior or config.start_uniform:  # the price prior, or uniform at strength 0
                actions = policy_kwargs(config, registry)["actions"]
                fit_action_prior(model, tok, [p for p, _ in examples], actions,
                                 action_prior(registry, actions, config.cost_prior, config.cost_scale),
                                 seed=config.seed)
        finally:
            torch.random.set_rng_state(state)
    policy = LMPolicy(model, tok, registry, temperature=config.temperature if temperature is None else temperature,
                      seed=config.seed, checkpoint_id="init", **policy_kwargs(config, registry))
    return model, tok, policy


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'name old -> new' for each setting of `after` that differs from `before` (nested sections
    as 'grpo.beta'; a setting `before` lacks, from an older checkpoint, counts as changed)."""
    out = []
    for key, new in after.items():
        old = before.get(key, "(unset)")
        if isinstance(new, Mapping):
            out += config_changes(old if isinstance(old, Mapping) else {}, new, f"{prefix}{key}.")
        elif old != json.loads(json.dumps(new, default=str)):  # as stored (save_checkpoint): tuples as lists
            out.append(f"{prefix}{key} {old!r} -> {new!r}")
    return out


def collect_threads(config: TrainConfig) -> int | None:
    """Torch threads for collecting in this process (TrainConfig.collect_threads); None: leave them."""
    if config.collect_threads == -1:
        return None
    return config.collect_threads or max(1, (os.cpu_count() or 2) // 2)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Torch's intra-op CPU threads set to `n` inside (None: unchanged), restored on exit.
    Threads that already ran a parallel torch op keep their own count; the episode runner's
    worker threads are new for each chunk, so they take this one."""
    import torch

    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def hidden_cost_lambda_at(config: TrainConfig, iteration: int | None) -> float:
    """The hidden cost weight of `iteration` (None: the full weight), ramped over hidden_cost_warmup."""
    if iteration is None or config.hidden_cost_warmup <= 0:
        return config.hidden_cost_lambda
    return config.hidden_cost_lambda * min(1.0, iteration / config.hidden_cost_warmup)


def episode_config(config: TrainConfig, iteration: int | None = None) -> EpisodeConfig:
    """Episode settings of training; `iteration` sets the ramped hidden cost weight (None: full)."""
    return EpisodeConfig(max_turns=config.max_turns, call_timeout_s=1800, compact_prompt=True,
                         reward=RewardConfig(cost_lambda=hidden_cost_lambda_at(config, iteration),
                                             cost_scale=config.cost_scale,
                                             cost_on_success=config.cost_on_success))


def update(model, tokenizer, trajectories: Sequence[Trajectory], config: TrainConfig, out_dir: Path, *,
           images: Mapping[str, Sequence[str]] | None = None):
    """One GRPO step; a vision-language learner passes its processor as `tokenizer` and the
    episodes' item images as `images` ({item_id: paths})."""
    model.train()
    return grpo_update(model, tokenizer, list(trajectories), config.grpo, str(out_dir / "trainer"), images=images)


def validate(registry: Registry, model, tokenizer, items: Sequence[Item], config: TrainConfig, experts, cache, *,
             policy=None) -> dict:
    """Greedy policy on `items`: accuracy, calls and cost per task. `policy`: the greedy policy
    to use instead of the in-process model (a served policy at temperature 0)."""
    from maestro_core.lm_policy import LMPolicy

    greedy = policy
    if greedy is None:
        model.eval()
        greedy = LMPolicy(model, tokenizer, registry, temperature=0.0, checkpoint_id="validation",
                          **policy_kwargs(config, registry))
    runner = EpisodeRunner(registry, experts, greedy, cache=cache, config=episode_config(config))
    # trained with a cost weight in every prompt: validate with the grid's smallest weight shown
    lam = default_cost_lambda(asdict(config))

    async def go():
        try:
            return await runner.run(list(items), run_id="validation", cost_lambda=lam)
        finally:
            close = getattr(greedy, "aclose", None)  # a served policy's HTTP client
            if close is not None:
                await close()
    trajs = asyncio.run(go())
    n = max(1, len(trajs))
    return {"val_accuracy": sum(t.outcome for t in trajs) / n, "val_calls_per_task": sum(t.n_calls for t in trajs) / n,
            "val_cost_per_task": sum(t.total_cost for t in trajs) / n}


def write_curve(curve: Sequence[dict], out_dir: Path, run_id: str) -> None:
    """curve.json and curve.png (training curves) in the run folder."""
    from maestro_core.plots import training_curve_plot

    (out_dir / "curve.json").write_text(json.dumps(list(curve), indent=2))
    training_curve_plot(curve, out_dir / "curve.png", title=f"training run {run_id}")


def _row_text(row: dict) -> str:
    return " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())


class TrainingRun:
    """One training run between iterations: the learner (model, tokenizer, optimizer state) in
    this process, the run folder, its checkpoints and curve.

        run = TrainingRun(registry, train, val, store=store, experts=experts, config=cfg, out_dir=d, run_id="r1")
        for it in range(run.start, cfg.iterations):
            for spec in run.chunk_specs(it):          # each chunk: a task (any process) -> a shard
                run_chunk(spec, skip_existing=True)
            run.ingest(it)                            # the one writer: shards -> DuckDB
            run.update(it)                            # GRPO step -> ckpt-(it+1), validation, curve
        result = run.finish()

    Iteration `it` is collected by the policy of checkpoint `ckpt-it` (a folder, also in the
    object store), so collection can run anywhere and a crashed run resumes from its latest
    checkpoint: chunks whose shard exists are not collected again, the update is redone, and
    nothing is stored twice. Items and cost weights of an iteration are functions of (seed,
    iteration). The optimizer's moments restart at a resume. Checkpoints kept: ckpt-0 (the
    untrained policy), every validated one, and the latest.

    With a served policy (`policy` backend 'openai', maestro_core.policy_config) the learner is
    loaded from `policy.checkpoint`, rollouts are sampled by the server (spec kind "served"),
    and the server is synced (`OpenAIPolicy.sync_weights`) to ckpt-start when the run opens
    and to ckpt-(it+1) after each update, before validation and the next collection. With
    backend 'transformers' and a `policy.checkpoint`, that pretrained model (a VLM with its
    processor under `policy.vision`) is the learner and samples in process, as the CPU policy does.
    """

    def __init__(self, registry: Registry, train_items: Sequence[Item], val_items: Sequence[Item], *, store,
                 experts, config: TrainConfig, out_dir: Path, run_id: str | None = None,
                 data_version: str | None = None, registry_path: str | None = None, resume: bool = True,
                 log: Callable[[str], None] = print, policy=None):
        from maestro_core.checkpoints import load_checkpoint_policy, local_copy, run_checkpoints, save_checkpoint
        from maestro_core.policy_config import PolicyConfig, load_learner

        if not train_items:
            raise ConfigError("no train items.", fix="build the suite (maestro build-dataset) or pass a train split.")
        check_batch_weights(config.batch_weights, train_items)
        self.registry, self.train_items, self.store, self.experts = registry, list(train_items), store, experts
        self.config, self.out_dir, self.log = config, Path(out_dir), log
        self.policy: PolicyConfig = policy if policy is not None else PolicyConfig()
        self.policy.check_train(config)
        self.run_id = run_id or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
        self.registry_path = registry_path
        self.objects = store.objects
        self.meta_base = {"run_id": self.run_id, "registry_version": registry.version, "data_version": data_version,
                          "config": asdict(config),
                          **({"policy": asdict(self.policy)} if self.policy.pretrained else {})}
        self.val = spread(val_items, config.val_items, seed=config.seed)
        self.cache = ExpertCache(store)
        self.curve: list[dict] = []
        self.timing: dict[int, dict] = {}
        done = run_checkpoints(self.out_dir, self.run_id, self.objects) if resume else []
        if done:
            last = done[-1]
            path = local_copy(last, self.out_dir / last.name, self.objects)
            if self.policy.pretrained:
                self.model, self.tokenizer = load_learner(path, vision=self.policy.vision)
            else:
                lm = load_checkpoint_policy(path, registry, temperature=config.temperature, device="cpu")
                self.model, self.tokenizer = lm.model, lm.tokenizer  # as at a fresh start: TRL places the learner
            self.curve = list(last.meta.get("curve", []))[:last.iteration]
            self.start = last.iteration
            self.checkpoints = [str(c.path or c.name) for c in done if c.iteration > 0 and c.val_accuracy is not None]
            scored = [c for c in done if c.val_accuracy is not None]
            best = max(scored, key=lambda c: (c.val_accuracy, c.iteration)) if scored else None
            self.best = (best.val_accuracy, str(best.path or best.name)) if best else None
            log(f"resuming run {self.run_id} from {last.name} (iteration {self.start} of {config.iterations})")
            changed = config_changes(last.meta.get("config", {}), asdict(config))
            if changed:
                log(f"resuming with a changed config (the new values apply from iteration {self.start}): "
                    + "; ".join(changed))
        else:
            if self.policy.pretrained:  # the initial weights (a server starts on them too)
                self.model, self.tokenizer = load_learner(self.policy.checkpoint, vision=self.policy.vision)
            else:
                self.model, self.tokenizer, _ = build_policy(registry, [it.question for it in train_items], config,
                                                             messages=warmup_messages(registry, train_items, config))
            self.start, self.checkpoints, self.best = 0, [], None
            save_checkpoint(self.model, self.tokenizer, self.out_dir / "ckpt-0",
                            {**self.meta_base, "iteration": 0, "metrics": {}, "curve": []}, objects=self.objects)
        if config.grpo.beta > 0 and config.grpo.lora_r is None and not self.policy.served:
            # TRL loads the KL reference from the config's model id: here ckpt-0, the policy before RL
            first = done[0] if done and done[0].iteration == 0 else None
            ref = local_copy(first, self.out_dir / "ckpt-0", self.objects) if first else self.out_dir / "ckpt-0"
            self.model.config._name_or_path = str(ref)
        self.contrast = None
        if config.rl_contrast_lr > 0:
            if self.policy.served or self.policy.vision:
                raise ConfigError("rl_contrast_lr needs a text policy trained in this process.", field="rl_contrast_lr",
                                  fix="set rl_contrast_lr: 0 for a served or vision-language policy.")
            examples = warmup_examples(self.tokenizer, warmup_messages(registry, train_items, config))
            self.contrast = ContrastRegulariser(self.model, self.tokenizer, examples, lr=config.rl_contrast_lr,
                                                steps=config.rl_contrast_steps, views=config.pretrain_views,
                                                seed=config.seed)
        # the server samples iteration `start` with ckpt-start (also a first check of its sync endpoints)
        self.served = self.policy.build(registry, config, tokenizer=self.tokenizer) if self.policy.served else None
        self.sync_served(self.start)
        store.record_run(self.run_id, "train", {"config": asdict(config), "policy": served_section(self.policy),
                                                "n_train": len(train_items), "out_dir": str(self.out_dir)},
                         registry.version, status="running")

    # -- what an iteration collects --------------------------------------------------------------
    def items_for(self, it: int) -> list[Item]:
        n = min(self.config.prompts_per_iteration, len(self.train_items))
        if self.config.balanced_batches:
            return spread(self.train_items, n, seed=f"{self.config.seed}-items-{it}",
                          weights=self.config.batch_weights)
        rng = random.Random(f"{self.config.seed}-items-{it}")
        return rng.sample(self.train_items, n)

    def lambdas_for(self, it: int, n_items: int) -> list[float] | None:
        """One cost weight per episode, constant within each item's group of G (seeded by iteration)."""
        if not trained_with_cost(asdict(self.config)):
            return None
        rng = random.Random(f"{self.config.seed}-lambda-{it}")
        g = self.config.grpo.num_generations
        return [lam for _ in range(n_items) for lam in [rng.choice(self.config.cost_lambdas)] * g]

    def budgets_for(self, it: int, n_items: int) -> list[float | None] | None:
        """One cost budget per episode (None: no budget), constant within each item's group."""
        cfg = self.config
        if not cfg.cost_budgets or not cfg.budget_share:
            return None
        rng = random.Random(f"{cfg.seed}-budget-{it}")
        g = cfg.grpo.num_generations
        return [b for _ in range(n_items)
                for b in [rng.choice(cfg.cost_budgets) if rng.random() < cfg.budget_share else None] * g]

    def question_views_for(self, it: int, items: Sequence[Item]) -> list[str | None] | None:
        """The question each episode's prompt shows: for a share of the groups one noisy version
        of the item's question (the same for the whole group), else None (the item's own)."""
        cfg = self.config
        noise = QuestionNoise(cfg.question_drop, cfg.question_replace)
        if not cfg.question_noise_share or not noise.active:
            return None
        rng = random.Random(f"{cfg.seed}-question-{it}")
        g = cfg.grpo.num_generations
        return [v for item in items
                for v in [noise(item.question, rng) if rng.random() < cfg.question_noise_share else None] * g]

    def checkpoint_path(self, it: int) -> Path:
        return self.out_dir / f"ckpt-{it}"

    def chunk_specs(self, it: int) -> list:
        from maestro_core.rollouts import chunk_specs

        items = self.items_for(it)
        g = self.config.grpo.num_generations
        ep = episode_config(self.config, it)
        episode = {"max_turns": ep.max_turns, "call_timeout_s": ep.call_timeout_s, "compact_prompt": True,
                   "reward": {"cost_lambda": ep.reward.cost_lambda, "cost_scale": ep.reward.cost_scale,
                              "cost_on_success": ep.reward.cost_on_success}}
        spec = {"kind": "learned", "checkpoint": str(self.checkpoint_path(it)), "run_id": self.run_id,
                "temperature": self.config.temperature, "seed": self.config.seed * 100_003 + it * 1009}
        if self.config.explore:
            spec["explore"] = self.config.explore
            if self.config.explore_within is not None:
                spec["explore_within"] = self.config.explore_within
        if self.served is not None:  # no API key in it: OpenAIPolicy reads the environment
            kw = self.policy.openai_kwargs(self.config, self.registry)
            spec = {"kind": "served", "base_url": self.served.base_url, "model": self.served.model, **kw,
                    "checkpoint_id": f"{self.run_id}/ckpt-{it}", "seed": kw["seed"] * 100_003 + it * 1009}
        return chunk_specs(items, run_id=self.run_id, iteration=it, chunk_size=self.config.chunk_size or len(items),
                           policy_spec=spec, object_store=self.objects.uri(), registry_path=self.registry_path,
                           group_size=g, episode=episode, cost_lambdas=self.lambdas_for(it, len(items)),
                           cost_budgets=self.budgets_for(it, len(items)),
                           question_views=self.question_views_for(it, items))

    def collect_chunk(self, spec) -> dict:
        """One chunk in this process, with the run's experts and persistent expert cache; skipped
        when its shard exists. Its time adds to the iteration's collect_s."""
        from maestro_core.rollouts import run_chunk

        t0 = time.perf_counter()
        with torch_threads(collect_threads(self.config)):
            out = run_chunk(spec, cache=self.cache, registry=self.registry, experts=self.experts, skip_existing=True)
        self.cache.flush()
        t = self.timing.setdefault(spec.iteration, {})
        t["collect_s"] = t.get("collect_s", 0.0) + time.perf_counter() - t0
        return out

    def collect(self, it: int) -> list[dict]:
        """Every chunk of the iteration in this process."""
        return [self.collect_chunk(spec) for spec in self.chunk_specs(it)]

    def ingest(self, it: int) -> int:
        """Load the iteration's shards into DuckDB (the one writer); returns its episode count."""
        self.store.load_shards(self.run_id, it)
        return self.store.count_episodes(self.run_id, it)

    # -- the update ----------------------------------------------------------------------------
    def update(self, it: int, *, validate_now: bool | None = None) -> dict:
        """GRPO step from the iteration's stored episodes -> ckpt-(it+1) (validated every
        `eval_every` iterations and at the end); returns the iteration's curve row."""
        from maestro_core.checkpoints import save_checkpoint, save_weights

        cfg = self.config
        trajs = self.store.trajectories(self.run_id, it)
        want = min(cfg.prompts_per_iteration, len(self.train_items)) * cfg.grpo.num_generations
        if len(trajs) != want:
            raise ConfigError(f"iteration {it} of run {self.run_id} has {len(trajs)} stored episodes, expected {want}.",
                              source="training", fix="collect the missing chunks (rerun the iteration), then update.")
        t1 = time.perf_counter()
        images = None
        if self.policy.vision:  # the update's forward sees each episode's images
            by_id = {it.id: it.images for it in self.train_items}
            images = {t.item_id: by_id[t.item_id] for t in trajs if t.item_id in by_id}
        res = update(self.model, self.tokenizer, trajs, cfg, self.out_dir, images=images)
        contrast_loss = self.contrast.step(it) if self.contrast is not None else None
        n = len(trajs)
        row = {"iteration": it, "mean_reward": sum(t.reward for t in trajs) / n,
               "accuracy": sum(t.outcome for t in trajs) / n, "calls_per_task": sum(t.n_calls for t in trajs) / n,
               "cost_per_task": sum(t.total_cost for t in trajs) / n, "loss": res.loss,
               "collect_s": self.timing.get(it, {}).get("collect_s"), "update_s": time.perf_counter() - t1}
        if contrast_loss is not None:
            row["contrast_loss"] = contrast_loss
        if validate_now is None:
            validate_now = (it + 1) % cfg.eval_every == 0 or it == cfg.iterations - 1
        if self.served is not None:  # the server loads the new weights before validation and the next collection
            save_weights(self.model, self.tokenizer, self.checkpoint_path(it + 1))
            row["sync_s"] = self.sync_served(it + 1)
        if validate_now:
            greedy = self.served_policy(temperature=0.0, checkpoint_id="validation") if self.served else None
            if greedy is None and self.policy.vision:  # in process: the VLM with its processor sees the images
                from maestro_core.multimodal import VLMPolicy
                self.model.eval()
                greedy = VLMPolicy(self.model, self.tokenizer, self.registry, temperature=0.0,
                                   checkpoint_id="validation", **policy_kwargs(cfg, self.registry))
            row.update(validate(self.registry, self.model, self.tokenizer, self.val, cfg, self.experts, self.cache,
                                policy=greedy))
        self.curve = [r for r in self.curve if r["iteration"] < it] + [row]
        ck = save_checkpoint(self.model, self.tokenizer, self.checkpoint_path(it + 1), {
            **self.meta_base, "iteration": it + 1, "metrics": row if validate_now else {}, "curve": self.curve},
            objects=self.objects, weights=self.served is None)
        self._prune(keep=it + 1)
        if validate_now:
            self.checkpoints.append(ck)
            if self.best is None or row["val_accuracy"] >= self.best[0]:  # ties: the later one, as `best` resolves
                self.best = (row["val_accuracy"], ck)
            write_curve(self.curve, self.out_dir, self.run_id)
        self.log(_row_text(row))
        return row

    def sync_served(self, k: int) -> float | None:
        """Make the policy server serve ckpt-k (its folder, as an absolute path the server must be
        able to read); returns the seconds it took, None without a served policy."""
        if self.served is None:
            return None
        t0 = time.perf_counter()
        self.served.sync_weights(self.checkpoint_path(k).resolve(), checkpoint_id=f"{self.run_id}/ckpt-{k}")
        return time.perf_counter() - t0

    def served_policy(self, **overrides):
        """An OpenAIPolicy on the server as it is now (the current model name: a new LoRA adapter
        name after each sync), with the learner's tokenizer."""
        return self.policy.build(self.registry, self.config, model=self.served.model, tokenizer=self.tokenizer,
                                 **overrides)

    def _prune(self, keep: int) -> None:
        """Drop unvalidated checkpoints other than ckpt-0 and the latest (local and object store)."""
        import shutil

        from maestro_core.checkpoints import PREFIX, run_checkpoints

        for c in run_checkpoints(self.out_dir, self.run_id, self.objects):
            if c.iteration in (0, keep) or c.val_accuracy is not None:
                continue
            if c.path is not None:
                shutil.rmtree(c.path, ignore_errors=True)
            for key in self.objects.list(f"{PREFIX}/{self.run_id}/{c.name}/"):
                self.objects.delete(key)

    def finish(self) -> TrainResult:
        self.cache.flush()
        write_curve(self.curve, self.out_dir, self.run_id)
        self.store.set_run_status(self.run_id, "completed")
        return TrainResult(self.run_id, self.curve, self.checkpoints, self.best[1] if self.best else None,
                           self.best[0] if self.best else None)


def served_section(policy) -> dict | None:
    """The `policy:` section a run records (JSON-plain) when it trains a served policy; None
    for the in-process policy."""
    if policy is None or not getattr(policy, "served", False):
        return None
    return json.loads(json.dumps(asdict(policy), default=str))


def choose_run(store, config: TrainConfig, run_id: str | None = None, *, fresh: bool = False,
               out_dir: Path | None = None, registry_version: str | None = None, policy=None,
               log: Callable[[str], None] | None = None) -> tuple[str, Path]:
    """The run to train and its folder. Resume by default: without `run_id`, the newest
    unfinished training run with the same train config and `policy:` section (and registry
    version, when given) goes on. When none matches but an unfinished run exists, `log` says
    which it is, why it was not resumed, and how to resume it. `fresh`: a new run, or
    `run_id`'s folder, stored checkpoints, rollout shards and episodes deleted first."""
    import shutil

    from maestro_core.checkpoints import PREFIX
    from maestro_core.shards import list_shards

    if run_id is None and not fresh:
        same = json.loads(json.dumps(asdict(config), default=str))
        same_policy = served_section(policy)
        unfinished = [r for r in store.runs("train") if r["status"] != "completed"]
        why = [resume_mismatch(r, same, same_policy, registry_version) for r in unfinished]
        open_runs = [r for r, w in zip(unfinished, why) if not w]
        run_id = open_runs[-1]["run_id"] if open_runs else None
        if run_id is None and unfinished and log:
            last = unfinished[-1]["run_id"]
            log(f"unfinished run {last} is not resumed: this run's settings differ from it ("
                + "; ".join(why[-1]) + f"). Starting a new run; to go on with {last} instead, pass --run-id "
                f"{last} (the new values apply from its next iteration).")
    run_id = run_id or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out_dir) if out_dir else store.home / "runs" / run_id
    if fresh:  # checkpoints, rollout shards and stored episodes: a rerun must not reuse another model's rollouts
        shutil.rmtree(out, ignore_errors=True)
        for key in [*store.objects.list(f"{PREFIX}/{run_id}/"), *list_shards(store.objects, run_id)]:
            store.objects.delete(key)
        store.delete_episodes(run_id)
    return run_id, out


def resume_mismatch(run: Mapping[str, Any], config: Mapping[str, Any], policy_section: Any,
                    registry_version: str | None) -> list[str]:
    """Why the unfinished training run `run` (a store.runs row) does not resume under `config`
    (a stored train config), `policy_section` and `registry_version` (None: any); empty when it does."""
    stored = run.get("config") or {}
    why = []
    if stored.get("config") != config:
        why = config_changes(stored.get("config") or {}, config) or ["its stored config"]
    if stored.get("policy") != policy_section:
        why.append("the policy: section")
    if registry_version is not None and run.get("registry_version") != registry_version:
        why.append(f"registry version {run.get('registry_version')} -> {registry_version}")
    return why


def data_version(items: Sequence[Item]) -> str:
    """A content id of the items a run trains and validates on (their ids)."""
    import hashlib
    return hashlib.sha256("\n".join(sorted(it.id for it in items)).encode()).hexdigest()[:16]


def train_policy(registry: Registry, train_items: Sequence[Item], val_items: Sequence[Item], *, store, experts,
                 config: TrainConfig, out_dir: Path, run_id: str | None = None, data_version: str | None = None,
                 resume: bool = True, log: Callable[[str], None] = print, policy=None) -> TrainResult:
    """The loop without an orchestrator: collect (in this process), ingest, update, per
    iteration. The Prefect flow `train_orchestrator` runs the same TrainingRun steps as tasks.
    `policy`: the `policy:` section (a PolicyConfig; None: the transformers backend)."""
    run = TrainingRun(registry, train_items, val_items, store=store, experts=experts, config=config,
                      out_dir=out_dir, run_id=run_id, data_version=data_version, resume=resume, log=log,
                      policy=policy)
    for it in range(run.start, config.iterations):
        run.collect(it)
        run.ingest(it)
        run.update(it)
    return run.finish()
