import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from maestro_core.errors import ConfigError
from maestro_core.registry import load_registry, parse_registry

ROOT = Path(__file__).resolve().parents[1]


def test_loads_and_renders(registry):
    assert set(registry.experts) == {"calc", "counter", "llm"}
    assert registry.skills["text"].default_solver == "words"
    cat = registry.catalogue()
    assert "calc" in cat and "math/calculator" in cat and "$0.001 per call" in cat


def test_grammar_only_compatible_pairs(registry):
    acts = set(registry.grammar().actions)
    assert {"calc@@math", "calc@@math/checked", "llm@@math", "llm@@chat", "counter@@text/letters"} <= acts
    assert "calc@@text" not in acts and "counter@@math" not in acts and "calc@@chat" not in acts
    import re
    rx = re.compile(registry.grammar().regex())
    assert rx.fullmatch("<call>calc@@math: 2+2</call>")
    assert not rx.fullmatch("<call>calc@@text: 2+2</call>")
    assert rx.fullmatch("<think>hm</think> <answer>4</answer>")
    assert '"calc@@math"' in registry.grammar().ebnf()


def test_version_is_content_hash(registry_dict):
    a = parse_registry(registry_dict)
    reordered = dict(registry_dict, experts=list(reversed(registry_dict["experts"])), tag="human-tag")
    assert parse_registry(reordered).version == a.version  # order and tag do not change content
    changed = dict(registry_dict)
    changed["experts"] = [dict(e) for e in registry_dict["experts"]]
    changed["experts"][0]["price"] = {"per_call": 0.5}
    assert parse_registry(changed).version != a.version
    assert len(a.version) == 16


def test_skill_images_and_the_actions_a_task_s_images_allow(registry_dict):
    """`images:` per skill: omitted it is 'used' and the version is what it was without the
    field; 'required' skills are not offered on a task without images; with routing 'first' an
    image task's first call goes to skills that see images, later calls to every skill; nothing
    is narrowed to no action; an unknown routing is a ConfigError with the fix."""
    plain = parse_registry(registry_dict)
    assert {s.images for s in plain.skills.values()} == {"used"}
    explicit = dict(registry_dict, skills=[dict(s, images="used") for s in registry_dict["skills"]])
    assert parse_registry(explicit).version == plain.version
    uses = {"math": "ignored", "text": "required", "chat": "used"}
    reg = parse_registry(dict(registry_dict, skills=[dict(s, images=uses[s["name"]]) for s in registry_dict["skills"]]))
    assert reg.version != plain.version and reg.to_dict()["skills"]["text"]["images"] == "required"
    acts = reg.grammar().actions
    skill = lambda a: a.split("@@")[1].split("/")[0]  # noqa: E731
    offered = lambda routing, **kw: {skill(a) for a in reg.for_images(acts, routing, **kw)}  # noqa: E731
    assert offered("any", has_images=False, first_call=True) == {"math", "text", "chat"}
    for routing in ("match", "first"):
        assert offered(routing, has_images=False, first_call=True) == {"math", "chat"}
        assert offered(routing, has_images=False, first_call=False) == {"math", "chat"}
    assert offered("match", has_images=True, first_call=True) == {"math", "text", "chat"}
    assert offered("first", has_images=True, first_call=True) == {"text", "chat"}
    assert offered("first", has_images=True, first_call=False) == {"math", "text", "chat"}
    assert reg.for_images(acts, "first", has_images=True, first_call=False) == acts  # order kept
    text_only = parse_registry(dict(registry_dict, skills=[dict(s, images="ignored") for s in registry_dict["skills"]]))
    assert text_only.for_images(acts, "first", has_images=True, first_call=True) == acts
    with pytest.raises(ConfigError) as e:
        reg.for_images(acts, "sometimes", has_images=True, first_call=True)
    assert "'first'" in e.value.fix


def test_dispatch_picks_solver(registry):
    assert registry.skills["text"].pick_solver("count the letter a in 'banana'").name == "letters"
    assert registry.skills["text"].pick_solver("'a b c'").name == "words"


