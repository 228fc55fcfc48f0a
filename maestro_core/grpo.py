"""GRPO updates of the orchestrator policy from stored multi-turn episodes, through TRL.

Collect and update are separate steps:

    trajs = run_episodes(policy_at_checkpoint_k, items, G)        # collect (anywhere, any process)
    store.write_and_ingest(trajs, run_id, iteration=k, chunk=0)   # store
    res = grpo_update(model_k, tok, store.trajectories(run_id, k), settings, out_dir)   # k -> k+1

`grpo_update` feeds the stored episodes to `trl.GRPOTrainer` through a `rollout_func`: the
trainer's dataset is one prompt per episode group, the prompt being the group key
`maestro-group:<iteration>:<item_id>` (`group_key`), and the rollout_func maps the i-th repeat
of a key to the group's i-th stored sample (`RolloutBank`). Policy tokens have env_mask 1,
observation tokens 0, so the loss mask (completion mask x env_mask) trains only what the policy
wrote. One call = one optimizer step over all the episodes given (gradient accumulation over
micro-batches), so the update is exact on-policy GRPO when the episodes were sampled by the
current weights. Without vLLM TRL does NOT use the stored sampling logprobs: the "old" logprobs
are the current model's (ratio 1 at the start of the step).

`make_rollout_func(collect)` gives the other mode: a long-lived trainer whose rollout_func calls
`collect(group_keys) -> list[Trajectory]` (sampling with the trainer's current weights) each
generation batch.

Cost: on the toy test (hidden 64, 2 layers, 32 episodes of ~20 tokens, 2 CPU cores) one
grpo_update is ~0.25 s, of which the optimizer step is ~0.03 s and ~0.2 s is the gc.collect()
that accelerate's free_memory() runs at the start of every Trainer.train() (it grows with the
process's Python heap). The trainer and its AdamW state are reused between calls.

Facts about TRL 1.16 relied on here (checked in trl/trainer/grpo_trainer.py):
- rollout_func(prompts, trainer) gets the prompts already repeated num_generations times, each
  group contiguous, and must return one completion per prompt, in order; keys other than
  prompt_ids/completion_ids/logprobs are forwarded to reward functions (env_mask is popped and
  becomes the tool mask).
- an env_mask row shorter than its completion is padded with 1 (trained): lengths are
  validated here.
- with mask_truncated_completions=True a completion whose last token is not EOS/pad gets zero
  loss: every episode must end with the policy's EOS (validated here).

Vision-language policies (maestro_core.multimodal.VLMPolicy): pass the processor as `tokenizer`
and `images={item_id: item.images}`. How images reach TRL 1.16's loss with a rollout_func:
- TRL takes images only from the dataset rows ("images" column) and only with conversational
  prompts (a string prompt with images is refused). So with `images`, each group's row is
  `{"prompt": [{"role": "user", "content": <group key>}], "images": [PIL images]}`; TRL turns the
  prompt into multimodal parts (prepare_multimodal_messages) before the rollout_func sees it, and
  `prompt_group_key` reads the key back from the text part.
- TRL computes the forward's image inputs by running the processor over the dataset prompt (the
  group key) with the row's images, not over the rollout's prompt_ids. Pixel values and image
  grids depend only on the images, so they are the ones the policy sampled with (the same
  processor, the same RGB images: multimodal.load_image). Per-token fields do not:
  `mm_token_type_ids` (Qwen-VL's multimodal RoPE) and `token_type_ids` (Gemma-3-style) come out
  aligned with the group key's tokens, not with prompt_ids + completion_ids (with Qwen2-VL the
  forward fails: "The shape of the mask [204] ... does not match ... [63]"). The trainer
  subclass used for processors (`_vlm_trainer_class`) rebuilds them from the ids actually
  scored (`processor.create_mm_token_type_ids`) in `_get_per_token_logps_and_entropies`, which
  every TRL forward (old, reference and loss logprobs) goes through.
- The rollout's prompt_ids must hold exactly one run of placeholder tokens per image, as the
  processor expands them (VLMPolicy records them so); TRL does not check it (the model's
  forward raises on a count mismatch).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from maestro_core.errors import ConfigError
from maestro_core.trajectory import Trajectory

GROUP_KEY_PREFIX = "maestro-group"

# ---------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------


def _f(default: Any, help: str, trl: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "trl": trl})


@dataclass(frozen=True)
class GRPOSettings:
    """GRPO hyper-parameters. Defaults follow the Maestro paper; names follow trl.GRPOConfig
    where TRL has the setting (metadata 'trl' True), so `to_grpo_config` passes them through."""

    num_generations: int = _f(8, "Episodes per item (GRPO group size G).")
    learning_rate: float = _f(1e-6, "AdamW learning rate.")
    epsilon: float = _f(0.2, "PPO-style clip range of the importance ratio (lower side; upper too unless epsilon_high).")
    epsilon_high: float | None = _f(None, "Upper clip range; None = epsilon.")
    beta: float = _f(0.0, "KL coefficient against the reference policy (0: no reference model is kept). With "
                          "beta > 0 TRL loads the reference from model.config._name_or_path (full fine-tuning: "
                          "must be a saved checkpoint; `maestro train` points it at the run's ckpt-0, the policy "
                          "before RL) or disables the adapter (LoRA).")
    temperature: float = _f(1.0, "Sampling temperature; TRL divides logits by it when computing logprobs, so the "
                                 "episode sampler must use the same value.")
    max_turns: int = _f(4, "Policy turns per episode (read by the episode runner, not by TRL).", trl=False)
    per_device_train_batch_size: int = _f(8, "Episodes per micro-batch (forward/backward). One update accumulates "
                                             "all micro-batches of the collected episodes into ONE optimizer step.")
    max_completion_length: int = _f(4096, "Longest episode completion (policy + observation tokens) accepted.")
    loss_type: str = _f("dapo", "TRL loss aggregation ('dapo' = TRL default: token-level mean over the batch).")
    scale_rewards: str = _f("group", "Advantage scaling: 'group' (std of the group), 'batch' or 'none'.")
    mask_truncated_completions: bool = _f(True, "Zero loss for completions not ending in EOS (never happens "
                                                "here: episodes are validated to end with EOS).")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(0, "Linear warm-up (optimizer steps).")
    lr_scheduler_type: str = _f("constant", "LR schedule. 'constant': each grpo_update call is one train() of one "
                                            "step, so a decaying schedule would restart or hit 0.")
    num_iterations: int = _f(1, "Passes over each collected batch (mu). 1 = exact on-policy GRPO.")
    bf16: bool = _f(False, "bfloat16 mixed precision (GPU).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (saves memory, costs time).")
    seed: int = _f(0, "Trainer seed (group shuffling, dropout).")
    mask_forced_tokens: bool = _f(True, "Leave out of the loss the policy tokens the grammar forced (sampled with "
                                        "probability 1, recorded logprob 0: tags, the close of a call, a sole answer "
                                        "candidate, EOS). Their gradient under the constrained distribution is 0, "
                                        "but TRL scores the unconstrained log-probability, so without this they "
                                        "add advantage-weighted noise that outweighs the one routing token.",
                                  trl=False)
    negative_advantage_scale: float = _f(1.0, "Multiplies every negative advantage before the loss (1 = GRPO as "
                                              "is; 0 = learn from the better-than-average episodes only). A "
                                              "negative episode pushes its action down and so every other action "
                                              "up in proportion to its probability, i.e. mostly the incumbent; "
                                              "with exploration, whose draws are mostly poor, that push keeps a "
                                              "saturated route in place on every prompt that shares its features.",
                                         trl=False)
    score_policy_tokens_only: bool = _f(False, "In the loss pass, compute the output layer over the vocabulary only "
                                               "at the tokens the loss reads (completion_mask x tool_mask: the "
                                               "policy's own, unforced tokens), not at every completion token: the "
                                               "observations are most of each completion, and without Triton (CPU) "
                                               "TRL's fused head scores every position, so the update's cost grows "
                                               "with the vocabulary (train.vocab_from). The log-probs where the loss "
                                               "reads them are the same; elsewhere they are 0.",
                                         trl=False)
    share_prompt_prefix: bool = _f(True, "Score each micro-batch with the prompt prefix all its episodes share "
                                         "(the system prompt: 90 of ~140 tokens per episode on Maestro-Mini) run "
                                         "once and its keys and values reused by every row "
                                         "(shared_prefix_token_logps), instead of once per episode; the same "
                                         "log-probs and gradients up to float rounding. Text-only learners "
                                         "without LoRA; others, and batches that share under 16 tokens, are "
                                         "scored by TRL as before.", trl=False)
    propensity_cap: float | None = _f(None, "Weights each episode's advantage by 1 / its sampling probability (the "
                                           "product of the recorded probabilities of its unforced policy tokens: "
                                           "the routing choice), capped here, taken against the weighted group "
                                           "mean and renormalised per group. In expectation each route's logit "
                                           "then moves by its value minus the mean over routes, whatever its "
                                           "current probability (plain GRPO moves it by probability x (value - "
                                           "mean), so a route that wins while rarely sampled never catches up with "
                                           "a tied incumbent). None = plain GRPO; pair it with train.explore so "
                                           "the probabilities stay bounded.", trl=False)
    train_only_head: bool = _f(False, "Train only the output layer (the model's output embeddings) in RL; the "
                                      "body keeps the features it had before RL (e.g. after the label-free "
                                      "warm-up), so routing is a linear policy on them. False = every weight.",
                               trl=False)
    lora_r: int | None = _f(None, "LoRA rank via PEFT; None = full fine-tuning.", trl=False)
    lora_alpha: int = _f(16, "LoRA alpha.", trl=False)
    lora_dropout: float = _f(0.0, "LoRA dropout.", trl=False)
    lora_target_modules: tuple[str, ...] | str = _f("all-linear", "LoRA target modules.", trl=False)

    def __post_init__(self) -> None:
        def bad(name: str, msg: str, fix: str) -> ConfigError:
            return ConfigError(msg, source="GRPOSettings", field=name, fix=fix)

        if self.num_generations < 2:
            raise bad("num_generations", f"is {self.num_generations}; GRPO needs >= 2 samples per group.",
                      "set num_generations >= 2 (paper: 8).")
        if self.per_device_train_batch_size < 1:
            raise bad("per_device_train_batch_size", "must be >= 1.", "set it to a positive int.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise bad("learning_rate", f"is {self.learning_rate}.", "use a positive finite value (paper: 1e-6).")
        if not 0 < self.epsilon < 1:
            raise bad("epsilon", f"is {self.epsilon}.", "use a clip range in (0, 1) (paper: 0.2).")
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            raise bad("epsilon_high", f"is {self.epsilon_high}.", "use a positive value or None.")
        if self.beta < 0:
            raise bad("beta", f"is {self.beta}.", "use beta >= 0 (paper: 0).")
        if self.temperature <= 0:
            raise bad("temperature", f"is {self.temperature}.", "use a positive temperature (paper: 1.0).")
        if self.max_turns < 1:
            raise bad("max_turns", f"is {self.max_turns}.", "use max_turns >= 1 (paper: 4).")
        if self.num_iterations < 1:
            raise bad("num_iterations", f"is {self.num_iterations}.", "use num_iterations >= 1.")
        if self.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"):
            raise bad("loss_type", f"'{self.loss_type}' is not a TRL loss type.", "use 'dapo' or 'grpo'.")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise bad("scale_rewards", f"'{self.scale_rewards}' is unknown.", "use 'group', 'batch' or 'none'.")
        if not 0.0 <= self.negative_advantage_scale <= 1.0:
            raise bad("negative_advantage_scale", f"is {self.negative_advantage_scale}.",
                      "use a value in [0, 1] (1 = plain GRPO).")
        if self.propensity_cap is not None and not self.propensity_cap >= 1.0:
            raise bad("propensity_cap", f"is {self.propensity_cap}.", "use a cap >= 1 (e.g. 20) or None (off).")
        if self.train_only_head and self.lora_r is not None:
            raise bad("train_only_head", "and lora_r are both set.", "use one of them.")
        if self.lora_r is not None and self.lora_r < 1:
            raise bad("lora_r", f"is {self.lora_r}.", "use a positive rank or None for full fine-tuning.")

    @classmethod
    def paper(cls) -> "GRPOSettings":
        """The Maestro paper's settings (the defaults)."""
        return cls()

    @classmethod
    def cpu_profile(cls, **overrides: Any) -> "GRPOSettings":
        """For the embedded default (a ~1M-parameter Llama from a config) on 2 CPU cores: a large
        LR (the paper's 1e-6 would not move a random-init model in a CPU budget), two passes over
        each collected batch (mu = 2, clipped), micro-batches of 32 episodes, sampling at temperature
        1.5 (exploration), advantages not divided by the group's std (with a cost term in the
        reward, a group where every sample failed has a tiny std and the division turned cost
        differences between wrong answers into full-size advantages)."""
        base = dict(num_generations=8, learning_rate=2e-3, per_device_train_batch_size=32, num_iterations=2,
                    max_turns=2, temperature=1.5, scale_rewards="none", max_completion_length=512, bf16=False,
                    gradient_checkpointing=False)
        base.update(overrides)
        return cls(**base)

    def trl_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("trl")}

    def to_grpo_config(self, output_dir: str, **extra: Any) -> Any:
        """A `trl.GRPOConfig` with these settings, no vLLM, no checkpoints, no reporting, logging
        every step. `extra` overrides/adds GRPOConfig fields (grpo_update sets the batch layout)."""
        from trl import GRPOConfig

        kw = self.trl_kwargs()
        kw.update(output_dir=str(output_dir), use_vllm=False, report_to="none", save_strategy="no",
                  logging_steps=1, disable_tqdm=True, remove_unused_columns=False, use_cpu=_no_gpu(),
                  shuffle_dataset=True)
        kw.update(extra)
        try:
            return GRPOConfig(**kw)
        except ValueError as e:
            raise ConfigError(str(e), source="GRPOSettings.to_grpo_config",
                              fix="make per_device_train_batch_size x steps_per_generation divisible by "
                                  "num_generations (whole groups per generation batch).") from e

    def lora_config(self) -> Any | None:
        if self.lora_r is None:
            return None
        from peft import LoraConfig

        targets = self.lora_target_modules
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets if isinstance(targets, str) else list(targets),
                          task_type="CAUSAL_LM")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


