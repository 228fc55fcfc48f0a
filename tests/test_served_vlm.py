"""Training a served vision-language policy (`policy: {backend: openai, vision: true}`).

The learner is a tiny LLaVA built from a config (tests/test_vlm.py: a CLIP vision tower with
16 image tokens and a 2-layer Llama, CLIP's PIL image processor, no torchvision), saved as a
checkpoint folder and loaded back with AutoModelForImageTextToText + AutoProcessor. Rollouts
are sampled by a real loopback vLLM-like server (tests/openai_server.py) that does what vLLM
does with a VLM: it decodes the messages' image_url data URIs, renders them with the
processor's chat template (image placeholders expanded), and its own copy of the VLM samples
the turn with the pixel values under the request's grammar, returning token ids, logprobs and
the prompt ids. The test shows that the images reach the server, that the recorded prompt ids
are the server's (image tokens included), and that the GRPO update sees the images (the vision
tower moves).
"""

from __future__ import annotations

import base64
import io
import re
import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from maestro_core.config import build  # noqa: E402
from maestro_core.episode import EpisodeRunner, EpisodeConfig, build_messages  # noqa: E402
from maestro_core.errors import ConfigError  # noqa: E402
from maestro_core.experts import build_experts  # noqa: E402
from maestro_core.grpo import GRPOSettings  # noqa: E402
from maestro_core.http_policy import OpenAIPolicy  # noqa: E402
from maestro_core.multimodal import openai_messages  # noqa: E402
from maestro_core.policy import EpisodeView  # noqa: E402
from maestro_core.policy_config import PolicyConfig, load_learner  # noqa: E402
from maestro_core.store import Store  # noqa: E402
from maestro_core.training import TrainConfig, TrainingRun  # noqa: E402
from tests.openai_server import OpenAIServer  # noqa: E402
from tests.test_http_policy import sample_candidates  # noqa: E402
from tests.test_vlm import math_items, reg, tiny_llava, write_png  # noqa: E402,F401  (reg: fixture)

KEY = "sk-vlm-policy-test-SECRET"


def candidates(text: str) -> list[str]:
    """The turns the server's model may write (valid actions and junk that never matches)."""
    q = re.search(r"What is (\d+ \+ \d+)\?", text)
    expr = q.group(1) if q else "1 + 1"
    a, b = (int(x) for x in expr.split(" + "))
    return ["<call>calc@@math</call>", "<call>counter@@text</call>", f"<call>calc@@math: {expr}</call>",
            f"<answer>{a + b}</answer>", f"<answer>{a + b + 1}</answer>", f"The answer is {a + b}"]


class TinyVisionVLLM:
    """A vLLM-like `/v1/chat/completions` reply from a tiny VLM that sees the request's images."""

    def __init__(self, processor, model):
        self.processor, self.model = processor, model
        self.eos = processor.tokenizer.eos_token_id
        self.lock = threading.Lock()
        self.images_per_request: list[int] = []
        self.sent_text: list[str] = []

    def messages(self, body: dict):
        from PIL import Image

        out, n = [], 0
        for m in body["messages"]:
            c = m["content"]
            parts = [{"type": "text", "text": c}] if isinstance(c, str) else []
            for p in ([] if isinstance(c, str) else c):
                if p["type"] == "image_url":
                    head, data = p["image_url"]["url"].split(",", 1)
                    assert head == "data:image/png;base64"
                    parts.append({"type": "image", "image": Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")})
                    n += 1
                else:
                    parts.append({"type": "text", "text": p["text"]})
            out.append({"role": m["role"], "content": parts})
        return out, n

    def __call__(self, body: dict) -> dict:
        msgs, n = self.messages(body)
        text = " ".join(p["text"] for m in msgs for p in m["content"] if p["type"] == "text")
        enc = self.processor.apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=True,
                                                 return_tensors="pt")
        prompt = [int(i) for i in enc["input_ids"][0]]
        vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        rx = (body.get("structured_outputs") or {}).get("regex")
        allowed = [c for c in candidates(text) if rx is None or re.fullmatch(rx, c, flags=re.DOTALL)]
        assert allowed, f"no candidate matches {rx}"
        tok = self.processor.tokenizer
        seqs = [tuple(tok.encode(c, add_special_tokens=False)) + (self.eos,) for c in allowed]
        with self.lock, torch.no_grad():
            self.images_per_request.append(n)
            self.sent_text.append(text)
            out, lps = sample_candidates(
                lambda ids: self.model(input_ids=torch.tensor([ids]), **vision).logits[0, -1], prompt, seqs, body,
                self.eos)
        content = tok.decode(out[:-1] if out and out[-1] == self.eos else out, skip_special_tokens=True)
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                  "logprobs": {"content": [{"token": f"token_id:{t}", "logprob": lp} for t, lp in zip(out, lps)]},
                  "token_ids": list(out)}
        return {"id": "chatcmpl-vlm", "object": "chat.completion", "model": body.get("model"), "choices": [choice],
                "prompt_token_ids": prompt,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(out), "total_tokens": len(prompt) + len(out)}}