@pytest.mark.parametrize("mutate, entry, field, fix", [
    (lambda d: d["experts"][0].update(capabilities=["telepathy"]), "calc", "capabilities", "telepathy"),
    (lambda d: d["experts"].append(dict(d["experts"][0])), "calc", "name", "unique"),
    (lambda d: d["experts"][2]["backend"].pop("base_url"), "llm", "backend.base_url", "endpoint"),
    (lambda d: d["skills"][0]["solvers"][0].update(requires=["counting"]), "math/calculator", "requires", "capabilit"),
    (lambda d: d["skills"][1].update(default_solver="nope"), "text", "default_solver", "solvers"),
    (lambda d: d["skills"][0]["solvers"][1]["steps"][1].update(tool="nosuchtool"), "math/checked", "tool", "extract_number"),
    (lambda d: d["experts"][0].update(price={"per_call": -1}), "calc", "per_call", "number"),
    (lambda d: d["experts"][0].update(timeout=3), "calc", "timeout", "spelling"),
    (lambda d: d["skills"].append(dict(d["skills"][0])), "math", "name", "unique"),
    (lambda d: d["experts"][1].update(name="bad name"), "experts[1]", "name", "letters"),
    (lambda d: d["skills"][1].update(images="sometimes"), "text", "images", "'required'"),
])
def test_validation_names_entry_field_fix(registry_dict, mutate, entry, field, fix):
    mutate(registry_dict)
    with pytest.raises(ConfigError) as ei:
        parse_registry(registry_dict, source="broken.yaml")
    msg = str(ei.value)
    assert "broken.yaml" in msg and entry in msg and f"field '{field}'" in msg and "Fix:" in msg
    assert fix in msg


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("experts: [\n  - name: x\n bad")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_registry(p)
    with pytest.raises(ConfigError, match="not found"):
        load_registry(tmp_path / "missing.yaml")


def test_shipped_registry_is_valid():
    reg = load_registry(ROOT / "registry" / "maestro-mini.yaml")
    assert reg.grammar().actions
    # its image-reading skills need an image; the LMs and the calculator get text only
    assert {n: s.images for n, s in reg.skills.items()} == {
        "math": "ignored", "general": "ignored", "chart": "required", "text_reading": "required",
        "perception": "required"}


def test_cli_validate_exit_codes(tmp_path, registry_dict):
    maestro = [sys.executable, "-m", "flows.cli"]
    ok = subprocess.run([*maestro, "registry", "validate", str(ROOT / "registry" / "maestro-mini.yaml")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout
    registry_dict["experts"][2]["backend"].pop("base_url")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(registry_dict))
    res = subprocess.run([*maestro, "registry", "validate", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0
    assert "entry 'experts[2] llm'" in res.stderr and "field 'backend.base_url'" in res.stderr


def test_registry_diff_files_and_recorded_versions(tmp_path, registry_dict):
    import copy

    from maestro_core.registry import diff_registries
    from maestro_core.store import Store
    a = parse_registry(registry_dict)
    changed = copy.deepcopy(registry_dict)
    changed["experts"][0]["price"] = {"per_call": 0.005}
    changed["experts"] = [e for e in changed["experts"] if e["name"] != "counter"]
    changed["skills"] = [s for s in changed["skills"] if s["name"] != "text"]
    b = parse_registry(changed)
    lines = diff_registries(a, b)
    assert "- expert counter removed" in lines and "- skill text removed" in lines
    assert "~ expert calc: price.per_call 0.001 -> 0.005" in lines and "- action counter@@text" in lines
    assert diff_registries(a, a) == []
    fa, fb = tmp_path / "a.yaml", tmp_path / "b.yaml"
    fa.write_text(yaml.safe_dump(registry_dict))
    fb.write_text(yaml.safe_dump(changed))
    with Store(tmp_path / "home") as store:
        store.record_registry(a)
    cmd = [sys.executable, "-m", "flows.cli", "--home", str(tmp_path / "home"), "registry", "diff"]
    out = subprocess.run(cmd + [a.version[:8], str(fb)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "- expert counter removed" in out.stdout, out.stderr
    bad = subprocess.run(cmd + ["nope", str(fb)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "Fix:" in bad.stderr