@contextlib.contextmanager
def older_objects_frozen(enabled: bool = True):
    """Inside, the cycle collector skips every object that existed at entry (`gc.freeze`);
    they rejoin it at exit (`gc.unfreeze`), so older garbage is collected afterwards as usual.

    Each `Trainer.train()` starts with accelerate's `free_memory()`, a full `gc.collect()` meant
    to release accelerator memory between trainings. On CPU it frees nothing, yet it scanned
    every object of the libraries, models and store at every update. Does nothing when disabled.

    At exit every frozen object rejoins the collector, also any frozen before entry: `gc` has no
    partial unfreeze, and a freeze only tells the collector what to skip, so no result changes.
    (A guard on an earlier freeze would turn this off on Python 3.12, which reports a few hundred
    objects of its own frozen at start and again after every collection: 375 in 3.12.1 and 3.12.3.)"""
    if not enabled:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ---------------------------------------------------------------------------------------
# group keys, rollout conversion, the bank
# ---------------------------------------------------------------------------------------


def group_key(iteration: int, item_id: str) -> str:
    """The prompt string that stands for one episode group in the trainer's dataset."""
    return f"{GROUP_KEY_PREFIX}:{int(iteration)}:{item_id}"


def parse_group_key(key: str) -> tuple[int, str]:
    parts = key.split(":", 2) if isinstance(key, str) else []
    if len(parts) != 3 or parts[0] != GROUP_KEY_PREFIX or not parts[1].lstrip("-").isdigit():
        raise ConfigError(f"prompt {key!r} is not a Maestro group key.", source="grpo",
                          fix="build the trainer dataset with grpo.group_dataset / group_key(iteration, item_id).")
    return int(parts[1]), parts[2]


