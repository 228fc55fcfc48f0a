"""The vision-language policy path: multimodal chat messages, VLMPolicy rollouts, GRPO with images.

The message tests always run. The rollout + update tests build a tiny randomly initialised VLM
from a config (no hub): LLaVA (CLIP vision tower + Llama, CLIP's PIL image processor) runs on
CPU; the Qwen2-VL variant needs torchvision for its processor (its video processor), which the
CPU environment must not have, so it runs in the GPU environment and is skipped here.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from maestro_core.dataset import Item  # noqa: E402
from maestro_core.episode import EpisodeConfig, EpisodeRunner, build_messages  # noqa: E402
from maestro_core.errors import ConfigError  # noqa: E402
from maestro_core.experts import build_experts  # noqa: E402
from maestro_core.grpo import (GRPOSettings, group_dataset, group_key, grpo_update, make_rollout_func,  # noqa: E402
                               prompt_group_key)
from maestro_core.multimodal import VLMPolicy, multimodal_messages, split_descriptors, text_parts  # noqa: E402
from maestro_core.policy import EpisodeView, Policy, ScriptedPolicy  # noqa: E402
from maestro_core.tokenizer import policy_corpus, policy_extra_tokens, train_policy_tokenizer  # noqa: E402
from tests.conftest import python_only_registry  # noqa: E402

NO_TORCHVISION = ("Qwen2-VL processors need torchvision (their video processor), which the CPU environment must not "
                  "have; runs in the GPU environment")


def vlm_template(image_markup: str) -> str:
    """The policy tokenizer's chat template (tokenizer.CHAT_TEMPLATE) over string or part-list
    contents, an image part rendered as `image_markup` (the processor expands it)."""
    return ("{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' }}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image_markup +
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
            "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


@pytest.fixture(scope="module")
def reg():
    return python_only_registry()


def write_png(path, size, color):
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return str(path)


def image_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def expected_image_tokens(processor, path):
    """transformers' own count of placeholder tokens for an image of this size."""
    w, h = image_size(path)
    return processor._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"][0]


def math_items(tmp_path, n=2):
    return [Item(id=f"v{i}", benchmark="math", question=f"What is {i + 2} + 3?", answer=str(i + 5), scorer="numeric",
                 images=(write_png(tmp_path / f"v{i}.png", (40 + 8 * i, 30), (40 * i, 200, 90)),))
            for i in range(n)]


# ---------------------------------------------------------------------------------------
# multimodal chat messages (always run)
# ---------------------------------------------------------------------------------------


def test_multimodal_messages_parts_order_and_no_descriptors(reg, tmp_path):
    a = write_png(tmp_path / "a.png", (64, 48), (255, 0, 0))
    b = write_png(tmp_path / "b.png", (20, 10), (0, 0, 255))
    item = Item(id="q", benchmark="charts", question="Which bar is taller?", answer="A", scorer="exact", images=(a, b))
    msgs = build_messages(reg, item, cost_budget=0.5, cost_lambda=0.3)
    assert "[image 1: 64x48]" in msgs[1]["content"] and "[image 2: 20x10]" in msgs[1]["content"]
    expected = "\n".join(line for line in msgs[1]["content"].split("\n") if not line.startswith("[image "))
    assert expected.startswith("Question: Which bar is taller?\n") and expected.endswith("\nBudget: $0.5")
    mm = multimodal_messages(msgs, item.images)
    assert [m["role"] for m in mm] == ["system", "user"]
    assert mm[0]["content"] == [{"type": "text", "text": msgs[0]["content"]}]
    parts = mm[1]["content"]
    assert parts[:2] == [{"type": "image", "image": a}, {"type": "image", "image": b}]
    assert parts[2] == {"type": "text", "text": expected}
    assert len(parts) == 3 and msgs[1]["content"].startswith("Question:")  # the input is not modified

    # later turns and observations become text parts; PIL images are accepted as they are
    from PIL import Image

    pil = Image.new("RGB", (64, 48)), Image.new("RGB", (20, 10))
    convo = msgs + [{"role": "assistant", "content": "<answer>A</answer>"}, {"role": "tool", "content": "x"}]
    mm2 = multimodal_messages(convo, pil)
    assert mm2[1]["content"][0]["image"] is pil[0] and mm2[1]["content"][1]["image"] is pil[1]
    assert mm2[2:] == text_parts(convo[2:]) == [
        {"role": "assistant", "content": [{"type": "text", "text": "<answer>A</answer>"}]},
        {"role": "tool", "content": [{"type": "text", "text": "x"}]}]

    # no images: the user message is text parts only
    plain = build_messages(reg, Item(id="t", benchmark="math", question="1+1?", answer="2", scorer="numeric"))
    assert multimodal_messages(plain, [])[1]["content"] == [{"type": "text", "text": "Question: 1+1?"}]


