"""The model-skill registry: experts and a two-tier skill library, loaded from YAML.

A registry file declares a vocabulary of capabilities, the experts (each with a backend, its
capabilities and its price) and the level-1 skills, each with level-2 solvers. From it come
the policy's catalogue text and the grammar of valid actions (`EXPERT@@SKILL[/SOLVER]`, only
for compatible pairs). Its version is the content hash of the normalised registry.

    reg = load_registry("registry/maestro-mini.yaml")
    reg.version, reg.catalogue(), reg.grammar().actions

Validation errors are `ConfigError`s that name the file, the entry, the field and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import yaml

from maestro_core.breaker import BreakerConfig
from maestro_core.errors import ConfigError

DEFAULT_REGISTRY = Path(__file__).resolve().parents[1] / "registry" / "maestro-mini.yaml"
"""The embedded default registry (Maestro-Mini)."""

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
BACKENDS = ("http", "transformers", "python")
BACKEND_REQUIRED = {
    "http": ("base_url", "model"),
    "transformers": (),  # one of model / package / assemble: checked below
    "python": ("callable",),
}
STEP_KINDS = ("prompt", "tool", "code")
IMAGE_USES = ("used", "required", "ignored")
"""How a skill's calls use the episode's images (Skill.images)."""
IMAGE_ROUTING = ("any", "match", "first")
"""Which actions a policy turn offers given the task's images (Registry.for_images)."""


def check_image_routing(routing: str) -> str:
    """`routing` when it is one of IMAGE_ROUTING, else a ConfigError with the fix."""
    if routing not in IMAGE_ROUTING:
        raise ConfigError(f"image_routing '{routing}' is unknown.", field="image_routing",
                          fix=f"use one of {list(IMAGE_ROUTING)}: 'any' (every action on every turn), 'match' (no "
                              "image-reading skill without an image) or 'first' (also: an image task's first call "
                              "goes to a skill that sees its images).")
    return routing


@dataclass(frozen=True)
class Price:
    """What one call costs, in the registry's currency unit (USD by default)."""

    input_per_1m: float = 0.0
    """Price of one million input (prompt) tokens."""
    output_per_1m: float = 0.0
    """Price of one million output (completion) tokens."""
    per_call: float = 0.0
    """Flat price of one call (for models without tokens: OCR, classifiers)."""

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input_per_1m + tokens_out * self.output_per_1m) / 1e6 + self.per_call


@dataclass(frozen=True)
class Expert:
    """A frozen model behind one interface. `backend` holds the backend's own settings."""

    name: str
    description: str
    kind: str
    """Backend kind: http | transformers | python."""
    backend: Mapping[str, Any]
    capabilities: frozenset[str]
    price: Price
    timeout_s: float = 60.0
    max_concurrency: int = 8
    deterministic: bool = True
    """Same input, same output (greedy decoding, pure functions): its calls may be cached."""
    breaker: BreakerConfig = BreakerConfig()
    """When this expert's circuit breaker opens (failures in a row), and for how long."""

    @property
    def digest(self) -> str:
        """Hash of everything that changes what this expert answers (its cache version). An
        in-process model's `dtype: auto` counts as the dtype it resolves to on this machine."""
        backend = _plain(self.backend)
        if self.kind == "transformers" and backend.get("dtype") == "auto":
            from maestro_core.weights import resolve_dtype

            backend = {**backend, "dtype": resolve_dtype("auto")}
        return _hash({"kind": self.kind, "backend": backend})

    def call_cost_estimate(self, prompt_tokens: int = 512) -> float:
        """What one call may cost before it is made: the per-call price plus `prompt_tokens`
        input tokens and the backend's output limit (max_tokens / max_new_tokens, else 256) at
        the token prices. The request-time budget filter offers an action only when this fits."""
        b = self.backend
        out = int(b.get("max_tokens", b.get("max_new_tokens", 256)) or 256)
        return self.price.cost(prompt_tokens if (self.price.input_per_1m or self.price.output_per_1m) else 0, out)


