"""The vision-language policy: the prompt's images go to the model itself, not as descriptors.

    msgs = multimodal_messages(build_messages(registry, item), item.images)   # HF multimodal chat format
    policy = VLMPolicy(model, processor, registry, temperature=1.0, max_turn_tokens=24)
    trajs = await EpisodeRunner(registry, experts, policy).run(items, group_size=8, run_id="r1", iteration=0)
    grpo_update(policy.model, processor, trajs, settings, out_dir, images={it.id: it.images for it in items})

The text-only policy (LMPolicy, the CPU default) sees each image as a neutral descriptor
`[image i: WxH]` in the user message (episode.build_messages). A vision-language model (VLM)
sees the images: `multimodal_messages` turns the runner's text messages into the Hugging Face
multimodal chat format (every content a list of parts; the user message's image parts, in
order, then its text without the descriptors), which `processor.apply_chat_template` renders,
expanding each image into the model's image placeholder tokens.

`VLMPolicy` is `LMPolicy` (same grammar-constrained sampling, same exact token ids, logprobs
and env-mask contract, same ChatEncoder framing of observations and turns) with three
differences:
- the prompt's ids are the processor's: `encode_prompt(messages)` renders the prompt with one
  image per descriptor, of the descriptor's size. A processor's number of placeholder tokens
  per image is a function of the image's size only (transformers' own contract:
  `ProcessorMixin._get_num_multimodal_tokens(image_sizes)`), so these ids are those of the real
  images; the first turn of every episode checks it against the real images and raises if not.
- the images of an episode are bound by episode id on its first turn, from the EpisodeView:
  EpisodeRunner passes the item's image files in `view.images`, so nothing has to be bound by
  hand. A caller that drives `act` itself (or wants PIL images) can bind them first with
  `begin_episode(episode_id, images)` or `expect(items, ...)`; an explicit binding wins.
- sampling batches the queued turns as LMPolicy does (left padding, KV cache): each batch's
  prefill gets its rows' pixel values (and image grids, ...) concatenated in row order, as the
  processor batches them; rows whose image inputs have other shapes go in separate batches.
  A model with multimodal RoPE (Qwen-VL class) computes its own positions from the image
  grids and the attention mask at the prefill; each cached step then gets the row's text
  position + its RoPE offset, as transformers' generation does. Every prefill carries the
  images, so the shared system prompt is not prefilled apart (`share_prefix` is off). Image
  placeholder tokens are never sampled (a sampled one would have no image features; TRL
  suppresses them in its own generation for the same reason).

Observations and turns are text and are encoded exactly as ChatEncoder does, with the
processor's chat template. Validation errors are `ConfigError`s that name the image and the fix.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from maestro_core.chat_encoding import ChatEncoder
from maestro_core.dataset import Item, check_image
from maestro_core.errors import ConfigError
from maestro_core.lm_policy import LMPolicy
from maestro_core.policy import EpisodeView
from maestro_core.registry import Registry
from maestro_core.trajectory import episode_id as make_episode_id

# a descriptor as episode.image_descriptor writes it, one line each after the question
_DESCRIPTOR = re.compile(r"\[image (\d+)(?::\s*(\d+)x(\d+))?\]")

ImageLike = Any
"""A path (str or Path) or a PIL image."""

TEXT_ONLY_KEYS = ("input_ids", "attention_mask")
TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")
"""Per-token processor outputs: they follow the ids, so they are rebuilt for every context."""


# ---------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------


def split_descriptors(content: str) -> tuple[str, list[tuple[int, tuple[int, int] | None]]]:
    """(the user message without its image descriptors, [(index, (width, height) or None)]).
    The descriptors are the last block of whole lines `[image i: WxH]` (or `[image i]`) after
    the first line: episode.build_messages writes them after the question and before the lines
    it may add (cost weight, budget), which are kept, as is the question itself."""
    lines = content.split("\n")
    end = next((i for i in range(len(lines) - 1, 0, -1) if _DESCRIPTOR.fullmatch(lines[i])), None)
    if end is None:
        return content, []
    start = end
    while start > 1 and _DESCRIPTOR.fullmatch(lines[start - 1]):
        start -= 1
    descs = []
    for line in lines[start:end + 1]:
        d = _DESCRIPTOR.fullmatch(line)
        descs.append((int(d.group(1)), (int(d.group(2)), int(d.group(3))) if d.group(2) else None))
    return "\n".join(lines[:start] + lines[end + 1:]), descs


def text_parts(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages with every string content as one text part: the form every VLM chat template
    accepts (LLaVA-style templates iterate over parts and do not accept strings; Qwen2-VL's
    accepts both)."""
    out = []
    for m in messages:
        c = m["content"]
        out.append({**m, "content": [{"type": "text", "text": c}] if isinstance(c, str) else list(c)})
    return out