# the templates of real VLMs that TRL 1.16 ships (trl/chat_templates), and how each renders an image
REAL_TEMPLATES = {"qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                  "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                  "llava_next": "<image>\n", "smolvlm": "<image>", "idefics3": "<image>"}


@pytest.mark.parametrize("name", sorted(REAL_TEMPLATES))
def test_multimodal_messages_render_with_real_vlm_chat_templates(reg, tmp_path, name):
    """Every message as a list of parts is what these templates need: LLaVA-NeXT, SmolVLM and
    Idefics3 index content[0] / iterate over parts for every role; Qwen accepts both forms."""
    from pathlib import Path

    import trl
    from transformers.utils.chat_template_utils import render_jinja_template

    path = Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja"
    if not path.is_file():
        pytest.skip(f"this TRL does not ship {path.name}")
    template = path.read_text()
    a = write_png(tmp_path / "a.png", (64, 48), (255, 0, 0))
    b = write_png(tmp_path / "b.png", (20, 10), (0, 0, 255))
    item = Item(id="q", benchmark="charts", question="Which bar is taller?", answer="A", scorer="exact", images=(a, b))
    convo = build_messages(reg, item) + [{"role": "assistant", "content": "<call>calc@@math: 1 + 3</call>"},
                                         {"role": "user", "content": "<information>4</information>"}]
    rendered = render_jinja_template([multimodal_messages(convo, item.images)], chat_template=template,
                                     add_generation_prompt=True, bos_token="<s>", eos_token="</s>")[0][0]
    marker = REAL_TEMPLATES[name]
    assert rendered.count(marker) == 2 and "[image" not in rendered
    assert rendered.index(marker) < rendered.index("Question: Which bar is taller?")
    for text in ("calc@@math: 1 + 3", "<information>4</information>", convo[0]["content"][:40]):
        assert text in rendered
    if name.startswith("qwen"):  # string contents render the same as text parts
        plain = render_jinja_template([convo[2:]], chat_template=template, bos_token="<s>", eos_token="</s>")[0][0]
        parts = render_jinja_template([text_parts(convo[2:])], chat_template=template, bos_token="<s>",
                                      eos_token="</s>")[0][0]
        assert plain == parts


def test_split_descriptors_takes_only_the_trailing_block():
    q = "Question: what does [image 1: 2x2] mean?\nsecond line"
    assert split_descriptors(q) == (q, [])
    text, descs = split_descriptors(q + "\n[image 1: 3x4]\n[image 2]\nBudget: $1")
    assert text == q + "\nBudget: $1" and descs == [(1, (3, 4)), (2, None)]
    text, descs = split_descriptors("Question: [image 9]\n[image 1: 5x6]\nCost weight: 0.3\nBudget: $1")
    assert text == "Question: [image 9]\nCost weight: 0.3\nBudget: $1" and descs == [(1, (5, 6))]


