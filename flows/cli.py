"""The `maestro` command (installed into .venv/bin by `make setup`).

    maestro registry validate FILE     check a registry; exit non-zero with the entry, field and fix
    maestro registry publish FILE      record a new registry version; emit maestro.registry.updated
                                       (publishing an older file again retrains on it: a rollback)
    maestro registry diff A B          what changed between two registry files or recorded versions
    maestro runs [--kind K]            runs with their status, checkpoints and results
    maestro ask "QUESTION" [--image F] [--checkpoint best]   one question: the answer, its route and costs
    maestro build-dataset [--config C] build the Maestro-Mini suite (train/val/test) into the store
    maestro build-dataset --heldout DIR  write the held-out generalisation set (JSONL for --data)
    maestro warm-up [--registry FILE]  load every expert, probe it, record latency and cost
    maestro prepare-models [--registry FILE] [--out DIR]
                                       assemble and convert the registry's GGUF experts once per
                                       install (`make setup` runs it), so a new home skips that
    maestro eval [--checkpoint none|latest|best|RUN/ckpt-N|DIR] [--cost-lambda X [--unseen-cost-weight]] [--baselines] [--split test] [--data FILE] [--registry FILE] --out DIR
    maestro collect --policy SPEC [--data FILE] [--runner local|dask] ...
                                       collect rollouts in chunks (one shard each), load them into the store
    maestro train [--config C] [--iterations N] [--run-id R | --fresh] [--baselines] [--direct]
                                       GRPO training of the policy (the train-orchestrator flow on
                                       Prefect's ephemeral API), then the test-split evaluation
    maestro demo                       the main job: maestro train --baselines on the embedded default
    maestro trace EPISODE_ID [--home DIR] [--full]
                                       one stored episode turn by turn: calls, observations, costs, reward

It lives on the top floor (flows/) because its commands start flows; the logic is in
maestro_core.
"""

from __future__ import annotations

import argparse
import sys

from maestro_core.errors import ConfigError, MaestroError


def _validate(args) -> int:
    from maestro_core.registry import load_registry
    reg = load_registry(args.file)
    pairs = [a for a in reg.grammar().actions if "/" not in a]
    print(f"{args.file}: valid registry '{reg.name}' version {reg.version} "
          f"({len(reg.experts)} experts, {len(reg.skills)} skills, {len(pairs)} expert@@skill pairs)")
    return 0


def _publish(args) -> int:
    """Runs the publish_registry task (in the `publish-registry` flow): records the version and
    emits `maestro.registry.updated` to the Prefect API ($PREFECT_API_URL, else the ephemeral
    one), which starts the deployments triggered by it."""
    from maestro_core.registry import load_registry
    load_registry(args.file)  # a bad file fails here, before Prefect starts
    from flows.pipeline import publish_registry_flow
    res = publish_registry_flow(args.file, home=args.home)
    state = "published new version" if res["new"] else "already published"
    print(f"{args.file}: {state} {res['version']} of '{res['name']}'")
    print(f"emitted maestro.registry.updated for maestro.registry.{res['name']} (event {res['event_id']})")
    return 0


def _registry_ref(ref: str, store):
    """A registry file, or a recorded version (or a unique prefix of one) from the store."""
    from pathlib import Path

    from maestro_core.registry import load_registry
    if Path(ref).is_file():
        return load_registry(ref)
    hits = [r["version"] for r in store.registries() if r["version"].startswith(ref)]
    if len(hits) != 1:
        known = ", ".join(r["version"] for r in store.registries()) or "none recorded"
        raise ConfigError(f"'{ref}' is neither a registry file nor {'a unique' if hits else 'a'} recorded version "
                          f"({known}).", field="registry", fix="pass a file path or a version from `maestro runs`.")
    return store.registry_content(hits[0])


def _diff(args) -> int:
    from maestro_core.registry import diff_registries
    from maestro_core.store import Store
    with Store(args.home) as store:
        a, b = _registry_ref(args.a, store), _registry_ref(args.b, store)
    lines = diff_registries(a, b)
    print("\n".join(lines) if lines else "no differences")
    return 0