def _user_index(messages: Sequence[Mapping[str, Any]]) -> int:
    for i, m in enumerate(messages):
        if m.get("role") == "user":
            return i
    raise ConfigError("the messages have no user message, so there is nowhere to put the images.",
                      source="multimodal_messages", fix="pass the prompt built by episode.build_messages.")


def _image_size(img: ImageLike, index: int) -> tuple[int, int]:
    """(width, height) of a PIL image or an image file (header only), validated."""
    if hasattr(img, "size") and hasattr(img, "mode"):
        return tuple(img.size)  # type: ignore[return-value]
    path = Path(img)
    if not path.is_file():
        raise ConfigError(f"image {index} ({path}) does not exist.", source="multimodal_messages", field="images",
                          fix="pass the item's images (item.images: absolute paths checked when the dataset "
                              "was loaded), or restore the file.")
    check_image(path, where="multimodal_messages", entry=f"image {index}")
    from PIL import Image

    with Image.open(path) as im:
        return im.width, im.height


def multimodal_messages(messages: Sequence[Mapping[str, Any]], images: Sequence[ImageLike]) -> list[dict[str, Any]]:
    """The runner's text messages in the Hugging Face multimodal chat format.

    The first user message becomes `[{"type": "image", "image": img} for each image, in order]
    + [{"type": "text", "text": its text without the "[image i: WxH]" descriptors}]`; every
    other message becomes `[{"type": "text", "text": content}]` (see `text_parts`). `images`
    are paths or PIL images; their number must equal the descriptors', and an image whose
    descriptor names a size must have that size (a check that the images belong to this
    prompt). A missing or unreadable image file raises ConfigError naming it."""
    out = text_parts(messages)
    u = _user_index(messages)
    content = messages[u]["content"]
    if not isinstance(content, str):
        raise ConfigError("the user message is already in the multimodal (list of parts) format.",
                          source="multimodal_messages", fix="pass the text messages from episode.build_messages.")
    text, descs = split_descriptors(content)
    images = list(images)
    if len(descs) != len(images):
        raise ConfigError(f"the prompt names {len(descs)} image(s) but {len(images)} were given.",
                          source="multimodal_messages", field="images",
                          fix="pass exactly the images of the item the prompt was built from (item.images), in order.")
    for k, ((index, size), img) in enumerate(zip(descs, images), 1):
        if index != k:
            raise ConfigError(f"descriptor {k} is numbered [image {index}].", source="multimodal_messages",
                              fix="build the prompt with episode.build_messages (descriptors numbered 1..n).")
        actual = _image_size(img, k)
        if size is not None and actual != size:
            raise ConfigError(f"image {k} is {actual[0]}x{actual[1]} but the prompt describes it as "
                              f"{size[0]}x{size[1]}.", source="multimodal_messages", field="images",
                              fix="pass the images of the item the prompt was built from (item.images), in order.")
    out[u] = {**messages[u], "content": [{"type": "image", "image": img} for img in images]
              + [{"type": "text", "text": text}]}
    return out


def load_image(path: str | Path, *, index: int = 1):
    """A validated image file as an RGB PIL image (read now, file closed). The policy and the
    GRPO update both load images this way, so the processor sees the same pixels in both."""
    from PIL import Image

    _image_size(str(path), index)
    with Image.open(path) as im:
        return im.convert("RGB")