@dataclass(frozen=True)
class Step:
    """One step of a level-2 solver.

    kind 'prompt': send `template` to an expert (the chosen one unless `expert` names a
    helper) with the episode's images; kind 'tool': run the named Python tool on `template`;
    kind 'code': run the rendered `template` as Python in the sandbox, output = stdout.
    Templates may use {input} (the policy's call input), {prev} (previous step's output) and
    the `save_as` names of earlier steps.
    """

    kind: str
    template: str
    expert: str | None = None
    tool: str | None = None
    args: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    save_as: str | None = None


@dataclass(frozen=True)
class Solver:
    """A level-2 solver: a small workflow of steps."""

    name: str
    description: str
    requires: frozenset[str]
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Skill:
    """A level-1 skill: a coarse capability with its level-2 solvers."""

    name: str
    description: str
    requires: frozenset[str]
    solvers: Mapping[str, Solver]
    default_solver: str
    dispatch: tuple[tuple[str, str], ...] = ()
    """(regex, solver) rules tried in order on the call input when the policy names only the
    level-1 skill; the default solver when none matches."""
    images: str = "used"
    """How its calls use the episode's images: 'used' (the expert sees them when the task has
    some; the default), 'required' (they read the image and fail without one: chart, OCR and
    digit skills), 'ignored' (text only: no step ever sees an image). Registry.for_images reads it."""

    def pick_solver(self, call_input: str, runnable: frozenset[str] | None = None) -> Solver:
        """The first dispatch rule matching the input, else the default solver, among the
        solvers the chosen expert can run (`runnable`; all when None)."""
        ok = (lambda name: runnable is None or name in runnable)
        for pattern, solver in self.dispatch:
            if ok(solver) and re.search(pattern, call_input, flags=re.IGNORECASE):
                return self.solvers[solver]
        if ok(self.default_solver):
            return self.solvers[self.default_solver]
        return next(sv for name, sv in self.solvers.items() if ok(name))


@dataclass(frozen=True)
class ActionGrammar:
    """The valid call targets and a regex / EBNF of one policy turn."""

    actions: tuple[str, ...]
    """Every valid `EXPERT@@SKILL` and `EXPERT@@SKILL/SOLVER`, sorted."""

    def regex(self, free_input: bool = True) -> str:
        """One turn; `free_input=False`: calls carry no input (the runner forwards the question)."""
        targets = "|".join(re.escape(a) for a in self.actions)
        call_input = r"(?:: [^<]*)?" if free_input else ""
        return (r"(?:<think>[^<]*</think>\s*)?(?:<call>(?:" + targets + r")" + call_input + r"</call>"
                r"|<answer>[^<]*</answer>)")

    def ebnf(self) -> str:
        targets = " | ".join(json.dumps(a) for a in self.actions)
        return "\n".join([
            'root   ::= think? (call | answer)',
            'think  ::= "<think>" text "</think>" ws',
            'call   ::= "<call>" target (": " text)? "</call>"',
            'answer ::= "<answer>" text "</answer>"',
            f'target ::= {targets}',
            'text   ::= [^<]*',
            'ws     ::= [ \\t\\n]*',
        ])


