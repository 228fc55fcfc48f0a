"""The `maestro` command (installed into .venv/bin by `make setup`).

    maestro registry validate FILE     check a registry; exit non-zero with the entry, field and fix
    maestro registry publish FILE      record a new registry version in the store
    maestro build-dataset [--config C] build the Maestro-Mini suite (train/val/test) into the store
    maestro warm-up [--registry FILE]  load every expert, probe it, record latency and cost
    maestro eval [--checkpoint none] [--baselines] [--split test] [--data FILE] [--registry FILE] --out DIR
    maestro demo                       the main job: build the suite, warm up, evaluate baselines

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
    from maestro_core.registry import load_registry
    from maestro_core.store import Store
    reg = load_registry(args.file)
    with Store(args.home) as store:
        new = store.record_registry(reg)
    state = "published new version" if new else "already published"
    print(f"{args.file}: {state} {reg.version} of '{reg.name}'")
    return 0


def _build_dataset(args) -> int:
    from maestro_core.config import build, load_config
    from maestro_core.store import Store
    from maestro_core.suite import SuiteConfig, build_suite
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


def _eval(args) -> int:
    from maestro_core.config import build, load_config
    from maestro_core.evaluation import EvalConfig, run_evaluation
    cfg = load_config(args.config)
    ev = cfg.section("eval")
    ev.setdefault("split", args.split)
    run_evaluation(out=args.out, registry_path=args.registry or cfg.registry, home=args.home or cfg.home,
                   split=args.split, data=args.data, checkpoint=args.checkpoint, baselines=args.baselines,
                   config=build(EvalConfig, ev, source=cfg.source, section="eval"))
    print(f"wrote {args.out}/metrics.json, report.md, results.csv")
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


def _demo(args) -> int:
    """The main job on the embedded default, until training lands: build the suite, warm up
    every expert, evaluate every baseline on the test split."""
    import time

    from maestro_core.home import resolve_home
    home = resolve_home(args.home)  # resolve once, so every stage uses the same home
    print(f"Maestro demo on the embedded default (home {home})")
    args.home, args.registry = str(home), None
    _warm_up(args)
    out = args.out or str(home / "reports" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    args.config, args.checkpoint, args.baselines, args.split, args.data, args.out = None, "none", True, "test", None, out
    return _eval(args)


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

    b = sub.add_parser("build-dataset", help="build the Maestro-Mini benchmark suite")
    b.add_argument("--config", default=None, help="YAML config (section 'suite')")
    b.set_defaults(func=_build_dataset)

    w = sub.add_parser("warm-up", help="load and probe every expert; record latency and cost")
    w.add_argument("--registry", default=None, help="registry file (default: the embedded default)")
    w.set_defaults(func=_warm_up)

    e = sub.add_parser("eval", help="evaluate baselines (and later the policy)")
    e.add_argument("--config", default=None, help="YAML config (sections 'registry', 'suite', 'eval')")
    e.add_argument("--checkpoint", default="none", help="none (baselines only) | latest | best | PATH")
    e.add_argument("--baselines", action="store_true", help="evaluate every baseline")
    e.add_argument("--split", default="test", help="train | val | test (default test)")
    e.add_argument("--data", default=None, help="a JSONL dataset file instead of the suite")
    e.add_argument("--registry", default=None, help="registry file (default: the embedded default)")
    e.add_argument("--out", required=True, help="output folder")
    e.set_defaults(func=_eval)

    d = sub.add_parser("demo", help="the main job on the embedded default: suite, warm-up, baselines")
    d.add_argument("--out", default=None, help="output folder (default: HOME/reports/demo-<time>)")
    d.set_defaults(func=_demo)
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