def _runs(args) -> int:
    """Every run of the store with its status, registry version, checkpoints and results."""
    import datetime

    from maestro_core.checkpoints import list_checkpoints
    from maestro_core.store import Store
    with Store(args.home) as store:
        runs = store.runs(args.kind)
        ckpts = list_checkpoints(store.home, store.objects)
        evals = store.query("SELECT run_id, system, metrics FROM eval_results") if runs else None
        regs = store.registries()
    if not runs:
        print("no runs yet")
        return 0
    by_run: dict[str, list] = {}
    for c in ckpts:
        by_run.setdefault(c.run_id, []).append(c)
    res: dict[str, list] = {}
    if evals is not None:
        import json
        for row in evals.to_pylist():
            m = json.loads(row["metrics"]) if isinstance(row["metrics"], str) else row["metrics"]
            res.setdefault(row["run_id"], []).append((row["system"], m.get("accuracy")))
    print(f"{'run':34} {'kind':8} {'status':10} {'registry':17} {'created':17} details")
    for r in runs:
        when = datetime.datetime.fromtimestamp(r["created_at"]).strftime("%Y-%m-%d %H:%M")
        extra = []
        if r["run_id"] in by_run:
            cs = sorted(by_run[r["run_id"]], key=lambda c: c.iteration)
            extra.append("checkpoints " + ", ".join(
                c.name + (f" (val {c.val_accuracy:.3f})" if c.val_accuracy is not None else "") for c in cs))
        if r["run_id"] in res:
            top = sorted(res[r["run_id"]], key=lambda x: -(x[1] or 0))[:4]
            extra.append("results " + ", ".join(f"{s} {a:.3f}" for s, a in top if a is not None))
        print(f"{r['run_id']:34} {r['kind']:8} {r['status']:10} {str(r['registry_version'])[:16]:17} {when:17} "
              + "; ".join(extra))
    print("registry versions: " + ", ".join(f"{g['version']} ({g['name']})" for g in regs))
    return 0


def _ask(args) -> int:
    from maestro_core.ask import ask, format_answer
    res = ask(args.question, images=args.image or (), checkpoint=args.checkpoint, home=args.home,
              registry_path=args.registry, cost_lambda=args.cost_lambda, budget=args.budget,
              price_tilt=args.price_tilt)
    print(format_answer(res))
    return 0


def _build_dataset(args) -> int:
    from maestro_core.config import build, load_config
    from maestro_core.store import Store
    from maestro_core.suite import SuiteConfig, build_suite
    if args.heldout:
        from pathlib import Path

        from maestro_core.benchmarks.heldout import build_heldout
        path = build_heldout(Path(args.heldout), n_per_benchmark=args.n, seed=args.seed)
        print(f"wrote the held-out set: {path} (evaluate with maestro eval --data {path})")
        return 0
    cfg = load_config(args.config)
    suite_cfg = build(SuiteConfig, cfg.section("suite"), source=cfg.source, section="suite")
    with Store(args.home or cfg.home) as store:
        res = build_suite(suite_cfg, store.home, object_store=store.objects, progress=_progress("build"))
    print(f"built suite version {res.version}: " + ", ".join(f"{k} {v}" for k, v in res.counts.items()))
    return 0


def _warm_up(args) -> int:
    import asyncio

    from maestro_core.experts import build_experts
    from maestro_core.registry import DEFAULT_REGISTRY, load_registry
    from maestro_core.store import Store
    from maestro_core.warmup import format_stats_table, warm_up
    reg = load_registry(args.registry or DEFAULT_REGISTRY)
    with Store(args.home) as store:
        store.record_registry(reg)
        stats = asyncio.run(warm_up(reg, build_experts(reg), store))
    print(format_stats_table(stats))
    return 0


def _prepare_models(args) -> int:
    from maestro_core.registry import DEFAULT_REGISTRY, load_registry
    from maestro_core.weights import prepare_models, prepared_models_dir
    reg = load_registry(args.registry or DEFAULT_REGISTRY)
    out = args.out or prepared_models_dir()
    backends = [e.backend for e in reg.experts.values() if e.kind == "transformers"]
    folders = prepare_models(backends, out, progress=lambda line: print(f"prepared {line}", flush=True))
    print(f"{len(folders)} GGUF model(s) prepared in {out}")
    return 0


def _eval(args) -> int:
    from maestro_core.config import build, load_config
    from maestro_core.evaluation import EvalConfig, run_evaluation
    cfg = load_config(args.config)
    ev = cfg.section("eval")
    ev.setdefault("split", args.split)
    run_evaluation(out=args.out, registry_path=args.registry or cfg.registry, home=args.home or cfg.home,
                   split=args.split, data=args.data, checkpoint=args.checkpoint, baselines=args.baselines,
                   config=build(EvalConfig, ev, source=cfg.source, section="eval"),
                   cost_lambda=getattr(args, "cost_lambda", None), budget=getattr(args, "budget", None),
                   price_tilt=getattr(args, "price_tilt", 0.0), target_cost=getattr(args, "target_cost", None),
                   unseen_cost_weight=getattr(args, "unseen_cost_weight", False))
    print(f"wrote {args.out}/metrics.json, report.md, results.csv")
    return 0


