"""Run configuration files (`--config C`): YAML sections mapped onto typed dataclasses.

    registry: registry/maestro-mini.yaml     # optional, the embedded default otherwise
    home: .maestro                           # optional, $MAESTRO_HOME or ./.maestro otherwise
    suite: {seed: 0, test_per_benchmark: 40} # SuiteConfig fields
    eval: {routers: [knn, mlp]}              # EvalConfig fields

Every section is checked against its dataclass: an unknown or mistyped field is a
ConfigError naming the file, the section, the field and the valid names.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from maestro_core.errors import ConfigError

SECTIONS = ("registry", "home", "suite", "eval", "episode", "train", "policy")


@dataclass(frozen=True)
class RunConfig:
    source: str | None
    registry: str | None
    home: str | None
    sections: dict[str, dict]

    def section(self, name: str) -> dict:
        return dict(self.sections.get(name) or {})


def load_config(path: str | Path | None) -> RunConfig:
    if path is None:
        return RunConfig(None, None, None, {})
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config file not found.", source=str(p), fix="pass the path of a YAML config file.")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read YAML: {e}", source=str(p), fix="correct the YAML syntax.") from e
    if not isinstance(raw, dict):
        raise ConfigError("must be a mapping of sections.", source=str(p), fix=f"use sections {list(SECTIONS)}.")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}.", source=str(p), field=unknown[0],
                          fix=f"use only {list(SECTIONS)}.")
    reg = raw.get("registry")
    if reg is not None and not Path(reg).is_absolute():
        cand = (p.parent / reg)
        reg = str(cand if cand.exists() else Path(reg))
    for name in SECTIONS[2:]:
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise ConfigError("must be a mapping.", source=str(p), field=name, fix=f"write '{name}:' followed by fields.")
    return RunConfig(str(p), reg, raw.get("home"), {k: raw[k] for k in SECTIONS[2:] if raw.get(k)})


def build(cls: type, values: dict[str, Any], *, source: str | None = None, section: str = "",
          base: Any = None) -> Any:
    """Make dataclass `cls` from a dict, checking names and simple types; __post_init__ validates the rest.
    A nested dataclass section overrides the field's own default (e.g. train.grpo on top of the
    CPU profile), not the nested class's defaults; `base` is that default for this level."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kw = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls) if f.init} if base is not None else {}
    for k, v in values.items():
        if k not in fields:
            raise ConfigError(f"unknown field '{k}'.", source=source, entry=section or cls.__name__, field=k,
                              fix=f"use one of {sorted(fields)}.")
        f = fields[k]
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default if dataclasses.is_dataclass(f.default) else None)
        if base is not None and dataclasses.is_dataclass(getattr(base, k, None)):
            default = getattr(base, k)
        kw[k] = _coerce(v, hints[k], source, section, k, default)
    try:
        return cls(**kw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e), source=source, entry=section or cls.__name__, fix="correct the value.") from e


def _coerce(v: Any, hint: Any, source, section, key, default: Any = None):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(v, dict):
        return build(hint, v, source=source, section=f"{section}.{key}",
                     base=default if dataclasses.is_dataclass(default) else None)
    if origin is tuple and isinstance(v, list):
        return tuple(v)
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"must be a mapping, got {v!r}.", source=source, entry=section, field=key,
                              fix=f"write '{key}:' followed by 'name: value' lines, or {{}}.")
        return dict(v)
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:  # an optional value: None, or the other type's check
        return v if v is None else _coerce(v, next(a for a in args if a is not type(None)), source, section, key,
                                           default)
    want = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}.get(hint)
    if want and (not isinstance(v, want) or (hint is not bool and isinstance(v, bool))):
        raise ConfigError(f"must be {hint.__name__}, got {v!r}.", source=source, entry=section, field=key,
                          fix=f"write a {hint.__name__}.")
    return v
