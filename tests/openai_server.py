"""A real OpenAI-compatible chat-completions server on loopback, for tests and benchmarks.

Standard library only: a `ThreadingHTTPServer` speaking HTTP/1.1 with keep-alive, one daemon
thread per connection, started in a background thread on a free port. No client is mocked:
the code under test talks to it over TCP exactly as it would to vLLM or llama.cpp.

    with OpenAIServer(reply=lambda msgs: "42", latency_s=0.05, faults=[500, "ok"]) as srv:
        backend = {"base_url": srv.base_url, "model": "m"}
        ...
        assert srv.requests == 2

Endpoints: `POST /v1/chat/completions` and `GET /v1/models`.

Faults, chosen per chat request by `faults` (a callable `(index, body) -> fault` or a
sequence consumed one per request, "ok" once exhausted):

- "ok": a normal reply.
- an int (400, 429, 500, 503...): that status with an OpenAI-style error body.
- "malformed": status 200 with a body that is not valid JSON.
- "empty": status 200 with the valid JSON body `{}` (no choices).
- "hang": sleep `hang_s` (longer than any client timeout in the tests), then reply; the
  sleep ends early when the server stops.
- "huge": status 200 with a valid JSON body of `huge_bytes`, sent chunked (no
  Content-Length), so only a client that bounds what it reads survives it.
- "drop": close the connection without answering (a connection error for the client).
- "garbage": status 200 with a text/plain body of random printable garbage (not JSON).
- "echo_auth": a normal reply whose text is the Authorization header the request carried
  (a misconfigured proxy or debug server echoing headers).

Replies carry `usage` (prompt tokens = words in the messages' text, completion tokens = words
in the reply) unless `usage=False`, and `choices[0].logprobs.content` (every token with
`token_logprob`) when the request asks for `logprobs: true`.

Optional modes (both off by default):

- `completion=fn(body) -> dict`: the whole chat-completion reply is built by `fn` from the
  request body (e.g. a vLLM-like server that samples with a real model under the request's
  structured-output regex and returns token ids); faults and the API key check still apply.
- `routes={"/path": fn(body) -> obj}`: extra POST endpoints (e.g. vLLM's `/collective_rpc`,
  `/v1/load_lora_adapter`); each answers 200 with `fn`'s JSON (an `(status, obj)` tuple sets
  the status). Calls are recorded in `route_requests` as `(path, body)`; the API key check
  applies; faults do not.
"""

from __future__ import annotations

import json
import random
import socket
import string
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Fault = str | int
FaultSource = Callable[[int, dict], Fault] | Sequence[Fault] | Iterable[Fault]


