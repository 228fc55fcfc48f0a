"""The learned policy served over HTTP: an OpenAI-compatible `/v1/chat/completions` (vLLM).

    policy = OpenAIPolicy("http://gpu-node:8000/v1", "maestro-policy", registry,
                          tokenizer="/ckpt/step-0", temperature=1.0, max_tokens=256)
    runner = EpisodeRunner(registry, experts, policy)
    ...                                  # collect, GRPO update -> /ckpt/step-1
    policy.sync_weights("/ckpt/step-1")  # the server now samples with the new weights

Each `act` sends the episode's chat so far (one request per turn; concurrent episodes are
batched by the server) and returns the turn's text with its sampled token ids and sampling
logprobs, exactly as the server sampled them.

Request body (vLLM facts, from the vLLM docs and source):

- `structured_outputs: {"regex": R}` constrains the turn to the registry grammar
  (`Registry.grammar().regex()`; on the episode's last turn, when `answer_on_last_turn`, a
  regex that allows only `<answer>...</answer>`). This is the current vLLM field; the older
  `guided_regex` field (deprecated, removed in vLLM 0.12) is sent instead with
  `structured_outputs="guided_regex"`.
- `logprobs: true` and `return_tokens_as_token_ids: true` (a vLLM extension): every
  generated token comes back as the string `token_id:<id>` with its logprob, so the turn's
  ids are the sampled ids (ending with the EOS the model sampled), never a re-tokenisation.
  `return_token_ids: true` (newer vLLM) also returns `prompt_token_ids`: the ids the server
  actually conditioned on, which are compared with the local encoding of the same context
  (`stats.context_mismatches`; `strict_context=True` raises on a mismatch).
  vLLM's default `--logprobs-mode raw_logprobs` reports log-softmax of the logits after the
  grammar mask but before temperature: the sampling logprobs at temperature 1.0 (the paper's
  setting). For another temperature serve with `--logprobs-mode processed_logprobs`.
- `temperature`, `max_tokens`, and `seed` (per request, derived from `seed`, the episode id
  and the turn, so the G samples of a group differ but a rerun repeats), plus `extra_body`
  and `chat_template_kwargs` (e.g. `{"enable_thinking": false}` for Qwen3 templates; the
  same kwargs render the local prompt ids).

A server that does not return logprobs or token ids (not vLLM, or an old one) gets a
ConfigError naming the fix: serve the policy with vLLM, or pass `record_tokens=False` for
evaluation-only use (then no vLLM extensions are requested, turn ids are the local
tokenizer's encoding of the text + EOS when a tokenizer is given, and logprobs are empty:
such trajectories cannot be trained on).

Token accounting: `encode_prompt(messages)` / `encode_observation(message)` use a local
tokenizer (`tokenizer=`: the served checkpoint's directory or hub id, loaded with
AutoTokenizer, or a tokenizer object) and its chat template, as `LMPolicy` does, so
prompt_ids + completion ids of a trajectory match the server's rendering of the chat.
Recording tokens needs that tokenizer (ConfigError otherwise).

Vision-language policies (`vision=True`, e.g. a served Qwen3-VL): `tokenizer` is the
checkpoint's processor (loaded with AutoProcessor from a directory or hub id). The prompt's
`[image i: WxH]` descriptors are replaced by the episode's images (from the EpisodeView, as
EpisodeRunner passes them), sent as `image_url` parts with PNG data URIs
(`multimodal.openai_messages`), and the prompt ids are the processor's, with each image's
placeholder tokens expanded (`multimodal.ProcessorChatEncoder`), as the server renders them;
`prompt_token_ids` checks that. The GRPO update then needs the processor and the images
(`grpo_update(..., images=...)`; TrainingRun does this with `policy: {vision: true}`).

HTTP: the API key comes from the environment (`api_key_env`, else MAESTRO_API_KEY, then
OPENAI_API_KEY; none: no Authorization header), is sent as `Authorization: Bearer`, and
never logged nor put into an error message (error bodies echoing it are redacted). 429,
5xx, timeouts, connection errors and bodies that are not JSON are retried with exponential
backoff and jitter (a numeric Retry-After is honoured up to the cap); other 4xx fail at
once. Errors: ExpertHTTPError (status), ExpertTimeout, ExpertReplyError (unreadable reply),
ConfigError (the server cannot give what training needs).

Weight sync (`sync_weights(checkpoint_dir)`), after each GRPO update. vLLM has no stable
public "load these weights" endpoint; what it documents:

- `sync="reload_weights"` (default, full fine-tuning): with `VLLM_SERVER_DEV_MODE=1` vLLM
  exposes `POST /collective_rpc` (body `{"method", "args", "kwargs", "timeout"}`), which
  calls a worker method on every worker. The worker's `reload_weights` reloads the weights
  in place; recent vLLM versions take `weights_path` (a new checkpoint directory). Then
  `POST /reset_prefix_cache` (also dev mode) drops KV blocks computed with the old weights.
  On a vLLM whose `reload_weights` takes no path, pass `sync_requests` (see below), e.g.
  `update_config({"model_config": {"model": DIR}})` then `reload_weights`, as vLLM's
  offline example does with `LLM.collective_rpc`.
- `sync="lora"` (LoRA training): with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and
  `--enable-lora`, `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` loads the new
  adapter under a new name; later requests use that name as `model` and the previous
  adapter is unloaded (`POST /v1/unload_lora_adapter`).
- `sync_requests=[(path, body), ...]`: any other sequence of POSTs (paths from the server
  root; `{checkpoint_dir}` and `{checkpoint_id}` in body strings are substituted); e.g.
  vLLM's RLHF routes `/pause`, `/resume`, or a custom server's endpoint.
- `sync="none"`: nothing is posted (a server restarted on the new checkpoint by the caller).

`sync_weights` also sets `checkpoint_id` (recorded in every trajectory) to the checkpoint
id given or the directory's name. Call it between collection rounds, with no turn in flight
(vLLM does not reset the prefix cache while requests run).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import httpx

from maestro_core.chat_encoding import ChatEncoder
from maestro_core.errors import ConfigError, ExpertError, ExpertHTTPError, ExpertReplyError, ExpertTimeout
from maestro_core.policy import EpisodeView, PolicyTurn, offered_actions
from maestro_core.registry import ActionGrammar, Registry, check_image_routing

log = logging.getLogger(__name__)

DEFAULT_KEY_ENVS = ("MAESTRO_API_KEY", "OPENAI_API_KEY")
ANSWER_ONLY_REGEX = r"<answer>[^<]*</answer>"
"""The last turn's grammar: only an answer can still score."""
STRUCTURED_FIELDS = ("structured_outputs", "guided_regex")
SYNC_PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    "reload_weights": (("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": "{checkpoint_dir}"}}),
                       ("/reset_prefix_cache", None)),
    "lora": (),  # handled in sync_weights (load the new adapter, switch `model`, unload the old one)
    "none": (),
}
_TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")
_ERROR_BODY_BYTES = 64 * 1024
_MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass
class HTTPPolicyStats:
    requests: int = 0
    """HTTP attempts sent for turns (retries included)."""
    retries: int = 0
    turns: int = 0
    tokens: int = 0
    context_checks: int = 0
    """Turns whose server-side prompt ids (`prompt_token_ids`) were compared with the local context."""
    context_mismatches: int = 0
    syncs: int = 0
    latency_s: float = 0.0
    """Summed wall time of the turns' requests (retries and backoff included)."""


