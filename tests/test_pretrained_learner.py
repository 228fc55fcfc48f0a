"""Training a pretrained model in process (`policy: {backend: transformers, checkpoint: ...}`).

The learner is loaded from a checkpoint folder with transformers, as a hub id would be, and
samples its own rollouts in process (spec kind "learned"), no server: a tiny Llama saved with
its own tokenizer for the text path, and the tiny LLaVA of tests/test_vlm.py (CLIP's PIL image
processor, no torchvision) with `vision: true`, whose rollouts and update see the pixels.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from maestro_core.checkpoints import load_checkpoint_policy  # noqa: E402
from maestro_core.config import build  # noqa: E402
from maestro_core.errors import ConfigError  # noqa: E402
from maestro_core.experts import build_experts  # noqa: E402
from maestro_core.grpo import GRPOSettings  # noqa: E402
from maestro_core.lm_policy import LMPolicy  # noqa: E402
from maestro_core.multimodal import VLMPolicy  # noqa: E402
from maestro_core.policy_config import PolicyConfig  # noqa: E402
from maestro_core.policy_model import build_tiny_model  # noqa: E402
from maestro_core.store import Store  # noqa: E402
from maestro_core.training import TrainConfig, TrainingRun  # noqa: E402
from tests.test_http_policy import ITEMS, tok, tok_dir  # noqa: E402,F401  (fixtures)
from tests.test_served_training import fingerprint  # noqa: E402
from tests.test_vlm import math_items, reg, tiny_llava  # noqa: E402,F401  (reg: fixture)


def cfg(**kw) -> TrainConfig:
    base = dict(iterations=2, prompts_per_iteration=2, max_turns=2, max_turn_tokens=32, eval_every=2, val_items=2,
                temperature=1.0, seed=3, question_noise_share=0.0, budget_share=0.0,
                grpo=GRPOSettings.cpu_profile(num_generations=4, per_device_train_batch_size=8, temperature=1.0))
    base.update(kw)
    return TrainConfig(**base)


def test_a_pretrained_text_model_trains_in_process_and_resumes(reg, tok, tmp_path):  # noqa: F811
    init = tmp_path / "init"
    tok.save_pretrained(init)
    build_tiny_model(tok, hidden=64, layers=2, heads=2, seed=0).save_pretrained(init)
    pcfg = build(PolicyConfig, {"backend": "transformers", "checkpoint": str(init)}, section="policy")
    assert pcfg.pretrained and not pcfg.served
    c = cfg()
    with Store(tmp_path / "home") as store:
        run = TrainingRun(reg, ITEMS, ITEMS[:2], store=store, experts=build_experts(reg), config=c,
                          out_dir=tmp_path / "run", run_id="p1", log=lambda s: None, policy=pcfg)
        initial = fingerprint(run.model)
        specs = []
        for it in range(c.iterations):
            specs += run.chunk_specs(it)
            run.collect(it)
            assert run.ingest(it) == 2 * 4
            row = run.update(it)
        trajs = {it: store.trajectories("p1", it) for it in range(2)}
        again = TrainingRun(reg, ITEMS, ITEMS[:2], store=store, experts=build_experts(reg), config=c,
                            out_dir=tmp_path / "run", run_id="p1", log=lambda s: None, policy=pcfg)
        assert again.start == 2 and fingerprint(again.model) == fingerprint(run.model)
    assert {s.policy_spec["kind"] for s in specs} == {"learned"}
    for it, ts in trajs.items():  # sampled in process by ckpt-it, in the checkpoint's own tokenizer
        assert len(ts) == 8 and {t.checkpoint_id for t in ts} == {f"p1/ckpt-{it}"}
        assert all(t.steps and t.steps[0].completion_ids[-1] == tok.eos_token_id for t in ts)
        assert all(tok.decode(t.prompt_ids).count("Question:") == 1 for t in ts)
    assert fingerprint(run.model) != initial and "val_accuracy" in row
    meta = json.loads((tmp_path / "run" / "ckpt-2" / "maestro.json").read_text())
    assert meta["policy"]["checkpoint"] == str(init) and meta["policy"]["backend"] == "transformers"
    lm = load_checkpoint_policy(tmp_path / "run" / "ckpt-2", reg)
    assert isinstance(lm, LMPolicy)  # rollouts and evaluation sample on the GPU when there is one
    assert next(lm.model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_pretrained_vlm_trains_in_process_with_the_images(reg, tmp_path):  # noqa: F811
    model, processor, prefix = tiny_llava(reg)
    init = tmp_path / "init"
    model.save_pretrained(init)
    processor.save_pretrained(init)
    items = math_items(tmp_path, n=2)
    pcfg = build(PolicyConfig, {"backend": "transformers", "checkpoint": str(init), "vision": True}, section="policy")
    c = cfg(iterations=1, eval_every=1)
    with Store(tmp_path / "home") as store:
        run = TrainingRun(reg, items, items, store=store, experts=build_experts(reg), config=c,
                          out_dir=tmp_path / "run", run_id="v1", log=lambda s: None, policy=pcfg)
        assert type(run.model).__name__ == "LlavaForConditionalGeneration"
        before = {n: p.detach().clone() for n, p in run.model.named_parameters() if n.startswith(prefix)}
        run.collect(0)
        assert run.ingest(0) == 2 * 4
        trajs = store.trajectories("v1", 0)
        row = run.update(0)
    assert all(t.prompt_ids.count(processor.image_token_id) == 16 for t in trajs)  # the pixels were in context
    assert len({t.reward for t in trajs}) > 1, "the group rewards are all equal: no advantage to learn from"
    moved = [n for n, p in run.model.named_parameters() if n in before and not torch.equal(p.cpu(), before[n].cpu())]
    assert moved, "the vision tower did not move: the update's forward did not see the images"
    assert row["val_accuracy"] is not None
    assert isinstance(load_checkpoint_policy(tmp_path / "run" / "ckpt-1", reg), VLMPolicy)


def test_the_in_process_policy_section_is_checked():
    with pytest.raises(ConfigError, match="vision is set without a checkpoint"):
        PolicyConfig(backend="transformers", vision=True)
    with pytest.raises(ConfigError, match="base_url"):
        PolicyConfig(backend="transformers", checkpoint="x", base_url="http://h/v1")
    with pytest.raises(ConfigError, match="cost_prior"):
        PolicyConfig(backend="transformers", checkpoint="x").check_train(TrainConfig(cost_prior=2.0))
    PolicyConfig(backend="transformers").check_train(TrainConfig(cost_prior=2.0))  # the CPU policy: fine


def test_in_process_policies_sample_where_maestro_policy_device_says(monkeypatch):
    from maestro_core.policy_model import DEVICE_ENV, inference_device

    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert inference_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert inference_device() == "cpu"
    monkeypatch.setenv(DEVICE_ENV, "gpu0")
    with pytest.raises(ConfigError, match="is not a torch device") as e:
        inference_device()
    assert "cuda:N" in e.value.fix
    monkeypatch.setenv(DEVICE_ENV, f"cuda:{torch.cuda.device_count()}")  # one past the last
    with pytest.raises(ConfigError, match="CUDA device"):
        inference_device()