def prompt_group_key(prompt: Any) -> str:
    """The group key a trainer prompt stands for: the prompt itself (text-only rows), or the text
    of the last user message of a conversational prompt (rows with images, which TRL hands to the
    rollout_func as multimodal messages)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        users = [m for m in prompt if m.get("role") == "user"] or prompt
        content = users[-1].get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return content if isinstance(content, str) else str(content)
    return prompt if isinstance(prompt, str) else str(prompt)


def trajectory_group_key(t: Trajectory) -> str:
    return group_key(t.iteration, t.item_id)


def _episode_rows(t: Trajectory, eos_ids: set[int] | None) -> tuple[list[int], list[int], list[float]]:
    """completion_ids, env_mask, logprobs of one episode, validated; trailing observation tokens
    (after the policy's last turn: masked and followed by nothing) are dropped so the
    completion ends with the policy's EOS."""
    name = f"episode {t.episode_id} (item {t.item_id!r}, sample {t.sample_index})"
    for s in t.steps:
        if len(s.logprobs) != len(s.completion_ids):
            raise ConfigError(f"{name} turn {s.turn}: {len(s.logprobs)} logprobs for {len(s.completion_ids)} "
                              "completion tokens.", source="grpo", fix="record one sampling logprob per sampled token.")
    ids, mask, lps = t.completion_ids(), t.env_mask(), t.completion_logprobs()
    return _validate_row(name, list(t.prompt_ids), ids, mask, lps, eos_ids)


def _validate_row(name: str, prompt_ids: list[int], ids: list[int], mask: list[int], lps: list[float],
                  eos_ids: set[int] | None) -> tuple[list[int], list[int], list[float]]:
    if not prompt_ids:
        raise ConfigError(f"{name} has no prompt tokens.", source="grpo",
                          fix="collect episodes with a token policy (the scripted policy records no tokens).")
    if len(mask) != len(ids) or len(lps) != len(ids):
        raise ConfigError(f"{name}: env_mask has {len(mask)} entries and logprobs {len(lps)} for {len(ids)} "
                          "completion tokens.", source="grpo",
                          fix="give exactly one env_mask entry (1 policy, 0 environment) per completion token; "
                              "TRL would silently train unmasked padding.")
    if any(m not in (0, 1) for m in mask):
        raise ConfigError(f"{name}: env_mask must hold only 0 and 1.", source="grpo", fix="use 1 policy / 0 env.")
    end = len(mask)
    while end and mask[end - 1] == 0:
        end -= 1
    ids, mask, lps = ids[:end], mask[:end], lps[:end]
    if not ids:
        raise ConfigError(f"{name} has no policy tokens.", source="grpo",
                          fix="collect episodes with a token policy (the scripted policy records no tokens).")
    if eos_ids is not None and ids[-1] not in eos_ids:
        raise ConfigError(f"{name}: the policy's last token {ids[-1]} is not EOS {sorted(eos_ids)}; TRL would treat "
                          "it as truncated (zero gradient) or learn from a cut-off episode.", source="grpo",
                          fix="the policy must emit EOS at the end of its final turn (stop sampling on EOS and "
                              "keep it in completion_ids); drop or re-collect cut-off episodes.")
    return ids, mask, lps


def trajectories_to_rollout(trajs: Sequence[Trajectory], *, eos_token_ids: Sequence[int] | None = None,
                            num_generations: int | None = None, mask_forced: bool = False) -> dict[str, list]:
    """What a TRL rollout_func returns for these episodes, in order: prompt_ids, completion_ids,
    logprobs, env_mask, plus reward components and ids as extra keys (forwarded to reward
    functions). Validates lengths, the final EOS and that each group is contiguous (and of size
    num_generations when given). `mask_forced`: the mask handed to TRL (its loss mask) is also 0
    on policy tokens sampled with probability 1 (recorded logprob 0: the grammar left one
    choice), see GRPOSettings.mask_forced_tokens; the trajectories' own env_mask is unchanged."""
    if not trajs:
        raise ConfigError("no trajectories.", source="grpo", fix="collect at least one group of episodes.")
    eos = set(eos_token_ids) if eos_token_ids is not None else None
    out: dict[str, list] = defaultdict(list)
    seen: set[str] = set()
    runs: list[list[str]] = []
    prev = None
    for t in trajs:
        key = trajectory_group_key(t)
        if key != prev:
            if key in seen:
                raise ConfigError(f"group {key!r} is not contiguous (episode {t.episode_id} comes after another "
                                  "group).", source="grpo", fix="order episodes by (iteration, item_id, sample_index) "
                                                                "(see order_groups).")
            seen.add(key)
            runs.append([])
            prev = key
        runs[-1].append(t.episode_id)
        ids, mask, lps = _episode_rows(t, eos)
        if mask_forced:
            mask = [m if lp < 0.0 else 0 for m, lp in zip(mask, lps)]
        out["prompt_ids"].append(list(t.prompt_ids))
        out["completion_ids"].append(ids)
        out["env_mask"].append(mask)
        out["logprobs"].append(lps)
        out["reward"].append(float(t.reward))
        out["outcome"].append(float(t.outcome))
        out["format_score"].append(float(t.format_score))
        out["cost_term"].append(float(t.cost_term))
        out["episode_id"].append(t.episode_id)
        out["group_key"].append(key)
    if num_generations is not None:
        for r, key in zip(runs, seen_order(trajs)):
            if len(r) != num_generations:
                raise ConfigError(f"group {key!r} has {len(r)} episodes, expected num_generations={num_generations}.",
                                  source="grpo", fix="collect exactly num_generations samples per item, or drop "
                                                     "incomplete groups (complete_groups).")
    return dict(out)


def seen_order(trajs: Sequence[Trajectory]) -> list[str]:
    keys: list[str] = []
    for t in trajs:
        k = trajectory_group_key(t)
        if not keys or keys[-1] != k:
            keys.append(k)
    return keys


def order_groups(trajs: Sequence[Trajectory]) -> list[Trajectory]:
    """Episodes sorted so each group is contiguous and ordered by sample_index."""
    return sorted(trajs, key=lambda t: (t.iteration, t.item_id, t.sample_index))


def complete_groups(trajs: Sequence[Trajectory], num_generations: int) -> list[Trajectory]:
    """Only the groups with exactly num_generations episodes (ordered)."""
    by: dict[str, list[Trajectory]] = defaultdict(list)
    for t in order_groups(trajs):
        by[trajectory_group_key(t)].append(t)
    return [t for g in by.values() if len(g) == num_generations for t in g]


def reward_from_trajectory(completions: list, reward: list[float] | None = None, **kw: Any) -> list[float]:
    """TRL reward function: the stored episode reward (forwarded by the rollout_func)."""
    if reward is None:
        raise ConfigError("no 'reward' column reached the reward function.", source="grpo",
                          fix="use make_rollout_func, whose output carries the stored rewards.")
    if len(reward) != len(completions):
        raise ConfigError(f"{len(reward)} rewards for {len(completions)} completions.", source="grpo",
                          fix="return one stored reward per completion from the rollout_func.")
    return [float(r) for r in reward]


class RolloutBank:
    """Stored episodes by group key; `take(prompts)` maps the i-th occurrence of a key in the
    prompt list to that group's i-th sample (by sample_index)."""

    def __init__(self, trajs: Sequence[Trajectory] = ()):
        self.groups: dict[str, list[Trajectory]] = {}
        self.put(trajs)

    def put(self, trajs: Sequence[Trajectory]) -> None:
        by: dict[str, list[Trajectory]] = defaultdict(list)
        for t in trajs:
            by[trajectory_group_key(t)].append(t)
        for k, g in by.items():
            g.sort(key=lambda t: t.sample_index)
            idx = [t.sample_index for t in g]
            if len(set(idx)) != len(idx):
                raise ConfigError(f"group {k!r} has duplicate sample_index values {idx}.", source="grpo",
                                  fix="give each episode of a group a distinct sample_index 0..G-1.")
            self.groups[k] = g

    def clear(self) -> None:
        self.groups.clear()

    def keys(self) -> list[str]:
        return list(self.groups)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def take(self, prompts: Sequence[Any]) -> list[Trajectory]:
        count: dict[str, int] = defaultdict(int)
        out = []
        for p in prompts:
            key = prompt_group_key(p)
            parse_group_key(key)
            if key not in self.groups:
                raise ConfigError(f"no stored episodes for group {key!r}.", source="grpo",
                                  fix="the trainer dataset must list only groups that were collected.")
            g, i = self.groups[key], count[key]
            if i >= len(g):
                raise ConfigError(f"group {key!r} was asked for sample {i} but has {len(g)} episodes.", source="grpo",
                                  fix="collect num_generations episodes per group.")
            out.append(g[i])
            count[key] += 1
        return out


def _trainer_eos(trainer: Any) -> list[int] | None:
    ids = getattr(trainer, "eos_token_ids", None)
    if ids is None:
        return None
    return [int(i) for i in ids if i is not None]


def make_rollout_func(source: Sequence[Trajectory] | RolloutBank | Callable[[list[str]], Sequence[Trajectory]],
                      *, eos_token_ids: Sequence[int] | None = None,
                      mask_forced: bool = False) -> Callable[[list, Any], dict]:
    """A TRL rollout_func. source: stored episodes (list or RolloutBank: collect -> update
    separated), or `collect(group_keys) -> episodes` called each generation batch with the unique
    group keys in order (long-lived trainer: collect with the trainer's current weights).
    EOS ids default to the trainer's eos_token_ids."""
    if callable(source) and not isinstance(source, RolloutBank):
        collect = source
        bank = None
    else:
        collect = None
        bank = source if isinstance(source, RolloutBank) else RolloutBank(list(source))

    def rollout_func(prompts: list, trainer: Any) -> dict:
        eos = eos_token_ids if eos_token_ids is not None else _trainer_eos(trainer)
        b = bank
        if collect is not None:
            keys = []
            for p in map(prompt_group_key, prompts):
                if not keys or keys[-1] != p:
                    keys.append(p)
            model = getattr(trainer, "model", None)
            was_training = getattr(model, "training", None)
            try:
                b = RolloutBank(list(collect(list(dict.fromkeys(keys)))))
            finally:
                # a sampler that calls model.eval() would otherwise make TRL score this batch and
                # compute its loss in "eval" mode (no gradient-accumulation scaling, eval_ metrics)
                if was_training is not None and model.training != was_training:
                    model.train(was_training)
        trajs = b.take(prompts)
        out = trajectories_to_rollout(trajs, eos_token_ids=eos, mask_forced=mask_forced)
        if len(out["completion_ids"]) != len(prompts):  # pragma: no cover - take() guarantees it
            raise ConfigError("rollout count mismatch.", source="grpo")
        return out

    rollout_func.bank = bank  # type: ignore[attr-defined]
    return rollout_func


def group_dataset(keys: Sequence[str], images: Mapping[str, Sequence[str]] | None = None) -> Any:
    """The trainer's dataset: one row per group, the prompt being the group key. With `images`
    (item_id -> image paths, () for a text-only item; every group's item must be listed) the rows
    are conversational and carry the item's images, which is how TRL passes images to the loss
    (see the module docstring)."""
    from datasets import Dataset

    if images is None:
        return Dataset.from_dict({"prompt": list(keys)})
    from maestro_core.multimodal import load_image

    rows: dict[str, list] = {"prompt": [], "images": []}
    for key in keys:
        item_id = parse_group_key(key)[1]
        if item_id not in images:
            raise ConfigError(f"no images given for item {item_id!r} (group {key!r}).", source="grpo", field="images",
                              fix="pass images={item.id: item.images for item in items} covering every item "
                                  "trained on (an empty tuple for a text-only item).")
        rows["prompt"].append([{"role": "user", "content": key}])
        rows["images"].append([load_image(p, index=k) for k, p in enumerate(images[item_id], 1)])
    return Dataset.from_dict(rows)


# ---------------------------------------------------------------------------------------
# the update
# ---------------------------------------------------------------------------------------


@dataclass
class UpdateResult:
    loss: float | None
    """The logged training loss of the step (TRL's; may be ~0 at ratio 1 with 'dapo')."""
    mean_reward: float
    params_changed: bool
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    """TRL's logged metrics for the step (reward, reward_std, kl, entropy, clip ratios, ...)."""
    reused_trainer: bool = False


def _fingerprint(model: Any) -> list[tuple[float, float]]:
    import torch

    with torch.no_grad():
        return [(float(p.double().sum()), float(p.double().pow(2).sum()))
                for p in model.parameters() if p.requires_grad]


def _batch_layout(n: int, settings: GRPOSettings) -> tuple[int, int]:
    """(per_device_train_batch_size, steps_per_generation) so that one generation batch holds all
    n episodes and is one optimizer step."""
    b = min(settings.per_device_train_batch_size, n)
    while n % b:
        b -= 1
    return b, n // b


class GRPOUpdater:
    """One trl.GRPOTrainer reused across updates of the same model (optimizer state kept). Each
    `update(trajs)` is one train() call of one optimizer step over all the episodes given."""

    def __init__(self, model: Any, tokenizer: Any, settings: GRPOSettings, output_dir: str, n_episodes: int):
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        self.settings, self.output_dir, self.n_episodes = settings, str(output_dir), n_episodes
        b, spg = _batch_layout(n_episodes, settings)
        config = settings.to_grpo_config(output_dir, per_device_train_batch_size=b, steps_per_generation=spg,
                                         gradient_accumulation_steps=spg, max_steps=1)
        self.bank = RolloutBank()
        if getattr(getattr(tokenizer, "tokenizer", tokenizer), "pad_token_id", None) is None:
            raise ConfigError("the tokenizer has no pad token.", source="grpo",
                              fix="set tokenizer.pad_token (e.g. to the EOS token) before training.")
        rollout = make_rollout_func(self.bank, mask_forced=settings.mask_forced_tokens)
        self.trainer = _make_trainer(settings, tokenizer, model=model, args=config, rollout_func=rollout,
                                     train_dataset=group_dataset(["maestro-group:0:placeholder"]))
        self.model = self.trainer.model
        self.calls = 0

    def update(self, trajectories: Sequence[Trajectory],
               images: Mapping[str, Sequence[str]] | None = None) -> UpdateResult:
        """One optimizer step; `images` (item_id -> image paths) for a vision-language policy."""
        t0 = time.perf_counter()
        trajs = order_groups(trajectories)
        G = self.settings.num_generations
        if len(trajs) != self.n_episodes:
            raise ConfigError(f"{len(trajs)} episodes for an updater built for {self.n_episodes}.", source="grpo",
                              fix="create a GRPOUpdater per batch size (grpo_update does).")
        # validate everything up front (clear errors before TRL runs)
        trajectories_to_rollout(trajs, eos_token_ids=_trainer_eos(self.trainer), num_generations=G)
        self.bank.clear()
        self.bank.put(trajs)
        keys = seen_order(trajs)
        tr = self.trainer
        tr.train_dataset = group_dataset(keys, images)
        before = _fingerprint(tr.model)
        old_state = tr.state
        n_logs = len(old_state.log_history)
        with older_objects_frozen(enabled=tr.args.device.type == "cpu"):
            out = tr.train()
        if tr.state is not old_state:  # train() starts a fresh TrainerState
            n_logs = 0
        after = _fingerprint(tr.model)
        logs = [h for h in tr.state.log_history[n_logs:] if "reward" in h or "loss" in h]
        metrics: dict[str, float] = {}
        for h in logs:
            metrics.update({k: float(v) for k, v in h.items() if isinstance(v, (int, float))})
        loss = metrics.get("loss", getattr(out, "training_loss", None))
        self.calls += 1
        return UpdateResult(loss=None if loss is None else float(loss),
                            mean_reward=sum(t.reward for t in trajs) / len(trajs),
                            params_changed=before != after, seconds=time.perf_counter() - t0,
                            metrics=metrics, reused_trainer=self.calls > 1)


def _trainer_class(processing_class: Any) -> type:
    """The GRPOTrainer subclass for a tokenizer; for a processor, the one that also realigns
    per-token modality ids (see the module docstring)."""
    from transformers import ProcessorMixin

    return _vlm_trainer_class() if isinstance(processing_class, ProcessorMixin) else _base_trainer_class()


def _make_trainer(settings: GRPOSettings, tokenizer: Any, **kw: Any) -> Any:
    if settings.train_only_head:
        model = kw["model"]
        head = model.get_output_embeddings()
        if head is None:
            raise ConfigError(f"{type(model).__name__} has no output embeddings to train alone.", source="grpo",
                              field="train_only_head", fix="set train_only_head: false.")
        for p in model.parameters():
            p.requires_grad_(False)
        head.weight.requires_grad_(True)
    trainer = _trainer_class(tokenizer)(processing_class=tokenizer, reward_funcs=[reward_from_trajectory],
                                        peft_config=settings.lora_config(), **kw)
    trainer.negative_advantage_scale = settings.negative_advantage_scale
    trainer.propensity_cap = settings.propensity_cap
    trainer.score_policy_tokens_only = settings.score_policy_tokens_only and settings.lora_config() is None
    # a text-only learner: a vision-language one's forward takes the pixels with the whole row
    trainer.share_prompt_prefix = (settings.share_prompt_prefix and settings.lora_config() is None
                                   and not isinstance(trainer, _vlm_trainer_class()))
    _quiet(trainer)
    return trainer


def propensity_weighted(advantages: Any, sampling_logps: Any, tool_mask: Any, group_size: int, cap: float) -> Any:
    """GRPOSettings.propensity_cap: advantages (one per episode, groups of `group_size` in a row)
    re-weighted by w = min(1 / sampling probability, cap), the probability being exp of the
    episode's summed sampling logprobs on policy tokens (tool_mask 1; forced tokens and padding
    hold 0), against the w-weighted group mean, times w / the group's mean w."""
    import torch

    lp = sampling_logps if tool_mask is None else sampling_logps * tool_mask
    lp = torch.nan_to_num(lp, nan=0.0).sum(-1)
    w = torch.exp(-lp).clamp(max=cap).view(-1, group_size)
    a = advantages.view(-1, group_size)
    base = (w * a).sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
    return ((a - base) * w / w.mean(-1, keepdim=True)).view(-1).to(advantages.dtype)


def policy_token_logps(model: Any, input_ids: Any, attention_mask: Any, mask: Any, temperature: float,
                       compute_entropy: bool = False) -> tuple[Any, Any]:
    """Log-probs (and entropies) of the last `mask.size(1)` tokens of `input_ids` under `model`
    at `temperature`, with the output layer applied only where `mask` is True (0 elsewhere):
    the backbone runs on the whole sequence, the vocabulary projection on the masked positions."""
    n = mask.size(1)
    states = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).last_hidden_state[:, -n - 1:-1]  # position t predicts t + 1
    return _scored(model, states[mask], input_ids[:, -n:], mask, temperature, compute_entropy)


