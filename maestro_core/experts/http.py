"""The `http` expert backend: OpenAI-compatible chat completions (vLLM, llama.cpp server, APIs).

    expert = HTTPExpert(spec)            # spec.kind == "http"
    reply = await expert.generate([{"role": "user", "content": "2+2?"}], images=["page.png"])
    await expert.aclose()

Backend settings (`spec.backend`):

- base_url (required): the OpenAI-compatible root, e.g. http://127.0.0.1:8000/v1; requests
  go to POST {base_url}/chat/completions.
- model (required): the served model name.
- api_key_env: name of the environment variable holding the key. Default: MAESTRO_API_KEY,
  then OPENAI_API_KEY; with neither set no Authorization header is sent (local servers).
  The key is read on first use, sent as `Authorization: Bearer`, and never logged nor put
  in an exception message (error bodies that echo it are redacted); a reply text that holds
  it (a proxy echoing headers) is redacted too, so it never reaches a trajectory.
- temperature (0.0), max_tokens (256).
- max_retries (3): retries after the first attempt, so at most 1 + max_retries requests.
  Retried: 429, 5xx, timeouts, connection errors, bodies that are not JSON. Other 4xx and
  replies of the wrong shape fail at once. After the last attempt the last error is raised.
- backoff_s (0.25): first retry delay; doubles per retry, capped at `backoff_cap_s` (8.0),
  with jitter in [50%, 100%]. A numeric Retry-After header (429/503) is honoured up to the cap.
- logprobs (false): ask for token logprobs; confidence = exp(mean token logprob) when the
  reply carries `choices[0].logprobs.content`, else None.
- extra_body: a mapping merged into the request body last (e.g. vLLM's guided decoding).
- max_body_bytes (4 MiB): a larger reply is refused (ExpertReplyError) without reading it all.
- trust_env (false): honour HTTP(S)_PROXY / NO_PROXY from the environment (off, so a proxy
  meant for the internet never sees traffic to local model servers).

`spec.timeout_s` bounds each attempt (connect + send + the whole body) -> ExpertTimeout;
`spec.max_concurrency` bounds the requests in flight for this expert, and sizes its
connection pools so a request never waits for a connection. The HTTP clients and the slots
are made per running event loop, so one HTTPExpert works under several `asyncio.run` calls.
The expert's circuit breaker (maestro_core.breaker) is asked again before every attempt: a
call that queued or backed off while the breaker opened stops with ExpertUnavailable
instead of sending.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import math
import mimetypes
import os
import random
import ssl
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import httpx

from maestro_core.errors import ExpertError, ExpertHTTPError, ExpertReplyError, ExpertTimeout
from maestro_core.experts.base import ExpertBackend, ExpertReply
from maestro_core.registry import Expert

log = logging.getLogger(__name__)

DEFAULT_KEY_ENVS = ("MAESTRO_API_KEY", "OPENAI_API_KEY")
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
_ERROR_BODY_BYTES = 64 * 1024  # enough for any error message; the rest is not read


# httpcore's pool does O(connections x waiting requests) work on every request start and end,
# which makes one pool of 200 connections CPU-bound (~10 ms per request). Small pools keep
# that cost flat: a request in slot i uses pool i // _POOL_SLOTS.
_POOL_SLOTS = 4


@dataclass
class _LoopState:
    clients: list[httpx.AsyncClient]
    slots: asyncio.Queue[int]
    """Free concurrency slots: taking one is the per-expert concurrency limit."""


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # building one loads the CA bundle (~25 ms): share it between all pools
    return httpx.create_ssl_context()


class _Retryable(Exception):
    """Internal marker: wraps an ExpertError that another attempt may cure."""

    def __init__(self, error: ExpertError, retry_after: float | None = None):
        self.error, self.retry_after = error, retry_after


class HTTPExpert(ExpertBackend):
    """An expert behind an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(self, spec: Expert):
        super().__init__(spec)
        b = spec.backend
        self.base_url = str(b["base_url"]).rstrip("/")
        self.model = str(b["model"])
        self.temperature = float(b.get("temperature", 0.0))
        self.max_tokens = int(b.get("max_tokens", 256))
        self.max_retries = max(0, int(b.get("max_retries", 3)))
        self.backoff_s = float(b.get("backoff_s", 0.25))
        self.backoff_cap_s = float(b.get("backoff_cap_s", 8.0))
        self.logprobs = bool(b.get("logprobs", False))
        self.extra_body: dict[str, Any] = dict(b.get("extra_body") or {})
        self.max_body_bytes = int(b.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES))
        self.trust_env = bool(b.get("trust_env", False))
        self._api_key_env: str | None = b.get("api_key_env")
        self._api_key: str | None = None
        # clients and slots per event loop: both are bound to the loop that first uses them
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()

    # -- plumbing ---------------------------------------------------------------------------
    def _resolve_key(self) -> str | None:
        if self._api_key_env:
            key = os.environ.get(self._api_key_env)
            if not key:
                raise ExpertError(f"environment variable {self._api_key_env} (backend.api_key_env) is not set. "
                                  f"Fix: export {self._api_key_env}=<your key>, or remove api_key_env for a "
                                  "server without authentication.", expert=self.name)
            return key
        for env in DEFAULT_KEY_ENVS:
            if os.environ.get(env):
                return os.environ[env]
        return None

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            self._api_key = self._resolve_key()
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            n = self.spec.max_concurrency
            # a slot's request never waits for a connection: each pool has one per slot it serves
            limits = httpx.Limits(max_connections=_POOL_SLOTS, max_keepalive_connections=_POOL_SLOTS,
                                  keepalive_expiry=30.0)
            clients = [httpx.AsyncClient(
                headers=headers,
                # the per-attempt deadline is enforced around the whole request; this is a backstop
                timeout=httpx.Timeout(self.spec.timeout_s + 1.0),
                limits=limits,
                verify=_ssl_context(),
                trust_env=self.trust_env,
            ) for _ in range(-(-n // _POOL_SLOTS))]
            slots: asyncio.Queue[int] = asyncio.Queue()
            for i in range(n):
                slots.put_nowait(i)
            state = _LoopState(clients, slots)
            self._states[loop] = state
        return state

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _err(self, cls: type[ExpertError], message: str, **kw: Any) -> ExpertError:
        return cls(self._redact(message), expert=self.name, **kw)

    # -- request ----------------------------------------------------------------------------
    def _body(self, messages: list[Mapping[str, str]], image_parts: list[dict]) -> dict[str, Any]:
        msgs: list[dict[str, Any]] = [dict(m) for m in messages]
        if image_parts:
            last_user = next((i for i in range(len(msgs) - 1, -1, -1) if msgs[i].get("role") == "user"), None)
            if last_user is None:
                msgs.append({"role": "user", "content": ""})
                last_user = len(msgs) - 1
            content = msgs[last_user].get("content") or ""
            parts = list(content) if isinstance(content, list) else [{"type": "text", "text": content}]
            msgs[last_user]["content"] = [*parts, *image_parts]
        body: dict[str, Any] = {"model": self.model, "messages": msgs,
                                "temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.logprobs:
            body["logprobs"] = True
        body.update(self.extra_body)
        return body

    def _image_parts(self, images: list[Path]) -> list[dict]:
        parts = []
        for p in images:
            try:
                data = p.read_bytes()
            except OSError as e:
                raise ExpertError(f"cannot read image {p}: {e.strerror or e}. Fix: pass existing image files.",
                                  expert=self.name) from e
            mime = mimetypes.guess_type(p.name)[0] or "image/png"
            url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        return parts

    async def _read_limited(self, resp: httpx.Response, limit: int) -> bytes | None:
        """The body, or None when it is larger than `limit` (stops reading there)."""
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            return None
        buf = bytearray()
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) > limit:
                return None
        return bytes(buf)

    async def _attempt(self, client: httpx.AsyncClient, body: dict) -> dict:
        """One POST. Returns the parsed JSON; raises _Retryable or a final ExpertError."""
        try:
            async with asyncio.timeout(self.spec.timeout_s):
                async with client.stream("POST", f"{self.base_url}/chat/completions", json=body) as resp:
                    if resp.status_code >= 400:
                        raw = await self._read_limited(resp, _ERROR_BODY_BYTES) or b""
                        err = self._err(ExpertHTTPError, _error_message(raw, resp.reason_phrase),
                                        status=resp.status_code)
                        if err.retryable:
                            raise _Retryable(err, _retry_after(resp.headers.get("Retry-After")))
                        raise err
                    raw = await self._read_limited(resp, self.max_body_bytes)
        except TimeoutError as e:
            raise _Retryable(self._err(ExpertTimeout, f"no complete reply within {self.spec.timeout_s:g} s "
                                       f"from {self.base_url}")) from e
        except httpx.TimeoutException as e:
            raise _Retryable(self._err(ExpertTimeout, f"{type(e).__name__} talking to {self.base_url}")) from e
        except httpx.TransportError as e:
            err = self._err(ExpertError, f"connection to {self.base_url} failed: {type(e).__name__}: {e}. "
                                         "Fix: check that the server is running and base_url is right.")
            err.retryable = True
            raise _Retryable(err) from e
        if raw is None:
            raise self._err(ExpertReplyError, f"reply body larger than {self.max_body_bytes} bytes "
                                              "(backend.max_body_bytes); refused.")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            err = self._err(ExpertReplyError, f"reply is not valid JSON ({e}): {raw[:200]!r}")
            err.retryable = True  # usually a proxy or an overloaded server cutting the body
            raise _Retryable(err) from e

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_cap_s)
        return min(self.backoff_cap_s, self.backoff_s * 2 ** (retry - 1)) * random.uniform(0.5, 1.0)

    async def _generate(self, messages: list[Mapping[str, str]], images: list[Path]) -> ExpertReply:
        start = time.perf_counter()
        state = self._state()
        parts = await asyncio.to_thread(self._image_parts, images) if images else []
        body = self._body(messages, parts)
        attempts, queued = 0, 0.0
        while True:
            attempts += 1
            try:
                # hold a slot only while on the wire: backoff sleeps must not block other calls
                t_wait = time.perf_counter()
                slot = await state.slots.get()
                queued += time.perf_counter() - t_wait  # our own queue is not the expert's latency
                if self.breaker.rejecting():
                    # the breaker opened while this call queued or backed off: stop, send nothing
                    state.slots.put_nowait(slot)
                    raise self.breaker.unavailable()
                try:
                    data = await self._attempt(state.clients[slot // _POOL_SLOTS], body)
                finally:
                    state.slots.put_nowait(slot)
                break
            except ExpertError as e:
                e.attempts = attempts  # type: ignore[attr-defined]  (for the caller's logs)
                raise
            except _Retryable as r:
                if attempts > self.max_retries:
                    r.error.attempts = attempts  # type: ignore[attr-defined]
                    raise r.error from r.__cause__
                delay = self._backoff(attempts, r.retry_after)
                log.info("expert %s: attempt %d failed (%s); retrying in %.2f s",
                         self.name, attempts, r.error, delay)
                await asyncio.sleep(delay)
        text, tokens_in, tokens_out, confidence = self._parse(data, body)
        return self.reply(text, tokens_in, tokens_out, time.perf_counter() - start - queued,
                          confidence=confidence, attempts=attempts)

    def _parse(self, data: Any, body: dict) -> tuple[str, int, int, float | None]:
        """Text, tokens in/out and confidence of a chat completion.

        Token counts come from `usage.prompt_tokens` / `usage.completion_tokens`. A server that
        sends no usage gets an estimate of ceil(characters / 4) of the messages' text (images
        not counted) and of the reply: the usual rule of thumb for English BPE tokenizers.
        """
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content")
        except (TypeError, KeyError, IndexError, AttributeError):
            raise self._err(ExpertReplyError, f"reply has no choices[0].message: {json.dumps(data)[:200]}") from None
        if isinstance(content, list):  # some servers answer in content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        text = self._redact(content) if isinstance(content, str) else ""
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        tin, tout = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not isinstance(tin, int):
            chars = sum(len(_text_of(m)) for m in body["messages"])
            tin = math.ceil(chars / 4)
        if not isinstance(tout, int):
            tout = math.ceil(len(text) / 4)
        return text, tin, tout, _confidence(choice)

    async def aclose(self) -> None:
        """Close the HTTP clients of the running loop. Call it in every loop that used this
        expert: clients of other loops cannot be closed from here and are only dropped."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        state = self._states.pop(loop, None) if loop is not None else None
        self._states.clear()
        if state is not None:
            for client in state.clients:
                await client.aclose()


def _text_of(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


def _confidence(choice: Mapping[str, Any]) -> float | None:
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    if not isinstance(content, list):
        return None
    values = [t["logprob"] for t in content if isinstance(t, dict) and isinstance(t.get("logprob"), (int, float))]
    if not values:
        return None
    return min(1.0, max(0.0, math.exp(sum(values) / len(values))))


def _error_message(raw: bytes, reason: str) -> str:
    try:
        err = json.loads(raw).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:500]
    except (ValueError, AttributeError):
        pass
    text = raw.decode("utf-8", "replace").strip()
    return text[:500] or reason


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
