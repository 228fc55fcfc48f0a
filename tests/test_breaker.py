"""The circuit breaker's state machine with an injectable clock, and its place in ExpertBackend."""

from __future__ import annotations

import asyncio
import copy

import pytest

from maestro_core.breaker import CLOSED, HALF_OPEN, OPEN, BreakerConfig, CircuitBreaker, counts_as_failure
from maestro_core.errors import (ConfigError, ExpertError, ExpertHTTPError, ExpertReplyError, ExpertTimeout,
                                 ExpertUnavailable)
from maestro_core.experts.base import ExpertBackend
from maestro_core.registry import parse_registry
from tests.conftest import BASE_REGISTRY


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def boom(status: int = 500) -> ExpertHTTPError:
    return ExpertHTTPError("boom", status=status, expert="e")


def fail(b: CircuitBreaker, n: int, err: Exception | None = None) -> None:
    for _ in range(n):
        trial = b.before_call()
        b.record_failure(err or boom(), trial)


def test_opens_after_n_failures_in_a_row_and_fails_fast():
    clock = Clock()
    b = CircuitBreaker("e", BreakerConfig(failures=3, window_s=60, cooldown_s=10), clock=clock)
    fail(b, 2)
    assert b.state == CLOSED
    fail(b, 1)
    assert b.state == OPEN and b.opened == 1
    with pytest.raises(ExpertUnavailable) as info:
        b.before_call()
    msg = str(info.value)
    assert "expert 'e'" in msg and "3 failures in a row" in msg and "HTTP 500: boom" in msg and "Fix:" in msg
    assert info.value.retry_in_s == pytest.approx(10.0) and not info.value.retryable
    assert b.rejected == 1


def test_success_resets_the_streak():
    b = CircuitBreaker("e", BreakerConfig(failures=3), clock=Clock())
    fail(b, 2)
    b.record_success(b.before_call())
    fail(b, 2)
    assert b.state == CLOSED


def test_failures_older_than_the_window_are_forgotten():
    clock = Clock()
    b = CircuitBreaker("e", BreakerConfig(failures=3, window_s=5, cooldown_s=10), clock=clock)
    fail(b, 2)
    clock.t += 6
    fail(b, 2)
    assert b.state == CLOSED  # only 2 within the last 5 s
    fail(b, 1)
    assert b.state == OPEN


def test_half_open_lets_exactly_one_trial_through_and_success_closes():
    clock = Clock()
    b = CircuitBreaker("e", BreakerConfig(failures=1, cooldown_s=10), clock=clock)
    fail(b, 1)
    clock.t += 9.9
    with pytest.raises(ExpertUnavailable):
        b.before_call()
    clock.t += 0.1
    assert b.state == HALF_OPEN
    trial = b.before_call()
    assert trial is True and b.trials == 1
    with pytest.raises(ExpertUnavailable, match="while its trial call runs"):
        b.before_call()  # a second caller while the trial runs
    b.record_success(trial)
    assert b.state == CLOSED
    assert b.before_call() is False


def test_failed_trial_reopens_for_another_cooldown():
    clock = Clock()
    b = CircuitBreaker("e", BreakerConfig(failures=2, cooldown_s=10), clock=clock)
    fail(b, 2)
    clock.t += 10
    trial = b.before_call()
    b.record_failure(ExpertTimeout("slow", expert="e"), trial)
    assert b.state == OPEN and b.opened == 2
    clock.t += 5
    with pytest.raises(ExpertUnavailable, match="another 5.0 s"):
        b.before_call()


def test_cancelled_or_uncounted_trial_frees_the_trial_slot():
    clock = Clock()
    b = CircuitBreaker("e", BreakerConfig(failures=1, cooldown_s=1), clock=clock)
    fail(b, 1)
    clock.t += 1
    b.release(b.before_call())  # cancelled
    assert b.state == HALF_OPEN
    trial = b.before_call()
    b.record_failure(boom(400), trial)  # the caller's mistake says nothing about the expert
    assert b.state == HALF_OPEN
    b.record_success(b.before_call())
    assert b.state == CLOSED


def test_late_success_of_a_call_admitted_before_opening_does_not_close():
    clock = Clock()
    b = CircuitBreaker("e", BreakerConfig(failures=1, cooldown_s=10), clock=clock)
    early = b.before_call()
    fail(b, 1)
    b.record_success(early)
    assert b.state == OPEN


