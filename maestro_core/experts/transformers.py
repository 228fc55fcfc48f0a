"""The `transformers` expert backend: an in-process Hugging Face causal LM.

    expert = TransformersExpert(spec)    # spec.kind == "transformers"
    await expert.load()                  # optional warm-up; the first call loads otherwise
    reply = await expert.generate([{"role": "user", "content": "Capital of France?"}])

Backend settings (`spec.backend`):

- model (required): a hub id or a local directory (config.json + weights + tokenizer).
- gguf_file: a GGUF file inside `model`, passed to `from_pretrained(gguf_file=...)`.
- dtype: "float32" (default), "bfloat16" or "float16".
- max_new_tokens (64).
- local_files_only (true): never touch the network; download models beforehand.
- use_chat_template: default true when the tokenizer has a chat template; otherwise the
  messages' contents are joined with newlines.

Decoding is greedy (do_sample=False), so the expert is deterministic. tokens_in is the prompt
length, tokens_out the number of generated tokens (prompt excluded), and confidence is
exp(mean log-probability of the generated tokens) under the model's raw logits.

The model is text-only: images are not seen, but each one is mentioned as "[image k]" at the
end of the last user message, so the model (and the logs) know something was not shown.

Concurrency and timeouts: one generation at a time per expert. The model loads on first use
in a worker thread (not bounded by `spec.timeout_s`). Generation runs in a worker thread
bounded by `spec.timeout_s` -> ExpertTimeout. A thread cannot be killed: on timeout it is
told to stop at the next token and finishes in the background; the next call waits for it.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Mapping

from maestro_core.errors import ExpertError, ExpertTimeout
from maestro_core.experts.base import ExpertBackend, ExpertReply
from maestro_core.registry import Expert

DTYPES = ("float32", "bfloat16", "float16")


class TransformersExpert(ExpertBackend):
    """A causal LM loaded with `AutoModelForCausalLM`, decoding greedily."""

    def __init__(self, spec: Expert):
        super().__init__(spec)
        b = spec.backend
        self.model_path = str(b["model"])
        self.gguf_file: str | None = b.get("gguf_file")
        self.dtype = str(b.get("dtype", "float32"))
        if self.dtype not in DTYPES:
            raise ExpertError(f"backend.dtype {self.dtype!r} is not supported. Fix: use one of {list(DTYPES)}.",
                              expert=spec.name)
        self.max_new_tokens = int(b.get("max_new_tokens", 64))
        self.local_files_only = bool(b.get("local_files_only", True))
        self.use_chat_template: bool | None = b.get("use_chat_template")
        self._model: Any = None
        self._tokenizer: Any = None
        # the thread lock serialises generations even across event loops and after a timeout
        # (the timed-out thread still holds it); the asyncio locks keep waiting calls out of
        # the thread pool
        self._thread_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    # -- loading ----------------------------------------------------------------------------
    async def load(self) -> None:
        """Load the tokenizer and model now (in a worker thread) if not loaded yet."""
        if self._model is None:
            await asyncio.to_thread(self._load_sync)

    def _load_sync(self) -> None:
        with self._load_lock:
            if self._model is not None:
                return
            try:
                import torch
                from transformers import AutoModelForCausalLM, AutoTokenizer

                kw: dict[str, Any] = {"local_files_only": self.local_files_only}
                if self.gguf_file:
                    kw["gguf_file"] = self.gguf_file
                tokenizer = AutoTokenizer.from_pretrained(self.model_path, **kw)
                model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype), **kw)
                model.eval()
            except Exception as e:  # noqa: BLE001  (any load failure gets the same actionable message)
                where = f"'{self.model_path}'" + (f" (gguf_file '{self.gguf_file}')" if self.gguf_file else "")
                fix = ("set backend.model to a local directory holding config.json, the weights and the "
                       "tokenizer files, or download the hub model first (huggingface-cli download ID) "
                       "and keep local_files_only: true")
                if self.gguf_file:
                    fix += "; for GGUF, check that gguf_file names a file inside that directory and that " \
                           "the 'gguf' package is installed"
                raise ExpertError(f"cannot load model {where}: {type(e).__name__}: {e}. Fix: {fix}.",
                                  expert=self.name) from e
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            self._tokenizer, self._model = tokenizer, model

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
    def _generate_sync(self, prompt: str, templated: bool, stop: threading.Event) -> tuple[str, int, int, float | None]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _StopOnEvent(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        with self._thread_lock:
            if stop.is_set():  # timed out while waiting for a previous generation
                return "", 0, 0, None
            tok, model = self._tokenizer, self._model
            enc = tok(prompt, return_tensors="pt", add_special_tokens=not templated)
            n_in = int(enc["input_ids"].shape[1])
            with torch.inference_mode():
                out = model.generate(
                    **enc, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                    temperature=None, top_p=None, top_k=None,  # silence sampling defaults of the model's config
                    output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([_StopOnEvent()]),
                )
            gen = out.sequences[0, n_in:]
            logits = out.logits or out.scores or ()
            logps = [torch.log_softmax(step[0].float(), dim=-1)[int(t)].item() for step, t in zip(logits, gen)]
            text = tok.decode(gen, skip_special_tokens=True)
        confidence = math.exp(sum(logps) / len(logps)) if logps else None
        return text, n_in, int(gen.shape[0]), confidence

    async def _generate(self, messages: list[Mapping[str, str]], images: list[Path]) -> ExpertReply:
        start = time.perf_counter()
        await self.load()
        prompt, templated = self._prompt(messages, len(images))
        loop = asyncio.get_running_loop()
        lock = self._locks.setdefault(loop, asyncio.Lock())
        stop = threading.Event()
        async with lock:
            try:
                text, n_in, n_out, conf = await asyncio.wait_for(
                    asyncio.to_thread(self._generate_sync, prompt, templated, stop), self.spec.timeout_s)
            except TimeoutError:
                stop.set()  # the thread stops at its next token and finishes in the background
                raise ExpertTimeout(f"generation took longer than {self.spec.timeout_s:g} s "
                                    f"(model '{self.model_path}', max_new_tokens={self.max_new_tokens})",
                                    expert=self.name) from None
            except ExpertError:
                raise
            except Exception as e:  # noqa: BLE001  (a generation failure is the expert's failure)
                raise ExpertError(f"generation failed: {type(e).__name__}: {e}", expert=self.name) from e
        return self.reply(text, n_in, n_out, time.perf_counter() - start, confidence=conf)

    async def aclose(self) -> None:
        """Drop the model so its memory can be freed (the next call loads it again)."""
        with self._load_lock:
            self._model = self._tokenizer = None