def _scored(model: Any, states: Any, targets: Any, mask: Any, temperature: float,
            compute_entropy: bool) -> tuple[Any, Any]:
    """Log-probs (and entropies) of `targets` where `mask` is True, from `states` (one row per
    True position, in order) through the output layer at `temperature`; 0 elsewhere."""
    logp = (model.get_output_embeddings()(states).float() / temperature).log_softmax(-1)
    picked = logp.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    logps = picked.new_zeros(mask.shape).masked_scatter(mask, picked)
    entropies = None
    if compute_entropy:
        ent = -(logp.exp() * logp).sum(-1)
        entropies = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
    return logps, entropies


SHARED_PREFIX_MIN = 16
"""Fewer shared prompt tokens than this: shared_prefix_token_logps declines (nothing to save)."""


def shared_prefix_token_logps(model: Any, input_ids: Any, attention_mask: Any, n: int, temperature: float,
                              mask: Any = None, compute_entropy: bool = False) -> tuple[Any, Any] | None:
    """TRL's scoring of the last `n` tokens of `input_ids` (left-padded prompts, then right-
    padded completions; log-probs at `temperature`, 0 where `attention_mask` is 0), with the
    prompt prefix every row shares run once: its keys and values are repeated for each row,
    and only the rest of each row runs through the model, right-padded, at the positions it has
    in the unpadded sequence (so the same log-probs, and gradients, up to float rounding). The
    output layer applies only where `mask` is True, when one is given (policy_token_logps).
    None when the rows share fewer than SHARED_PREFIX_MIN prompt tokens or a row's tokens are
    not contiguous (the caller then scores the usual way)."""
    import torch

    B, T = input_ids.shape
    am = attention_mask.bool()
    lead = (~am).int().cumprod(1).sum(1)  # each row's left padding
    length = am.sum(1)
    pos = torch.arange(T, device=input_ids.device)
    if not bool((am == ((pos >= lead[:, None]) & (pos < (lead + length)[:, None]))).all()):
        return None
    prompt_len = (T - n) - lead  # each row's prompt tokens
    P = int(prompt_len.min()) - 1  # at least one prompt token runs per row: its state predicts the first completion token
    first = input_ids[0, lead[0]:lead[0] + P]
    for i in range(1, B):
        diff = (input_ids[i, lead[i]:lead[i] + P] != first[:P]).nonzero()
        if len(diff):
            P = int(diff[0])
    if P < SHARED_PREFIX_MIN:
        return None
    backbone = model.base_model
    cache = backbone(input_ids=first[None, :P], use_cache=True).cache
    cache.batch_repeat_interleave(B)
    L = int((length - P).max())
    rest = input_ids.new_full((B, L), 0)
    rest_mask = attention_mask.new_zeros((B, L))
    for i in range(B):
        k = int(length[i]) - P
        rest[i, :k] = input_ids[i, lead[i] + P:lead[i] + length[i]]
        rest_mask[i, :k] = 1
    states = backbone(input_ids=rest, attention_mask=torch.cat([attention_mask.new_ones((B, P)), rest_mask], 1),
                      cache=cache, use_cache=True).last_hidden_state
    # completion column c of row i is token T - n + c; the state at the token before it predicts it
    cols = torch.arange(n, device=input_ids.device)
    where = (T - n + cols)[None, :] - lead[:, None] - 1 - P
    sel = am[:, -n:] if mask is None else am[:, -n:] & mask.bool()
    picked_states = states[torch.arange(B)[:, None].expand(B, n)[sel], where[sel]]
    return _scored(model, picked_states, input_ids[:, -n:], sel, temperature, compute_entropy)


