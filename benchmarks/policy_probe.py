"""What the policy reads at its first action, on the suite in a home (diagnostics behind
docs/POLICY.md "why"):

    .venv/bin/python benchmarks/policy_probe.py --home HOME                    # warm-up separation
    .venv/bin/python benchmarks/policy_probe.py --home HOME --checkpoint DIR --cost-lambdas 0 1 2
    .venv/bin/python benchmarks/policy_probe.py --home HOME --seeds 0 1 2 3 --contrast 0 1   # seeds x warm-ups

1. Separation: a fresh policy (the CPU default's tokenizer and model) with 0 and with 300
   label-free warm-up steps (`pretrain_reader`); for every train item, the last hidden state
   where the first action is sampled (prompt + `<call>`); the mean distance between the five
   benchmark centroids, and the mean distance of an item to its own centroid; and how much of
   that state all prompts share: the mean cosine between the centroids of the image benchmarks
   (`image_centroid_cos`; near 1: one update moves every image question alike) and the share
   of the state's energy in its mean over items (`common_share`). With --seeds / --contrast,
   one row per seed and contrastive weight (`TrainConfig.pretrain_contrast`).
2. With --checkpoint: the probability of each action at that position (temperature 1), the
   top three per benchmark, on one train item per benchmark: a policy that routes per
   benchmark shows different top actions; one that learned only the marginal shows the same.
   One table per cost weight in --cost-lambdas (shown in the prompt as in training), and the
   sharing measures of 1. for the checkpoint's own state.
Writes benchmarks/results/policy_probe.json (or --out DIR).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "2")

from benchmarks._common import write_result  # noqa: E402


def main() -> None:
    import argparse

    import torch

    from maestro_core.episode import build_messages
    from maestro_core.registry import DEFAULT_REGISTRY, load_registry
    from maestro_core.suite import load_suite
    from maestro_core.training import TrainConfig, build_policy, warmup_messages

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", required=True, help="a home holding the Maestro-Mini suite")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder for the routing probe")
    p.add_argument("--small", action="store_true", help="20 warm-up steps, 40 items")
    p.add_argument("--cost-lambdas", type=float, nargs="*", default=[],
                   help="cost weights shown in the prompt for the routing probe, one table each (default: one "
                        "table without a weight, as a checkpoint trained without one sees its prompts)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="policy seeds to warm up (one row each)")
    p.add_argument("--contrast", type=float, nargs="+", default=[0.0],
                   help="pretrain_contrast weights to warm up with (one row each per seed)")
    p.add_argument("--views", choices=("prompt", "question"), default="prompt",
                   help="pretrain_views of the contrastive rows")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    started = time.perf_counter()
    reg = load_registry(DEFAULT_REGISTRY)
    items = load_suite(args.home, split="train")
    if args.small:
        items = items[::max(1, len(items) // 40)]
    warm_msgs = warmup_messages(reg, items, TrainConfig())  # the prompts as the default's warm-up reads them
    msgs = [build_messages(reg, it, compact=True) for it in items]

    image = {it.benchmark for it in items if it.images}

    def states(model, tok, pol) -> dict[str, list]:
        call = tok("<call>", add_special_tokens=False)["input_ids"]
        hs: dict[str, list] = {}
        for it, m in zip(items, msgs):
            with torch.no_grad():
                out = model(torch.tensor([list(pol.encode_prompt(m)) + call]), output_hidden_states=True)
            hs.setdefault(it.benchmark, []).append(out.hidden_states[-1][0, -1])
        return hs

    def measures(hs: dict[str, list]) -> dict:
        cent = {b: torch.stack(v).mean(0) for b, v in hs.items()}
        within = sum(float((torch.stack(v) - cent[b]).norm(dim=-1).mean()) for b, v in hs.items()) / len(hs)
        pairs = list(itertools.combinations(sorted(cent), 2))
        between = sum(float((cent[a] - cent[b]).norm()) for a, b in pairs) / max(1, len(pairs))
        cos = [float(torch.nn.functional.cosine_similarity(cent[a], cent[b], dim=0))
               for a, b in itertools.combinations(sorted(image & set(cent)), 2)]
        allh = torch.cat([torch.stack(v) for v in hs.values()])
        common = float(allh.mean(0).pow(2).sum() / allh.pow(2).sum(-1).mean())
        return {"between_centroids": round(between, 3), "within": round(within, 3), "ratio": round(between / within, 2),
                "image_centroid_cos": round(sum(cos) / len(cos), 3) if cos else None,
                "image_centroid_cos_max": round(max(cos), 3) if cos else None, "common_share": round(common, 3)}

    def separation(steps: int, seed: int, contrast: float) -> dict:
        cfg = TrainConfig(pretrain_steps=steps, seed=seed, pretrain_contrast=contrast, pretrain_views=args.views)
        t0 = time.perf_counter()
        model, tok, pol = build_policy(reg, [it.question for it in items], cfg, messages=warm_msgs)
        return {"warmup_steps": steps, "seed": seed, "contrast": contrast, "views": args.views if contrast else None,
                "warmup_s": round(time.perf_counter() - t0, 1), **measures(states(model, tok, pol))}

    steps = 20 if args.small else 300
    rows = [separation(0, args.seeds[0], 0.0)]
    rows += [separation(steps, seed, c) for c in args.contrast for seed in args.seeds]
    res = {"separation": rows}
    print(f"{'warm-up steps':>14} {'seed':>4} {'contrast':>8} {'between':>9} {'within':>8} {'ratio':>6} "
          f"{'image cos':>9} {'max':>6} {'common':>6} {'s':>5}")

    def fmt(v) -> str:
        return "-" if v is None else f"{v:g}"

    for r in rows:
        print(f"{r['warmup_steps']:>14} {r['seed']:>4} {r['contrast']:>8g} {r['between_centroids']:>9} "
              f"{r['within']:>8} {r['ratio']:>6} {fmt(r['image_centroid_cos']):>9} "
              f"{fmt(r['image_centroid_cos_max']):>6} {r['common_share']:>6} {r['warmup_s']:>5}")

    if args.checkpoint:
        from maestro_core.checkpoints import load_checkpoint_policy
        pol = load_checkpoint_policy(args.checkpoint, reg)
        tok, model = pol.tokenizer, pol.model
        ids = [tok.convert_tokens_to_ids(a) for a in pol.actions]
        call = tok("<call>", add_special_tokens=False)["input_ids"]
        res["checkpoint_state"] = measures(states(model, tok, pol))
        cs = res["checkpoint_state"]
        print(f"\ncheckpoint state: image centroid cosine {fmt(cs['image_centroid_cos'])} "
              f"(max {fmt(cs['image_centroid_cos_max'])}), common share {cs['common_share']}")
        res["routing"] = {}
        for lam in args.cost_lambdas or [None]:
            routing = {}
            for it in items:
                if it.benchmark in routing:
                    continue
                m = build_messages(reg, it, compact=True, cost_lambda=lam)
                with torch.no_grad():
                    logits = model(torch.tensor([list(pol.encode_prompt(m)) + call])).logits[0, -1]
                pr = logits[ids].softmax(-1)
                top = pr.topk(min(3, len(ids)))
                routing[it.benchmark] = [(pol.actions[i], round(float(v), 3)) for v, i in zip(top.values, top.indices)]
            res["routing"]["none" if lam is None else f"{lam:g}"] = routing
            print("\nfirst action" + ("" if lam is None else f" at cost weight {lam:g}") + ", top 3 per benchmark:")
            for b, r in sorted(routing.items()):
                print(f"  {b:13} " + ", ".join(f"{a} {p:.2f}" for a, p in r))
    write_result("policy_probe", args, res, started)


if __name__ == "__main__":
    main()