def _policy_spec(text: str) -> dict:
    """`fixed-route:EXPERT@@SKILL`, or a JSON object (see maestro_core.rollouts)."""
    import json
    if text.startswith("fixed-route:"):
        return {"kind": "fixed-route", "pair": text.split(":", 1)[1]}
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"cannot read the policy spec {text!r}: {e}.", field="--policy",
                          fix='write fixed-route:EXPERT@@SKILL or a JSON object like {"kind": "scripted", ...}.') from e
    if not isinstance(spec, dict):
        raise ConfigError("the policy spec must be a JSON object.", field="--policy", fix='e.g. {"kind": "fixed-route", "pair": "calc@@math"}.')
    return spec


def _collect(args) -> int:
    from flows.pipeline import collect_and_store
    res = collect_and_store(policy_spec=_policy_spec(args.policy), run_id=args.run_id, iteration=args.iteration,
                            data=args.data, split=args.split, limit=args.limit, registry=args.registry,
                            chunk_size=args.chunk_size, group_size=args.group_size, home=args.home,
                            object_store=args.object_store, runner=args.runner, dask_address=args.dask_address,
                            dask_workers=args.dask_workers)
    print(f"run {res['run_id']} iteration {res['iteration']}: {res['episodes']} episodes in "
          f"{len(res['shards'])} shards")
    for uri in res["shards"]:
        print(f"  {uri}")
    return 0


def _progress(stage: str):
    last = {"t": 0.0}

    def report(done: int, total: int, what: str = "") -> None:
        import time
        now = time.monotonic()
        if done == total or now - last["t"] > 2.0:
            last["t"] = now
            print(f"  {stage} {what} {done}/{total}", flush=True)
    return report


