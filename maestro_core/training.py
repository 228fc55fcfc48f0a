"""The training loop: collect episodes with checkpoint k, store them, GRPO update to k+1.

    result = train_policy(registry, train_items, val_items, store=store, experts=experts,
                          config=TrainConfig(iterations=40), out_dir=home / "runs" / run_id)

Each iteration samples `prompts_per_iteration` train items, runs `num_generations` episodes
per item with the current weights (the LM policy, grammar-constrained, the compact prompt),
writes them as a shard and into DuckDB, then makes one GRPO optimizer step from exactly
those episodes (on-policy: collect once per step). Every `eval_every` iterations the greedy
policy is scored on validation items and a checkpoint is saved; a curve row is kept per
iteration. Collection and update are separate functions (`collect`, `update`) so the
pipeline can run them as separate retryable tasks.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from maestro_core.cache import ExpertCache
from maestro_core.dataset import Item
from maestro_core.episode import EpisodeConfig, EpisodeRunner
from maestro_core.errors import ConfigError
from maestro_core.grpo import GRPOSettings, grpo_update
from maestro_core.registry import Registry
from maestro_core.rewards import RewardConfig
from maestro_core.trajectory import Trajectory


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = field(default=40, metadata={"help": "GRPO iterations (one collect + one update each)."})
    prompts_per_iteration: int = field(default=16, metadata={"help": "Train items per iteration."})
    max_turns: int = field(default=3, metadata={"help": "Policy turns per episode."})
    max_turn_tokens: int = field(default=12, metadata={"help": "Tokens per policy turn (constrained decoding)."})
    hidden: int = field(default=256, metadata={"help": "Policy model width (a Llama built from a config)."})
    layers: int = field(default=4, metadata={"help": "Policy model layers."})
    heads: int = field(default=4, metadata={"help": "Attention heads."})
    vocab_size: int = field(default=2048, metadata={"help": "Policy tokenizer size (trained on the suite)."})
    call_input: str = field(default="question", metadata={
        "help": "'question': a call forwards the task's question (the policy routes; the CPU default, whose "
                "~5M-parameter policy cannot write useful inputs); 'free': it may also write the input."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of rollouts."})
    eval_every: int = field(default=10, metadata={"help": "Validate and checkpoint every N iterations."})
    val_items: int = field(default=50, metadata={"help": "Validation items scored at each evaluation."})
    cost_lambda_max: float = field(default=0.0, metadata={
        "help": "Cost weight sampled uniformly in [0, max] per episode and shown in the prompt (0: off)."})
    cost_scale: float = field(default=0.05, metadata={"help": "Cost (USD) that counts as 1.0 in the cost term."})
    seed: int = field(default=0, metadata={"help": "Seed of item sampling, model init and sampling."})
    grpo: GRPOSettings = field(default_factory=GRPOSettings.cpu_profile, metadata={"help": "GRPO settings."})

    def __post_init__(self):
        for name in ("iterations", "prompts_per_iteration", "max_turns", "eval_every", "val_items"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1.", field=name, fix=f"set {name} to a positive integer.")
        if self.call_input not in ("question", "free"):
            raise ConfigError(f"call_input '{self.call_input}' is unknown.", field="call_input",
                              fix="use 'question' or 'free'.")
        if self.cost_lambda_max < 0:
            raise ConfigError("cost_lambda_max must be >= 0.", field="cost_lambda_max", fix="use 0 to switch it off.")


@dataclass
class TrainResult:
    run_id: str
    curve: list[dict]
    checkpoints: list[str]
    best_checkpoint: str | None
    best_val_accuracy: float | None


def spread(items: Sequence[Item], n: int, *, seed: int = 0) -> list[Item]:
    """Up to `n` items taken in turn from each benchmark (shuffled within each, seeded): the
    suite is stored benchmark by benchmark, so its first n items would cover one or two."""
    rng = random.Random(seed)
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(it.benchmark, []).append(it)
    for g in groups.values():
        rng.shuffle(g)
    out: list[Item] = []
    while len(out) < n and any(groups.values()):
        for b in sorted(groups):
            if groups[b] and len(out) < n:
                out.append(groups[b].pop())
    return out


def policy_kwargs(config: TrainConfig | dict) -> dict:
    """LMPolicy decoding settings of a training config (a TrainConfig or its stored dict)."""
    cfg = asdict(config) if isinstance(config, TrainConfig) else dict(config)
    return dict(max_turn_tokens=int(cfg.get("max_turn_tokens", 24)), constrained=True, forward_question=True,
                free_input=cfg.get("call_input", "free") == "free", answer_candidates=True, answer_on_last_turn=True)


def build_policy(registry: Registry, texts: Sequence[str], config: TrainConfig, *, temperature: float | None = None):
    """A fresh tokenizer (trained on `texts`) and a random-init policy model from a config."""
    from maestro_core.lm_policy import LMPolicy
    from maestro_core.policy_model import build_tiny_model
    from maestro_core.tokenizer import policy_corpus, policy_extra_tokens, train_policy_tokenizer

    tok = train_policy_tokenizer(policy_corpus(registry, texts), vocab_size=config.vocab_size,
                                 extra_tokens=policy_extra_tokens(registry))
    model = build_tiny_model(tok, hidden=config.hidden, layers=config.layers, heads=config.heads, seed=config.seed)
    policy = LMPolicy(model, tok, registry, temperature=config.temperature if temperature is None else temperature,
                      seed=config.seed, checkpoint_id="init", **policy_kwargs(config))
    return model, tok, policy


def episode_config(config: TrainConfig) -> EpisodeConfig:
    return EpisodeConfig(max_turns=config.max_turns, call_timeout_s=1800, compact_prompt=True,
                         reward=RewardConfig(cost_scale=config.cost_scale))


def collect(runner: EpisodeRunner, items: Sequence[Item], config: TrainConfig, *, run_id: str, iteration: int,
            rng: random.Random) -> list[Trajectory]:
    """One iteration's episodes: `num_generations` per item, cost weight sampled per episode."""
    lams = [rng.uniform(0.0, config.cost_lambda_max) if config.cost_lambda_max else None
            for _ in range(len(items) * config.grpo.num_generations)]
    return asyncio.run(runner.run(items, group_size=config.grpo.num_generations, run_id=run_id, iteration=iteration,
                                  cost_lambda=(lambda k: lams[k]) if config.cost_lambda_max else None))