@pytest.fixture
def vlm_checkpoint(reg, tmp_path):  # noqa: F811
    model, processor, prefix = tiny_llava(reg)
    path = tmp_path / "init"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, prefix


def test_openai_messages_put_the_images_in_place_of_the_descriptors(reg, tmp_path):  # noqa: F811
    item = math_items(tmp_path, n=1)[0]
    msgs = build_messages(reg, item)
    out = openai_messages(msgs, item.images)
    assert out[0] == msgs[0]
    parts = out[1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "[image 1" not in parts[1]["text"] and item.question in parts[1]["text"]
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1])))
    assert img.size == Image.open(item.images[0]).size
    # an image that is not the item's (another size than the descriptor) is refused with the fix
    other = write_png(tmp_path / "other.png", (7, 7), (0, 0, 0))
    with pytest.raises(ConfigError, match="image 1 is 7x7 but the prompt describes it"):
        openai_messages(msgs, [other])


async def test_served_vlm_gets_the_images_and_the_ids_are_the_servers(reg, vlm_checkpoint, tmp_path):  # noqa: F811
    path, _ = vlm_checkpoint
    model, processor = load_learner(path, vision=True)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and hasattr(processor, "image_processor")
    server = TinyVisionVLLM(processor, model)
    items = math_items(tmp_path, n=2)
    with OpenAIServer(completion=server) as srv:
        policy = OpenAIPolicy(srv.base_url, "maestro-policy", reg, tokenizer=str(path), vision=True, seed=1,
                              max_tokens=32, backoff_s=0.01)
        trajs = await EpisodeRunner(reg, build_experts(reg), policy, config=EpisodeConfig(max_turns=2)).run(
            items, group_size=2, run_id="sv", iteration=0)
        # a text-only client of the same server sends the descriptors, not the images
        text_only = OpenAIPolicy(srv.base_url, "maestro-policy", reg, tokenizer=processor.tokenizer, max_tokens=32,
                                 backoff_s=0.01, record_tokens=False)
        await text_only.act(build_messages(reg, items[0]), EpisodeView("t", 0, 2, images=items[0].images))
        # vision without images in the view: refused with the fix, nothing sent
        sent = srv.requests
        with pytest.raises(ConfigError, match="EpisodeView carries none"):
            await policy.act(build_messages(reg, items[0]), EpisodeView("none", 0, 2))
        assert srv.requests == sent
        await policy.aclose()
        await text_only.aclose()
    image_id = processor.image_token_id
    assert server.images_per_request[:-1] == [1] * (len(server.images_per_request) - 1)
    assert server.images_per_request[-1] == 0 and "[image 1: " in server.sent_text[-1]
    assert not any("[image 1: " in t for t in server.sent_text[:-1])
    assert policy.stats.context_checks == sum(len(t.steps) for t in trajs) and policy.stats.context_mismatches == 0
    for t in trajs:
        assert t.prompt_ids.count(image_id) == 16  # the 32x32 CLIP input: 4x4 patches
        assert len(t.env_mask()) == len(t.completion_ids()) == len(t.completion_logprobs())
    with pytest.raises(ConfigError, match="processor"):
        OpenAIPolicy("http://127.0.0.1:9/v1", "m", reg, tokenizer=processor.tokenizer, vision=True)


