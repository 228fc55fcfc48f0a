"""In-process VLM sampling: VLMPolicy turns per second, batched against one sequence at a time.

    .venv/bin/python benchmarks/vlm_sampling.py [--small] [--out DIR]

Model: a randomly initialised Qwen2-VL built from a config (tests/test_vlm.py's tiny_qwen2_vl,
multimodal RoPE, 14x14 patches merged 2x2), with the processor that needs no torchvision (the
PIL image processor, no video processor) and the local tokenizer trained on the test registry.
Sizes: text hidden 1024 / 8 layers / 8 heads, a 2-block vision tower (--small: 64 / 2 / 2,
1 block). On CUDA when there is one, else the CPU (one thread).

Work: the first turn of E episodes at once (asyncio.gather over VLMPolicy.act), each item one
image of its own size (40 to 320 px a side, so the rows have different image-token counts and
are padded), grammar-constrained and greedy, at most 24 tokens a turn. Two runs of the same
policy settings: max_batch_size 1 (one sequence per forward pass, what VLMPolicy did before
batching) and max_batch_size E. turns/s = E / seconds (best of 3, after one warm-up run);
tokens/s = sampled tokens / seconds. The batched run must give the same tokens as the
one-at-a-time run and logprobs within 2e-3 (reported: same_tokens, max_abs_logprob_diff).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path

import _common

import torch

from maestro_core.dataset import Item
from maestro_core.episode import build_messages
from maestro_core.multimodal import VLMPolicy
from maestro_core.policy import EpisodeView
from tests.conftest import python_only_registry
from tests.test_vlm import tiny_qwen2_vl, write_png


def items(n: int, folder: Path, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        size = (rng.randint(40, 320), rng.randint(40, 320))
        png = write_png(folder / f"i{i}.png", size, (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
        out.append(Item(f"i{i}", "bench", f"What is {rng.randint(2, 99)} plus {rng.randint(2, 99)}?", "0",
                        "numeric", images=(png,)))
    return out


async def first_turns(policy: VLMPolicy, registry, batch: list[Item], tag: str):
    views = [EpisodeView(f"{tag}-{it.id}", 0, 0, images=it.images) for it in batch]
    return await asyncio.gather(*(policy.act(build_messages(registry, it), v) for it, v in zip(batch, views)))


def measure(policy: VLMPolicy, registry, batch: list[Item], repeats: int) -> tuple[float, list]:
    asyncio.run(first_turns(policy, registry, batch, "warm"))
    best, turns = float("inf"), None
    for r in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        turns = asyncio.run(first_turns(policy, registry, batch, f"r{r}"))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, turns


def main() -> None:
    args = _common.parse_args(__doc__)
    started = time.perf_counter()
    registry = python_only_registry()
    size = dict(hidden=64, layers=2, heads=2) if args.small else dict(hidden=1024, layers=8, heads=8,
                                                                      vision_depth=2, vision_dim=256)
    n_episodes, repeats = (8, 1) if args.small else (64, 3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor, _ = tiny_qwen2_vl(registry, image_only=True, **size)
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    rows, outs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        batch = items(n_episodes, Path(tmp))
        for max_batch in (1, n_episodes):
            policy = VLMPolicy(model, processor, registry, temperature=0.0, max_turn_tokens=24,
                               max_batch_size=max_batch, batch_window_s=0.02)
            seconds, turns = measure(policy, registry, batch, repeats)
            outs[max_batch] = turns
            tokens = sum(len(t.token_ids) for t in turns)
            rows.append({"max_batch_size": max_batch, "seconds": round(seconds, 4),
                         "turns_per_s": round(n_episodes / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                         "mean_batch": round(sum(policy.stats.batch_sizes) / max(len(policy.stats.batch_sizes), 1), 2)})
    one, many = outs[1], outs[n_episodes]
    same = all(a.token_ids == b.token_ids for a, b in zip(one, many))
    diff = max((abs(x - y) for a, b in zip(one, many) for x, y in zip(a.logprobs, b.logprobs)), default=0.0)
    speedup = rows[1]["turns_per_s"] / rows[0]["turns_per_s"]
    _common.print_table(["max_batch_size", "seconds", "turns/s", "tokens/s", "mean batch"],
                        [[r["max_batch_size"], r["seconds"], r["turns_per_s"], r["tokens_per_s"], r["mean_batch"]]
                         for r in rows])
    print(f"\ndevice {device} ({torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}), "
          f"{params / 1e6:.1f}M parameters, {n_episodes} first turns; batched/one-at-a-time {speedup:.1f}x; "
          f"same tokens: {same}; max |logprob diff| {diff:.2e}")
    _common.write_result("vlm_sampling", args, {
        "definition": __doc__.split("Work:")[1].strip(), "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "parameters": params,
        "size": size, "episodes": n_episodes, "rows": rows, "speedup": round(speedup, 2), "same_tokens": same,
        "max_abs_logprob_diff": diff}, started)
    if not same or diff > 2e-3:
        raise SystemExit("the batched turns differ from the one-at-a-time turns")


if __name__ == "__main__":
    main()