@functools.cache
def _base_trainer_class() -> type:
    from trl import GRPOTrainer

    class MaestroGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose advantages can be re-weighted by the episodes' sampling
        probabilities (`propensity_cap`) and whose negative advantages can be scaled
        (`negative_advantage_scale`), both from GRPOSettings; at the defaults (None, 1) TRL's
        advantages are left as they are. With `score_policy_tokens_only` the loss pass projects
        onto the vocabulary only the tokens the loss reads (`policy_token_logps`)."""

        negative_advantage_scale: float = 1.0
        propensity_cap: float | None = None
        score_policy_tokens_only: bool = False
        share_prompt_prefix: bool = False
        _score_mask: Any = None

        def _compute_loss(self, model: Any, inputs: dict) -> Any:
            if self.score_policy_tokens_only and inputs.get("tool_mask") is not None:
                self._score_mask = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self._score_mask = None

        def _get_per_token_logps_and_entropies(self, model: Any, input_ids: Any, attention_mask: Any,
                                               logits_to_keep: int, batch_size: int | None = None,
                                               compute_entropy: bool = False, compute_aux_loss: bool = False,
                                               **kwargs: Any):
            import torch

            mask = self._score_mask
            if mask is not None and tuple(mask.shape) != (input_ids.size(0), logits_to_keep):
                mask = None
            plain = compute_aux_loss or any(v is not None for v in kwargs.values())
            if not plain and self.share_prompt_prefix:
                size = batch_size or input_ids.size(0)
                parts = []
                with self.accelerator.autocast():
                    for a in range(0, input_ids.size(0), size):
                        parts.append(shared_prefix_token_logps(
                            model, input_ids[a:a + size], attention_mask[a:a + size], logits_to_keep,
                            self.temperature, None if mask is None else mask[a:a + size], compute_entropy))
                        if parts[-1] is None:
                            break
                if parts and all(p is not None for p in parts):
                    logps = torch.cat([p[0] for p in parts])
                    entropies = torch.cat([p[1] for p in parts]) if compute_entropy else None
                    return logps, entropies, None
            if plain or mask is None:
                return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                  batch_size, compute_entropy, compute_aux_loss,
                                                                  **kwargs)
            with self.accelerator.autocast():
                logps, entropies = policy_token_logps(model, input_ids, attention_mask, mask, self.temperature,
                                                      compute_entropy)
            return logps, entropies, None

        def _generate_and_score_completions(self, *args: Any, **kwargs: Any) -> dict:
            out = super()._generate_and_score_completions(*args, **kwargs)
            if self.propensity_cap is not None:
                if out.get("sampling_per_token_logps") is None:
                    raise ConfigError("propensity_cap needs the episodes' sampling logprobs, and the rollout gave "
                                      "none.", source="grpo", field="propensity_cap",
                                      fix="return `logprobs` from the rollout_func (stored episodes do), or set "
                                          "propensity_cap: null.")
                out["advantages"] = propensity_weighted(out["advantages"], out["sampling_per_token_logps"],
                                                        out.get("tool_mask"), self.num_generations,
                                                        self.propensity_cap)
            s = self.negative_advantage_scale
            if s != 1.0:
                a = out["advantages"]
                out["advantages"] = a.where(a >= 0, a * s)
            return out

    return MaestroGRPOTrainer


@functools.cache
def _vlm_trainer_class() -> type:
    class VLMGRPOTrainer(_base_trainer_class()):
        """GRPOTrainer whose forward rebuilds mm_token_type_ids / token_type_ids from the ids it
        scores (TRL computed them over the dataset prompt, not over the rollout's prompt_ids)."""

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               *args: Any, **kwargs: Any):
            import torch

            keys = [k for k in ("mm_token_type_ids", "token_type_ids") if kwargs.get(k) is not None]
            if keys:
                types = torch.tensor(self.processing_class.create_mm_token_type_ids(input_ids.tolist()),
                                     dtype=kwargs[keys[0]].dtype, device=input_ids.device)
                kwargs.update({k: types for k in keys})
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)

    return VLMGRPOTrainer


