"""HTTPExpert against a real loopback OpenAI-compatible server (tests/openai_server.py)."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from types import MappingProxyType

import pytest

from maestro_core.errors import ExpertError, ExpertHTTPError, ExpertReplyError, ExpertTimeout
from maestro_core.experts import build_expert
from maestro_core.experts.http import HTTPExpert
from maestro_core.registry import Expert, Price, parse_registry
from tests.openai_server import OpenAIServer

USER = [{"role": "user", "content": "what is two plus two"}]
KEY = "sk-test-0123456789abcdef-SECRET"


@pytest.fixture(autouse=True)
def _no_ambient_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # a developer's real key must neither leak into the test server nor change results
    for env in ("MAESTRO_API_KEY", "OPENAI_API_KEY", "TEST_EXPERT_KEY"):
        monkeypatch.delenv(env, raising=False)


def make_spec(base_url: str, *, timeout_s: float = 5.0, max_concurrency: int = 8, name: str = "remote",
              **backend: object) -> Expert:
    settings = {"kind": "http", "base_url": base_url, "model": "m", "backoff_s": 0.01, **backend}
    return Expert(name=name, description="test expert", kind="http", backend=MappingProxyType(settings),
                  capabilities=frozenset({"text"}), price=Price(input_per_1m=2.0, output_per_1m=8.0, per_call=0.001),
                  timeout_s=timeout_s, max_concurrency=max_concurrency)


async def test_normal_reply_usage_and_cost() -> None:
    with OpenAIServer(reply=lambda msgs: "the answer is four") as srv:
        expert = HTTPExpert(make_spec(srv.base_url, max_tokens=32, extra_body={"seed": 7}))
        try:
            r = await expert.generate(USER)
        finally:
            await expert.aclose()
        assert r.text == "the answer is four"
        assert (r.tokens_in, r.tokens_out) == (5, 4)  # words, as the server counts them
        assert r.cost == pytest.approx(expert.spec.price.cost(5, 4))
        assert r.attempts == 1 and r.latency_s > 0 and r.confidence is None
        sent = srv.received[0]
        assert sent["model"] == "m" and sent["messages"] == USER
        assert sent["temperature"] == 0.0 and sent["max_tokens"] == 32 and sent["seed"] == 7
        assert "logprobs" not in sent


async def test_build_expert_from_registry() -> None:
    with OpenAIServer() as srv:
        reg = parse_registry({
            "name": "t", "capabilities": {"text": "text"},
            "experts": [{"name": "remote", "backend": {"kind": "http", "base_url": srv.base_url, "model": "m"},
                         "capabilities": ["text"], "price": {"per_call": 0.5}}],
            "skills": [{"name": "ask", "solvers": [{"name": "direct", "steps": [{"prompt": "{input}"}]}]}],
        })
        expert = build_expert(reg.experts["remote"])
        assert isinstance(expert, HTTPExpert)
        r = await expert.generate(USER)
        await expert.aclose()
        assert r.text == "echo: what is two plus two" and r.cost == pytest.approx(0.5)


async def test_logprobs_give_confidence() -> None:
    with OpenAIServer(token_logprob=-0.25) as srv:
        expert = HTTPExpert(make_spec(srv.base_url, logprobs=True))
        r = await expert.generate(USER)
        await expert.aclose()
        assert srv.received[0]["logprobs"] is True
        assert r.confidence == pytest.approx(math.exp(-0.25))


async def test_missing_usage_is_estimated_from_characters() -> None:
    with OpenAIServer(reply=lambda m: "x" * 10, usage=False) as srv:
        expert = HTTPExpert(make_spec(srv.base_url))
        r = await expert.generate(USER)
        await expert.aclose()
        assert r.tokens_in == math.ceil(len(USER[0]["content"]) / 4)
        assert r.tokens_out == math.ceil(10 / 4)


async def test_images_become_data_url_parts(tmp_path) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "b.jpg").write_bytes(b"jpeg")
    with OpenAIServer() as srv:
        expert = HTTPExpert(make_spec(srv.base_url))
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "read it"}]
        r = await expert.generate(msgs, images=[tmp_path / "a.png", str(tmp_path / "b.jpg")])
        await expert.aclose()
    sent = srv.received[0]["messages"]
    assert sent[0] == {"role": "system", "content": "be brief"}
    text, img_a, img_b = sent[1]["content"]
    assert text == {"type": "text", "text": "read it"}
    assert img_a["type"] == "image_url"
    head, b64 = img_a["image_url"]["url"].split(",", 1)
    assert head == "data:image/png;base64" and base64.b64decode(b64) == png
    assert img_b["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert r.text == "echo: read it"


async def test_unreadable_image_is_an_expert_error(tmp_path) -> None:
    with OpenAIServer() as srv:
        expert = HTTPExpert(make_spec(srv.base_url))
        with pytest.raises(ExpertError, match="cannot read image"):
            await expert.generate(USER, images=[tmp_path / "missing.png"])
        await expert.aclose()
        assert srv.requests == 0


# -- authentication --------------------------------------------------------------------------

async def test_api_key_from_named_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_EXPERT_KEY", KEY)
    with OpenAIServer(api_key=KEY) as srv:
        expert = HTTPExpert(make_spec(srv.base_url, api_key_env="TEST_EXPERT_KEY"))
        r = await expert.generate(USER)
        await expert.aclose()
        assert r.text.startswith("echo:")


async def test_default_env_var_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with OpenAIServer(api_key=KEY) as srv:
        expert = HTTPExpert(make_spec(srv.base_url))
        assert (await expert.generate(USER)).text.startswith("echo:")
        await expert.aclose()


async def test_wrong_key_is_401_without_retry_and_never_leaks(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TEST_EXPERT_KEY", KEY)
    with OpenAIServer(api_key="sk-the-right-one") as srv:  # it echoes the key it got, as real APIs do
        expert = HTTPExpert(make_spec(srv.base_url, api_key_env="TEST_EXPERT_KEY"))
        with pytest.raises(ExpertHTTPError) as info:
            await expert.generate(USER)
        await expert.aclose()
        assert srv.requests == 1
    err = info.value
    assert err.status == 401 and not err.retryable
    assert KEY not in str(err) and KEY not in repr(err.args) and "***" in str(err)
    assert KEY not in caplog.text


async def test_key_not_in_retry_errors_or_logs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MAESTRO_API_KEY", KEY)
    with OpenAIServer(api_key=KEY, faults=lambda i, body: 503) as srv:
        expert = HTTPExpert(make_spec(srv.base_url, max_retries=2))
        with pytest.raises(ExpertHTTPError) as info:
            await expert.generate(USER)
        await expert.aclose()
    assert info.value.status == 503 and KEY not in str(info.value)
    assert KEY not in caplog.text and "retrying" in caplog.text


async def test_missing_named_env_var_says_how_to_fix() -> None:
    with OpenAIServer() as srv:
        expert = HTTPExpert(make_spec(srv.base_url, api_key_env="TEST_EXPERT_KEY"))
        with pytest.raises(ExpertError, match="TEST_EXPERT_KEY.*not set.*Fix"):
            await expert.generate(USER)
        assert srv.requests == 0


# -- retries ---------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [500, 429, 503])
async def test_retryable_status_then_success(status: int) -> None:
    with OpenAIServer(faults=[status, status, "ok"]) as srv:
        expert = HTTPExpert(make_spec(srv.base_url))
        r = await expert.generate(USER)
        await expert.aclose()
        assert srv.requests == 3 and r.attempts == 3 and r.text.startswith("echo:")


async def test_no_retry_on_400() -> None:
    with OpenAIServer(faults=[400, "ok"]) as srv:
        expert = HTTPExpert(make_spec(srv.base_url))
        with pytest.raises(ExpertHTTPError) as info:
            await expert.generate(USER)
        await expert.aclose()
        assert srv.requests == 1
    assert info.value.status == 400 and not info.value.retryable and "injected fault 400" in str(info.value)
    assert info.value.attempts == 1


async def test_last_error_raised_after_max_retries() -> None:
    with OpenAIServer(faults=lambda i, body: 500) as srv:
        expert = HTTPExpert(make_spec(srv.base_url, max_retries=2))
        with pytest.raises(ExpertHTTPError) as info:
            await expert.generate(USER)
        await expert.aclose()
        assert srv.requests == 3
    assert info.value.status == 500 and info.value.retryable


async def test_timeout_after_bounded_retries() -> None:
    with OpenAIServer(faults=lambda i, body: "hang") as srv:
        expert = HTTPExpert(make_spec(srv.base_url, timeout_s=0.2, max_retries=1))
        t0 = time.perf_counter()
        with pytest.raises(ExpertTimeout) as info:
            await expert.generate(USER)
        elapsed = time.perf_counter() - t0
        await expert.aclose()
        assert srv.requests == 2
    assert 0.38 <= elapsed < 2.0
    assert info.value.retryable and "0.2 s" in str(info.value)


async def test_timeout_then_success() -> None:
    with OpenAIServer(faults=["hang", "ok"]) as srv:
        expert = HTTPExpert(make_spec(srv.base_url, timeout_s=0.3))
        r = await expert.generate(USER)
        await expert.aclose()
        assert r.attempts == 2 and r.latency_s >= 0.3


async def test_malformed_json_is_retried() -> None:
    with OpenAIServer(faults=["malformed", "ok"]) as srv:
        expert = HTTPExpert(make_spec(srv.base_url))
        r = await expert.generate(USER)
        await expert.aclose()
        assert srv.requests == 2 and r.attempts == 2


async def test_always_malformed_gives_reply_error() -> None:
    with OpenAIServer(faults=lambda i, body: "malformed") as srv:
        expert = HTTPExpert(make_spec(srv.base_url, max_retries=1))
        with pytest.raises(ExpertReplyError, match="not valid JSON"):
            await expert.generate(USER)
        await expert.aclose()
        assert srv.requests == 2


async def test_dropped_connection_is_retried() -> None:
    with OpenAIServer(faults=["drop", "ok"]) as srv:
        expert = HTTPExpert(make_spec(srv.base_url))
        r = await expert.generate(USER)
        await expert.aclose()
        assert r.attempts == 2 and srv.requests == 2


async def test_connection_refused_is_retryable_error() -> None:
    with OpenAIServer() as srv:
        url = srv.base_url  # the port is free again once the server stops
    expert = HTTPExpert(make_spec(url, max_retries=1))
    with pytest.raises(ExpertError, match="connection .* failed.*Fix") as info:
        await expert.generate(USER)
    await expert.aclose()
    assert info.value.retryable and info.value.attempts == 2


async def test_wrong_shape_is_not_retried() -> None:
    # a JSON reply without choices: the server understood us but answered nonsense
    with OpenAIServer(faults=["empty", "ok"]) as srv:
        expert = HTTPExpert(make_spec(srv.base_url))
        with pytest.raises(ExpertReplyError, match="no choices"):
            await expert.generate(USER)
        await expert.aclose()
        assert srv.requests == 1


# -- body size -------------------------------------------------------------------------------

async def test_huge_chunked_body_is_refused() -> None:
    with OpenAIServer(faults=["huge"], huge_bytes=16 * 1024 * 1024) as srv:
        expert = HTTPExpert(make_spec(srv.base_url))
        with pytest.raises(ExpertReplyError, match="larger than"):
            await expert.generate(USER)
        # not retried, and the expert still works afterwards
        r = await expert.generate(USER)
        await expert.aclose()
        assert srv.requests == 2 and r.text.startswith("echo:")


async def test_body_over_limit_with_content_length_is_refused() -> None:
    with OpenAIServer(reply=lambda m: "y" * 5000) as srv:
        expert = HTTPExpert(make_spec(srv.base_url, max_body_bytes=1000))
        with pytest.raises(ExpertReplyError, match="larger than 1000"):
            await expert.generate(USER)
        await expert.aclose()


# -- concurrency -----------------------------------------------------------------------------

async def test_concurrency_limit_respected() -> None:
    with OpenAIServer(latency_s=0.2) as srv:
        expert = HTTPExpert(make_spec(srv.base_url, max_concurrency=2))
        t0 = time.perf_counter()
        replies = await asyncio.gather(*[expert.generate([{"role": "user", "content": f"q{i}"}]) for i in range(6)])
        elapsed = time.perf_counter() - t0
        await expert.aclose()
        assert srv.max_in_flight == 2
    assert elapsed >= 0.6
    assert [r.text for r in replies] == [f"echo: q{i}" for i in range(6)]


async def test_200_concurrent_calls_across_experts() -> None:
    with OpenAIServer(latency_s=0.05) as srv:
        experts = [HTTPExpert(make_spec(srv.base_url, name=f"e{k}", max_concurrency=50)) for k in range(4)]
        t0 = time.perf_counter()
        replies = await asyncio.gather(*[experts[i % 4].generate([{"role": "user", "content": f"n {i}"}])
                                         for i in range(200)])
        elapsed = time.perf_counter() - t0
        for e in experts:
            await e.aclose()
        assert srv.requests == 200
    assert all(r.attempts == 1 for r in replies)
    assert [r.text for r in replies] == [f"echo: n {i}" for i in range(200)]
    assert elapsed < 10.0  # ~0.5 s here; a serialised client would need 10 s


def test_works_across_event_loops() -> None:
    with OpenAIServer() as srv:
        expert = HTTPExpert(make_spec(srv.base_url))

        async def call_and_close():
            try:
                return await expert.generate(USER)
            finally:
                await expert.aclose()

        first = asyncio.run(call_and_close())
        second = asyncio.run(call_and_close())  # a new loop gets its own client and slots
    assert first.text == second.text


async def test_server_lists_models() -> None:
    import httpx

    with OpenAIServer(model="tiny") as srv:
        async with httpx.AsyncClient() as client:
            resp = await client.get(f"{srv.base_url}/models")
    assert resp.json()["data"][0]["id"] == "tiny"
