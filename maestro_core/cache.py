"""The expert-call cache: content-addressed, persistent, and invisible in results.

The key hashes everything that decides a call's result: the chosen expert's version (its
backend settings, sampling included), the helper experts' versions, the skill, the solver and
its steps, the call input, and the content of every image. Only calls whose experts are all
deterministic are cached.

A hit saves compute only: it returns the call's ORIGINAL cost, latency and tokens, which
rewards, budgets and reports use, so no result depends on what happened to be cached. The
seconds actually spent are measured by the caller. Identical calls in flight at the same time
(the G samples of a GRPO group) run once and share the result.

Entries live in memory and in the store's `expert_cache` table; `flush()` writes new ones.
A lookup missing from memory asks the store only for a key the store holds: the cache keeps
the store's key set (one query, again after any write through the store), so the many misses
of a cold cache cost no query each on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from maestro_core.imagetools import image_digest
from maestro_core.protocol import Call
from maestro_core.registry import Registry, Solver
from maestro_core.skills import SkillResult

_FIELDS = ("text", "solver", "confidence", "cost", "latency_s", "tokens_in", "tokens_out", "expert_calls")


class ExpertCache:
    """In-memory front of the store's `expert_cache` table. `store` may be None (memory only)."""

    def __init__(self, store=None, *, flush_every: int = 512):
        self.store = store
        self.flush_every = flush_every
        self._mem: dict[str, SkillResult] = {}
        self._pending: list[dict] = []
        self._inflight: dict[str, asyncio.Future] = {}
        self._stored_keys: set[str] | None = None
        self._stored_generation = -1
        self.store_queries = 0
        """Lookups that went to the store (for tests and measurements)."""
        self.hits = 0
        self.misses = 0

    # -- keys -----------------------------------------------------------------------------
    def key(self, registry: Registry, call: Call, solver: Solver, images: Sequence[str | Path]) -> str | None:
        """The content address of this call, or None when it must not be cached."""
        experts = [call.expert, *(st.expert for st in solver.steps if st.expert)]
        specs = [registry.experts[e] for e in experts]
        if not all(s.deterministic for s in specs):
            return None
        skill = registry.skills[call.skill]
        payload = {
            "experts": [[s.name, s.digest] for s in specs],
            "skill": call.skill,
            "solver": [solver.name, [[st.kind, st.template, st.expert, st.tool, sorted(st.args.items())]
                                     for st in solver.steps]],
            "requires": sorted(skill.requires),
            "input": call.input,
            "images": [image_digest(p) for p in images],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    # -- lookups --------------------------------------------------------------------------
    def get(self, key: str) -> SkillResult | None:
        hit = self._mem.get(key)
        if hit is None and self.store is not None and self._stored(key):
            self.store_queries += 1
            row = self.store.cache_get_many([key]).get(key)
            if row is not None:
                hit = self._mem[key] = SkillResult(**{f: row[f] for f in _FIELDS})
        return hit

    def _stored(self, key: str) -> bool:
        """Whether the store may hold `key`: its key set, read again once the store was written."""
        if self._stored_keys is None or self._stored_generation != self.store.cache_generation:
            self._stored_keys, self._stored_generation = self.store.cache_keys()
        return key in self._stored_keys

    def put(self, key: str, result: SkillResult, *, expert: str, skill: str) -> None:
        self._mem[key] = result
        if self.store is not None:
            self._pending.append({"key": key, "expert": expert, "skill": skill,
                                  **{f: getattr(result, f) for f in _FIELDS}})
            if len(self._pending) >= self.flush_every:
                self.flush()

    async def get_or_run(self, key: str | None, run: Callable[[], Awaitable[SkillResult]], *,
                         expert: str, skill: str) -> tuple[SkillResult, bool | None, float]:
        """Return (result, hit, spent_s). hit is None when the call is not cacheable (key None).

        spent_s is the compute this call actually cost now: the solver's run time on a miss,
        the lookup time on a hit, 0 when it shared a run in flight (its owner paid)."""
        if key is None:
            res = await run()
            return res, None, res.latency_s
        t0 = time.perf_counter()
        hit = self.get(key)
        if hit is not None:
            self.hits += 1
            return hit, True, time.perf_counter() - t0
        fut = self._inflight.get(key)
        if fut is not None:
            try:
                result = await asyncio.shield(fut)
            except asyncio.CancelledError:
                if not fut.cancelled():
                    raise  # this waiter itself was cancelled
                return await self.get_or_run(key, run, expert=expert, skill=skill)  # the owner was
            self.hits += 1
            return result, True, 0.0
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            result = await run()
        except BaseException as e:
            # failures are not cached; waiters see the same error (or run again if cancelled)
            if isinstance(e, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(e)
                fut.exception()  # mark retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            self._inflight.pop(key, None)
        fut.set_result(result)
        self.misses += 1
        self.put(key, result, expert=expert, skill=skill)
        return result, False, result.latency_s

    def flush(self) -> int:
        """Write new entries to the store. Returns how many were written."""
        if self.store is None or not self._pending:
            return 0
        rows, self._pending = self._pending, []
        before = self.store.cache_generation
        self.store.cache_put_many(rows)
        if self._stored_keys is not None and self._stored_generation == before == self.store.cache_generation - 1:
            self._stored_keys.update(r["key"] for r in rows)  # only this write since the set was read
            self._stored_generation = before + 1
        return len(rows)
