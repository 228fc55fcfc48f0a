"""In-process GRPO training of a pretrained-size policy: seconds per iteration, on the GPU when there is one.

    .venv/bin/python benchmarks/pretrained_training.py [--small] [--out DIR]

The path of `policy: {backend: transformers, checkpoint: DIR}` (TrainingRun with a
PolicyConfig.pretrained): each iteration's rollouts are sampled in process by ckpt-k (loaded
where `inference_device()` says: CUDA when there is one), stored, and the GRPO update with TRL
makes ckpt-(k+1), saved to the object store.

Model: a random model from a config with Qwen2.5-0.5B's architecture and shape (Llama class
with q/k/v biases; hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864) and the
local tokenizer's vocabulary (so about 360M parameters, against 494M with Qwen's 152k
vocabulary), saved as the run's initial checkpoint.
--small: hidden 64, 2 layers, 2 heads.

Work: 3 iterations of 16 prompts x G = 8 episodes (arithmetic questions, the in-process
calculator expert, at most 2 turns of 12 tokens, grammar-constrained, temperature 1.0), GRPO
with the paper's settings (lr 1e-6, clip 0.2, beta 0, DAPO loss) in micro-batches of 32, bf16
and gradient checkpointing on a GPU; then greedy validation of 16 items. Reported per
iteration: collect_s (rollouts, including loading ckpt-k), update_s (the GRPO step and the
checkpoint's save), peak GPU memory. The figures are a cold start's: the first iteration
includes the trainer's set-up.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import _common

import torch

from maestro_core.config import build
from maestro_core.dataset import Item
from maestro_core.experts import build_experts
from maestro_core.grpo import GRPOSettings
from maestro_core.policy_config import PolicyConfig
from maestro_core.store import Store
from maestro_core.tokenizer import policy_corpus, policy_extra_tokens, train_policy_tokenizer
from maestro_core.training import TrainConfig, TrainingRun
from tests.conftest import python_only_registry


def qwen2_shaped(tok, small: bool):
    """A Llama with Qwen2's biases on q/k/v (attention_bias) and Qwen2.5-0.5B's shape: the
    architecture Qwen2's is, under the Llama class, which keeps the local tokenizer's class when
    the folder is reloaded (a Qwen2 config.json makes AutoTokenizer pick Qwen2's tokenizer
    class, which adds a token of its own)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=128) if small else
             dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864))
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
                      attention_bias=True, rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def items(n: int, offset: int = 0) -> list[Item]:
    return [Item(id=f"a{i}", benchmark="math", question=f"What is {i + 3} times {2 * i + 1}?",
                 answer=str((i + 3) * (2 * i + 1)), scorer="numeric") for i in range(offset, offset + n)]


def main() -> None:
    args = _common.parse_args(__doc__)
    started = time.perf_counter()
    gpu = torch.cuda.is_available()
    registry = python_only_registry()
    tok = train_policy_tokenizer(policy_corpus(registry), extra_tokens=policy_extra_tokens(registry))
    iterations, prompts = (2, 2) if args.small else (3, 16)
    grpo = dataclasses.replace(GRPOSettings.paper(), num_generations=8, per_device_train_batch_size=32,
                               bf16=gpu, gradient_checkpointing=gpu)
    config = TrainConfig(iterations=iterations, prompts_per_iteration=prompts, max_turns=2, max_turn_tokens=12,
                         eval_every=iterations, val_items=16, temperature=1.0, seed=0, question_noise_share=0.0,
                         budget_share=0.0, grpo=grpo)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init"
        tok.save_pretrained(init)
        model = qwen2_shaped(tok, args.small)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(init)
        del model
        policy = build(PolicyConfig, {"backend": "transformers", "checkpoint": str(init)}, section="policy")
        with Store(Path(tmp) / "home") as store:
            run = TrainingRun(registry, items(64), items(16, offset=64), store=store, experts=build_experts(registry),
                              config=config, out_dir=Path(tmp) / "run", run_id="bench", log=lambda s: None,
                              policy=policy)
            for it in range(iterations):
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                run.collect(it)
                episodes = run.ingest(it)
                t1 = time.perf_counter()
                row = run.update(it)
                t2 = time.perf_counter()
                rows.append({"iteration": it, "episodes": episodes, "collect_s": round(t1 - t0, 2),
                             "update_s": round(t2 - t1, 2), "mean_reward": round(row["mean_reward"], 3),
                             "val_accuracy": row.get("val_accuracy"),
                             "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None})
                print(rows[-1], flush=True)
            learner = str(next(run.model.parameters()).device)
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    _common.print_table(["iteration", "episodes", "collect s", "update s", "mean reward", "peak GPU GB"],
                        [[r["iteration"], r["episodes"], r["collect_s"], r["update_s"], r["mean_reward"],
                          r["peak_gpu_gb"] if gpu else "-"] for r in rows])
    print(f"\n{device}: {params / 1e6:.0f}M parameters; the learner ended on {learner}")
    _common.write_result("pretrained_training", args, {
        "definition": __doc__.split("Work:")[1].strip(), "device": device, "parameters": params,
        "learner_device": learner, "rows": rows}, started)


if __name__ == "__main__":
    main()