def test_multimodal_messages_errors_name_the_image_and_the_fix(reg, tmp_path):
    a = write_png(tmp_path / "a.png", (64, 48), (255, 0, 0))
    item = Item(id="q", benchmark="charts", question="Q?", answer="A", scorer="exact", images=(a,))
    msgs = build_messages(reg, item)
    with pytest.raises(ConfigError, match=r"names 1 image\(s\) but 2 were given.*Fix: pass exactly the images"):
        multimodal_messages(msgs, [a, a])
    with pytest.raises(ConfigError, match="names 1 image"):
        multimodal_messages(msgs, [])
    missing = tmp_path / "gone.png"
    with pytest.raises(ConfigError, match=rf"image 1 \({missing}\) does not exist.*Fix:"):
        multimodal_messages(msgs, [str(missing)])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ConfigError, match=r"bad\.png is not a readable image.*Fix: replace the file"):
        multimodal_messages(msgs, [str(bad)])
    other = write_png(tmp_path / "other.png", (10, 10), (0, 0, 0))
    with pytest.raises(ConfigError, match=r"image 1 is 10x10 but the prompt describes it as 64x48"):
        multimodal_messages(msgs, [other])


async def test_episode_runner_passes_the_item_images_in_the_view(reg, tmp_path):
    """The runner hands every act the item's image files (EpisodeView.images): what VLMPolicy binds."""
    a = write_png(tmp_path / "a.png", (8, 6), (255, 0, 0))
    b = write_png(tmp_path / "b.png", (4, 4), (0, 0, 255))
    items = [Item(id="img", benchmark="charts", question="Which bar?", answer="A", scorer="exact", images=(a, b)),
             Item(id="txt", benchmark="math", question="1+1?", answer="2", scorer="numeric")]
    seen: list[tuple[str, EpisodeView]] = []

    def script(question, observations, view):
        seen.append((question, view))
        return "<call>calc@@math: 1+1</call>" if view.turn == 0 else "<answer>A</answer>"

    runner = EpisodeRunner(reg, build_experts(reg), ScriptedPolicy(script), config=EpisodeConfig(max_turns=2))
    trajs = await runner.run(items, group_size=2, run_id="spy")
    assert [len(t.steps) for t in trajs] == [2, 2, 2, 2]
    assert sorted((q, v.sample_index, v.turn) for q, v in seen) == sorted(
        (it.question, s, t) for it in items for s in range(2) for t in range(2))
    for q, v in seen:
        assert v.images == ((a, b) if q == "Which bar?" else ()) and isinstance(v.images, tuple)
    assert EpisodeView("e", 0, 0).images == ()  # views built by hand carry none


def test_vlm_policy_needs_a_processor(reg):
    tok = train_policy_tokenizer(policy_corpus(reg), extra_tokens=policy_extra_tokens(reg))
    with pytest.raises(ConfigError, match=r"not a processor.*Fix: pass the model's AutoProcessor"):
        VLMPolicy(None, tok, reg)


def test_group_dataset_with_images_and_prompt_keys(tmp_path):
    a = write_png(tmp_path / "a.png", (12, 9), (1, 2, 3))
    keys = [group_key(0, "v0"), group_key(0, "t1")]
    ds = group_dataset(keys, images={"v0": (a,), "t1": ()})
    rows = list(ds)
    assert rows[0]["prompt"] == [{"role": "user", "content": keys[0]}]
    assert rows[0]["images"][0].size == (12, 9) and rows[0]["images"][0].mode == "RGB" and rows[1]["images"] == []
    # TRL hands the rollout_func the prompts in multimodal form; the group key is the text part
    from trl.data_utils import prepare_multimodal_messages

    mm = prepare_multimodal_messages(rows[0]["prompt"], images=rows[0]["images"])
    assert prompt_group_key(mm) == keys[0] and prompt_group_key(keys[1]) == keys[1]
    with pytest.raises(ConfigError, match=r"no images given for item 'v0'.*Fix: pass images="):
        group_dataset(keys, images={"t1": ()})
    assert list(group_dataset(keys)) == [{"prompt": k} for k in keys]  # text-only rows unchanged


# ---------------------------------------------------------------------------------------
# tiny VLMs built from configs
# ---------------------------------------------------------------------------------------


def policy_tokenizer(reg, vision_tokens):
    tok = train_policy_tokenizer(policy_corpus(reg), extra_tokens=(*policy_extra_tokens(reg), *vision_tokens))
    return tok