@dataclass(frozen=True)
class Registry:
    """A validated, versioned registry. Look things up through the dicts."""

    name: str
    description: str
    capabilities: Mapping[str, str]
    experts: Mapping[str, Expert]
    skills: Mapping[str, Skill]
    version: str
    """Content hash of the normalised registry (16 hex digits)."""
    tag: str | None = None
    source: str | None = None

    # -- compatibility --------------------------------------------------------------------
    def compatible(self, expert: str, skill: str, solver: str | None = None) -> bool:
        """Can `expert` run `skill` (a bare level-1 call: at least one of its solvers)?"""
        if solver is None:
            return bool(self.runnable_solvers(expert, skill))
        e, s = self.experts[expert], self.skills[skill]
        return (s.requires | s.solvers[solver].requires) <= e.capabilities

    def runnable_solvers(self, expert: str, skill: str) -> frozenset[str]:
        e, s = self.experts[expert], self.skills[skill]
        return frozenset(n for n, sv in s.solvers.items() if (s.requires | sv.requires) <= e.capabilities)

    def grammar(self) -> ActionGrammar:
        out = []
        for e in self.experts:
            for s, skill in self.skills.items():
                if self.compatible(e, s):
                    out.append(f"{e}@@{s}")
                for sv in skill.solvers:
                    if self.compatible(e, s, sv):
                        out.append(f"{e}@@{s}/{sv}")
        return ActionGrammar(tuple(sorted(out)))

    def call_price(self, action: str) -> float:
        """The price estimate of one call of `action` (EXPERT@@SKILL[/SOLVER]): its expert's
        Expert.call_cost_estimate(), what budgets, the price tilt and the price prior use."""
        return self.experts[action.split("@@", 1)[0]].call_cost_estimate()

    def affordable(self, actions: Sequence[str], budget_left: float | None) -> tuple[str, ...]:
        """The actions whose call price (call_price) fits the budget left; all of them when
        there is no budget."""
        if budget_left is None:
            return tuple(actions)
        return tuple(a for a in actions if self.call_price(a) <= budget_left + 1e-12)

    def for_images(self, actions: Sequence[str], routing: str, *, has_images: bool, first_call: bool
                   ) -> tuple[str, ...]:
        """The actions (EXPERT@@SKILL[/SOLVER], order kept) a policy turn offers under image
        `routing` (IMAGE_ROUTING): 'any': all; 'match': not the skills whose `images` is
        'required' on a task without images; 'first': 'match', and on a task with images the
        first call goes to a skill that sees them ('required' or 'used'): text-only skills
        ('ignored') are offered from the second call on, when an observation has brought
        something they can read. Nothing is narrowed where it would leave no action."""
        if check_image_routing(routing) == "any":
            return tuple(actions)
        use = {a: self.skills[a.split("@@", 1)[1].split("/", 1)[0]].images for a in actions}
        if not has_images:
            return tuple(a for a in actions if use[a] != "required")
        if routing == "first" and first_call:
            seeing = tuple(a for a in actions if use[a] != "ignored")
            return seeing or tuple(actions)
        return tuple(actions)

    # -- rendering ------------------------------------------------------------------------
    def catalogue(self, compact: bool = False) -> str:
        """The text shown to the policy: experts with price, skills with solvers, and the
        valid pairs. `compact`: only the valid actions (the CPU profile: a short prompt, each
        action one token of the policy's own tokenizer)."""
        if compact:
            return "Actions: " + " ".join(self.grammar().actions)
        lines = ["Experts:"]
        for e in self.experts.values():
            p = e.price
            price = []
            if p.input_per_1m or p.output_per_1m:
                price.append(f"${p.input_per_1m:g}/${p.output_per_1m:g} per 1M in/out tokens")
            if p.per_call:
                price.append(f"${p.per_call:g} per call")
            lines.append(f"- {e.name}: {e.description} ({'; '.join(price) or 'free'})")
        lines.append("Skills:")
        for s in self.skills.values():
            lines.append(f"- {s.name}: {s.description}")
            for sv in s.solvers.values():
                lines.append(f"  - {s.name}/{sv.name}: {sv.description}")
        lines.append("Valid pairs: " + ", ".join(a for a in self.grammar().actions if "/" not in a))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The normalised registry (what the version hashes)."""
        return _normalised(self)

    def helper_experts(self, skill: str, solver: str) -> tuple[str, ...]:
        return tuple(st.expert for st in self.skills[skill].solvers[solver].steps if st.expert)


# ---------------------------------------------------------------------------------------
# loading and validation
# ---------------------------------------------------------------------------------------

def load_registry(path: str | Path, *, tools: Mapping[str, Any] | None = None) -> Registry:
    """Load and validate a registry YAML file. Raises ConfigError naming entry, field, fix."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("file not found.", source=str(path),
                          fix="pass the path of a registry YAML file, e.g. registry/maestro-mini.yaml.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e}).", source=str(path), fix="save the file as UTF-8.") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", source=str(path), fix="correct the YAML syntax at the position shown.") from e
    return parse_registry(raw, source=str(path), tools=tools)


