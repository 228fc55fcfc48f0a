"""One question of the user's through the trained orchestrator: the answer and its route.

    result = ask("What is 17 * 23?", checkpoint="best", home=home)
    print(format_answer(result))

The question goes through the same episode runner as training and evaluation (greedy policy
of the checkpoint, the registry's experts through the persistent expert cache); the episode is
not scored (there is no gold answer) and is stored under the run `ask`, so `maestro trace`
shows it.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from maestro_core.dataset import Item, check_image
from maestro_core.errors import ConfigError
from maestro_core.trajectory import Trajectory


@dataclass(frozen=True)
class AskResult:
    answer: str | None
    trajectory: Trajectory
    checkpoint: str


def ask(question: str, *, images: Sequence[str | Path] = (), checkpoint: str = "best", home: str | Path | None = None,
        registry_path: str | Path | None = None, cost_lambda: float | None = None,
        budget: float | None = None, price_tilt: float = 0.0) -> AskResult:
    """Answer one question with a trained checkpoint (greedy); `budget`: the per-task cost
    budget (the prompt states it, the grammar offers only calls it can pay for); `price_tilt`:
    dearer calls' logits lowered while decoding (LMPolicy.price_tilt)."""
    from maestro_core.cache import ExpertCache
    from maestro_core.checkpoints import load_checkpoint_policy, read_meta, resolve_checkpoint
    from maestro_core.episode import EpisodeRunner
    from maestro_core.evaluation import checkpoint_episode_config
    from maestro_core.experts import build_experts
    from maestro_core.registry import DEFAULT_REGISTRY, load_registry
    from maestro_core.store import Store
    from maestro_core.training import request_cost_lambda

    if not question.strip():
        raise ConfigError("the question is empty.", field="question", fix="pass the question as text.")
    paths = []
    for i, img in enumerate(images):
        p = Path(img).resolve()
        if not p.is_file():
            raise ConfigError(f"image {img} does not exist.", field="--image", fix="pass an existing image file.")
        check_image(p, where=f"--image {i + 1}", entry=str(img))
        paths.append(str(p))
    registry = load_registry(registry_path or DEFAULT_REGISTRY)
    with Store(home) as store:
        path = resolve_checkpoint(checkpoint, home=store.home, objects=store.objects)
        if path is None:
            raise ConfigError("ask needs a trained policy.", field="--checkpoint",
                              fix="use --checkpoint best, latest, RUN_ID/ckpt-N or a folder.")
        store.record_registry(registry)
        item = Item(id=f"ask-{uuid.uuid4().hex[:8]}", benchmark="ask", question=question.strip(), answer="",
                    scorer="exact", images=tuple(paths))
        policy = load_checkpoint_policy(path, registry, temperature=0.0, price_tilt=price_tilt)
        experts = build_experts(registry)
        cache = ExpertCache(store)
        meta = read_meta(path)
        cost_lambda = request_cost_lambda(meta.get("config", {}), cost_lambda, checkpoint=str(path))
        runner = EpisodeRunner(registry, experts, policy, cache=cache,
                               config=checkpoint_episode_config(meta, budget=budget))
        run_id = "ask"
        n_before = store.count_episodes(run_id)  # each question is one iteration of the run `ask`
        store.record_run(run_id, "ask", {"checkpoint": str(path)}, registry.version, status="running")

        async def go():
            try:
                return await runner.run_episode(item, run_id=run_id, iteration=n_before,
                                                cost_lambda=cost_lambda)
            finally:
                for e in experts.values():
                    await e.aclose()

        traj = asyncio.run(go())
        cache.flush()
        store.write_and_ingest([traj], run_id, traj.iteration, 0)
        store.set_run_status(run_id, "completed")
    return AskResult(traj.final_answer, traj, str(path))


def format_answer(res: AskResult) -> str:
    t = res.trajectory
    lines = [f"answer: {res.answer if res.answer is not None else '(none)'}", f"checkpoint: {res.checkpoint}", "route:"]
    for s in t.steps:
        if s.action == "call":
            lines.append(f"  {s.turn + 1}. {s.expert}@@{s.skill}" + (f"/{s.solver}" if s.solver else "")
                         + f"  ${s.cost:.6f}  {s.latency_s:.2f} s" + (f"  [{s.error}]" if s.error else ""))
        else:
            lines.append(f"  {s.turn + 1}. {s.action}: {s.text[:120]}")
    lines.append(f"total: ${t.total_cost:.6f}, {t.n_calls} expert call(s), {t.total_latency_s:.2f} s; "
                 f"trace: maestro trace {t.episode_id}")
    return "\n".join(lines)
