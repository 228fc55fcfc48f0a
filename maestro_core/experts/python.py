"""The `python` expert backend: an in-process Python model (OCR engine, classifier, calculator).

    # registry: backend: {kind: python, callable: "my_pkg.ocr:make_model", kwargs: {lang: en}}
    expert = PythonExpert(spec)
    reply = await expert.generate([{"role": "user", "content": "read this"}], images=["scan.png"])

Backend settings (`spec.backend`):

- callable (required): "package.module:function" (the part after the colon may be dotted,
  e.g. "pkg.mod:Class.create"). It is called once, on first use, with **kwargs, in a worker
  thread, and must return the model.
- kwargs: a mapping passed to that factory (default none).

The model is a callable `model(text: str, images: list[Path]) -> str | dict`, where `text` is
the messages' contents joined with newlines. A dict reply needs `text` and may carry
`confidence` (in [0, 1]), `tokens_in` and `tokens_out` (default 0, so only the registry's
per-call price applies), and `latency_s` (seconds >= 0; default the measured time of the call):
the model's own account of its time, e.g. a model that kept an earlier result gives the time
that result took (the OCR models' ReadMemo). An `async def` model (or an object whose
`__call__` is one) is awaited on the event loop; a plain one runs in a worker thread.

At most `spec.max_concurrency` calls run at once; each is bounded by `spec.timeout_s` ->
ExpertTimeout. A timed-out thread cannot be killed and finishes in the background (its slot is
freed, so a model that keeps timing out can briefly run more threads than max_concurrency).
Whatever the model raises becomes an ExpertError naming the exception, never a crash.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
import importlib
import inspect
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping

from maestro_core.errors import ExpertError, ExpertReplyError, ExpertTimeout
from maestro_core.experts.base import ExpertBackend, ExpertReply
from maestro_core.registry import Expert



def _timed(model: Callable, text: str, images: list[Path]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return model(text, images), time.perf_counter() - t0

class PythonExpert(ExpertBackend):
    """An expert implemented by a Python callable built from a factory."""

    def __init__(self, spec: Expert):
        super().__init__(spec)
        self.target = str(spec.backend["callable"])
        self.kwargs: dict[str, Any] = dict(spec.backend.get("kwargs") or {})
        self._model: Callable[..., Any] | None = None
        self._is_async = False
        self._load_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._sems: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()

    # -- loading ----------------------------------------------------------------------------
    async def load(self) -> None:
        """Import the factory and build the model now (in a worker thread) if not done yet."""
        if self._model is None:
            await asyncio.to_thread(self._load_sync)

    def _load_sync(self) -> None:
        with self._load_lock:
            if self._model is not None:
                return
            factory = self._import()
            try:
                model = factory(**self.kwargs)
            except Exception as e:  # noqa: BLE001
                raise ExpertError(f"building the model with {self.target}(**{self.kwargs!r}) failed: "
                                  f"{type(e).__name__}: {e}. Fix: check backend.kwargs and the factory.",
                                  expert=self.name) from e
            if not callable(model):
                raise ExpertError(f"{self.target} returned {type(model).__name__}, not a callable model. "
                                  "Fix: make the factory return a function model(text, images) -> str | dict.",
                                  expert=self.name)
            self._is_async = inspect.iscoroutinefunction(model) or inspect.iscoroutinefunction(
                getattr(model, "__call__", None))
            self._model = model

    def _import(self) -> Callable[..., Any]:
        module_name, _, attr_path = self.target.partition(":")
        fix = ("Fix: set backend.callable to 'package.module:function' where the module is importable "
               "(installed, or on PYTHONPATH) and defines that function.")
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001  (an import can fail in any way; name it)
            raise ExpertError(f"cannot import module '{module_name}' for callable '{self.target}': "
                              f"{type(e).__name__}: {e}. {fix}", expert=self.name) from e
        for part in attr_path.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ExpertError(f"callable '{self.target}': '{module_name}' has no attribute '{attr_path}'. "
                                  f"{fix}", expert=self.name) from None
        if not callable(obj):
            raise ExpertError(f"'{self.target}' is a {type(obj).__name__}, not callable. {fix}", expert=self.name)
        return obj

    # -- calls ------------------------------------------------------------------------------
    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._sems.get(loop)
        if sem is None:
            sem = self._sems[loop] = asyncio.Semaphore(self.spec.max_concurrency)
        return sem

    async def _generate(self, messages: list[Mapping[str, str]], images: list[Path]) -> ExpertReply:
        await self.load()
        model = self._model
        assert model is not None
        text = "\n".join(str(m.get("content") or "") for m in messages)
        async with self._semaphore():
            start = time.perf_counter()  # latency is the model's, not our queue's
            try:
                if self._is_async:
                    out = await asyncio.wait_for(model(text, list(images)), self.spec.timeout_s)
                    latency = time.perf_counter() - start
                else:
                    # own threads (one per slot), timed inside: the shared default executor's queue
                    # is not this model's latency
                    out, latency = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                        self._executor(), _timed, model, text, list(images)), self.spec.timeout_s)
            except TimeoutError:
                raise ExpertTimeout(f"model {self.target} took longer than {self.spec.timeout_s:g} s",
                                    expert=self.name) from None
            except ExpertError:
                raise
            except Exception as e:  # noqa: BLE001  (a model failure is reported, never a crash)
                err = ExpertError(f"model {self.target} raised {type(e).__name__}: {e}", expert=self.name)
                err.latency_s = time.perf_counter() - start  # type: ignore[attr-defined]
                raise err from e
        return self._to_reply(out, latency)

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.spec.max_concurrency,
                                            thread_name_prefix=f"expert-{self.name}")
        return self._pool

    def _to_reply(self, out: Any, latency_s: float) -> ExpertReply:
        if isinstance(out, str):
            return self.reply(out, 0, 0, latency_s)
        if not isinstance(out, dict) or not isinstance(out.get("text"), str):
            raise ExpertReplyError(f"model {self.target} returned {type(out).__name__}; expected str or a dict "
                                   "with a 'text' string.", expert=self.name)
        conf = out.get("confidence")
        if conf is not None:
            if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.0 <= conf <= 1.0:
                raise ExpertReplyError(f"model {self.target} returned confidence {conf!r}; expected a number "
                                       "in [0, 1] or none.", expert=self.name)
            conf = float(conf)
        tokens = []
        for key in ("tokens_in", "tokens_out"):
            n = out.get(key, 0) or 0
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ExpertReplyError(f"model {self.target} returned {key}={n!r}; expected an integer >= 0.",
                                       expert=self.name)
            tokens.append(n)
        own = out.get("latency_s")
        if own is not None:
            if isinstance(own, bool) or not isinstance(own, (int, float)) or not 0.0 <= own < float("inf"):
                raise ExpertReplyError(f"model {self.target} returned latency_s={own!r}; expected a number of "
                                       "seconds >= 0 or none.", expert=self.name)
            latency_s = float(own)
        return self.reply(out["text"], tokens[0], tokens[1], latency_s, confidence=conf)