def parse_registry(raw: Any, *, source: str = "<registry>", tools: Mapping[str, Any] | None = None) -> Registry:
    v = _Validator(source)
    if not isinstance(raw, dict):
        raise v.err("the registry must be a mapping with 'capabilities', 'experts' and 'skills'.",
                    fix="start the file with 'name:', 'capabilities:', 'experts:' and 'skills:' keys.")
    v.allowed(raw, None, {"name", "tag", "description", "capabilities", "experts", "skills"})
    name = v.string(raw, None, "name")
    caps_raw = raw.get("capabilities")
    if not isinstance(caps_raw, dict) or not caps_raw:
        raise v.err("must be a non-empty mapping of capability name -> description.", field="capabilities",
                    fix="add e.g. 'capabilities: {text: \"reads and writes text\"}'.")
    capabilities = {str(k): str(d) for k, d in caps_raw.items()}

    experts: dict[str, Expert] = {}
    exp_raw = raw.get("experts")
    if not isinstance(exp_raw, list) or not exp_raw:
        raise v.err("must be a non-empty list of experts.", field="experts",
                    fix="add at least one expert with name, backend, capabilities and price.")
    for i, e in enumerate(exp_raw):
        ex = _parse_expert(v, e, i, capabilities)
        if ex.name in experts:
            raise v.err(f"duplicate expert name '{ex.name}'.", entry=f"experts[{i}] {ex.name}", field="name",
                        fix="give every expert a unique name.")
        experts[ex.name] = ex

    skills: dict[str, Skill] = {}
    sk_raw = raw.get("skills")
    if not isinstance(sk_raw, list) or not sk_raw:
        raise v.err("must be a non-empty list of level-1 skills.", field="skills",
                    fix="add at least one skill with name, requires and solvers.")
    for i, s in enumerate(sk_raw):
        sk = _parse_skill(v, s, i, capabilities, experts, tools)
        if sk.name in skills:
            raise v.err(f"duplicate skill name '{sk.name}'.", entry=f"skills[{i}] {sk.name}", field="name",
                        fix="give every level-1 skill a unique name.")
        skills[sk.name] = sk

    # every solver must be runnable by at least one expert
    for sk in skills.values():
        for sv in sk.solvers.values():
            need = sk.requires | sv.requires
            if not any(need <= e.capabilities for e in experts.values()):
                raise v.err(f"no expert has all of {sorted(need)}, so no expert can run this solver.",
                            entry=f"skill {sk.name}/{sv.name}", field="requires",
                            fix="add the missing capabilities to an expert, or remove them from the skill/solver.")

    reg = Registry(name=name, description=str(raw.get("description", "")), capabilities=MappingProxyType(capabilities),
                   experts=MappingProxyType(experts), skills=MappingProxyType(skills), version="",
                   tag=(str(raw["tag"]) if raw.get("tag") is not None else None), source=source)
    version = _hash(_normalised(reg))
    return Registry(**{**reg.__dict__, "version": version})


