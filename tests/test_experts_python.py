"""PythonExpert with models defined in this module ("tests.test_experts_python:...")."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import pytest

from maestro_core.errors import ExpertError, ExpertReplyError, ExpertTimeout
from maestro_core.experts import build_expert
from maestro_core.experts.python import PythonExpert
from maestro_core.registry import Expert, Price, parse_registry

HERE = "tests.test_experts_python"
USER = [{"role": "user", "content": "2 + 3"}]
BUILDS: list[dict] = []  # factory calls, to check the model is built once


# -- models ------------------------------------------------------------------------------------

def make_calculator(prefix: str = "") -> Callable[[str, list[Path]], str]:
    BUILDS.append({"prefix": prefix})

    def model(text: str, images: list[Path]) -> str:
        a, op, b = text.split()
        return prefix + str({"+": int(a) + int(b), "*": int(a) * int(b)}[op])

    return model


def make_ocr() -> Callable[[str, list[Path]], dict]:
    def model(text: str, images: list[Path]) -> dict:
        return {"text": " | ".join(p.read_text() for p in images), "confidence": 0.9,
                "tokens_in": len(text.split()), "tokens_out": 3}

    return model


def make_sleeper(delay: float = 0.2) -> Callable[[str, list[Path]], str]:
    def model(text: str, images: list[Path]) -> str:
        time.sleep(delay)
        return text

    return model


def make_async(delay: float = 0.0) -> Callable[[str, list[Path]], Any]:
    async def model(text: str, images: list[Path]) -> dict:
        await asyncio.sleep(delay)
        # an async model runs on the loop's own thread
        return {"text": f"async {text} on {threading.current_thread().name}"}

    return model


def make_failing() -> Callable[[str, list[Path]], str]:
    def model(text: str, images: list[Path]) -> str:
        raise ZeroDivisionError("division by zero in the model")

    return model


def make_bad_reply(reply: Any = 42) -> Callable[[str, list[Path]], Any]:
    return lambda text, images: reply


def make_broken_factory() -> None:
    raise RuntimeError("weights file missing")


def make_not_callable() -> str:
    return "not a model"


class Models:
    @staticmethod
    def create() -> Callable[[str, list[Path]], str]:
        return lambda text, images: "from a dotted path"


# -- helpers -----------------------------------------------------------------------------------

def make_spec(target: str, *, timeout_s: float = 5.0, max_concurrency: int = 4, kwargs: dict | None = None) -> Expert:
    backend: dict[str, Any] = {"kind": "python", "callable": target}
    if kwargs is not None:
        backend["kwargs"] = kwargs
    return Expert(name="calc", description="", kind="python", backend=MappingProxyType(backend),
                  capabilities=frozenset({"math"}), price=Price(per_call=0.002, input_per_1m=1.0, output_per_1m=1.0),
                  timeout_s=timeout_s, max_concurrency=max_concurrency)


# -- tests -------------------------------------------------------------------------------------

async def test_str_model_from_registry() -> None:
    reg = parse_registry({
        "name": "t", "capabilities": {"math": "arithmetic"},
        "experts": [{"name": "calc", "backend": {"kind": "python", "callable": f"{HERE}:make_calculator",
                                                  "kwargs": {"prefix": "= "}},
                     "capabilities": ["math"], "price": {"per_call": 0.001}}],
        "skills": [{"name": "compute", "solvers": [{"name": "direct", "steps": [{"prompt": "{input}"}]}]}],
    })
    expert = build_expert(reg.experts["calc"])
    assert isinstance(expert, PythonExpert)
    BUILDS.clear()
    r1 = await expert.generate(USER)
    r2 = await expert.generate([{"role": "user", "content": "4 * 5"}])
    assert (r1.text, r2.text) == ("= 5", "= 20")
    assert (r1.tokens_in, r1.tokens_out, r1.confidence) == (0, 0, None)
    assert r1.cost == pytest.approx(0.001)
    assert BUILDS == [{"prefix": "= "}]  # built once, with the kwargs


async def test_dict_model_with_images_confidence_and_tokens(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("INVOICE 42")
    (tmp_path / "b.txt").write_text("TOTAL 7")
    expert = PythonExpert(make_spec(f"{HERE}:make_ocr"))
    r = await expert.generate([{"role": "user", "content": "read the page"}], images=[tmp_path / "a.txt",
                                                                                    str(tmp_path / "b.txt")])
    assert r.text == "INVOICE 42 | TOTAL 7"
    assert (r.confidence, r.tokens_in, r.tokens_out) == (0.9, 3, 3)
    assert r.cost == pytest.approx(expert.spec.price.cost(3, 3))


async def test_a_model_may_give_its_own_latency() -> None:
    slow = PythonExpert(make_spec(f"{HERE}:make_bad_reply", kwargs={"reply": {"text": "kept", "latency_s": 2.5}}))
    assert (await slow.generate(USER)).latency_s == 2.5  # not the microseconds the call took
    measured = PythonExpert(make_spec(f"{HERE}:make_sleeper", kwargs={"delay": 0.05}))
    assert (await measured.generate(USER)).latency_s >= 0.05


async def test_messages_are_joined_with_newlines() -> None:
    expert = PythonExpert(make_spec(f"{HERE}:make_sleeper", kwargs={"delay": 0.0}))
    r = await expert.generate([{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}])
    assert r.text == "sys\nhi"


async def test_async_model_is_awaited_on_the_loop() -> None:
    expert = PythonExpert(make_spec(f"{HERE}:make_async"))
    r = await expert.generate(USER)
    assert r.text == f"async 2 + 3 on {threading.current_thread().name}"


async def test_dotted_attribute_path() -> None:
    r = await PythonExpert(make_spec(f"{HERE}:Models.create")).generate(USER)
    assert r.text == "from a dotted path"


async def test_model_exception_becomes_expert_error() -> None:
    expert = PythonExpert(make_spec(f"{HERE}:make_failing"))
    with pytest.raises(ExpertError, match="ZeroDivisionError: division by zero in the model") as info:
        await expert.generate(USER)
    assert info.value.expert == "calc"


@pytest.mark.parametrize("reply, match", [(42, "expected str or a dict"), ({"txt": "x"}, "expected str or a dict"),
                                          ({"text": "x", "confidence": 1.5}, "confidence"),
                                          ({"text": "x", "tokens_out": -1}, "tokens_out"),
                                          ({"text": "x", "latency_s": -0.5}, "latency_s"),
                                          ({"text": "x", "latency_s": "1 s"}, "latency_s")])
async def test_bad_replies_are_reply_errors(reply: Any, match: str) -> None:
    expert = PythonExpert(make_spec(f"{HERE}:make_bad_reply", kwargs={"reply": reply}))
    with pytest.raises(ExpertReplyError, match=match):
        await expert.generate(USER)


async def test_slow_sync_model_times_out() -> None:
    expert = PythonExpert(make_spec(f"{HERE}:make_sleeper", kwargs={"delay": 0.5}, timeout_s=0.1))
    t0 = time.perf_counter()
    with pytest.raises(ExpertTimeout, match="longer than 0.1 s"):
        await expert.generate(USER)
    assert time.perf_counter() - t0 < 0.45  # did not wait for the thread


async def test_slow_async_model_times_out() -> None:
    expert = PythonExpert(make_spec(f"{HERE}:make_async", kwargs={"delay": 5.0}, timeout_s=0.1))
    with pytest.raises(ExpertTimeout):
        await expert.generate(USER)


async def test_concurrency_limit() -> None:
    expert = PythonExpert(make_spec(f"{HERE}:make_sleeper", kwargs={"delay": 0.2}, max_concurrency=2))
    await expert.load()
    t0 = time.perf_counter()
    replies = await asyncio.gather(*[expert.generate([{"role": "user", "content": str(i)}]) for i in range(6)])
    elapsed = time.perf_counter() - t0
    assert [r.text for r in replies] == [str(i) for i in range(6)]
    assert 0.6 <= elapsed < 2.0


@pytest.mark.parametrize("target, match", [
    ("tests.no_such_module:make", "cannot import module 'tests.no_such_module'"),
    (f"{HERE}:no_such_function", "has no attribute 'no_such_function'"),
    (f"{HERE}:HERE", "not callable"),
])
async def test_unknown_callable_is_a_clear_error(target: str, match: str) -> None:
    expert = PythonExpert(make_spec(target))
    with pytest.raises(ExpertError, match=match) as info:
        await expert.generate(USER)
    assert target in str(info.value) and "Fix:" in str(info.value)


async def test_factory_failures() -> None:
    with pytest.raises(ExpertError, match="RuntimeError: weights file missing.*Fix"):
        await PythonExpert(make_spec(f"{HERE}:make_broken_factory")).generate(USER)
    with pytest.raises(ExpertError, match="returned str, not a callable model"):
        await PythonExpert(make_spec(f"{HERE}:make_not_callable")).generate(USER)
    with pytest.raises(ExpertError, match="TypeError"):
        await PythonExpert(make_spec(f"{HERE}:make_calculator", kwargs={"nope": 1})).generate(USER)
