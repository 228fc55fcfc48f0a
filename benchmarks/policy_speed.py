"""Policy speed: LMPolicy generation tokens/s, and grpo_update tokens/s against plain PyTorch.

    .venv/bin/python benchmarks/policy_speed.py [--small]

Models: build_tiny_model (random Llama, 4 heads) at hidden 128 / 2 layers and hidden 256 /
4 layers, with the local tokenizer trained on the default registry (Maestro-Mini):
train_policy_tokenizer(policy_corpus(registry), extra_tokens=policy_extra_tokens(registry)).
One thread (OMP_NUM_THREADS=1).

Generation: LMPolicy.generate on B first-turn contexts (the compact prompt of B different
questions, about 100 tokens): one shared-prefix prefill, then one batched decode step per
token. Two decoders: the training one (grammar-constrained, the question-forwarding calls and
answers of training.policy_kwargs, at most 12 tokens) and an unconstrained one (24 tokens,
the grammar's cost left out). tokens/s = sampled tokens / seconds (best of 3).

GRPO update: grpo_update on N = 4 items x G = 8 episodes (cpu_profile settings: micro-batches
of 16, one AdamW step) shaped like the CPU profile's episodes: the prompt, a forwarding call
(4 tokens), an observation (env_mask 0), an answer (5 tokens). tokens = prompt + completion
tokens of all episodes. The baseline is the same model (same initial weights) doing the same
work in plain PyTorch: the same sequences right-padded in the same micro-batches, forward,
per-token log-probs of the policy tokens, loss -(advantage x logp) averaged over policy
tokens, backward, gradient clipping at 1.0, one AdamW step. Steady state: the best of the
calls after the first (best, not median: another job shares the cores; the first grpo_update
also builds the trainer and is reported apart).
overhead ratio = grpo seconds / plain seconds (1.0 = no overhead).
"""

from __future__ import annotations

import copy
import random
import tempfile
import time

import _common

import torch

from maestro_core.dataset import Item
from maestro_core.episode import build_messages
from maestro_core.grpo import GRPOSettings, grpo_update
from maestro_core.lm_policy import LMPolicy
from maestro_core.policy_model import build_tiny_model
from maestro_core.registry import DEFAULT_REGISTRY, load_registry
from maestro_core.tokenizer import policy_corpus, policy_extra_tokens, train_policy_tokenizer
from maestro_core.trajectory import StepRecord, Trajectory, episode_id

SIZES = [(128, 2), (256, 4)]
QUESTIONS = ["What is the value of the largest bar in the chart?", "How many words are in 'the quick brown fox'?",
             "What is 17 times 23?", "Which digit is shown in the image?", "What does the sign say?"]


def contexts(policy: LMPolicy, registry, b: int) -> list[list[int]]:
    out = []
    for i in range(b):
        item = Item(f"q{i}", "bench", f"{QUESTIONS[i % len(QUESTIONS)]} (case {i})", "1", "exact")
        out.append(list(policy.encode_prompt(build_messages(registry, item, compact=True))))
    return out


def generation(model, tok, registry, b: int, constrained: bool) -> dict:
    if constrained:
        kw = dict(max_turn_tokens=12, constrained=True, forward_question=True, free_input=False)
    else:
        kw = dict(max_turn_tokens=24, constrained=False)
    policy = LMPolicy(model, tok, registry, temperature=1.0, seed=0, **kw)
    ctx = contexts(policy, registry, b)
    best, tokens = float("inf"), 0
    for _ in range(3):
        states = [policy.constraint.start() if policy.constraint else None for _ in range(b)]
        before = policy.stats.tokens
        t0 = time.perf_counter()
        policy.generate(ctx, states)
        best = min(best, time.perf_counter() - t0)
        tokens = policy.stats.tokens - before
    return {"batch": b, "decoder": "constrained (training)" if constrained else "unconstrained",
            "tokens": tokens, "seconds": best, "tokens_per_s": tokens / best, "prompt_tokens": len(ctx[0])}


def episodes(tok, registry, n_items: int, g: int) -> list[Trajectory]:
    policy = LMPolicy(build_tiny_model(tok, hidden=64, layers=1), tok, registry, constrained=False)
    ids = tok.convert_tokens_to_ids
    target = registry.grammar().actions[0]
    call = (ids("<call>"), ids(target), ids("</call>"), tok.eos_token_id)
    obs = policy.encode_observation({"role": "user", "content": "<information>42 (confidence 0.90)</information>"})
    rng = random.Random(0)
    out = []
    for i in range(n_items):
        item = Item(f"item-{i}", "bench", f"{QUESTIONS[i % len(QUESTIONS)]} (case {i})", "42", "numeric")
        prompt = policy.encode_prompt(build_messages(registry, item, compact=True))
        for s in range(g):
            answer = (ids("<answer>"), *tok.encode(str(40 + s % 4), add_special_tokens=False), ids("</answer>"),
                      tok.eos_token_id)
            steps = (StepRecord(turn=0, text=f"<call>{target}</call>", action="call", completion_ids=call,
                                logprobs=(-1.0,) * len(call), observation_ids=obs),
                     StepRecord(turn=1, text="<answer>4x</answer>", action="answer", completion_ids=answer,
                                logprobs=(-1.0,) * len(answer)))
            r = float(rng.random() < 0.5)
            out.append(Trajectory(
                episode_id=episode_id("speed", 0, item.id, s), run_id="speed", iteration=0, chunk=0, item_id=item.id,
                benchmark="bench", sample_index=s, registry_version=registry.version, checkpoint_id="init",
                prompt_text="", prompt_ids=tuple(prompt), steps=steps, final_answer="42", finish_reason="answer",
                reward=r, outcome=r, format_score=1.0, cost_term=0.0, cost_lambda=0.0, total_cost=0.0,
                total_latency_s=0.0, spent_s=0.0, n_calls=1, n_cache_hits=0))
    return out