class _Validator:
    def __init__(self, source: str):
        self.source = source

    def err(self, msg: str, *, entry: str | None = None, field: str | None = None, fix: str | None = None) -> ConfigError:
        return ConfigError(msg, source=self.source, entry=entry, field=field, fix=fix)

    def allowed(self, d: dict, entry: str | None, keys: set[str]) -> None:
        extra = sorted(set(d) - keys)
        if extra:
            raise self.err(f"unknown field(s) {extra}.", entry=entry, field=extra[0],
                           fix=f"use only {sorted(keys)} (check the spelling).")

    def string(self, d: dict, entry: str | None, key: str, *, name: bool = False) -> str:
        val = d.get(key)
        if not isinstance(val, str) or not val.strip():
            raise self.err("missing or not a non-empty string.", entry=entry, field=key, fix=f"set '{key}' to a string.")
        if name and not NAME_RE.match(val):
            raise self.err(f"'{val}' is not a valid name.", entry=entry, field=key,
                           fix="use letters, digits, '.', '_' or '-' (no spaces, no '@@' or '/').")
        return val

    def number(self, d: dict, entry: str, key: str, default: float, *, positive: bool = False) -> float:
        val = d.get(key, default)
        if isinstance(val, bool) or not isinstance(val, (int, float)) or val < 0 or (positive and val == 0):
            raise self.err(f"must be a {'positive' if positive else 'non-negative'} number, got {val!r}.",
                           entry=entry, field=key, fix=f"set '{key}' to a number like {default}.")
        return float(val)

    def caps(self, d: dict, entry: str, key: str, vocab: Mapping[str, str], *, required: bool) -> frozenset[str]:
        val = d.get(key, None if required else [])
        if not isinstance(val, list) or (required and not val) or not all(isinstance(c, str) for c in val):
            raise self.err("must be a list of capability names.", entry=entry, field=key,
                           fix=f"use names from the registry's capabilities: {sorted(vocab)}.")
        for c in val:
            if c not in vocab:
                raise self.err(f"unknown capability '{c}'.", entry=entry, field=key,
                               fix=f"use one of {sorted(vocab)} or declare '{c}' under 'capabilities:'.")
        return frozenset(val)


def _parse_expert(v: _Validator, e: Any, i: int, vocab: Mapping[str, str]) -> Expert:
    entry = f"experts[{i}]"
    if not isinstance(e, dict):
        raise v.err("each expert must be a mapping.", entry=entry, fix="write 'name:', 'backend:', 'capabilities:' keys.")
    name = v.string(e, entry, "name", name=True)
    entry = f"experts[{i}] {name}"
    v.allowed(e, entry, {"name", "description", "backend", "capabilities", "price", "timeout_s",
                         "max_concurrency", "deterministic", "breaker"})
    backend = e.get("backend")
    if not isinstance(backend, dict) or backend.get("kind") not in BACKENDS:
        raise v.err(f"must be a mapping with 'kind' one of {list(BACKENDS)}.", entry=entry, field="backend.kind",
                    fix="e.g. 'backend: {kind: http, base_url: http://127.0.0.1:8000/v1, model: my-model}'.")
    kind = backend["kind"]
    for req in BACKEND_REQUIRED[kind]:
        if not backend.get(req):
            hint = {"base_url": "the server's OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1",
                    "model": "the served model name (http) or a hub id / local path (transformers)",
                    "callable": "'package.module:function' returning the model"}[req]
            what = "missing endpoint" if req == "base_url" else f"missing '{req}'"
            raise v.err(f"{what} for a {kind} expert.", entry=entry, field=f"backend.{req}", fix=f"set backend.{req} to {hint}.")
    if kind == "transformers" and sum(bool(backend.get(k)) for k in ("model", "package", "assemble")) != 1:
        raise v.err("a transformers expert names its weights with exactly one of model, package, assemble.",
                    entry=entry, field="backend.model", fix="set backend.model to a hub id or local path, or "
                    "backend.package (+ gguf_file) to an installed package holding the weights.")
    if kind == "python" and ":" not in str(backend["callable"]):
        raise v.err("callable must look like 'package.module:function'.", entry=entry, field="backend.callable",
                    fix="write the module path, a colon, and the function name.")
    caps = v.caps(e, entry, "capabilities", vocab, required=True)
    price_raw = e.get("price", {})
    if not isinstance(price_raw, dict):
        raise v.err("must be a mapping.", entry=entry, field="price", fix="e.g. 'price: {input_per_1m: 0.1, output_per_1m: 0.4}'.")
    v.allowed(price_raw, entry, {"input_per_1m", "output_per_1m", "per_call"})
    price = Price(**{k: v.number(price_raw, entry, k, 0.0) for k in ("input_per_1m", "output_per_1m", "per_call")})
    timeout_s = v.number(e, entry, "timeout_s", 60.0, positive=True)
    conc = e.get("max_concurrency", 8)
    if isinstance(conc, bool) or not isinstance(conc, int) or conc < 1:
        raise v.err(f"must be an integer >= 1, got {conc!r}.", entry=entry, field="max_concurrency", fix="set it to e.g. 8.")
    det = e.get("deterministic", True)
    if not isinstance(det, bool):
        raise v.err("must be true or false.", entry=entry, field="deterministic", fix="write true or false.")
    breaker = _parse_breaker(v, e.get("breaker", {}), entry)
    return Expert(name=name, description=str(e.get("description", "")), kind=kind,
                  backend=MappingProxyType(dict(backend)), capabilities=caps, price=price,
                  timeout_s=timeout_s, max_concurrency=conc, deterministic=det, breaker=breaker)


