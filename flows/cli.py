"""The `maestro` command (installed into .venv/bin by `make setup`).

    maestro registry validate FILE     check a registry; exit 1 with the entry, field and fix
    maestro registry publish FILE      record a new registry version in the store
    maestro demo                       run the foundation demo on the embedded default

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


def _demo(args) -> int:
    from maestro_core.demo import run_demo
    run_demo(home=args.home, n_items=args.items, group_size=args.group_size, seed=args.seed)
    return 0


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

    d = sub.add_parser("demo", help="run the foundation demo on the embedded default")
    d.add_argument("--items", type=int, default=40, help="benchmark items (default 40)")
    d.add_argument("--group-size", type=int, default=4, help="episodes per item (default 4)")
    d.add_argument("--seed", type=int, default=0)
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