def tiny_llava(reg):
    """LLaVA: a 1-layer CLIP vision tower (32x32 input, 8x8 patches: 16 image tokens) and a 2-layer
    Llama; CLIP's PIL image processor (no torchvision)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = policy_tokenizer(reg, ["<image>"])
    tok.chat_template = None  # as in many VLM checkpoints, only the processor has the chat template
    template = vlm_template("{{ '<image>' }}")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=template)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, tie_word_embeddings=True),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, projector_hidden_act="gelu")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval(), processor, "model.vision_tower."


def _image_only_qwen2_vl_processor_class():
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnly(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor (the one part that needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnly


def _ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=None):
    return _image_only_qwen2_vl_processor_class()(image_processor, tokenizer, chat_template=chat_template)


def tiny_qwen2_vl(reg, image_only: bool = False, *, hidden: int = 64, layers: int = 2, heads: int = 2,
                  vision_depth: int = 1, vision_dim: int = 32):
    """Qwen2-VL: a 1-block vision tower (14x14 patches merged 2x2) and a 2-layer text model with
    multimodal RoPE; a 56x56 image is 4 image tokens. `image_only`: a processor with the PIL
    image processor and no video processor, which needs no torchvision (runs on CPU). The sizes
    are for benchmarks/vlm_sampling.py."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok = policy_tokenizer(reg, ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"])
    template = vlm_template("{{ '<|vision_start|><|image_pad|><|vision_end|>' }}")
    tok.chat_template = None
    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    if image_only:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        processor = _ImageOnlyQwen2VLProcessor(Qwen2VLImageProcessorPil(size=size), tok, chat_template=template)
    else:
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(size=size), tokenizer=tok,
                                     video_processor=Qwen2VLVideoProcessor(size=size), chat_template=template)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                                                      "<|video_pad|>")}
    half = hidden // heads // 2  # the rotary half of a head: the three multimodal RoPE sections add up to it
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [half // 4, half * 3 // 8,
                                                                                     half - half // 4 - half * 3 // 8],
                                          "rope_theta": 10000.0},
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, mlp_ratio=2, num_heads=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(cfg).eval(), processor, "model.visual."


# ---------------------------------------------------------------------------------------
# one rollout and one update step
# ---------------------------------------------------------------------------------------


def _teacher_forced_logprobs(model, processor, policy, prompt_msgs, images, ctx, ids, temperature):
    """The constrained sampling logprobs of `ids` after `ctx`, recomputed in one forward pass."""
    from maestro_core.multimodal import load_image

    vision = processor.apply_chat_template(multimodal_messages(prompt_msgs, [load_image(p) for p in images]),
                                           tokenize=True, return_dict=True, add_generation_prompt=True,
                                           return_tensors="pt")
    dev = next(model.parameters()).device
    kw = {k: v.to(dev) for k, v in vision.items() if k not in ("input_ids", "attention_mask")}
    full = torch.tensor([list(ctx) + list(ids)], device=dev)
    for k in ("mm_token_type_ids", "token_type_ids"):
        if k in kw:
            kw[k] = torch.tensor(processor.create_mm_token_type_ids(full.tolist()), device=dev)
    with torch.no_grad():
        logits = model(input_ids=full, **kw).logits[0, len(ctx) - 1:-1].float()
    st, out = policy.constraint.start(), []
    for k, t in enumerate(ids):
        lp = torch.log_softmax(logits[k].masked_fill(~st.mask().to(logits.device), float("-inf")) / temperature, -1)[t]
        out.append(float(lp))
        st.advance(t)
    return out