def _parse_breaker(v: _Validator, raw: Any, entry: str) -> BreakerConfig:
    """Optional `breaker: {failures: 5, window_s: 60, cooldown_s: 30}` (failures 0: off)."""
    if raw is None:
        return BreakerConfig()
    if not isinstance(raw, dict):
        raise v.err("must be a mapping.", entry=entry, field="breaker",
                    fix="e.g. 'breaker: {failures: 5, window_s: 60, cooldown_s: 30}' (failures: 0 turns it off).")
    v.allowed(raw, entry, {"failures", "window_s", "cooldown_s"})
    default = BreakerConfig()
    failures = raw.get("failures", default.failures)
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
        raise v.err(f"must be an integer >= 0, got {failures!r}.", entry=entry, field="breaker.failures",
                    fix="set it to e.g. 5 (failures in a row that open the breaker), or 0 to turn it off.")
    seconds = {}
    for key in ("window_s", "cooldown_s"):
        val = raw.get(key, getattr(default, key))
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0:
            raise v.err(f"must be a positive number of seconds, got {val!r}.", entry=entry, field=f"breaker.{key}",
                        fix=f"set it to e.g. {getattr(default, key):g}.")
        seconds[key] = float(val)
    return BreakerConfig(failures=failures, **seconds)


def _parse_skill(v: _Validator, s: Any, i: int, vocab: Mapping[str, str], experts: Mapping[str, Expert],
                 tools: Mapping[str, Any] | None) -> Skill:
    entry = f"skills[{i}]"
    if not isinstance(s, dict):
        raise v.err("each skill must be a mapping.", entry=entry, fix="write 'name:', 'requires:', 'solvers:' keys.")
    name = v.string(s, entry, "name", name=True)
    entry = f"skill {name}"
    v.allowed(s, entry, {"name", "description", "requires", "solvers", "default_solver", "dispatch", "images"})
    images = s.get("images", "used")
    if images not in IMAGE_USES:
        raise v.err(f"images {images!r} is unknown.", entry=entry, field="images",
                    fix="use 'required' (the skill reads the image and fails without one), 'ignored' (text only) "
                        "or 'used' (it sees the images when there are some; the default).")
    requires = v.caps(s, entry, "requires", vocab, required=False)
    sv_raw = s.get("solvers")
    if not isinstance(sv_raw, list) or not sv_raw:
        raise v.err("must be a non-empty list of level-2 solvers.", entry=entry, field="solvers",
                    fix="add at least one solver with a name and steps.")
    solvers: dict[str, Solver] = {}
    for j, sv in enumerate(sv_raw):
        sentry = f"skill {name}/solvers[{j}]"
        if not isinstance(sv, dict):
            raise v.err("each solver must be a mapping.", entry=sentry, fix="write 'name:' and 'steps:' keys.")
        sname = v.string(sv, sentry, "name", name=True)
        sentry = f"skill {name}/{sname}"
        v.allowed(sv, sentry, {"name", "description", "requires", "steps"})
        if sname in solvers:
            raise v.err(f"duplicate solver name '{sname}'.", entry=sentry, field="name", fix="give each solver of a skill a unique name.")
        sreq = v.caps(sv, sentry, "requires", vocab, required=False)
        steps_raw = sv.get("steps")
        if not isinstance(steps_raw, list) or not steps_raw:
            raise v.err("must be a non-empty list of steps.", entry=sentry, field="steps",
                        fix="add e.g. '- prompt: \"Answer: {input}\"'.")
        steps = tuple(_parse_step(v, st, f"{sentry} steps[{k}]", experts, tools) for k, st in enumerate(steps_raw))
        solvers[sname] = Solver(name=sname, description=str(sv.get("description", "")), requires=sreq, steps=steps)
    default = s.get("default_solver", next(iter(solvers)))
    if default not in solvers:
        raise v.err(f"'{default}' is not one of this skill's solvers {sorted(solvers)}.", entry=entry,
                    field="default_solver", fix="name one of the solvers listed under 'solvers'.")
    dispatch = []
    for k, rule in enumerate(s.get("dispatch", []) or []):
        if not isinstance(rule, dict) or set(rule) != {"pattern", "solver"}:
            raise v.err("each rule must be {pattern: REGEX, solver: NAME}.", entry=entry, field=f"dispatch[{k}]",
                        fix="write e.g. '- {pattern: \"\\\\d+ [-+*/] \\\\d+\", solver: calculator}'.")
        if rule["solver"] not in solvers:
            raise v.err(f"unknown solver '{rule['solver']}'.", entry=entry, field=f"dispatch[{k}].solver",
                        fix=f"use one of {sorted(solvers)}.")
        try:
            re.compile(rule["pattern"])
        except re.error as e:
            raise v.err(f"invalid regex: {e}.", entry=entry, field=f"dispatch[{k}].pattern", fix="correct the regular expression.") from e
        dispatch.append((str(rule["pattern"]), str(rule["solver"])))
    return Skill(name=name, description=str(s.get("description", "")), requires=requires,
                 solvers=MappingProxyType(solvers), default_solver=default, dispatch=tuple(dispatch), images=images)