def _quiet(trainer: Any) -> None:
    """No per-step log dicts on stdout (disable_tqdm swaps the progress bar for a printer)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def build_trainer(model: Any, tokenizer: Any, settings: GRPOSettings, output_dir: str, *,
                  source: Sequence[Trajectory] | RolloutBank | Callable[[list[str]], Sequence[Trajectory]],
                  group_keys: Sequence[str], groups_per_step: int, max_steps: int,
                  images: Mapping[str, Sequence[str]] | None = None, **config_overrides: Any) -> Any:
    """A long-lived trl.GRPOTrainer over `group_keys` (the dataset) whose rollout_func draws from
    `source` (usually `collect(group_keys) -> episodes`, sampling with the trainer's current
    weights). Each optimizer step takes `groups_per_step` groups (one generation batch, gradient
    accumulation over micro-batches), so every step is on-policy. Call `.train()` on the result.
    `images` (item_id -> image paths) for a vision-language policy (tokenizer = its processor)."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    for k in group_keys:
        parse_group_key(k)
    b, spg = _batch_layout(groups_per_step * settings.num_generations, settings)
    kw = dict(per_device_train_batch_size=b, steps_per_generation=spg, gradient_accumulation_steps=spg,
              max_steps=max_steps)
    kw.update(config_overrides)
    config = settings.to_grpo_config(output_dir, **kw)
    return _make_trainer(settings, tokenizer, model=model, args=config, train_dataset=group_dataset(group_keys, images),
                         rollout_func=make_rollout_func(source, mask_forced=settings.mask_forced_tokens))


