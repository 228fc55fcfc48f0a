"""Sampling draw: the time of one constrained sampling step's draw, torch.multinomial over the
whole vocabulary against lm_policy._sample (over the columns some row may take).

    .venv/bin/python benchmarks/sampling_draw.py [--small]

Rows = 24 contexts (a collection batch), 12 allowed tokens per row (the action grammar's
first-token choices are about that many), random logits masked to them and softmaxed. Vocabulary
sizes: 1543 (the default policy's tokenizer trained on the Maestro-Mini suite), 8233 (SmolLM2's
cut to 8192 with the protocol and action tokens: `vocab_from` with `vocab_size: 8192`) and
49152 (SmolLM2's whole vocabulary). ms per draw: the best of 3 rounds of `reps` draws (another
job may share the cores). One thread (_common). Both draws have the same distribution (tests/
test_lm_policy.py); the whole-row draw spends one random number per vocabulary column.
"""

from __future__ import annotations

import time

import _common

import torch

from maestro_core.lm_policy import _sample

VOCABS = [1543, 8233, 49152]
ROWS, ALLOWED = 24, 12


def per_draw_ms(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e3


def main() -> None:
    args = _common.parse_args(__doc__)
    started = time.perf_counter()
    reps = 20 if args.small else 500
    rows = []
    for vocab in VOCABS:
        g = torch.Generator().manual_seed(0)
        mask = torch.zeros(ROWS, vocab, dtype=torch.bool)
        mask.scatter_(1, torch.randint(0, vocab, (ROWS, ALLOWED), generator=g), True)
        probs = torch.softmax(torch.randn(ROWS, vocab, generator=g).masked_fill(~mask, float("-inf")), -1)
        whole = per_draw_ms(lambda: torch.multinomial(probs, 1, generator=g), reps)
        allowed = per_draw_ms(lambda: _sample(probs, mask, g), reps)
        rows.append({"vocab": vocab, "rows": ROWS, "whole_row_ms": round(whole, 4),
                     "allowed_columns_ms": round(allowed, 4), "speedup": round(whole / allowed, 2)})
    _common.print_table(["vocab", "rows", "whole row ms", "allowed columns ms", "speed-up"],
                        [[r["vocab"], r["rows"], r["whole_row_ms"], r["allowed_columns_ms"], r["speedup"]]
                         for r in rows])
    _common.write_result("sampling_draw", args, {"definition": __doc__.strip().splitlines()[0], "rows": rows},
                         started)


if __name__ == "__main__":
    main()