class _Retryable(Exception):
    def __init__(self, error: ExpertError, retry_after: float | None = None):
        self.error, self.retry_after = error, retry_after


@dataclass
class _LoopState:
    client: httpx.AsyncClient
    slots: asyncio.Semaphore


class OpenAIPolicy:
    """A policy whose turns are sampled by an OpenAI-compatible chat server (vLLM)."""

    def __init__(self, base_url: str, model: str, registry: Registry, *, tokenizer: Any = None,
                 temperature: float = 1.0, max_tokens: int = 256, seed: int | None = None,
                 constrained: bool = True, answer_on_last_turn: bool = True,
                 structured_outputs: str = "structured_outputs", record_tokens: bool = True,
                 strict_context: bool = False, chat_template_kwargs: Mapping[str, Any] | None = None,
                 extra_body: Mapping[str, Any] | None = None, api_key_env: str | None = None,
                 timeout_s: float = 300.0, max_retries: int = 5, backoff_s: float = 0.5, backoff_cap_s: float = 16.0,
                 max_concurrency: int = 256, trust_env: bool = False, checkpoint_id: str | None = None,
                 sync: str = "reload_weights", sync_requests: Sequence[tuple[str, Any]] | None = None,
                 sync_timeout_s: float = 900.0, lora_name_prefix: str = "maestro-policy",
                 actions: Sequence[str] | None = None, free_input: bool = True, vision: bool = False,
                 image_routing: str = "any"):
        if temperature < 0:
            raise ConfigError("temperature must be >= 0.", field="temperature", fix="use e.g. 1.0 (the paper's setting).")
        if max_tokens < 1:
            raise ConfigError("max_tokens must be >= 1.", field="max_tokens", fix="use e.g. 256.")
        if structured_outputs not in STRUCTURED_FIELDS:
            raise ConfigError(f"unknown structured_outputs field '{structured_outputs}'.", field="structured_outputs",
                              fix=f"use one of {list(STRUCTURED_FIELDS)} ('guided_regex' for vLLM before 0.12).")
        if sync not in SYNC_PRESETS:
            raise ConfigError(f"unknown sync mode '{sync}'.", field="sync", fix=f"use one of {sorted(SYNC_PRESETS)} "
                              "or pass sync_requests=[(path, body), ...].")
        if max_concurrency < 1:
            raise ConfigError("max_concurrency must be >= 1.", field="max_concurrency", fix="use e.g. 256.")
        self.base_url = str(base_url).rstrip("/")
        self.root_url = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        self.model = str(model)
        self.registry = registry
        self.temperature, self.max_tokens, self.seed = temperature, max_tokens, seed
        self.constrained, self.answer_on_last_turn = constrained, answer_on_last_turn
        self.structured_outputs = structured_outputs
        self.record_tokens, self.strict_context = record_tokens, strict_context
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.extra_body = dict(extra_body or {})
        self.timeout_s, self.max_retries = timeout_s, max(0, int(max_retries))
        self.backoff_s, self.backoff_cap_s = backoff_s, backoff_cap_s
        self.max_concurrency, self.trust_env = max_concurrency, trust_env
        self.checkpoint_id = checkpoint_id or self.model
        self.sync_mode = sync
        self.sync_requests = tuple(sync_requests) if sync_requests is not None else None
        self.sync_timeout_s, self.lora_name_prefix = sync_timeout_s, lora_name_prefix
        self.stats = HTTPPolicyStats()
        every = registry.grammar().actions
        self.actions = tuple(actions) if actions is not None else every
        unknown = [a for a in self.actions if a not in every]
        if unknown or not self.actions:
            raise ConfigError(f"actions {unknown or '[]'} are not in registry '{registry.name}'s grammar.",
                              field="actions", fix=f"use a non-empty subset of {list(every)}.")
        self.free_input = free_input
        self.regex = ActionGrammar(self.actions).regex(free_input)
        self.image_routing = check_image_routing(image_routing)
        """Which actions a turn offers given the task's images (Registry.for_images), as LMPolicy."""
        self._api_key_env = api_key_env
        self._api_key: str | None = None
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()
        self._lora_loaded: str | None = None
        self._warned_mismatch = False
        self.vision = bool(vision)
        self.processor = None
        self._uris: OrderedDict[str, str] = OrderedDict()
        if self.vision:
            self.processor = _load_tokenizer(tokenizer, processor=True) if isinstance(tokenizer, (str, Path)) else tokenizer
            if not hasattr(self.processor, "tokenizer") or not hasattr(self.processor, "apply_chat_template"):
                raise ConfigError(f"vision needs the served checkpoint's processor, got {type(tokenizer).__name__}.",
                                  field="tokenizer", fix="pass tokenizer=<the checkpoint directory or hub id> (its "
                                  "AutoProcessor is loaded) or the processor object; for a text-only model set "
                                  "vision: false.")
            tokenizer = self.processor.tokenizer
        self.tokenizer = _load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        if record_tokens and self.tokenizer is None:
            raise ConfigError("recording token ids needs the served checkpoint's tokenizer (prompt and observation "
                              "ids are encoded locally).", field="tokenizer",
                              fix="pass tokenizer=<the checkpoint directory or hub id the server serves>, or "
                                  "record_tokens=False for evaluation-only use.")
        self.eos_id = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        self._turns: OrderedDict[str, dict[int, tuple[str, tuple[int, ...]]]] = OrderedDict()
        if self.vision:  # prompt ids with the image placeholders expanded, as the server's processor does
            from maestro_core.multimodal import ProcessorChatEncoder

            self.encoder = ProcessorChatEncoder(self.processor, self.chat_template_kwargs)
        elif self.tokenizer is not None:
            self.encoder = ChatEncoder(self.tokenizer, self.chat_template_kwargs)
        else:
            self.encoder = None

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIPolicy(base_url={self.base_url!r}, model={self.model!r}, checkpoint_id={self.checkpoint_id!r})"

    # -- encoding (local tokenizer; maestro_core.chat_encoding, the same as LMPolicy) ----------
    def encode_prompt(self, messages: Sequence[Mapping[str, str]]) -> tuple[int, ...]:
        return self.encoder.encode_prompt(messages) if self.encoder is not None else ()

    def encode_observation(self, message: Mapping[str, str]) -> tuple[int, ...]:
        return self.encoder.encode_observation(message) if self.encoder is not None else ()

    def context_ids(self, messages: Sequence[Mapping[str, str]], view: EpisodeView | None = None) -> list[int]:
        """The token context of the next turn as the trajectory records it: prompt + (turn ids,
        observation ids)*, reusing each turn's sampled ids."""
        if self.encoder is None:
            return []
        return self.encoder.context_ids(messages, self._turns.get(view.episode_id) if view is not None else None)

    # -- the request --------------------------------------------------------------------------
    def turn_regex(self, view: EpisodeView | None) -> str | None:
        """The grammar sent for this turn (None: unconstrained)."""
        if not self.constrained:
            return None
        last = view is not None and view.max_turns > 0 and view.turn >= view.max_turns - 1
        if last and self.answer_on_last_turn:
            return ANSWER_ONLY_REGEX
        ok = offered_actions(self.registry, self.actions, self.image_routing, view)  # none: answer
        if ok != self.actions:
            return ActionGrammar(ok).regex(self.free_input) if ok else ANSWER_ONLY_REGEX
        return self.regex

    def request_messages(self, messages: Sequence[Mapping[str, str]], view: EpisodeView | None) -> list[dict]:
        """The chat messages sent: the runner's, and with `vision` the episode's images (from the
        EpisodeView, as EpisodeRunner passes them) as image_url parts of the user message in place
        of its `[image i: WxH]` descriptors (maestro_core.multimodal.openai_messages)."""
        if not self.vision:
            return [dict(m) for m in messages]
        from maestro_core.multimodal import openai_messages, split_descriptors

        images = tuple(view.images) if view is not None and view.images else ()
        user = next((m for m in messages if m.get("role") == "user"), None)
        if not images and (user is None or not split_descriptors(str(user["content"]))[1]):
            return [dict(m) for m in messages]
        if not images:
            raise ConfigError(f"episode {view.episode_id if view else '?'}: the prompt shows images but its "
                              "EpisodeView carries none, so the served VLM would not see them.", field="images",
                              fix="run the episode with EpisodeRunner (which passes item.images in the view) or pass "
                                  "EpisodeView(..., images=item.images).")
        return openai_messages(messages, images, uri=self._image_uri)

    def _image_uri(self, img: Any, index: int) -> str:
        from maestro_core.multimodal import image_data_uri

        if not isinstance(img, (str, Path)):
            return image_data_uri(img, index=index)
        key = str(img)
        uri = self._uris.get(key)
        if uri is None:
            uri = self._uris[key] = image_data_uri(key, index=index)
            while len(self._uris) > 256:
                self._uris.popitem(last=False)
        else:
            self._uris.move_to_end(key)
        return uri

    def request_body(self, messages: Sequence[Mapping[str, str]], view: EpisodeView | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": self.request_messages(messages, view),
                                "temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.seed is not None:
            key = f"{self.seed}\x1f{view.episode_id if view else ''}\x1f{view.turn if view else 0}"
            body["seed"] = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF
        if self.record_tokens:
            body.update(logprobs=True, return_tokens_as_token_ids=True, return_token_ids=True)
        rx = self.turn_regex(view)
        if rx is not None:
            if self.structured_outputs == "structured_outputs":
                body["structured_outputs"] = {"regex": rx}
            else:
                body["guided_regex"] = rx
        if self.chat_template_kwargs:
            body["chat_template_kwargs"] = dict(self.chat_template_kwargs)
        body.update(self.extra_body)
        return body

    # -- plumbing -----------------------------------------------------------------------------
    def _resolve_key(self) -> str | None:
        if self._api_key_env:
            key = os.environ.get(self._api_key_env)
            if not key:
                raise ConfigError(f"environment variable {self._api_key_env} (api_key_env) is not set.",
                                  field="api_key_env", fix=f"export {self._api_key_env}=<your key>, or leave "
                                  "api_key_env unset for a server without authentication.")
            return key
        for env in DEFAULT_KEY_ENVS:
            if os.environ.get(env):
                return os.environ[env]
        return None

    def _headers(self) -> dict[str, str]:
        if self._api_key is None:
            self._api_key = self._resolve_key() or ""
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        st = self._states.get(loop)
        if st is None:
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency,
                                  keepalive_expiry=30.0)
            client = httpx.AsyncClient(headers=self._headers(), timeout=httpx.Timeout(self.timeout_s + 1.0),
                                       limits=limits, trust_env=self.trust_env)
            st = _LoopState(client, asyncio.Semaphore(self.max_concurrency))
            self._states[loop] = st
        return st

    def _who(self) -> str:
        return f"policy {self.model}"

    def _http_error(self, status: int, raw: bytes, reason: str, url: str) -> ExpertHTTPError:
        msg = _error_message(raw, reason)
        if status == 400 and self.constrained:
            msg += (f" (if the server rejects the grammar field, set structured_outputs='guided_regex' for vLLM "
                    f"before 0.12, or '{STRUCTURED_FIELDS[0]}' for newer vLLM)")
        if status in (404, 405) and not url.endswith("/chat/completions"):
            msg += (f" at {url}. Fix: start vLLM with VLLM_SERVER_DEV_MODE=1 (for /collective_rpc and "
                    "/reset_prefix_cache) or VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (for LoRA), or set sync_requests.")
        return ExpertHTTPError(self._redact(msg), status=status, expert=self._who())

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_cap_s)
        return min(self.backoff_cap_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    async def _attempt(self, client: httpx.AsyncClient, url: str, body: dict) -> Any:
        try:
            async with asyncio.timeout(self.timeout_s):
                async with client.stream("POST", url, json=body) as resp:
                    raw = await _read_limited(resp, _ERROR_BODY_BYTES if resp.status_code >= 400 else _MAX_BODY_BYTES)
                    if resp.status_code >= 400:
                        err = self._http_error(resp.status_code, raw or b"", resp.reason_phrase, url)
                        if err.retryable:
                            raise _Retryable(err, _retry_after(resp.headers.get("Retry-After")))
                        raise err
        except TimeoutError as e:
            raise _Retryable(ExpertTimeout(f"no complete reply within {self.timeout_s:g} s from {url}",
                                           expert=self._who())) from e
        except httpx.TimeoutException as e:
            raise _Retryable(ExpertTimeout(f"{type(e).__name__} talking to {url}", expert=self._who())) from e
        except httpx.TransportError as e:
            err = ExpertError(self._redact(f"connection to {url} failed: {type(e).__name__}: {e}. Fix: check that "
                                           "the policy server is running and base_url is right."), expert=self._who())
            err.retryable = True
            raise _Retryable(err) from e
        if raw is None:
            raise ExpertReplyError(f"reply body larger than {_MAX_BODY_BYTES} bytes; refused.", expert=self._who())
        try:
            return json.loads(raw) if raw else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            err = ExpertReplyError(self._redact(f"reply is not valid JSON ({e}): {raw[:200]!r}"), expert=self._who())
            err.retryable = True
            raise _Retryable(err) from e

    async def _post(self, url: str, body: dict) -> Any:
        state = self._state()
        attempt = 0
        while True:
            attempt += 1
            self.stats.requests += 1
            try:
                async with state.slots:
                    return await self._attempt(state.client, url, body)
            except _Retryable as r:
                if attempt > self.max_retries:
                    raise r.error from r.__cause__
                self.stats.retries += 1
                delay = self._backoff(attempt, r.retry_after)
                log.info("policy server: attempt %d failed (%s); retrying in %.2f s", attempt, r.error, delay)
                await asyncio.sleep(delay)

    # -- acting -------------------------------------------------------------------------------
    async def act(self, messages: Sequence[Mapping[str, str]], view: EpisodeView) -> PolicyTurn:
        body = self.request_body(messages, view)
        t0 = time.perf_counter()
        data = await self._post(f"{self.base_url}/chat/completions", body)
        self.stats.latency_s += time.perf_counter() - t0
        choice = _first_choice(data, self._who())
        msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content = msg.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        text = content if isinstance(content, str) else ""
        if self.record_tokens:
            ids, lps = self._parse_tokens(choice)
            served = data.get("prompt_token_ids") if isinstance(data, dict) else None
            if isinstance(served, list):
                self._check_context(messages, view, served)
        else:
            ids = self.encoder.encode_turn(text) if self.encoder is not None else ()
            lps = ()
        if view is not None:
            rec = self._turns.setdefault(view.episode_id, {})
            self._turns.move_to_end(view.episode_id)
            rec[view.turn] = (text, tuple(ids))
            while len(self._turns) > 8192:
                self._turns.popitem(last=False)
        self.stats.turns += 1
        self.stats.tokens += len(ids)
        return PolicyTurn(text, tuple(ids), tuple(lps))

    def _parse_tokens(self, choice: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[float, ...]]:
        lp = choice.get("logprobs")
        content = lp.get("content") if isinstance(lp, dict) else None
        if not isinstance(content, list) or (not content and choice.get("finish_reason") != "length"
                                             and (choice.get("message") or {}).get("content")):
            raise ConfigError(
                f"the policy server at {self.base_url} returned no token logprobs, so the turn's token ids and "
                "sampling logprobs cannot be recorded.", field="record_tokens",
                fix="serve the policy with vLLM (it honours logprobs=true and return_tokens_as_token_ids=true), or "
                    "pass record_tokens=False for evaluation-only use (ids then come from the local tokenizer).")
        ids, lps = [], []
        for entry in content:
            tok = entry.get("token") if isinstance(entry, dict) else None
            m = _TOKEN_ID.match(tok) if isinstance(tok, str) else None
            value = entry.get("logprob") if isinstance(entry, dict) else None
            if m is None:
                raise ConfigError(
                    f"the policy server at {self.base_url} returned tokens as text ({str(tok)[:40]!r}), not as "
                    "'token_id:<id>', so the sampled token ids are unknown.", field="record_tokens",
                    fix="serve the policy with vLLM (request field return_tokens_as_token_ids, or start it with "
                        "--return-tokens-as-token-ids), or pass record_tokens=False for evaluation-only use.")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ExpertReplyError(f"token {tok} has no numeric logprob.", expert=self._who())
            ids.append(int(m.group(1)))
            lps.append(min(0.0, float(value)))
        also = choice.get("token_ids")
        if isinstance(also, list) and list(also) != ids:
            raise ExpertReplyError("choices[0].token_ids disagrees with the ids in the logprobs.", expert=self._who())
        return tuple(ids), tuple(lps)

    def _check_context(self, messages, view, served: list) -> None:
        self.stats.context_checks += 1
        ours = self.context_ids(messages, view)
        if ours == served:
            return
        self.stats.context_mismatches += 1
        k = next((i for i, (a, b) in enumerate(zip(ours, served)) if a != b), min(len(ours), len(served)))
        what = (f"the server conditioned on {len(served)} prompt ids, the trajectory records {len(ours)}; first "
                f"difference at position {k}")
        if self.strict_context:
            raise ConfigError(f"{what}.", field="tokenizer",
                              fix="pass the served checkpoint's own tokenizer and the same chat_template_kwargs, "
                                  "serve without a reasoning parser, and use a chat template that does not rewrite "
                                  "earlier turns.")
        if not self._warned_mismatch:
            self._warned_mismatch = True
            log.warning("policy context differs from the server's (%s); counted in stats.context_mismatches.", what)

    # -- weight sync --------------------------------------------------------------------------
    def sync_weights(self, checkpoint_dir: str | Path, *, checkpoint_id: str | None = None) -> list[Any]:
        """Ask the server to serve the checkpoint in `checkpoint_dir` (a path the server can
        read); returns the servers' JSON answers. Sets `checkpoint_id`."""
        ckpt = str(checkpoint_dir)
        cid = checkpoint_id or Path(ckpt.rstrip("/")).name or ckpt
        out: list[Any] = []
        with httpx.Client(headers=self._headers(), timeout=httpx.Timeout(self.sync_timeout_s),
                          trust_env=self.trust_env) as client:
            if self.sync_requests is None and self.sync_mode == "lora":
                name = f"{self.lora_name_prefix}-{_slug(cid)}"
                out.append(self._sync_post(client, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": ckpt}))
                previous, self._lora_loaded, self.model = self._lora_loaded, name, name
                if previous and previous != name:
                    try:
                        out.append(self._sync_post(client, "/v1/unload_lora_adapter", {"lora_name": previous}))
                    except ExpertError as e:  # the new adapter serves already; a stale one only costs memory
                        log.warning("could not unload LoRA adapter %s: %s", previous, e)
            else:
                steps = self.sync_requests if self.sync_requests is not None else SYNC_PRESETS[self.sync_mode]
                subs = {"checkpoint_dir": ckpt, "checkpoint_id": cid}
                for path, body in steps:
                    out.append(self._sync_post(client, path, _substitute(body, subs)))
        self.checkpoint_id = cid
        self.stats.syncs += 1
        return out

    def _sync_post(self, client: httpx.Client, path: str, body: Any) -> Any:
        url = self.root_url + (path if path.startswith("/") else "/" + path)
        attempt = 0
        while True:
            attempt += 1
            try:
                try:
                    resp = client.post(url, json=body) if body is not None else client.post(url)
                except httpx.TimeoutException as e:
                    raise _Retryable(ExpertTimeout(f"{type(e).__name__} posting to {url}", expert=self._who())) from e
                except httpx.TransportError as e:
                    err = ExpertError(self._redact(f"connection to {url} failed: {type(e).__name__}: {e}"),
                                      expert=self._who())
                    err.retryable = True
                    raise _Retryable(err) from e
                if resp.status_code >= 400:
                    err = self._http_error(resp.status_code, resp.content[:_ERROR_BODY_BYTES], resp.reason_phrase, url)
                    if err.retryable:
                        raise _Retryable(err, _retry_after(resp.headers.get("Retry-After")))
                    raise err
                try:
                    return resp.json() if resp.content else None
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return resp.text
            except _Retryable as r:
                if attempt > self.max_retries:
                    raise r.error from r.__cause__
                time.sleep(self._backoff(attempt, r.retry_after))

    async def aclose(self) -> None:
        """Close the HTTP client of the running loop (clients of other loops are dropped)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        st = self._states.pop(loop, None) if loop is not None else None
        self._states.clear()
        if st is not None:
            await st.client.aclose()


# ---------------------------------------------------------------------------------------------

def _load_tokenizer(path: str | Path, *, processor: bool = False):
    """The served checkpoint's tokenizer (AutoTokenizer), or with `processor` its AutoProcessor."""
    from transformers import AutoProcessor, AutoTokenizer

    what, auto = ("processor", AutoProcessor) if processor else ("tokenizer", AutoTokenizer)
    try:
        return auto.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a {what} from {path}: {e}", field="tokenizer",
                          fix=f"pass the served checkpoint's directory (with its {what} files) or hub id.") from e


def _first_choice(data: Any, who: str) -> dict:
    try:
        choice = data["choices"][0]
    except (TypeError, KeyError, IndexError):
        raise ExpertReplyError(f"reply has no choices[0]: {json.dumps(data)[:200]}", expert=who) from None
    if not isinstance(choice, dict):
        raise ExpertReplyError("choices[0] is not an object.", expert=who)
    return choice


async def _read_limited(resp: httpx.Response, limit: int) -> bytes | None:
    declared = resp.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit and resp.status_code < 400:
        return None
    buf = bytearray()
    async for chunk in resp.aiter_bytes():
        buf += chunk
        if len(buf) > limit:
            return None if resp.status_code < 400 else bytes(buf[:limit])
    return bytes(buf)


def _error_message(raw: bytes, reason: str) -> str:
    try:
        obj = json.loads(raw)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        msg = err.get("message") or err.get("detail") if isinstance(err, dict) else None
        if msg:
            return str(msg)[:500]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        pass
    text = raw.decode("utf-8", "replace").strip()
    return (text[:500] or reason or "error")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _substitute(body: Any, subs: Mapping[str, str]) -> Any:
    if isinstance(body, str):
        for k, v in subs.items():
            body = body.replace("{" + k + "}", v)
        return body
    if isinstance(body, Mapping):
        return {k: _substitute(v, subs) for k, v in body.items()}
    if isinstance(body, (list, tuple)):
        return [_substitute(v, subs) for v in body]
    return body


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "ckpt"