_UPDATERS: "weakref.WeakKeyDictionary[Any, GRPOUpdater]" = weakref.WeakKeyDictionary()


def grpo_update(model: Any, tokenizer: Any, trajectories: Sequence[Trajectory], settings: GRPOSettings,
                output_dir: str, images: Mapping[str, Sequence[str]] | None = None) -> UpdateResult:
    """One GRPO optimizer step of `model` (in place) from collected episodes (whole groups of
    settings.num_generations). The trainer is cached per model and reused by later calls with the
    same tokenizer, settings, output_dir and number of episodes (AdamW state kept); otherwise a
    new trainer is built (~0.1-1 s plus a fresh optimizer state). A vision-language policy passes
    its processor as `tokenizer` and `images` = {item_id: image paths} (see the module docstring)."""
    n = len(trajectories)
    if n == 0 or n % settings.num_generations:
        raise ConfigError(f"{n} episodes is not a whole number of groups of {settings.num_generations}.",
                          source="grpo", fix="pass complete groups (see complete_groups).")
    up = _UPDATERS.get(model)
    if up is None or (up.settings, up.output_dir, up.n_episodes) != (settings, str(output_dir), n) \
            or up.trainer.processing_class is not tokenizer:
        up = GRPOUpdater(model, tokenizer, settings, output_dir, n)
        _UPDATERS[model] = up
    return up.update(trajectories, images)


def updater_for(model: Any) -> GRPOUpdater | None:
    """The cached updater of `model` (its `.trainer`, and `.model`: the PeftModel under LoRA,
    for saving or merging the adapter), or None before the first grpo_update."""
    return _UPDATERS.get(model)