def update(model, tokenizer, trajectories: Sequence[Trajectory], config: TrainConfig, out_dir: Path):
    model.train()
    return grpo_update(model, tokenizer, list(trajectories), config.grpo, str(out_dir / "trainer"))


def validate(registry: Registry, model, tokenizer, items: Sequence[Item], config: TrainConfig, experts, cache) -> dict:
    """Greedy policy on `items`: accuracy, calls and cost per task."""
    from maestro_core.lm_policy import LMPolicy

    model.eval()
    greedy = LMPolicy(model, tokenizer, registry, temperature=0.0, checkpoint_id="validation",
                      **policy_kwargs(config))
    runner = EpisodeRunner(registry, experts, greedy, cache=cache, config=episode_config(config))
    trajs = asyncio.run(runner.run(list(items), run_id="validation"))
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


def train_policy(registry: Registry, train_items: Sequence[Item], val_items: Sequence[Item], *, store, experts,
                 config: TrainConfig, out_dir: Path, run_id: str | None = None, data_version: str | None = None,
                 resume: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Train from scratch, or resume the run from its latest checkpoint (local folder or object
    store) when `resume` and one exists: the weights, tokenizer and curve come back, and the
    iterations after it are collected again (each chunk replaces its earlier copy, so nothing
    is stored twice). The optimizer's moments restart at a resume."""
    from maestro_core.checkpoints import load_checkpoint_policy, local_copy, run_checkpoints, save_checkpoint

    if not train_items:
        raise ConfigError("no train items.", fix="build the suite (maestro build-dataset) or pass a train split.")
    run_id = run_id or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(out_dir)
    objects = getattr(store, "objects", None)
    meta_base = {"run_id": run_id, "registry_version": registry.version, "data_version": data_version,
                 "config": asdict(config)}
    done = run_checkpoints(out_dir, run_id, objects) if resume else []
    curve: list[dict] = []
    checkpoints: list[str] = []
    if done:
        last = done[-1]
        path = local_copy(last, out_dir / last.name, objects)
        policy = load_checkpoint_policy(path, registry, temperature=config.temperature,
                                        checkpoint_id=f"{run_id}/{last.name}")
        model, tok = policy.model, policy.tokenizer
        policy.generator.manual_seed(config.seed + last.iteration)
        curve = list(last.meta.get("curve", []))[:last.iteration]
        checkpoints = [str(c.path or c.name) for c in sorted(done, key=lambda c: c.iteration) if c.iteration > 0]
        start = last.iteration
        log(f"resuming run {run_id} from {last.name} (iteration {start} of {config.iterations})")
    else:
        model, tok, policy = build_policy(registry, [it.question for it in train_items], config)
        start = 0
        store.record_run(run_id, "train", {"config": asdict(config), "n_train": len(train_items)}, registry.version)
        save_checkpoint(model, tok, out_dir / "ckpt-0", {**meta_base, "iteration": 0, "metrics": {}, "curve": []},
                        objects=objects)
    cache = ExpertCache(store)
    runner = EpisodeRunner(registry, experts, policy, cache=cache, config=episode_config(config))
    val = spread(val_items, config.val_items, seed=config.seed)
    best: tuple[float, str] | None = None
    for c in done:
        if c.val_accuracy is not None and c.iteration <= start and (best is None or c.val_accuracy > best[0]):
            best = (c.val_accuracy, str(c.path or c.name))
    for it in range(start, config.iterations):
        t0 = time.perf_counter()
        policy.checkpoint_id = f"{run_id}/ckpt-{it}"
        rng = random.Random(f"{config.seed}-{it}")  # per iteration: a resumed run samples the same items
        batch = rng.sample(list(train_items), min(config.prompts_per_iteration, len(train_items)))
        trajs = collect(runner, batch, config, run_id=run_id, iteration=it, rng=rng)
        store.write_and_ingest(trajs, run_id, it, 0)
        t1 = time.perf_counter()
        res = update(model, tok, trajs, config, out_dir)
        n = len(trajs)
        row = {"iteration": it, "mean_reward": sum(t.reward for t in trajs) / n,
               "accuracy": sum(t.outcome for t in trajs) / n, "calls_per_task": sum(t.n_calls for t in trajs) / n,
               "cost_per_task": sum(t.total_cost for t in trajs) / n, "loss": res.loss,
               "collect_s": t1 - t0, "update_s": time.perf_counter() - t1}
        if (it + 1) % config.eval_every == 0 or it == config.iterations - 1:
            row.update(validate(registry, model, tok, val, config, experts, cache))
        curve.append(row)
        if "val_accuracy" in row:
            ck = save_checkpoint(model, tok, out_dir / f"ckpt-{it + 1}", {
                **meta_base, "iteration": it + 1, "metrics": row, "curve": curve}, objects=objects)
            checkpoints.append(ck)
            if best is None or row["val_accuracy"] > best[0]:
                best = (row["val_accuracy"], ck)
            write_curve(curve, out_dir, run_id)
        log(_row_text(row))
    cache.flush()
    write_curve(curve, out_dir, run_id)
    store.set_run_status(run_id, "completed")
    return TrainResult(run_id, curve, checkpoints, best[1] if best else None, best[0] if best else None)