def message_text(message: dict) -> str:
    """The text of one chat message, whether `content` is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def echo_reply(messages: list[dict]) -> str:
    """Default reply: echo the last user message's text."""
    for m in reversed(messages):
        if m.get("role") == "user":
            return "echo: " + message_text(m)
    return "echo:"


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung handler must never keep the test process alive
    request_queue_size = 1024  # listen backlog: bursts of hundreds of connects are not refused
    allow_reuse_address = True
    owner: "OpenAIServer"

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client closed its keep-alive connection: normal, not worth a traceback
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so pooled clients reuse connections
    timeout = 60  # idle keep-alive connections release their thread eventually
    disable_nagle_algorithm = True  # else small replies wait for the client's delayed ACK
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (stdlib signature)
        pass  # keep test output clean

    # -- helpers ------------------------------------------------------------------------
    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(obj).encode(), headers)

    def _send_bytes(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                    content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error")
        self._send_json(status, {"error": {"message": message, "type": kind, "code": status}})

    # -- endpoints ----------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802  (stdlib name)
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": self.server.owner.model, "object": "model",
                                                              "owned_by": "maestro-tests"}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.rstrip("/") in owner.routes:
            self._route(owner, self.path.rstrip("/"), raw)
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}")
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._error(400, "request body is not JSON")
            return
        index = owner._enter(body)
        try:
            self._chat(owner, index, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout, body limit): fine
        finally:
            owner._leave()

    def _authorized(self, owner: "OpenAIServer") -> bool:
        if owner.api_key is not None:
            got = self.headers.get("Authorization", "")
            if got != f"Bearer {owner.api_key}":
                # like real APIs, echo what was sent: clients must keep keys out of their errors
                self._error(401, f"Incorrect API key provided: {got.removeprefix('Bearer ')!r}")
                return False
        return True

    def _route(self, owner: "OpenAIServer", path: str, raw: bytes) -> None:
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            self._error(400, "request body is not JSON")
            return
        if not self._authorized(owner):
            return
        with owner._lock:
            owner.route_requests.append((path, body))
        out = owner.routes[path](body)
        status, obj = out if isinstance(out, tuple) else (200, out)
        if status >= 400:
            self._error(status, str(obj))
        else:
            self._send_json(status, obj)

    def _chat(self, owner: "OpenAIServer", index: int, body: dict) -> None:
        if not self._authorized(owner):
            return
        fault = owner._fault(index, body)
        if owner.latency_s:
            time.sleep(owner.latency_s)
        if fault == "hang":
            owner._stopped.wait(owner.hang_s)
            fault = "ok"
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if isinstance(fault, int) and not isinstance(fault, bool):
            self._error(fault, f"injected fault {fault}")
            return
        if fault == "malformed":
            self._send_bytes(200, b'{"id": "x", "choices": [{"message": ')
            return
        if fault == "empty":
            self._send_json(200, {})
            return
        if fault == "huge":
            self._send_huge(owner.huge_bytes)
            return
        if fault == "garbage":
            rng = random.Random(index)
            junk = "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 300)))
            self._send_bytes(200, ("<html>502 Bad Gateway " + junk).encode(), content_type="text/plain")
            return
        if fault == "echo_auth":
            reply = owner._completion(body)
            reply["choices"][0]["message"]["content"] = "you sent: " + self.headers.get("Authorization", "")
            self._send_json(200, reply)
            return
        if fault != "ok":
            raise ValueError(f"unknown fault {fault!r}")
        self._send_json(200, owner._completion(body))

    def _send_huge(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        head = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "'
        tail = b'"}, "finish_reason": "stop"}]}'
        chunk = b"x" * 65536
        parts = [head] + [chunk] * max(1, size // len(chunk)) + [tail]
        for part in parts:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")


class OpenAIServer:
    """A loopback OpenAI chat-completions server in a background thread.

    Args:
        reply: `fn(messages) -> str`, the assistant's answer (default: echo the last user text).
        latency_s: sleep this long before answering each chat request.
        model: the model id reported by `/v1/models` and in replies.
        api_key: when set, chat requests without `Authorization: Bearer <api_key>` get 401.
        faults: a callable `(index, body) -> fault` or a sequence consumed per request.
        usage: include `usage` in replies.
        token_logprob: the logprob of every token when the request asks for `logprobs`.
        hang_s: how long a "hang" fault sleeps (cut short when the server stops).
        huge_bytes: size of a "huge" reply body.
        completion: `fn(body) -> dict` building the whole chat-completion reply (replaces `reply`).
        routes: extra POST endpoints, path -> `fn(body) -> obj | (status, obj)`.

    Attributes: `base_url` ("http://127.0.0.1:PORT/v1"), `port`, `requests` (chat requests
    received, faults included), `received` (their JSON bodies, in arrival order),
    `max_in_flight` (most chat requests handled at the same time), `route_requests`
    (`(path, body)` of the extra endpoints' calls).
    """

    def __init__(self, reply: Callable[[list[dict]], str] = echo_reply, *, latency_s: float = 0.0,
                 model: str = "m", api_key: str | None = None, faults: FaultSource | None = None,
                 usage: bool = True, token_logprob: float = -0.1, hang_s: float = 30.0,
                 huge_bytes: int = 8 * 1024 * 1024, completion: Callable[[dict], dict] | None = None,
                 routes: dict[str, Callable[[Any], Any]] | None = None):
        self.reply, self.latency_s, self.model, self.api_key = reply, latency_s, model, api_key
        self.completion, self.routes = completion, dict(routes or {})
        self.route_requests: list[tuple[str, Any]] = []
        self.usage, self.token_logprob, self.hang_s, self.huge_bytes = usage, token_logprob, hang_s, huge_bytes
        self._fault_fn: Callable[[int, dict], Fault] | None = None
        self._fault_iter = None
        if callable(faults):
            self._fault_fn = faults
        elif faults is not None:
            self._fault_iter = iter(faults)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._count = 0
        self._in_flight = 0
        self.max_in_flight = 0
        self.received: list[dict] = []
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> "OpenAIServer":
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"openai-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()  # wakes "hang" handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> int:
        with self._lock:
            return self._count

    # -- used by the handler threads ------------------------------------------------------
    def _enter(self, body: dict) -> int:
        with self._lock:
            index = self._count
            self._count += 1
            self.received.append(body)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            return index

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _fault(self, index: int, body: dict) -> Fault:
        if self._fault_fn is not None:
            return self._fault_fn(index, body)
        if self._fault_iter is not None:
            with self._lock:  # iterators are not thread-safe
                return next(self._fault_iter, "ok")
        return "ok"

    def _completion(self, body: dict) -> dict:
        if self.completion is not None:
            return self.completion(body)
        messages = body.get("messages") or []
        text = self.reply(messages)
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": w, "logprob": self.token_logprob, "bytes": None,
                                               "top_logprobs": []} for w in text.split()]}
        out: dict[str, Any] = {"id": f"chatcmpl-{self._count}", "object": "chat.completion",
                               "created": int(time.time()), "model": body.get("model", self.model),
                               "choices": [choice]}
        if self.usage:
            p = sum(len(message_text(m).split()) for m in messages)
            c = len(text.split())
            out["usage"] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        return out