async def _rollout_and_update(reg, tmp_path, model, processor, vision_prefix, n_image_tokens):
    items, G, temperature = math_items(tmp_path), 2, 1.0
    policy = VLMPolicy(model, processor, reg, temperature=temperature, max_turn_tokens=12, seed=3)
    assert isinstance(policy, Policy) and policy.model is model
    image_id = processor.image_token_id
    assert image_id in policy.banned_ids

    # the prompt: the processor's ids with the placeholders expanded; observations and turns as text
    msgs = build_messages(reg, items[0])
    prompt = policy.encode_prompt(msgs)
    assert prompt.count(image_id) == n_image_tokens == expected_image_tokens(processor, items[0].images[0])
    rendered = processor.apply_chat_template(multimodal_messages(msgs, items[0].images), tokenize=False,
                                             add_generation_prompt=True)
    assert processor.tokenizer.decode(list(prompt), skip_special_tokens=False).replace(
        processor.image_token * n_image_tokens, processor.image_token) == rendered
    obs = {"role": "user", "content": "<information>5 (confidence 1.00)</information>"}
    assert processor.tokenizer.decode(list(policy.encode_observation(obs)), skip_special_tokens=False) == \
        f"<|user|>{obs['content']}<|end|><|assistant|>"

    # an image that could not be read when the prompt was built has no size: refused with the fix
    unsized = [msgs[0], {"role": "user", "content": msgs[1]["content"].split("\n[image")[0] + "\n[image 1]"}]
    with pytest.raises(ConfigError, match=r"image 1 of the prompt has no size.*Fix: replace"):
        policy.encode_prompt(unsized)

    # an episode with neither bound images nor images in its view is refused with the fix
    with pytest.raises(ConfigError, match=r"none were bound.*carries none.*Fix: run the episode with EpisodeRunner"):
        await policy.act(msgs, EpisodeView("unbound", 0, 0))
    # bound by hand (callers that drive act themselves) or from the view, it runs
    policy.begin_episode("by-hand", items[0].images)
    await policy.act(msgs, EpisodeView("by-hand", 0, 0))
    await policy.act(msgs, EpisodeView("by-view", 0, 0, images=tuple(items[0].images)))

    # one rollout: G episodes per item, each episode's images taken from the runner's EpisodeView
    runner = EpisodeRunner(reg, build_experts(reg), policy, config=EpisodeConfig(max_turns=2))
    trajs = await runner.run(items, group_size=G, run_id="vlm", iteration=0)
    assert len(trajs) == len(items) * G
    eos = processor.tokenizer.eos_token_id
    for item, tr in zip([it for it in items for _ in range(G)], trajs):
        assert tr.prompt_ids == policy.encode_prompt(build_messages(reg, item))
        assert tr.prompt_ids.count(image_id) == expected_image_tokens(processor, item.images[0])
        ids, mask = tr.completion_ids(), tr.env_mask()
        assert len(mask) == len(ids) == len(tr.completion_logprobs()) and image_id not in ids
        pos = 0
        for s in tr.steps:
            assert s.action in ("call", "answer") and s.completion_ids[-1] == eos
            assert mask[pos:pos + len(s.completion_ids)] == [1] * len(s.completion_ids)
            pos += len(s.completion_ids)
            assert mask[pos:pos + len(s.observation_ids)] == [0] * len(s.observation_ids)
            pos += len(s.observation_ids)
        assert pos == len(mask)

    # the recorded logprobs are the model's with the real image (teacher-forced), not without it
    tr, item = trajs[0], items[0]
    first = tr.steps[0]
    exact = _teacher_forced_logprobs(model, processor, policy, build_messages(reg, item), item.images,
                                     tr.prompt_ids, first.completion_ids, temperature)
    tol = 1e-4 if next(model.parameters()).device.type == "cpu" else 2e-3
    assert max(abs(a - b) for a, b in zip(exact, first.logprobs)) < tol
    other = write_png(tmp_path / "other.png", image_size(item.images[0]), (0, 0, 0))
    blind = _teacher_forced_logprobs(model, processor, policy, build_messages(reg, item), [other],
                                     tr.prompt_ids, first.completion_ids, temperature)
    assert max(abs(a - b) for a, b in zip(blind, first.logprobs)) > 10 * tol

    # one GRPO step on the stored episodes with their images: rewards differ within each group
    trajs = [dataclasses.replace(t, reward=float(t.sample_index)) for t in trajs]
    settings = GRPOSettings.cpu_profile(num_generations=G, temperature=temperature, num_iterations=1,
                                        scale_rewards="group", per_device_train_batch_size=2)
    vision_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(vision_prefix)}
    assert vision_before
    images = {it.id: it.images for it in items}
    res = grpo_update(model, processor, trajs, settings, str(tmp_path / "grpo"), images=images)
    assert res.params_changed and res.loss is not None
    # the vision tower learns only if the update's forward saw the pixels
    changed = [n for n, p in model.named_parameters()
               if n in vision_before and not torch.equal(p.cpu(), vision_before[n].cpu())]
    assert changed, "no vision-tower parameter moved: the update's forward did not get the images"

    # the rollout_func reads the group key back from TRL's multimodal prompts
    from trl.data_utils import prepare_multimodal_messages

    row = list(group_dataset([group_key(0, items[0].id)], images))[0]
    fn = make_rollout_func(trajs, eos_token_ids=[eos])
    out = fn([prepare_multimodal_messages(row["prompt"], images=row["images"])] * G, None)
    assert out["prompt_ids"][0] == list(trajs[0].prompt_ids)
    assert len(out["env_mask"][1]) == len(out["completion_ids"][1])