def image_data_uri(img: ImageLike, *, index: int = 1) -> str:
    """A `data:image/png;base64,...` URI of a validated image file or a PIL image (RGB, PNG):
    how an OpenAI-compatible server (vLLM) takes an image in a chat message."""
    import base64
    import io

    pil = load_image(img, index=index) if isinstance(img, (str, Path)) else img.convert("RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def openai_messages(messages: Sequence[Mapping[str, Any]], images: Sequence[ImageLike], *,
                    uri: Any = None) -> list[dict[str, Any]]:
    """The runner's text messages in the OpenAI chat format with images, for a vision-language
    model behind an OpenAI-compatible server: the first user message becomes
    `[{"type": "image_url", "image_url": {"url": data URI}} for each image] + [{"type": "text",
    "text": its text without the descriptors}]`, in the order and with the checks of
    `multimodal_messages`; every other message keeps its string content. `uri(img, index)`
    makes the data URI (default `image_data_uri`; a caller may cache it)."""
    hf = multimodal_messages(messages, images)
    u = _user_index(messages)
    make = uri or (lambda img, k: image_data_uri(img, index=k))
    out = [dict(m) for m in messages]
    parts, k = [], 0
    for part in hf[u]["content"]:
        if part["type"] == "image":
            k += 1
            parts.append({"type": "image_url", "image_url": {"url": make(part["image"], k)}})
        else:
            parts.append(dict(part))
    out[u] = {**messages[u], "content": parts}
    return out