def batch_tensors(trajs: list[Trajectory], pad_id: int):
    """Right-padded prompt+completion ids, attention mask, policy-token mask (for the targets
    at positions 1..T-1) and per-sequence advantages (group-normalised rewards)."""
    seqs, masks = [], []
    for t in trajs:
        comp, env = t.completion_ids(), t.env_mask()
        while env and env[-1] == 0:
            comp, env = comp[:-1], env[:-1]
        seqs.append(list(t.prompt_ids) + comp)
        masks.append([0] * len(t.prompt_ids) + env)
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    pmask = torch.zeros((len(seqs), T), dtype=torch.float32)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        pmask[i, :len(m)] = torch.tensor(m, dtype=torch.float32)
    rewards = torch.tensor([t.reward for t in trajs])
    groups = rewards.view(-1, 8) if len(trajs) % 8 == 0 else rewards.view(1, -1)
    adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
    return ids, attn, pmask[:, 1:], adv, sum(len(s) for s in seqs)


def plain_step(model, opt, ids, attn, pmask, adv, micro: int) -> None:
    model.train()
    n_tokens = pmask.sum()
    for i in range(0, ids.shape[0], micro):
        sl = slice(i, i + micro)
        logits = model(input_ids=ids[sl], attention_mask=attn[sl]).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[sl, 1:, None]).squeeze(-1)
        loss = -(adv[sl, None] * logp * pmask[sl]).sum() / n_tokens
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def update_speed(tok, registry, hidden: int, layers: int, n_items: int, g: int, reps: int) -> dict:
    trajs = episodes(tok, registry, n_items, g)
    settings = GRPOSettings.cpu_profile(num_generations=g)
    model = build_tiny_model(tok, hidden=hidden, layers=layers, seed=0)
    plain = copy.deepcopy(model)
    ids, attn, pmask, adv, tokens = batch_tensors(trajs, tok.pad_token_id)
    micro = min(settings.per_device_train_batch_size, len(trajs))
    opt = torch.optim.AdamW(plain.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    plain_times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        plain_step(plain, opt, ids, attn, pmask, adv, micro)
        plain_times.append(time.perf_counter() - t0)
    grpo_times = []
    with tempfile.TemporaryDirectory() as tmp:
        model.train()
        for _ in range(reps + 1):
            res = grpo_update(model, tok, trajs, settings, tmp)
            assert res.params_changed, "the GRPO step must change the weights"
            grpo_times.append(res.seconds)
    grpo_s, plain_s = min(grpo_times[1:]), min(plain_times[1:])
    return {"hidden": hidden, "layers": layers, "params": sum(p.numel() for p in model.parameters()),
            "episodes": len(trajs), "tokens": tokens, "grpo_first_s": grpo_times[0], "grpo_s": grpo_s,
            "plain_s": plain_s, "grpo_tokens_per_s": tokens / grpo_s, "plain_tokens_per_s": tokens / plain_s,
            "overhead_ratio": grpo_s / plain_s, "extra_s_per_update": grpo_s - plain_s}


def main() -> None:
    args = _common.parse_args(__doc__)
    started = time.perf_counter()
    torch.manual_seed(0)
    registry = load_registry(DEFAULT_REGISTRY)
    tok = train_policy_tokenizer(policy_corpus(registry), extra_tokens=policy_extra_tokens(registry))
    sizes = SIZES[:1] if args.small else SIZES
    batches = [1, 8] if args.small else [1, 64]
    gen, upd = [], []
    for hidden, layers in sizes:
        model = build_tiny_model(tok, hidden=hidden, layers=layers, seed=0)
        for b in batches:
            for constrained in (True, False):
                gen.append({"hidden": hidden, "layers": layers, **generation(model, tok, registry, b, constrained)})
        upd.append(update_speed(tok, registry, hidden, layers, n_items=1 if args.small else 4, g=8,
                                reps=1 if args.small else 4))
    print(f"vocab {len(tok)}, prompt {gen[0]['prompt_tokens']} tokens\n\ngeneration (LMPolicy.generate, best of 3):")
    _common.print_table(["hidden", "layers", "decoder", "batch", "tokens", "seconds", "tokens/s"],
                        [[r["hidden"], r["layers"], r["decoder"], r["batch"], r["tokens"], r["seconds"],
                          r["tokens_per_s"]] for r in gen])
    print("\nGRPO update (grpo_update vs plain PyTorch fwd/bwd + AdamW, same tokens):")
    _common.print_table(["hidden", "layers", "params", "episodes", "tokens", "grpo s", "plain s", "grpo tok/s",
                         "plain tok/s", "grpo/plain", "first grpo s"],
                        [[r["hidden"], r["layers"], r["params"], r["episodes"], r["tokens"], r["grpo_s"], r["plain_s"],
                          r["grpo_tokens_per_s"], r["plain_tokens_per_s"], r["overhead_ratio"], r["grpo_first_s"]]
                         for r in upd])
    _common.write_result("policy_speed", args, {"vocab": len(tok), "generation": gen, "update": upd}, started)


if __name__ == "__main__":
    main()
