"""The `transformers` expert backend: an in-process Hugging Face causal LM.

    expert = TransformersExpert(spec)    # spec.kind == "transformers"
    await expert.load()                  # optional warm-up; the first call loads otherwise
    reply = await expert.generate([{"role": "user", "content": "Capital of France?"}])

Backend settings (`spec.backend`); name the weights with one of model / package / assemble:

- model: a hub id or a local directory (config.json + weights + tokenizer).
- package: an installed Python package holding the weights. With `gguf_file` (a glob inside
  the package folder, e.g. "*.gguf") the one matching GGUF file; alone, the package folder is
  the model directory. The package is found, not imported.
- assemble: a package that ships a GGUF file in parts with an `assemble(path)` function; the
  parts are joined once into <home>/models/<package>.gguf.
- gguf_file: with `model`, a GGUF file inside that directory (or in that hub repository);
  with `package`, a glob.
- dtype: "float32" (default), "bfloat16", "float16" or "auto". bfloat16 nearly halves the
  generation time on CPUs with bf16 instructions (AVX512-BF16 / AMX: Maestro-Mini's four LM
  pairs on 200 test questions, 261 s -> 141 s on a 2-core machine, benchmarks/lm_experts.py)
  and changes some greedy outputs (6 to 56 of the 200 final answers per pair); elsewhere it is
  slower than float32, and loading says so. "auto" picks bfloat16 on a CPU with those
  instructions and float32 on one without (`weights.resolve_dtype`); the expert's cache
  version (`Expert.digest`) holds the dtype it resolved to, so a cache never mixes the two.
- max_new_tokens (64).
- local_files_only (true): never touch the network; download models beforehand.
- use_chat_template: default true when the tokenizer has a chat template; otherwise the
  messages' contents are joined with newlines (and the tokenizer adds its BOS token).
- batch_window_ms (20): how long the first waiting request waits for others to join its batch.
- max_batch (16): the most requests generated together; 1 turns batching off.

<home> is $MAESTRO_HOME or ./.maestro. A GGUF file (whichever setting names it) is converted
once into a float32 safetensors folder under <home>/models/ (see maestro_core.weights) and
loaded from there with `from_pretrained`: ~20-60 s the first time, ~1-6 s afterwards.

Decoding is greedy (do_sample=False), so the expert is deterministic. tokens_in is the prompt
length, tokens_out the number of generated tokens (prompt excluded, the end-of-sequence token
included), and confidence is exp(mean log-probability of the generated tokens) under the
model's raw logits.

Micro-batching: calls that arrive while the model is busy, or within `batch_window_ms` of the
first waiting one, are generated together as ONE greedy `model.generate` over the
left-padded prompts (up to `max_batch`). On two CPU cores this multiplies throughput about 3x
at 8 requests. Padding changes the floating-point sums slightly, so a batched answer can in
rare cases differ from the unbatched one after a near-tie; identical prompts batched together
give identical answers.

The model is text-only: images are not seen, but each one is mentioned as "[image k]" at the
end of the last user message, so the model (and the logs) know something was not shown.

Concurrency and timeouts: one `generate` at a time per expert (a batch counts as one). The
model loads on first use in a worker thread (not bounded by `spec.timeout_s`). Waiting for a
batch to start is not bounded either; once a call's batch starts, the call is bounded by
`spec.timeout_s` -> ExpertTimeout. A thread cannot be killed: on timeout that call's row is
told to stop at the next token (the batch ends when all its rows have stopped or finished),
and the thread finishes in the background; the next batch waits for it.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from maestro_core import weights
from maestro_core.errors import ExpertError, ExpertTimeout
from maestro_core.experts.base import ExpertBackend, ExpertReply
from maestro_core.registry import Expert

MAX_BATCH_LIMIT = 256


@dataclass(eq=False)
class _Request:
    """One waiting `generate` call."""

    prompt: str
    templated: bool
    future: asyncio.Future
    started: asyncio.Event
    enqueued: float
    stop: threading.Event = field(default_factory=threading.Event)


class _Batcher:
    """Collects the requests of one event loop into batches and runs them one at a time."""

    def __init__(self, expert: "TransformersExpert"):
        self.expert = expert
        self.pending: list[_Request] = []
        self.full = asyncio.Event()
        self.task: asyncio.Task | None = None

    def submit(self, req: _Request) -> None:
        self.pending.append(req)
        if len(self.pending) >= self.expert.max_batch:
            self.full.set()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._loop()
        finally:  # never leave a caller waiting on a batch that will not come
            for r in self.pending:
                if not r.future.done():
                    r.future.set_exception(ExpertError("the batching task stopped before this request ran",
                                                       expert=self.expert.name))
                r.started.set()
            self.pending.clear()

    async def _loop(self) -> None:
        expert = self.expert
        while self.pending:
            # wait until the oldest request has waited batch_window_ms, or the batch is full
            remaining = self.pending[0].enqueued + expert.batch_window_s - time.perf_counter()
            if remaining > 0 and len(self.pending) < expert.max_batch:
                self.full.clear()
                try:
                    await asyncio.wait_for(self.full.wait(), remaining)
                except TimeoutError:
                    pass
            batch = [r for r in self.pending[:expert.max_batch] if not r.future.done()]
            del self.pending[:expert.max_batch]
            if len(self.pending) < expert.max_batch:
                self.full.clear()
            if not batch:
                continue
            for r in batch:
                r.started.set()
            try:
                results = await asyncio.to_thread(expert._generate_batch_sync, batch)
            except BaseException as e:  # noqa: BLE001  (every waiting caller gets the failure)
                for r in batch:
                    if r.stop.is_set():  # its caller is gone: nobody would read the exception
                        r.future.cancel()
                    elif not r.future.done():
                        r.future.set_exception(e if isinstance(e, Exception) else ExpertError(
                            f"generation interrupted: {type(e).__name__}", expert=expert.name))
                if not isinstance(e, Exception):
                    raise
                continue
            for r, res in zip(batch, results):
                if not r.future.done():
                    r.future.set_result(res)


class TransformersExpert(ExpertBackend):
    """A causal LM loaded with `AutoModelForCausalLM`, decoding greedily, micro-batching."""

    def __init__(self, spec: Expert):
        super().__init__(spec)
        b = spec.backend
        self.settings: dict[str, Any] = dict(b)
        self.model_path: str | None = str(b["model"]) if b.get("model") else None
        self.package: str | None = str(b["package"]) if b.get("package") else None
        self.assemble: str | None = str(b["assemble"]) if b.get("assemble") else None
        if not (self.model_path or self.package or self.assemble):
            raise ExpertError("no weights named. Fix: set backend.model (a hub id or local directory), "
                              "backend.package (+ gguf_file: a glob) or backend.assemble (a package "
                              "shipping a GGUF file in parts).", expert=spec.name)
        self.gguf_file: str | None = b.get("gguf_file")
        declared = str(b.get("dtype", "float32"))
        if declared not in weights.DTYPES:
            raise ExpertError(f"backend.dtype {declared!r} is not supported. Fix: use one of {list(weights.DTYPES)}.",
                              expert=spec.name)
        self.dtype = weights.resolve_dtype(declared)
        """The dtype the model loads in ("auto" resolved for this CPU)."""
        self.max_new_tokens = int(b.get("max_new_tokens", 64))
        self.local_files_only = bool(b.get("local_files_only", True))
        self.use_chat_template: bool | None = b.get("use_chat_template")
        window = b.get("batch_window_ms", 20)
        max_batch = b.get("max_batch", 16)
        if isinstance(window, bool) or not isinstance(window, (int, float)) or window < 0:
            raise ExpertError(f"backend.batch_window_ms must be a number >= 0, got {window!r}. "
                              "Fix: set it to e.g. 20.", expert=spec.name)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
            raise ExpertError(f"backend.max_batch must be an integer in [1, {MAX_BATCH_LIMIT}], got {max_batch!r}. "
                              "Fix: set it to e.g. 16 (1 turns batching off).", expert=spec.name)
        self.batch_window_s = float(window) / 1000.0
        self.max_batch = max_batch
        self.load_seconds: float | None = None
        """Seconds the last load took (GGUF conversion included)."""
        self.loaded_from: str | None = None
        """The folder or hub id `from_pretrained` loaded."""
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1024)
        """Sizes of the last 1024 batches generated (for measurements and tests)."""
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        # the thread lock serialises generations even across event loops and after a timeout
        # (the timed-out thread still holds it)
        self._thread_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Batcher] = weakref.WeakKeyDictionary()

    def _describe(self) -> str:
        if self.assemble:
            return f"assembled GGUF of package '{self.assemble}'"
        if self.package:
            return f"package '{self.package}'" + (f" (gguf_file '{self.gguf_file}')" if self.gguf_file else "")
        return f"'{self.model_path}'" + (f" (gguf_file '{self.gguf_file}')" if self.gguf_file else "")

    # -- loading ----------------------------------------------------------------------------
    async def load(self) -> None:
        """Load the tokenizer and model now (in a worker thread) if not loaded yet."""
        if self._model is None:
            await asyncio.to_thread(self._load_sync)

    def _load_sync(self) -> None:
        with self._load_lock:
            if self._model is not None:
                return
            start = time.perf_counter()
            try:
                from maestro_core.weights import model_loading, resolve_model

                with model_loading():  # the first import too: transformers' lazy module is not thread-safe
                    import torch
                    from transformers import AutoModelForCausalLM, AutoTokenizer
                source = resolve_model(self.settings, local_files_only=self.local_files_only)
                path, local_only = source.loadable(), source.gguf is not None or self.local_files_only
                with model_loading():  # loads run in worker threads: one at a time (see model_loading)
                    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
                    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.dtype),
                                                                 local_files_only=local_only)
                model.eval()
            except Exception as e:  # noqa: BLE001  (any load failure gets the same actionable message)
                fix = ("set backend.model to a local directory holding config.json, the weights and the "
                       "tokenizer files, or download the hub model first (huggingface-cli download ID) "
                       "and keep local_files_only: true")
                if self.package or self.assemble:
                    fix = "install the package that holds the weights (and its part packages), or correct the name"
                if self.gguf_file or self.assemble:
                    fix += "; for GGUF, check that gguf_file names one file and that the 'gguf' package is installed"
                raise ExpertError(f"cannot load model {self._describe()}: {type(e).__name__}: {e}. Fix: {fix}.",
                                  expert=self.name) from e
            if self.dtype == "bfloat16" and model.device.type == "cpu" and not weights.native_cpu_bf16():
                warnings.warn(f"expert {self.name!r} generates in bfloat16 on a CPU without bf16 instructions "
                              "(AVX512-BF16 or AMX), which is slower than float32. Fix: set backend.dtype: "
                              "auto (or float32) for this expert in the registry.", RuntimeWarning, stacklevel=2)
            head, embed = model.get_output_embeddings(), model.get_input_embeddings()
            if getattr(model.config, "tie_word_embeddings", False) and head is not None and embed is not None \
                    and head.weight is not embed.weight:
                raise ExpertError(f"model {self._describe()} loaded with its output layer untied from its embeddings "
                                  "although its config ties them, so it would write garbage. Fix: load transformers "
                                  "models one at a time (maestro_core.weights.model_loading); code outside it loaded "
                                  "one in another thread.", expert=self.name)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            eos = model.generation_config.eos_token_id
            eos = [eos] if isinstance(eos, int) else list(eos or [])
            if tokenizer.eos_token_id is not None:
                eos.append(tokenizer.eos_token_id)
            self._eos_ids = frozenset(int(t) for t in eos)
            self._tokenizer, self._model = tokenizer, model
            self.loaded_from = path
            self.load_seconds = time.perf_counter() - start

    # -- prompting --------------------------------------------------------------------------
    def _prompt(self, messages: list[Mapping[str, str]], n_images: int) -> tuple[str, bool]:
        """The prompt text, and whether it came from the chat template (which adds BOS)."""
        msgs = [{"role": m.get("role", "user"), "content": str(m.get("content") or "")} for m in messages]
        if n_images:
            tags = " ".join(f"[image {k}]" for k in range(1, n_images + 1))
            last_user = next((i for i in range(len(msgs) - 1, -1, -1) if msgs[i]["role"] == "user"), None)
            if last_user is None:
                msgs.append({"role": "user", "content": tags})
            else:
                msgs[last_user]["content"] = f"{msgs[last_user]['content']}\n{tags}".lstrip("\n")
        use_template = self.use_chat_template
        if use_template is None:
            use_template = bool(getattr(self._tokenizer, "chat_template", None))
        if use_template:
            text = self._tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return text, True
        return "\n".join(m["content"] for m in msgs), False

    # -- generation -------------------------------------------------------------------------
    def _generate_batch_sync(self, batch: list[_Request]) -> list[tuple[str, int, int, float | None]]:
        """Generate greedily for every request of `batch` in one `model.generate`."""
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        stops = [r.stop for r in batch]

        class _StopRows(StoppingCriteria):
            """Row i stops when its caller timed out or went away."""

            def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
                return torch.tensor([s.is_set() for s in stops], dtype=torch.bool, device=input_ids.device)

        class _ChosenLogProbs(LogitsProcessor):
            """Log-probability of each generated token under the raw logits, one step at a time
            (keeping one step of logits, not all of them: the vocabulary can be 262k wide)."""

            def __init__(self) -> None:
                self.prev: torch.Tensor | None = None
                self.steps: list[torch.Tensor] = []

            def take(self, chosen: torch.Tensor) -> None:
                assert self.prev is not None
                self.steps.append(self.prev.gather(1, chosen.view(-1, 1).to(self.prev.device)).squeeze(1))
                self.prev = None

            def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
                if self.prev is not None:  # input_ids ends with the token chosen from the previous scores
                    self.take(input_ids[:, -1])
                self.prev = torch.log_softmax(scores.float(), dim=-1)
                return scores

        with self._thread_lock:
            live = [i for i, r in enumerate(batch) if not r.stop.is_set()]
            results: list[tuple[str, int, int, float | None]] = [("", 0, 0, None)] * len(batch)
            if not live:  # all timed out while waiting for a previous generation
                return results
            batch = [batch[i] for i in live]
            stops = [r.stop for r in batch]
            tok, model = self._tokenizer, self._model
            ids = [tok(r.prompt, add_special_tokens=not r.templated)["input_ids"] for r in batch]
            width = max(len(x) for x in ids)
            pad = int(tok.pad_token_id)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for i, x in enumerate(ids):  # left padding: every prompt ends where generation starts
                if x:
                    input_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
                    mask[i, width - len(x):] = 1
            recorder = _ChosenLogProbs()
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                    do_sample=False, num_beams=1,
                    temperature=None, top_p=None, top_k=None,  # silence sampling defaults of the model's config
                    return_dict_in_generate=True, pad_token_id=pad,
                    logits_processor=LogitsProcessorList([recorder]),
                    stopping_criteria=StoppingCriteriaList([_StopRows()]),
                )
            gen = out.sequences[:, width:]
            if recorder.prev is not None and gen.shape[1] > len(recorder.steps):
                recorder.take(gen[:, len(recorder.steps)])
            logps = torch.stack(recorder.steps, dim=1) if recorder.steps else torch.zeros((len(ids), 0))
            self.batch_sizes.append(len(ids))
            for row, i in enumerate(live):
                seq = gen[row].tolist()
                n = len(seq)
                for j, t in enumerate(seq):  # the row ends at its first end-of-sequence token
                    if t in self._eos_ids:
                        n = j + 1
                        break
                text = tok.decode(seq[:n], skip_special_tokens=True)
                lp = logps[row, :n].tolist()
                conf = math.exp(sum(lp) / len(lp)) if lp else None
                results[i] = (text, len(ids[row]), n, conf)
        return results

    def _batcher(self) -> _Batcher:
        loop = asyncio.get_running_loop()
        b = self._batchers.get(loop)
        if b is None:
            b = self._batchers[loop] = _Batcher(self)
        return b

    async def _generate(self, messages: list[Mapping[str, str]], images: list[Path]) -> ExpertReply:
        await self.load()
        prompt, templated = self._prompt(messages, len(images))
        loop = asyncio.get_running_loop()
        req = _Request(prompt=prompt, templated=templated, future=loop.create_future(),
                       started=asyncio.Event(), enqueued=time.perf_counter())
        self._batcher().submit(req)
        try:
            await req.started.wait()
            start = time.perf_counter()  # latency is the batch's generation, not the queue before it
            text, n_in, n_out, conf = await asyncio.wait_for(asyncio.shield(req.future), self.spec.timeout_s)
        except TimeoutError:
            req.stop.set()  # this row stops at its next token; the thread finishes in the background
            raise ExpertTimeout(f"generation took longer than {self.spec.timeout_s:g} s "
                                f"(model {self._describe()}, max_new_tokens={self.max_new_tokens})",
                                expert=self.name) from None
        except asyncio.CancelledError:
            req.stop.set()
            if not req.future.done():
                req.future.cancel()
            raise
        except ExpertError:
            raise
        except Exception as e:  # noqa: BLE001  (a generation failure is the expert's failure)
            raise ExpertError(f"generation failed: {type(e).__name__}: {e}", expert=self.name) from e
        return self.reply(text, n_in, n_out, time.perf_counter() - start, confidence=conf)

    async def aclose(self) -> None:
        """Drop the model so its memory can be freed (the next call loads it again)."""
        with self._load_lock:
            self._model = self._tokenizer = None
