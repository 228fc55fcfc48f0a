"""A circuit breaker per expert: stop calling an expert that keeps failing, try again later.

    breaker = CircuitBreaker("ocr", BreakerConfig(failures=5, window_s=60, cooldown_s=30))
    trial = breaker.before_call()        # raises ExpertUnavailable while open
    try:
        reply = await call()
    except ExpertError as e:
        breaker.record_failure(e, trial)
        raise
    except BaseException:
        breaker.release(trial)           # cancelled: says nothing about the expert
        raise
    breaker.record_success(trial)

States. closed: calls go through; `failures` counted failures in a row, all within the
last `window_s` seconds, open the breaker. open: for `cooldown_s` every call fails at
once with `ExpertUnavailable` (the expert is not contacted). half-open: after the cool-down
one trial call goes through (others still fail fast); its success closes the breaker, its
failure opens it for another cool-down.

Counted failures are the expert's own trouble: timeouts, HTTP 429 and 5xx, connection
errors, replies that cannot be read (`counts_as_failure`). A 4xx other than 429, a model that
raises on one input, or a cancelled call is neither a failure nor a success. Every expert
backend has one (`ExpertBackend.generate`); its settings are the registry entry's optional
`breaker:` mapping.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from maestro_core.errors import ConfigError, ExpertError, ExpertHTTPError, ExpertReplyError, ExpertTimeout, ExpertUnavailable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    """When an expert's breaker opens and for how long (registry: `experts[].breaker`)."""

    failures: int = field(default=5, metadata={
        "help": "Counted failures in a row that open the breaker; 0 turns the breaker off."})
    window_s: float = field(default=60.0, metadata={
        "help": "The failures in a row must fall within this many seconds; older ones are forgotten."})
    cooldown_s: float = field(default=30.0, metadata={
        "help": "Seconds an open breaker fails calls fast before it lets one trial call through."})

    def __post_init__(self):
        if isinstance(self.failures, bool) or not isinstance(self.failures, int) or self.failures < 0:
            raise ConfigError(f"failures must be an integer >= 0, got {self.failures!r}.", field="breaker.failures",
                              fix="set it to e.g. 5, or 0 to turn the breaker off.")
        for name in ("window_s", "cooldown_s"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or val <= 0:
                raise ConfigError(f"{name} must be a positive number, got {val!r}.", field=f"breaker.{name}",
                                  fix=f"set it to e.g. {getattr(BreakerConfig, name)}.")


def counts_as_failure(error: BaseException) -> bool:
    """Is this error the expert's own trouble (so it counts toward opening the breaker)?"""
    if isinstance(error, ExpertUnavailable):
        return False
    if isinstance(error, (ExpertTimeout, ExpertReplyError)):
        return True
    if isinstance(error, ExpertHTTPError):
        return error.status == 429 or error.status >= 500
    # connection errors are marked retryable; a model raising on one input is not
    return isinstance(error, ExpertError) and bool(getattr(error, "retryable", False))


class CircuitBreaker:
    """The breaker of one expert. Thread-safe; `clock` is injectable for tests."""

    def __init__(self, expert: str, config: BreakerConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic):
        self.expert = expert
        self.config = config or BreakerConfig()
        self.clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._streak: list[float] = []  # times of the counted failures in a row
        self._opened_at = 0.0
        self._trial_in_flight = False
        self._last_error = ""
        self.opened = 0
        """How many times the breaker opened."""
        self.rejected = 0
        """Calls failed fast without contacting the expert."""
        self.trials = 0
        """Trial calls let through in the half-open state."""

    @property
    def enabled(self) -> bool:
        return self.config.failures > 0

    @property
    def state(self) -> str:
        """closed, open or half_open (an open breaker whose cool-down is over reads half_open)."""
        with self._lock:
            if self._state == OPEN and self._cooled_down():
                return HALF_OPEN
            return self._state

    def _cooled_down(self) -> bool:
        return self.clock() - self._opened_at >= self.config.cooldown_s

    def _unavailable(self) -> ExpertUnavailable:
        left = max(0.0, self.config.cooldown_s - (self.clock() - self._opened_at))
        wait = (f"for another {left:.1f} s, then one trial call is let through" if left > 0
                else "while its trial call runs")
        return ExpertUnavailable(
            f"unavailable: circuit breaker open after {self.config.failures} failures in a row (last: "
            f"{self._last_error}); calls fail fast {wait}. Fix: check the expert (its server, its logs) or "
            "use another expert; tune the registry's experts[].breaker (failures, window_s, cooldown_s).",
            expert=self.expert, retry_in_s=left)

    def rejecting(self) -> bool:
        """True while calls must fail fast (open and cooling down). Backends ask it again before
        each attempt, so calls queued or retrying when the breaker opened stop there."""
        with self._lock:
            return self.enabled and self._state == OPEN and not self._cooled_down()

    def unavailable(self) -> ExpertUnavailable:
        """The error a rejected call raises (counts the rejection)."""
        with self._lock:
            self.rejected += 1
            return self._unavailable()

    def before_call(self) -> bool:
        """Admit a call or raise ExpertUnavailable. Returns True when the call is the trial."""
        if not self.enabled:
            return False
        with self._lock:
            if self._state == CLOSED:
                return False
            if self._state == OPEN and not self._cooled_down():
                self.rejected += 1
                raise self._unavailable()
            if self._trial_in_flight:
                self.rejected += 1
                raise self._unavailable()
            self._state, self._trial_in_flight = HALF_OPEN, True
            self.trials += 1
            return True

    def record_success(self, trial: bool = False) -> None:
        with self._lock:
            if trial or self._state == CLOSED:
                self._state, self._trial_in_flight = CLOSED, False
                self._streak.clear()
            # a call admitted before the breaker opened proves little: only the trial closes it

    def record_failure(self, error: BaseException, trial: bool = False) -> None:
        """Count `error` if it is the expert's trouble; otherwise treat the call as neutral."""
        if not counts_as_failure(error):
            self.release(trial)
            return
        with self._lock:
            now = self.clock()
            self._last_error = _short(str(error).removeprefix(f"expert '{self.expert}': "))
            if trial:
                self._open(now)
                return
            if self._state != CLOSED or not self.enabled:
                return
            self._streak = [t for t in self._streak if now - t <= self.config.window_s]
            self._streak.append(now)
            if len(self._streak) >= self.config.failures:
                self._open(now)

    def release(self, trial: bool = False) -> None:
        """The call ended without telling anything (cancelled, a client-side error)."""
        if trial:
            with self._lock:
                self._trial_in_flight = False  # the next call becomes the trial

    def _open(self, now: float) -> None:
        self._state, self._opened_at, self._trial_in_flight = OPEN, now, False
        self._streak.clear()
        self.opened += 1


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