def _parse_step(v: _Validator, st: Any, entry: str, experts: Mapping[str, Expert], tools: Mapping[str, Any] | None) -> Step:
    if not isinstance(st, dict):
        raise v.err("each step must be a mapping.", entry=entry, fix="write one of 'prompt:', 'tool:' or 'code:'.")
    kinds = [k for k in STEP_KINDS if k in st]
    if len(kinds) != 1:
        raise v.err(f"a step needs exactly one of {list(STEP_KINDS)}, found {kinds or 'none'}.", entry=entry,
                    fix="split it into one step per action.")
    v.allowed(st, entry, {kinds[0], "expert", "input", "args", "save_as"})
    kind = kinds[0]
    expert = st.get("expert")
    if expert is not None:
        if kind != "prompt":
            raise v.err("'expert' applies to prompt steps only.", entry=entry, field="expert", fix="remove it.")
        if expert not in experts:
            raise v.err(f"unknown expert '{expert}'.", entry=entry, field="expert", fix=f"use one of {sorted(experts)}.")
    tool = None
    if kind == "prompt":
        template = st["prompt"]
    elif kind == "code":
        template = st["code"]
    else:
        tool = st["tool"]
        if tools is None:
            from maestro_core.tools import TOOLS as tools  # noqa: N811  (late: tools import heavy libs lazily)
        if tool not in tools:
            raise v.err(f"unknown tool '{tool}'.", entry=entry, field="tool", fix=f"use one of {sorted(tools)}.")
        template = st.get("input", "{prev}")
    if not isinstance(template, str):
        raise v.err("must be a template string.", entry=entry, field=kind, fix="write a string, e.g. \"{input}\".")
    args = st.get("args", {}) or {}
    if not isinstance(args, dict):
        raise v.err("must be a mapping.", entry=entry, field="args", fix="e.g. 'args: {scale: 2}'.")
    return Step(kind=kind, template=template, expert=expert, tool=tool,
                args=MappingProxyType(dict(args)), save_as=st.get("save_as"))


