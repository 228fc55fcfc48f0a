"""Training with a served policy (`policy:` backend 'openai').

The learner is loaded from a checkpoint folder (a tiny Llama built from a config + a locally
trained tokenizer with a chat template); rollouts are sampled by a real loopback vLLM-like
server (tests/openai_server.py with tests/test_http_policy.py's TinyVLLM: a real tiny model
under the request's grammar, token ids + logprobs), whose /collective_rpc `reload_weights`
route really reloads the weights from the checkpoint folder it is given. So the test shows
that iteration k is sampled by ckpt-k's weights and that after the last sync the server's
weights are the learner's.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml

from maestro_core.config import build
from maestro_core.errors import ConfigError
from maestro_core.experts import build_experts
from maestro_core.grpo import GRPOSettings
from maestro_core.http_policy import OpenAIPolicy
from maestro_core.policy_config import PolicyConfig, load_learner
from maestro_core.policy_model import build_tiny_model
from maestro_core.rollouts import build_policy as build_rollout_policy
from maestro_core.store import Store
from maestro_core.training import TrainConfig, TrainingRun
from tests.openai_server import OpenAIServer
from tests.test_http_policy import ITEMS, KEY, TinyVLLM, reg, tok, tok_dir  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ReloadingVLLM:
    """TinyVLLM whose `/collective_rpc reload_weights` loads the model from `weights_path`, as
    vLLM does; it remembers which checkpoint each sampled turn came from."""

    def __init__(self, tok, checkpoint: Path):
        self.tiny = TinyVLLM(tok, self._load(checkpoint))
        self.loaded = [str(checkpoint)]
        self.fingerprints: list[str] = []  # of each reloaded model, as the route reports it
        self.sampled: dict[str, set] = {}  # loaded folder -> {(ids, logprobs)} sampled with it
        self.temperatures: list[tuple[str, float]] = []

    @staticmethod
    def _load(path) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()

    def completion(self, body: dict) -> dict:
        served = self.loaded[-1]  # no reload runs while turns are sampled (sync is between collections)
        reply = self.tiny(body)
        ids = tuple(int(x["token"].split(":")[1]) for x in reply["choices"][0]["logprobs"]["content"])
        lps = tuple(x["logprob"] for x in reply["choices"][0]["logprobs"]["content"])
        self.sampled.setdefault(served, set()).add((ids, lps))
        self.temperatures.append((served, float(body["temperature"])))
        return reply

    def collective_rpc(self, body: dict):
        if body.get("method") != "reload_weights":
            return 400, f"unknown method {body.get('method')}"
        path = body["kwargs"]["weights_path"]
        model = self._load(path)
        with self.tiny.lock:
            self.tiny.model = model
            self.loaded.append(path)
            self.fingerprints.append(fingerprint(model))
        return {"results": [self.fingerprints[-1]]}

    def routes(self) -> dict:
        return {"/collective_rpc": self.collective_rpc, "/reset_prefix_cache": lambda body: {}}


@pytest.fixture
def checkpoint(tok, tmp_path) -> Path:
    """The initial weights: a tiny model from a config + the tokenizer (with its chat template)."""
    path = tmp_path / "init"
    tok.save_pretrained(path)
    build_tiny_model(tok, hidden=64, layers=2, heads=2, seed=0).save_pretrained(path)
    return path


def train_cfg(**kw) -> TrainConfig:
    base = dict(iterations=2, prompts_per_iteration=2, max_turns=2, max_turn_tokens=32, eval_every=2, val_items=2,
                temperature=1.0, cost_lambdas=(), seed=3, question_noise_share=0.0,
                grpo=GRPOSettings.cpu_profile(num_generations=4, per_device_train_batch_size=8, temperature=1.0))
    base.update(kw)
    return TrainConfig(**base)


def test_two_iterations_sampled_by_the_server_and_synced_after_each_update(reg, tok, checkpoint,  # noqa: F811
                                                                          tmp_path, monkeypatch):
    monkeypatch.setenv("MAESTRO_API_KEY", KEY)  # the server refuses requests without it
    server = ReloadingVLLM(tok, checkpoint)
    cfg = train_cfg()
    with OpenAIServer(completion=server.completion, routes=server.routes(), api_key=KEY) as srv, \
            Store(tmp_path / "home") as store:
        pcfg = build(PolicyConfig, {"backend": "openai", "checkpoint": str(checkpoint), "base_url": srv.base_url,
                                    "model": "maestro-policy", "backoff_s": 0.01}, section="policy")
        run = TrainingRun(reg, ITEMS, ITEMS[:2], store=store, experts=build_experts(reg), config=cfg,
                          out_dir=tmp_path / "run", run_id="s1", log=lambda s: None, policy=pcfg)
        initial = fingerprint(run.model)
        assert initial == fingerprint(load_learner(checkpoint)[0])
        specs, rows = [], []
        for it in range(run.start, cfg.iterations):
            specs += run.chunk_specs(it)
            run.collect(it)
            assert run.ingest(it) == 2 * 4  # items x group size
            rows.append(run.update(it))
        result = run.finish()
        trajs = {it: store.trajectories("s1", it) for it in range(2)}
        routes, loaded = list(srv.route_requests), list(server.loaded)
        served_state = {k: v.clone() for k, v in server.tiny.model.state_dict().items()}
        # a resumed run loads its learner from the latest checkpoint and syncs the server to it
        again = TrainingRun(reg, ITEMS, ITEMS[:2], store=store, experts=build_experts(reg), config=cfg,
                            out_dir=tmp_path / "run", run_id="s1", log=lambda s: None, policy=pcfg)
        assert again.start == 2 and fingerprint(again.model) == fingerprint(run.model)
        assert srv.route_requests[len(routes)][1]["kwargs"]["weights_path"] == str((tmp_path / "run" / "ckpt-2").resolve())

    ck = [str((tmp_path / "run" / f"ckpt-{k}").resolve()) for k in range(3)]
    # synced when the run opened (ckpt-0), then after each update with the new checkpoint
    assert [b["kwargs"]["weights_path"] for p, b in routes if p == "/collective_rpc"] == ck
    assert [p for p, _ in routes] == ["/collective_rpc", "/reset_prefix_cache"] * 3
    assert loaded[1:] == ck and run.served.checkpoint_id == "s1/ckpt-2" and run.served.stats.syncs == 3
    assert all(r["sync_s"] is not None for r in rows)

    # iteration k was sampled by the server holding ckpt-k, and stores exactly what it sampled
    for it, ts in trajs.items():
        assert len(ts) == 8 and {t.checkpoint_id for t in ts} == {f"s1/ckpt-{it}"}
        for t in ts:
            assert t.prompt_ids and t.steps
            for s in t.steps:
                assert s.completion_ids[-1] == tok.eos_token_id
                assert (s.completion_ids, s.logprobs) in server.sampled[ck[it]]

    # the updates moved the learner; the server reloaded ckpt-0 (the initial weights), then two new ones
    assert fingerprint(run.model) != initial
    assert server.fingerprints[0] == initial and len(set(server.fingerprints[:3])) == 3
    assert server.fingerprints[2] == fingerprint(run.model) == fingerprint(load_learner(ck[2])[0])
    # after the last sync the server's weights are the learner's, tensor for tensor
    learner_state = run.model.state_dict()
    assert served_state.keys() == learner_state.keys()
    assert all(torch.equal(served_state[k].cpu(), learner_state[k].cpu()) for k in learner_state)

    # validation: the served policy at temperature 0, after the last sync
    assert "val_accuracy" in rows[-1] and "val_accuracy" not in rows[0]
    greedy = [(served, t) for served, t in server.temperatures if t == 0.0]
    assert greedy and {served for served, _ in greedy} == {ck[2]}
    assert result.best_checkpoint == str(tmp_path / "run" / "ckpt-2")
    meta = json.loads((tmp_path / "run" / "ckpt-2" / "maestro.json").read_text())
    assert meta["metrics"]["val_accuracy"] == rows[-1]["val_accuracy"] and meta["policy"]["backend"] == "openai"

    # the API key is in no spec and no file of the run
    assert specs and all(s.policy_spec["kind"] == "served" for s in specs)
    assert KEY not in json.dumps([s.policy_spec for s in specs])
    assert not any(KEY.encode() in f.read_bytes() for f in (tmp_path / "run").rglob("*") if f.is_file())


def test_policy_section_is_typed_and_checked(tmp_path):
    assert build(PolicyConfig, {}, section="policy") == PolicyConfig() and not PolicyConfig().served
    cases = [({"backend": "vllm"}, "backend"),
             ({"backend": "openai", "base_url": "http://x/v1"}, "checkpoint"),
             ({"backend": "openai", "checkpoint": "c"}, "base_url"),
             ({"base_url": "http://x/v1"}, "base_url"),  # set, but the transformers backend would ignore it
             ({"checkpoint": ""}, "checkpoint"),
             ({"backend": "openai", "checkpoint": "c", "base_url": "u", "record_tokens": False}, "record_tokens"),
             ({"backend": "openai", "checkpoint": "c", "base_url": "u", "sync": "restart"}, "sync"),
             ({"backend": "openai", "checkpoint": "c", "base_url": "u", "max_tokens": 0}, "max_tokens"),
             ({"backend": "openai", "checkpoint": "c", "base_url": "u", "api_key": "sk-x"}, "api_key")]
    for values, name in cases:
        with pytest.raises(ConfigError, match=f"field '{name}'.*Fix: "):
            build(PolicyConfig, values, source="run.yaml", section="policy")
    # the GPU config's section builds, agrees with its train section, and maps onto OpenAIPolicy
    raw = yaml.safe_load((ROOT / "infra" / "configs" / "train-gpu-paper.yaml").read_text())
    pcfg = build(PolicyConfig, raw["policy"], section="policy")
    tcfg = build(TrainConfig, raw["train"], section="train")
    pcfg.check_train(tcfg)
    kw = pcfg.openai_kwargs(tcfg)
    assert set(kw) <= set(inspect.signature(OpenAIPolicy).parameters)
    assert (kw["temperature"], kw["max_tokens"], kw["tokenizer"]) == (1.0, 1024, "Qwen/Qwen3-VL-4B-Thinking")
    assert kw["vision"] is True  # the Qwen3-VL policy sees the images (tests/test_served_vlm.py)
    with pytest.raises(ConfigError, match="field 'temperature'.*train.temperature"):
        PolicyConfig(backend="openai", checkpoint="c", base_url="u", temperature=0.7).check_train(tcfg)


def test_served_rollout_spec_refuses_unknown_keys(reg, tok_dir):  # noqa: F811
    spec = {"kind": "served", "base_url": "http://127.0.0.1:9/v1", "model": "m", "tokenizer": str(tok_dir)}
    policy = build_rollout_policy(spec, reg)
    assert isinstance(policy, OpenAIPolicy) and policy.model == "m"
    with pytest.raises(ConfigError, match="policy_spec.api_key.*environment"):
        build_rollout_policy({**spec, "api_key": "sk-x"}, reg)
    with pytest.raises(ConfigError, match="policy_spec.base_url"):
        build_rollout_policy({"kind": "served", "model": "m"}, reg)


def test_resume_matches_the_policy_section_too(tmp_path):
    """An unfinished run resumes only under the same train config AND the same `policy:` section:
    a run trained against another server or checkpoint is not continued by accident."""
    from dataclasses import asdict

    from maestro_core.training import choose_run, served_section

    cfg = TrainConfig(iterations=2)
    a = PolicyConfig(backend="openai", checkpoint=str(tmp_path / "ck"), base_url="http://127.0.0.1:8000/v1")
    b = PolicyConfig(backend="openai", checkpoint=str(tmp_path / "other"), base_url="http://127.0.0.1:8000/v1")
    with Store(tmp_path / "home") as store:
        store.record_run("served-a", "train", {"config": json.loads(json.dumps(asdict(cfg), default=str)),
                                               "policy": served_section(a)}, "v", status="running")
        assert choose_run(store, cfg, policy=a)[0] == "served-a"
        assert choose_run(store, cfg, policy=b)[0] != "served-a"
        assert choose_run(store, cfg)[0] != "served-a"  # the in-process policy: a run of its own
    assert served_section(PolicyConfig()) is None and served_section(None) is None