def _prefect_defaults() -> None:
    """Offline-friendly defaults for Prefect's ephemeral API (no server to start by hand): a
    generous start-up timeout (the first start takes 16-27 s on 2 cores) and no telemetry."""
    import os
    for k, v in {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "DO_NOT_TRACK": "1",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
        os.environ.setdefault(k, v)


def _train(args) -> int:
    """Train the policy: the `train-orchestrator` Prefect flow on Prefect's ephemeral API (or
    $PREFECT_API_URL), or with --direct the same maestro_core steps in a plain loop. Resumes by
    default: without --run-id, the newest unfinished training run with the same config goes on."""
    if not args.direct:
        _prefect_defaults()
        from flows.pipeline import train_orchestrator
        res = train_orchestrator(config_path=args.config, iterations=args.iterations, run_id=args.run_id,
                                 fresh=args.fresh, home=args.home, runner=args.runner, dask_address=args.dask_address,
                                 evaluate_test=not args.no_eval, baselines=args.baselines, out=args.out)
        print(f"done: run {res['run_id']} in {res['out_dir']}; best checkpoint {res['best_checkpoint']} "
              f"(validation accuracy {res['best_val_accuracy']}); curves {res['curve_png']}")
        if res["test"]:
            print("test split: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(res["test"].items(), key=lambda kv: -kv[1]))
                  + f"; report in {res['eval_out']}")
        return 0
    from maestro_core.config import build, load_config
    from maestro_core.experts import build_experts
    from maestro_core.policy_config import PolicyConfig
    from maestro_core.registry import DEFAULT_REGISTRY, load_registry
    from maestro_core.store import Store
    from maestro_core.suite import ensure_suite
    from maestro_core.training import TrainConfig, choose_run, data_version, train_policy
    cfg = load_config(args.config)
    section = cfg.section("train")
    if args.iterations is not None:
        section["iterations"] = args.iterations
    tcfg = build(TrainConfig, section, source=cfg.source, section="train")
    pcfg = build(PolicyConfig, cfg.section("policy"), source=cfg.source, section="policy")
    registry = load_registry(cfg.registry or DEFAULT_REGISTRY)
    with Store(args.home or cfg.home) as store:
        run_id, out = choose_run(store, tcfg, args.run_id, fresh=args.fresh, policy=pcfg, log=print)
        store.record_registry(registry)
        suite = ensure_suite(store, log=print)
        train = [it for it in suite if it.split == "train"]
        val = [it for it in suite if it.split == "val"]
        print(f"training run {run_id}: {tcfg.iterations} iterations x {tcfg.prompts_per_iteration} items x "
              f"{tcfg.grpo.num_generations} episodes; outputs in {out}")
        res = train_policy(registry, train, val, store=store, experts=build_experts(registry), config=tcfg,
                           out_dir=out, run_id=run_id, data_version=data_version(train + val), policy=pcfg)
    print(f"done: checkpoints {res.checkpoints}; best {res.best_checkpoint} "
          f"(val accuracy {res.best_val_accuracy}); curve {out / 'curve.json'}")
    return 0


def _demo(args) -> int:
    """The main job on the embedded default: `maestro train --baselines` (the train-orchestrator
    flow: suite, warm-up, GRPO training, then the trained policy beside the untrained one and
    every baseline on the test split, with plots)."""
    import time

    from maestro_core.home import resolve_home
    home = resolve_home(args.home)  # resolve once, so every stage uses the same home
    print(f"Maestro demo on the embedded default (home {home})")
    args.home = str(home)
    args.out = args.out or str(home / "reports" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    args.config, args.iterations, args.run_id, args.fresh, args.direct = None, None, None, False, False
    args.runner, args.dask_address, args.baselines, args.no_eval = "local", None, True, False
    return _train(args)


def _trace(args) -> int:
    from maestro_core.trace import trace_from_home
    print(trace_from_home(args.episode_id, args.home, max_chars=None if args.full else 800), end="")
    return 0


PRICE_TILT_HELP = ("decode-time price tilt in nats per US cent (default 0: off): where the policy picks a call, each "
                   "call's logit is lowered by this x its estimated price in cents, so the trained policy takes "
                   "cheaper routes (docs/POLICY.md, the cost knob)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maestro", description=__doc__.split("\n\n")[0])
    p.add_argument("--home", default=None, help="store folder (default: $MAESTRO_HOME or ./.maestro)")
    sub = p.add_subparsers(dest="command", required=True)

    reg = sub.add_parser("registry", help="validate or publish a model-skill registry")
    regsub = reg.add_subparsers(dest="registry_command", required=True)
    v = regsub.add_parser("validate", help="check a registry file")
    v.add_argument("file")
    v.set_defaults(func=_validate)
    pub = regsub.add_parser("publish", help="record a new registry version")
    pub.add_argument("file")
    pub.set_defaults(func=_publish)
    dif = regsub.add_parser("diff", help="what changed between two registry files or recorded versions")
    dif.add_argument("a")
    dif.add_argument("b")
    dif.set_defaults(func=_diff)

    ak = sub.add_parser("ask", help="run the trained orchestrator on one question; print the answer and route")
    ak.add_argument("question")
    ak.add_argument("--image", action="append", help="an image file (repeat for several)")
    ak.add_argument("--checkpoint", default="best", help="best | latest | RUN_ID/ckpt-N | DIR (default best)")
    ak.add_argument("--registry", default=None, help="registry file (default: the embedded default)")
    ak.add_argument("--cost-lambda", type=float, default=None, help="cost weight shown to the policy")
    ak.add_argument("--budget", type=float, default=None,
                    help="cost budget for the task (USD): only the calls it can pay for are offered")
    ak.add_argument("--price-tilt", type=float, default=0.0, help=PRICE_TILT_HELP)
    ak.set_defaults(func=_ask)

    rn = sub.add_parser("runs", help="list runs with their checkpoints and results")
    rn.add_argument("--kind", default=None, help="train | eval | collect ... (default all)")
    rn.set_defaults(func=_runs)

    b = sub.add_parser("build-dataset", help="build the Maestro-Mini benchmark suite")
    b.add_argument("--config", default=None, help="YAML config (section 'suite')")
    b.add_argument("--heldout", default=None, metavar="DIR",
                   help="instead, write the held-out generalisation set (other generators, tables, fonts, wordings) "
                        "as DIR/heldout.jsonl")
    b.add_argument("--n", type=int, default=20, help="held-out items per benchmark (default 20)")
    b.add_argument("--seed", type=int, default=1000, help="held-out seed (default 1000)")
    b.set_defaults(func=_build_dataset)

    pm = sub.add_parser("prepare-models", help="assemble and convert the registry's GGUF experts once per install")
    pm.add_argument("--registry", default=None, help="registry file (default: the embedded default)")
    pm.add_argument("--out", default=None, help="store folder (default: <venv>/share/maestro/models, "
                    "which every home reads)")
    pm.set_defaults(func=_prepare_models)

    w = sub.add_parser("warm-up", help="load and probe every expert; record latency and cost")
    w.add_argument("--registry", default=None, help="registry file (default: the embedded default)")
    w.set_defaults(func=_warm_up)

    e = sub.add_parser("eval", help="evaluate a policy checkpoint and/or every baseline")
    e.add_argument("--config", default=None, help="YAML config (sections 'registry', 'suite', 'eval')")
    e.add_argument("--checkpoint", default="none",
                   help="none (baselines only) | latest | best (of the newest training run) | RUN_ID/ckpt-N | DIR; "
                        "adds the systems policy and policy_untrained")
    e.add_argument("--cost-lambda", type=float, default=None,
                   help="cost weight shown to the policy at request time (higher: cheaper routes)")
    e.add_argument("--unseen-cost-weight", action="store_true",
                   help="show --cost-lambda even to a checkpoint trained without a cost weight in its prompts (refused "
                        "otherwise: a diagnostic of how the unseen line moves its routes)")
    e.add_argument("--budget", type=float, default=None,
                   help="cost budget per task (USD) at request time: the policy is offered only the calls it can pay for")
    e.add_argument("--price-tilt", type=float, default=0.0, help=PRICE_TILT_HELP)
    e.add_argument("--target-cost", type=float, default=None,
                   help="cost per task (USD) to aim at: sets --price-tilt to the smallest tilt whose cost on the "
                        "validation split is at most this, then evaluates")
    e.add_argument("--baselines", action="store_true", help="evaluate every baseline")
    e.add_argument("--split", default="test", help="train | val | test (default test)")
    e.add_argument("--data", default=None, help="a JSONL dataset file instead of the suite")
    e.add_argument("--registry", default=None, help="registry file (default: the embedded default)")
    e.add_argument("--out", required=True, help="output folder")
    e.set_defaults(func=_eval)

    c = sub.add_parser("collect", help="collect rollouts in chunks (one shard each) and load them into the store")
    c.add_argument("--policy", required=True, help='fixed-route:EXPERT@@SKILL or a JSON policy spec')
    c.add_argument("--data", default=None, help="a JSONL dataset file instead of the suite")
    c.add_argument("--split", default="train", help="suite split when no --data (default train)")
    c.add_argument("--limit", type=int, default=None, help="at most this many items")
    c.add_argument("--registry", default=None, help="registry file (default: the embedded default)")
    c.add_argument("--run-id", default=None, help="run id (default collect-<time>); rerunning replaces its chunks")
    c.add_argument("--iteration", type=int, default=0)
    c.add_argument("--chunk-size", type=int, default=8, help="items per chunk (one task run, one shard)")
    c.add_argument("--group-size", type=int, default=1, help="episodes per item")
    c.add_argument("--object-store", default=None, help="shards location: a folder or s3://bucket/prefix")
    c.add_argument("--runner", choices=["local", "dask"], default="local", help="task runner for the chunks")
    c.add_argument("--dask-address", default=None, help="an existing Dask scheduler (default: a LocalCluster)")
    c.add_argument("--dask-workers", type=int, default=2, help="LocalCluster worker processes")
    c.set_defaults(func=_collect)

    t = sub.add_parser("train", help="GRPO training of the policy on the suite's train split")
    t.add_argument("--config", default=None, help="YAML config (sections 'registry', 'home', 'train')")
    t.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    t.add_argument("--run-id", default=None,
                   help="run id; an existing run resumes from its latest checkpoint (default: the newest "
                        "unfinished run with the same config, else train-<time>)")
    t.add_argument("--fresh", action="store_true", help="start over: a new run, or --run-id's checkpoints deleted")
    t.add_argument("--direct", action="store_true", help="run the loop without Prefect (same maestro_core steps)")
    t.add_argument("--runner", default="local", choices=["local", "dask"], help="rollout chunk task runner")
    t.add_argument("--dask-address", default=None, help="Dask scheduler address (runner dask; default a LocalCluster)")
    t.add_argument("--baselines", action="store_true", help="evaluate every baseline beside the policy on test")
    t.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation after training")
    t.add_argument("--out", default=None, help="test evaluation folder (default: HOME/reports/train-RUN_ID-<time>)")
    t.set_defaults(func=_train)

    d = sub.add_parser("demo", help="the main job on the embedded default: train, then policy + baselines on test")
    d.add_argument("--out", default=None, help="output folder (default: HOME/reports/demo-<time>)")
    d.set_defaults(func=_demo)

    tr = sub.add_parser("trace", help="show one stored episode: turns, calls, observations, costs, reward")
    tr.add_argument("episode_id", metavar="EPISODE_ID", help="the episode id (episode_id column of results.csv)")
    # SUPPRESS: `maestro --home DIR trace ID` keeps the top-level --home
    tr.add_argument("--home", default=argparse.SUPPRESS, help="store folder (default: $MAESTRO_HOME or ./.maestro)")
    tr.add_argument("--full", action="store_true", help="do not cut long texts (observations, inputs)")
    tr.set_defaults(func=_trace)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MaestroError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