# ---------------------------------------------------------------------------------------

def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted(_plain(v) for v in x)
    return x


def _normalised(reg: Registry) -> dict:
    def step(st: Step) -> dict:
        return {"kind": st.kind, "template": st.template, "expert": st.expert, "tool": st.tool,
                "args": _plain(st.args), "save_as": st.save_as}

    return _plain({
        "name": reg.name, "description": reg.description, "capabilities": dict(reg.capabilities),
        "experts": {n: {"description": e.description, "kind": e.kind, "backend": _plain(e.backend),
                        "capabilities": sorted(e.capabilities), "price": e.price.__dict__,
                        "timeout_s": e.timeout_s, "max_concurrency": e.max_concurrency,
                        "deterministic": e.deterministic,
                        # only when set: registries without one keep their version
                        **({"breaker": e.breaker.__dict__} if e.breaker != BreakerConfig() else {})}
                   for n, e in reg.experts.items()},
        "skills": {n: {"description": s.description, "requires": sorted(s.requires),
                       "default_solver": s.default_solver, "dispatch": [list(r) for r in s.dispatch],
                       "solvers": {sn: {"description": sv.description, "requires": sorted(sv.requires),
                                        "steps": [step(st) for st in sv.steps]}
                                   for sn, sv in s.solvers.items()},
                       # only when set: registries without one keep their version
                       **({"images": s.images} if s.images != "used" else {})} for n, s in reg.skills.items()},
    })


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def diff_registries(a: Registry | Mapping, b: Registry | Mapping) -> list[str]:
    """What changed from `a` to `b` (Registries or their `to_dict()`), one line per change:
    experts, skills and capabilities added/removed, changed fields (old -> new), and the
    expert@@skill actions the policy gains or loses. Empty when equal."""
    da = a.to_dict() if isinstance(a, Registry) else dict(a)
    db = b.to_dict() if isinstance(b, Registry) else dict(b)
    lines: list[str] = []
    for section, noun in (("capabilities", "capability"), ("experts", "expert"), ("skills", "skill")):
        sa, sb = da.get(section, {}), db.get(section, {})
        for name in sorted(set(sa) - set(sb)):
            lines.append(f"- {noun} {name} removed")
        for name in sorted(set(sb) - set(sa)):
            lines.append(f"+ {noun} {name} added")
        for name in sorted(set(sa) & set(sb)):
            fa, fb = _flat(sa[name]), _flat(sb[name])
            for key in sorted(set(fa) | set(fb)):
                if fa.get(key) != fb.get(key):
                    lines.append(f"~ {noun} {name}: {key} {fa.get(key)!r} -> {fb.get(key)!r}")
    for key in ("name", "description"):
        if da.get(key) != db.get(key):
            lines.append(f"~ registry {key}: {da.get(key)!r} -> {db.get(key)!r}")
    if isinstance(a, Registry) and isinstance(b, Registry):
        ga, gb = set(a.grammar().actions), set(b.grammar().actions)
        lines += [f"- action {x}" for x in sorted(ga - gb)] + [f"+ action {x}" for x in sorted(gb - ga)]
    return lines