async def test_llava_vlm_policy_rollout_and_grpo_step(reg, tmp_path):
    """LLaVA (CLIP + Llama) built from a config: runs on CPU."""
    model, processor, vision_prefix = tiny_llava(reg)
    await _rollout_and_update(reg, tmp_path, model, processor, vision_prefix, n_image_tokens=16)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason=NO_TORCHVISION)
async def test_qwen2_vl_policy_rollout_and_grpo_step(reg, tmp_path):
    """Qwen2-VL (multimodal RoPE, image grids, mm_token_type_ids) built from a config."""
    model, processor, vision_prefix = tiny_qwen2_vl(reg)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(dev)
    # a 40x30 image is scaled up to the minimum area, 56x84: a 4x6 patch grid merged 2x2 = 6 tokens
    await _rollout_and_update(reg, tmp_path, model, processor, vision_prefix, n_image_tokens=6)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
async def test_batched_vlm_sampling_matches_one_sequence_at_a_time(reg, tmp_path, arch):
    """Greedy episodes sampled in batches (left padding, the batch's images concatenated in its
    prefill; for Qwen2-VL, multimodal RoPE positions per row) give the same tokens and logprobs
    as one sequence per forward pass, over images of different sizes (other image-token counts,
    so the rows are padded) and an item with no image."""
    if arch == "llava":
        model, processor, _ = tiny_llava(reg)
    else:  # the image-only processor runs on CPU; the full one where torchvision is installed
        model, processor, _ = tiny_qwen2_vl(reg, image_only=importlib.util.find_spec("torchvision") is None)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [(40, 30), (120, 60), (56, 112), (90, 90)]
    items = [Item(id=f"b{i}", benchmark="math", question=f"What is {i} + 4?", answer=str(i + 4), scorer="numeric",
                  images=(write_png(tmp_path / f"b{i}.png", wh, (60 * i, 120, 200 - 40 * i)),))
             for i, wh in enumerate(sizes)]
    items.append(Item(id="plain", benchmark="math", question="What is 2 + 2?", answer="4", scorer="numeric"))
    if arch == "qwen2_vl":
        counts = {expected_image_tokens(processor, it.images[0]) for it in items if it.images}
        assert len(counts) > 1, counts  # the rows really are of different lengths

    async def sample(max_batch_size):
        policy = VLMPolicy(model, processor, reg, temperature=0.0, max_turn_tokens=12,
                           max_batch_size=max_batch_size, batch_window_s=0.05)
        runner = EpisodeRunner(reg, build_experts(reg), policy, config=EpisodeConfig(max_turns=2))
        return await runner.run(items, group_size=2, run_id="batch", iteration=0), policy.stats

    one, one_stats = await sample(1)
    many, many_stats = await sample(16)
    assert max(one_stats.batch_sizes) == 1 and max(many_stats.batch_sizes) >= len(items)
    tol = 1e-4 if next(model.parameters()).device.type == "cpu" else 2e-3
    for a, b in zip(one, many):
        assert a.item_id == b.item_id and a.prompt_ids == b.prompt_ids
        assert [s.completion_ids for s in a.steps] == [s.completion_ids for s in b.steps]
        assert max(abs(x - y) for x, y in zip(a.completion_logprobs(), b.completion_logprobs())) < tol