def placeholder_images(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """One blank RGB image per descriptor of the user message, of the descriptor's size: what
    the processor needs to expand the prompt's image placeholders (their number depends only on
    the sizes)."""
    from PIL import Image

    _, descs = split_descriptors(messages[_user_index(messages)]["content"])
    out = []
    for index, size in descs:
        if size is None:
            raise ConfigError(f"image {index} of the prompt has no size ([image {index}]): it could not be read when "
                              "the prompt was built.", source="VLMPolicy", field="images",
                              fix="replace the item's unreadable image file (dataset.check_image says why) or drop "
                                  "the item.")
        out.append(Image.new("RGB", size))
    return out


# ---------------------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------------------


class ProcessorChatEncoder(ChatEncoder):
    """ChatEncoder over a processor's chat template: text messages are rendered as text parts;
    the prompt is tokenised by the processor with its images (placeholders expanded)."""

    def __init__(self, processor: Any, chat_template_kwargs: Mapping[str, Any] | None = None, cache_size: int = 256):
        self.processor = processor
        super().__init__(processor.tokenizer, chat_template_kwargs, cache_size)

    def render(self, messages, add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(text_parts(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  **self.chat_template_kwargs)

    def processed(self, messages: Sequence[Mapping[str, Any]], images: Sequence[ImageLike]) -> Any:
        """The processor's output (input_ids, pixel_values, ...) for the prompt with these images."""
        image_token = getattr(self.processor, "image_token", None)
        u = _user_index(messages)
        if image_token and any(image_token in str(m["content"]) for m in messages[:u + 1]):
            raise ConfigError(f"the prompt's text contains the image placeholder {image_token!r}, which would be "
                              "taken for an image.", source="VLMPolicy", entry=str(messages[u]["content"])[:60],
                              fix="remove the placeholder from the question text.")
        return self.processor.apply_chat_template(multimodal_messages(messages, images), tokenize=True,
                                                  return_dict=True, add_generation_prompt=True, return_tensors="pt",
                                                  **self.chat_template_kwargs)

    def encode_prompt(self, messages: Sequence[Mapping[str, str]]) -> tuple[int, ...]:
        key = tuple((m["role"], m["content"]) for m in messages)
        ids = self._prompts.get(key)
        if ids is None:
            out = self.processed(messages, placeholder_images(messages))
            ids = tuple(int(i) for i in out["input_ids"][0])
            self._prompts[key] = ids
            if len(self._prompts) > self._cache_size:
                self._prompts.popitem(last=False)
        return ids


# ---------------------------------------------------------------------------------------
# the policy
# ---------------------------------------------------------------------------------------


class _ProcessorTemplateTokenizer:
    """The processor's tokenizer whose chat template is the processor's, applied to text parts:
    what LMPolicy's constructor gets, so that the ChatEncoder it builds (replaced right after by a
    ProcessorChatEncoder) works when the tokenizer has no template of its own, or one that accepts
    only part lists (LLaVA-NeXT, SmolVLM, Idefics3)."""

    def __init__(self, processor: Any):
        self._processor, self._tokenizer = processor, processor.tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, messages, **kwargs: Any) -> Any:
        return self._processor.apply_chat_template(text_parts(messages), **kwargs)


class _VisionContext(list):
    """A context's token ids (a list, as LMPolicy expects) carrying the episode's image inputs
    from `VLMPolicy.context_ids` through LMPolicy's request queue to `VLMPolicy.generate`."""

    vision: dict[str, Any] | None = None


class _VisionForward:
    """The model as LMPolicy.generate calls it, for one batch of left-padded sequences: the
    prefill (no cache yet) gets the batch's image inputs and the per-token modality ids rebuilt
    for the whole context. Positions: a model with multimodal RoPE (Qwen-VL class: it keeps
    `rope_deltas`) computes its own at the prefill from the ids, image grids and attention mask,
    and each cached step gets the row's text position (its unpadded length) + its RoPE delta,
    as transformers' own generation does; any other model gets LMPolicy's positions (0 at each
    row's first token). Placeholder tokens get logit -inf."""

    def __init__(self, model: Any, processor: Any, vision: Mapping[str, Any], token_type_keys: Iterable[str],
                 banned: Sequence[int]):
        self.model, self.processor, self.vision = model, processor, dict(vision)
        self.token_type_keys, self.banned = tuple(token_type_keys), list(banned)
        self.mrope = _rope_holder(model)

    def parameters(self):
        return self.model.parameters()

    def __call__(self, *, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True,
                 logits_to_keep=1):
        import torch

        kw: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep)
        if self.mrope is None:
            kw["position_ids"] = position_ids
        if cache is None:
            _reset_rope_deltas(self.model)
            kw.update(self.vision)
            if self.token_type_keys:
                types = torch.tensor(self.processor.create_mm_token_type_ids(input_ids.tolist()),
                                     dtype=torch.long, device=input_ids.device)
                kw.update({k: types for k in self.token_type_keys})
        elif self.mrope is not None and self.mrope.rope_deltas is not None:
            B, n = input_ids.shape
            mask = attention_mask if attention_mask is not None else torch.ones(
                (B, cache.get_seq_length() + n), dtype=torch.long, device=input_ids.device)
            text = (mask.long().cumsum(-1) - 1)[:, -n:]
            kw["position_ids"] = text.view(1, B, n).repeat(3, 1, 1) + self.mrope.rope_deltas.to(text.device)
        out = self.model(**kw)
        if self.banned:
            out.logits[..., self.banned] = float("-inf")
        return out


def _image_key(img: ImageLike) -> str:
    """A cache key: the path, or a PIL image's content hash."""
    if isinstance(img, (str, Path)):
        return str(img)
    import hashlib

    return f"{img.mode}:{img.size}:{hashlib.sha1(img.tobytes()).hexdigest()}"


def _batch_signature(vision: Mapping[str, Any]) -> tuple:
    """What must agree for image inputs to be concatenated into one batch: each key with the
    shape after its first (per-image or per-patch) dimension and its dtype."""
    return tuple(sorted((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in vision["inputs"].items()))


def _rope_holder(model: Any) -> Any:
    """The module that keeps a Qwen-VL-class model's multimodal RoPE offsets (`rope_deltas`), or
    None for a model without multimodal RoPE."""
    return next((m for m in (model, getattr(model, "model", None)) if m is not None and hasattr(m, "rope_deltas")),
                None)


def _reset_rope_deltas(model: Any) -> None:
    """Qwen-VL-class models keep the last prefill's multimodal RoPE offsets on the module and use
    them for later cached steps; a new batch must not inherit them."""
    for m in (model, getattr(model, "model", None)):
        if m is not None and getattr(m, "rope_deltas", None) is not None:
            m.rope_deltas = None


class VLMPolicy(LMPolicy):
    """LMPolicy for a vision-language model and its processor (AutoProcessor): the prompt's
    images reach the model. Sampling is batched, the batch's images in its prefill (see the module
    docstring); every LMPolicy option (constrained, temperature, max_turn_tokens, ...) applies."""

    def __init__(self, model: Any, processor: Any, registry: Registry, *, chat_template_kwargs:
                 Mapping[str, Any] | None = None, image_cache_size: int = 64, **kwargs: Any):
        if not hasattr(processor, "tokenizer") or not hasattr(processor, "apply_chat_template"):
            raise ConfigError(f"{type(processor).__name__} is not a processor with a tokenizer and a chat template.",
                              source="VLMPolicy", field="processor",
                              fix="pass the model's AutoProcessor (text-only models: use LMPolicy with the tokenizer).")
        self._local = threading.local()
        # every prefill carries the images, so the system prompt is not prefilled apart
        super().__init__(model, _ProcessorTemplateTokenizer(processor), registry, **{**kwargs, "share_prefix": False})
        self.tokenizer, self.processor = processor.tokenizer, processor
        self.encoder = ProcessorChatEncoder(processor, chat_template_kwargs)
        self.banned_ids = sorted({int(i) for name in ("image_token_ids", "video_token_ids", "audio_token_ids")
                                  for i in (getattr(processor, name, None) or []) if i is not None})
        self._episode_images: OrderedDict[str, tuple[ImageLike, ...]] = OrderedDict()
        self._vision: OrderedDict[tuple, tuple[dict[str, Any], tuple[str, ...]]] = OrderedDict()
        self._image_cache_size = image_cache_size

    # `model` is the VLM, except inside generate's worker thread, where LMPolicy's sampling loop
    # sees the _VisionForward of the sequence being sampled
    @property
    def model(self) -> Any:
        fwd = getattr(self._local, "forward", None)
        return fwd if fwd is not None else self._model

    @model.setter
    def model(self, value: Any) -> None:
        self._model = value

    # -- which images each episode shows -------------------------------------------------------
    def begin_episode(self, episode_id: str, images: Sequence[ImageLike]) -> None:
        """Bind the images (paths or PIL images, in the item's order) of episode `episode_id`.
        Not needed under EpisodeRunner, whose EpisodeView carries the item's images (bound on
        the episode's first act); an explicit binding takes precedence over `view.images`."""
        self._episode_images[episode_id] = tuple(images)
        self._episode_images.move_to_end(episode_id)
        while len(self._episode_images) > 65536:
            self._episode_images.popitem(last=False)

    def expect(self, items: Sequence[Item], *, run_id: str = "adhoc", iteration: int = 0, group_size: int = 1) -> None:
        """Bind the images of every episode `EpisodeRunner.run(items, group_size=..., run_id=...,
        iteration=...)` will run (episode ids are derived from those arguments). Not needed
        under EpisodeRunner (see `begin_episode`)."""
        for item in items:
            for s in range(group_size):
                self.begin_episode(make_episode_id(run_id, iteration, item.id, s), item.images)

    # -- encoding ---------------------------------------------------------------------------------
    def context_ids(self, messages: Sequence[Mapping[str, str]], view: EpisodeView | None = None) -> list[int]:
        """LMPolicy's context, carrying the episode's image inputs when `view` names the episode."""
        ctx = _VisionContext(super().context_ids(messages, view))
        if view is not None:
            ctx.vision = self._vision_inputs(messages, view)
        return ctx

    def _vision_inputs(self, messages: Sequence[Mapping[str, str]], view: EpisodeView) -> dict[str, Any]:
        episode_id = view.episode_id
        prompt = list(messages[:2])
        _, descs = split_descriptors(prompt[_user_index(prompt)]["content"])
        images = self._episode_images.get(episode_id)
        if images is None and view.images:  # the runner's view carries the item's images: bind them
            self.begin_episode(episode_id, view.images)
            images = self._episode_images[episode_id]
        if not descs and not images:
            return {"inputs": {}, "token_types": ()}
        if images is None:
            raise ConfigError(f"episode {episode_id}: the prompt shows {len(descs)} image(s) but none were bound to "
                              "the episode and its EpisodeView carries none.", source="VLMPolicy", entry=episode_id,
                              field="images",
                              fix="run the episode with EpisodeRunner (which passes item.images in the view), pass "
                                  "EpisodeView(..., images=item.images), or call policy.begin_episode(episode_id, "
                                  "item.images) before its first act.")
        key = (tuple((m["role"], m["content"]) for m in prompt), tuple(_image_key(i) for i in images))
        hit = self._vision.get(key)
        if hit is None:
            pil = [load_image(i, index=k) if isinstance(i, (str, Path)) else i for k, i in enumerate(images, 1)]
            out = self.encoder.processed(prompt, pil)
            ids = tuple(int(i) for i in out["input_ids"][0])
            if ids != tuple(self.encode_prompt(prompt)):
                raise ConfigError(f"episode {episode_id}: the processor's prompt ids with the real images differ from "
                                  "those with images of the descriptors' sizes, so its image token count depends on "
                                  "more than the image size.", source="VLMPolicy", entry=episode_id,
                                  fix="this processor is not supported by VLMPolicy's descriptor-based prompt "
                                      "encoding; bind the images in the runner instead (see maestro_core.multimodal).")
            inputs = {k: v for k, v in out.items() if k not in TEXT_ONLY_KEYS + TOKEN_TYPE_KEYS}
            hit = (inputs, tuple(k for k in TOKEN_TYPE_KEYS if k in out))
            self._vision[key] = hit
            if len(self._vision) > self._image_cache_size:
                self._vision.popitem(last=False)
        else:
            self._vision.move_to_end(key)
        return {"inputs": hit[0], "token_types": hit[1]}

    # -- sampling ---------------------------------------------------------------------------------
    def generate(self, contexts, states):
        """LMPolicy.generate over batches of contexts, each prefill with the batch's image inputs
        (concatenated in row order, as the processor batches them); contexts whose image inputs
        cannot be concatenated (other pixel shapes) go in separate batches."""
        import torch

        vlm = self._model
        dev = next(vlm.parameters()).device
        dtype = next(vlm.parameters()).dtype
        groups: dict[tuple, list[int]] = {}
        rows: list[dict[str, Any]] = []
        for i, ctx in enumerate(contexts):
            vision = getattr(ctx, "vision", None)
            if vision is None:
                if self.banned_ids and set(self.banned_ids) & set(ctx):
                    raise ConfigError("a context with image placeholder tokens has no image inputs.",
                                      source="VLMPolicy", fix="sample through act() (with the episode's images "
                                                              "bound), not generate() on bare ids.")
                vision = {"inputs": {}, "token_types": ()}
            rows.append(vision)
            groups.setdefault(_batch_signature(vision), []).append(i)
        if () in groups and len(groups) > 1:  # rows without images join any batch
            first = next(k for k in groups if k != ())
            groups[first] = sorted(groups[first] + groups.pop(()))
        results: list[Any] = [None] * len(contexts)
        for idx in groups.values():
            inputs: dict[str, Any] = {}
            for k in dict.fromkeys(k for i in idx for k in rows[i]["inputs"]):
                v = torch.cat([rows[i]["inputs"][k] for i in idx if k in rows[i]["inputs"]])
                inputs[k] = v.to(device=dev, dtype=dtype) if v.is_floating_point() else v.to(dev)
            types = tuple(dict.fromkeys(t for i in idx for t in rows[i]["token_types"]))
            self._local.forward = _VisionForward(vlm, self.processor, inputs, types, self.banned_ids)
            try:
                out = LMPolicy.generate(self, [list(contexts[i]) for i in idx], [states[i] for i in idx])
            finally:
                self._local.forward = None
            for i, r in zip(idx, out):
                results[i] = r
        return results