def test_training_a_served_vlm_updates_with_the_images(reg, vlm_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    path, prefix = vlm_checkpoint
    monkeypatch.setenv("MAESTRO_API_KEY", KEY)
    server_model, server_processor = load_learner(path, vision=True)
    server = TinyVisionVLLM(server_processor, server_model)
    items = math_items(tmp_path, n=2)
    cfg = TrainConfig(iterations=1, prompts_per_iteration=2, max_turns=2, max_turn_tokens=32, eval_every=1,
                      val_items=2, temperature=1.0, seed=3, question_noise_share=0.0, budget_share=0.0,
                      grpo=GRPOSettings.cpu_profile(num_generations=4, per_device_train_batch_size=8, temperature=1.0))
    with OpenAIServer(completion=server, api_key=KEY) as srv, Store(tmp_path / "home") as store:
        pcfg = build(PolicyConfig, {"backend": "openai", "checkpoint": str(path), "base_url": srv.base_url,
                                    "vision": True, "sync": "none", "backoff_s": 0.01}, section="policy")
        run = TrainingRun(reg, items, items, store=store, experts=build_experts(reg), config=cfg,
                          out_dir=tmp_path / "run", run_id="v1", log=lambda s: None, policy=pcfg)
        assert type(run.model).__name__ == "LlavaForConditionalGeneration"
        before = {n: p.detach().clone() for n, p in run.model.named_parameters() if n.startswith(prefix)}
        assert before
        run.collect(0)
        assert run.ingest(0) == 2 * 4
        trajs = store.trajectories("v1", 0)
        row = run.update(0)
        result = run.finish()
    assert server.images_per_request and set(server.images_per_request) == {1}
    assert all(t.prompt_ids.count(server_processor.image_token_id) == 16 for t in trajs)
    assert len({t.reward for t in trajs}) > 1, "the group rewards are all equal: no advantage to learn from"
    moved = [n for n, p in run.model.named_parameters() if n in before and not torch.equal(p.cpu(), before[n].cpu())]
    assert moved, "the vision tower did not move: the update's forward did not see the images"
    assert row["val_accuracy"] is not None and result.best_checkpoint is not None
    # the new checkpoint is a VLM checkpoint: it loads back with its processor
    again, proc = load_learner(tmp_path / "run" / "ckpt-1", vision=True)
    assert type(again).__name__ == "LlavaForConditionalGeneration" and hasattr(proc, "image_processor")
    # evaluated in process (maestro eval / ask): the checkpoint's policy is a VLMPolicy that sees the images
    import asyncio

    from maestro_core.checkpoints import load_checkpoint_policy
    from maestro_core.multimodal import VLMPolicy

    greedy = load_checkpoint_policy(tmp_path / "run" / "ckpt-1", reg)
    assert isinstance(greedy, VLMPolicy) and greedy.checkpoint_id == "v1/ckpt-1"
    evald = asyncio.run(EpisodeRunner(reg, build_experts(reg), greedy, config=EpisodeConfig(max_turns=2)).run(
        items, run_id="ev", iteration=0))
    assert all(t.prompt_ids.count(server_processor.image_token_id) == 16 and t.steps for t in evald)
    # vision is a served-policy option: the in-process CPU policy refuses it with the fix
    with pytest.raises(ConfigError, match="vision"):
        PolicyConfig(backend="transformers", vision=True)