def test_what_counts_as_a_failure():
    assert counts_as_failure(ExpertTimeout("t"))
    assert counts_as_failure(ExpertReplyError("not JSON"))
    assert counts_as_failure(boom(500)) and counts_as_failure(boom(503)) and counts_as_failure(boom(429))
    assert not counts_as_failure(boom(400)) and not counts_as_failure(boom(401))
    conn = ExpertError("connection refused")
    conn.retryable = True
    assert counts_as_failure(conn)
    assert not counts_as_failure(ExpertError("model raised ValueError on this input"))
    assert not counts_as_failure(ExpertUnavailable("open"))


def test_zero_failures_turns_it_off():
    b = CircuitBreaker("e", BreakerConfig(failures=0), clock=Clock())
    fail(b, 100)
    assert b.state == CLOSED and not b.rejecting() and b.opened == 0


@pytest.mark.parametrize("kw, field", [({"failures": -1}, "breaker.failures"), ({"failures": 2.5}, "breaker.failures"),
                                       ({"window_s": 0}, "breaker.window_s"), ({"cooldown_s": "1m"}, "breaker.cooldown_s")])
def test_config_is_validated(kw, field):
    with pytest.raises(ConfigError, match="Fix:") as info:
        BreakerConfig(**kw)
    assert info.value.field == field


# -- the registry entry and the backend ------------------------------------------------------

def _registry(**breaker):
    d = copy.deepcopy(BASE_REGISTRY)
    d["experts"][0]["breaker"] = breaker
    return parse_registry(d, source="unit.yaml")


def test_registry_entry_sets_the_breaker_and_default_keeps_the_version():
    plain = parse_registry(copy.deepcopy(BASE_REGISTRY))
    assert plain.experts["calc"].breaker == BreakerConfig()
    assert _registry().version == plain.version  # `breaker: {}` is the default
    reg = _registry(failures=2, window_s=5, cooldown_s=0.5)
    assert reg.experts["calc"].breaker == BreakerConfig(2, 5.0, 0.5)
    assert reg.version != plain.version and reg.to_dict()["experts"]["calc"]["breaker"]["failures"] == 2


@pytest.mark.parametrize("breaker, field", [({"failures": "3"}, "breaker.failures"), ({"cooldown_s": -1}, "breaker.cooldown_s"),
                                            ({"cooldwn_s": 1}, "cooldwn_s"), ("often", "breaker")])
def test_registry_breaker_errors_name_entry_field_fix(breaker, field):
    d = copy.deepcopy(BASE_REGISTRY)
    d["experts"][0]["breaker"] = breaker
    with pytest.raises(ConfigError) as info:
        parse_registry(d, source="unit.yaml")
    msg = str(info.value)
    assert "unit.yaml" in msg and "experts[0] calc" in msg and f"field '{field}'" in msg and "Fix:" in msg


class _Flaky(ExpertBackend):
    """Fails with `errors` in order, then answers 'ok'; counts the calls that reached it."""

    def __init__(self, spec, errors):
        super().__init__(spec)
        self.errors, self.calls = list(errors), 0

    async def _generate(self, messages, images):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.reply("ok", 0, 0, 0.0)


async def test_backend_fails_fast_while_open_then_recovers():
    spec = _registry(failures=2, cooldown_s=0.05).experts["calc"]
    expert = _Flaky(spec, [boom(503), ExpertTimeout("slow", expert="calc")])
    for _ in range(2):
        with pytest.raises(ExpertError):
            await expert.generate([{"role": "user", "content": "1+1"}])
    with pytest.raises(ExpertUnavailable):
        await expert.generate([{"role": "user", "content": "1+1"}])
    assert expert.calls == 2  # the third call never reached the model
    await asyncio.sleep(0.06)
    assert (await expert.generate([{"role": "user", "content": "1+1"}])).text == "ok"
    assert expert.breaker.state == CLOSED and expert.calls == 3


async def test_cancelled_call_is_no_verdict():
    spec = _registry(failures=1, cooldown_s=0.01).experts["calc"]

    class _Hang(ExpertBackend):
        async def _generate(self, messages, images):
            await asyncio.sleep(10)

    expert = _Hang(spec)
    for _ in range(3):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(expert.generate([{"role": "user", "content": "x"}]), 0.01)
    assert expert.breaker.state == CLOSED
