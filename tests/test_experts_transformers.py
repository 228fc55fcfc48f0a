"""TransformersExpert on a tiny Llama built from a config (no hub access, builds in ~1 s)."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path
from types import MappingProxyType

import pytest

from maestro_core.errors import ExpertError, ExpertTimeout
from maestro_core.experts import build_expert
from maestro_core.experts.transformers import TransformersExpert
from maestro_core.registry import Expert, Price

SENTENCES = [
    "The capital of France is Paris.",
    "Two plus two equals four.",
    "Read the text in the image and answer the question.",
    "A small model answers short questions about numbers and words.",
    "user assistant system: hello, how are you today?",
] * 4
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
USER = [{"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama and a byte-level BPE tokenizer with a chat template, saved to disk."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tied=False)


@pytest.fixture(scope="module")
def tiny_tied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with its output layer tied to its embeddings (as SmolLM2's and Gemma 3's are)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-tied-llama"), tied=True)


def save_tiny_llama(path: Path, *, tied: bool) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)

    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return path


def make_spec(model: Path | str, *, timeout_s: float = 30.0, **backend: object) -> Expert:
    settings = {"kind": "transformers", "model": str(model), "max_new_tokens": 8, **backend}
    return Expert(name="tiny", description="tiny llama", kind="transformers", backend=MappingProxyType(settings),
                  capabilities=frozenset({"text"}), price=Price(input_per_1m=1.0, output_per_1m=3.0),
                  timeout_s=timeout_s, max_concurrency=1)


def prompt_len(model: Path, messages: list[dict], template: bool = True) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    if template:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])
    return len(tok("\n".join(m["content"] for m in messages))["input_ids"])


async def test_generates_counts_prices_and_is_confident(tiny_model: Path) -> None:
    expert = build_expert(make_spec(tiny_model))
    assert isinstance(expert, TransformersExpert)
    r = await expert.generate(USER)
    assert isinstance(r.text, str)
    assert r.tokens_in == prompt_len(tiny_model, USER)
    assert 1 <= r.tokens_out <= 8
    assert r.cost == pytest.approx(expert.spec.price.cost(r.tokens_in, r.tokens_out))
    assert r.confidence is not None and 0.0 <= r.confidence <= 1.0
    assert r.latency_s > 0 and r.attempts == 1


async def test_greedy_is_deterministic_and_serialised(tiny_model: Path) -> None:
    expert = TransformersExpert(make_spec(tiny_model))
    replies = await asyncio.gather(*[expert.generate(USER) for _ in range(3)])
    assert len({(r.text, r.tokens_out, r.confidence) for r in replies}) == 1


async def test_without_chat_template_joins_contents(tiny_model: Path) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, *USER]
    plain = await TransformersExpert(make_spec(tiny_model, use_chat_template=False)).generate(msgs)
    templated = await TransformersExpert(make_spec(tiny_model)).generate(msgs)
    assert plain.tokens_in == prompt_len(tiny_model, msgs, template=False)
    assert templated.tokens_in == prompt_len(tiny_model, msgs, template=True)
    assert plain.tokens_in != templated.tokens_in


async def test_images_are_mentioned_not_seen(tiny_model: Path, tmp_path: Path) -> None:
    expert = TransformersExpert(make_spec(tiny_model))
    await expert.load()
    prompt, _ = expert._prompt(USER, 2)
    assert "What is two plus two?\n[image 1] [image 2]" in prompt
    with_images = await expert.generate(USER, images=[tmp_path / "a.png", tmp_path / "b.png"])
    without = await expert.generate(USER)
    assert with_images.tokens_in > without.tokens_in


async def test_bfloat16(tiny_model: Path) -> None:
    r = await TransformersExpert(make_spec(tiny_model, dtype="bfloat16", max_new_tokens=4)).generate(USER)
    assert 1 <= r.tokens_out <= 4 and 0.0 <= r.confidence <= 1.0


async def test_bfloat16_on_a_cpu_without_bf16_instructions_warns_with_the_fix(tiny_model: Path, monkeypatch) -> None:
    import maestro_core.weights as weights

    monkeypatch.setattr(weights, "native_cpu_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="slower than float32. Fix: set backend.dtype: auto"):
        await TransformersExpert(make_spec(tiny_model, dtype="bfloat16")).load()
    monkeypatch.setattr(weights, "native_cpu_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        await TransformersExpert(make_spec(tiny_model, dtype="bfloat16")).load()
        await TransformersExpert(make_spec(tiny_model)).load()  # float32: never


@pytest.mark.parametrize("native", [False, True])
async def test_dtype_auto_is_bfloat16_only_on_a_cpu_with_bf16_instructions(tiny_model: Path, monkeypatch,
                                                                           native: bool) -> None:
    """`dtype: auto` loads bfloat16 where the CPU has bf16 instructions and float32 elsewhere
    (no warning either way), and the expert's cache version is the one of the dtype it
    resolved to, so the cache keeps the two apart."""
    import torch

    import maestro_core.weights as weights

    monkeypatch.setattr(weights, "native_cpu_bf16", lambda: native)
    want = "bfloat16" if native else "float32"
    expert = TransformersExpert(make_spec(tiny_model, dtype="auto", max_new_tokens=4))
    assert expert.dtype == want
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        await expert.load()
        r = await expert.generate(USER)
    assert next(expert._model.parameters()).dtype == getattr(torch, want) and 1 <= r.tokens_out <= 4
    auto = make_spec(tiny_model, dtype="auto").digest
    assert auto == make_spec(tiny_model, dtype=want).digest
    monkeypatch.setattr(weights, "native_cpu_bf16", lambda: not native)
    assert make_spec(tiny_model, dtype="auto").digest != auto


def test_an_unknown_dtype_is_refused_with_the_choices(tiny_model: Path) -> None:
    from maestro_core.weights import resolve_dtype

    with pytest.raises(ExpertError, match=r"backend.dtype 'int8' is not supported. Fix: use one of \['auto'"):
        TransformersExpert(make_spec(tiny_model, dtype="int8"))
    assert resolve_dtype("float16") == "float16"
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8")


async def test_timeout(tiny_model: Path) -> None:
    expert = TransformersExpert(make_spec(tiny_model, timeout_s=0.001, max_new_tokens=200))
    await expert.load()  # loading is not bounded by timeout_s, generation is
    with pytest.raises(ExpertTimeout, match="longer than"):
        await expert.generate(USER)
    # the timed-out generation was told to stop; the expert keeps working
    fast = TransformersExpert(make_spec(tiny_model))
    assert (await fast.generate(USER)).tokens_out >= 1


async def test_load_error_names_model_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    expert = TransformersExpert(make_spec(missing))
    with pytest.raises(ExpertError) as info:
        await expert.generate(USER)
    msg = str(info.value)
    assert str(missing) in msg and "Fix:" in msg and "expert 'tiny'" in msg


FRESH_PROCESS_LOADS = """
import asyncio, sys
from maestro_core.experts.transformers import TransformersExpert
from tests.test_experts_transformers import make_spec
assert "transformers" not in sys.modules
experts = [TransformersExpert(make_spec(sys.argv[1])) for _ in range(4)]
async def main():
    await asyncio.gather(*(e.load() for e in experts))  # the first import of transformers, in 4 threads
asyncio.run(main())
print("loaded", len(experts))
"""


def test_experts_loading_at_once_in_a_fresh_process_import_transformers_safely(tiny_model: Path) -> None:
    """transformers' lazy top-level module is not safe to import from several threads at once:
    the first experts to load in a fresh process raised "cannot import name
    'AutoModelForCausalLM' from 'transformers'" (benchmarks/lm_experts.py hit it)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOADS, str(tiny_model)], cwd=root,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "loaded 4" in proc.stdout, proc.stderr[-3000:]


def test_bad_dtype_is_rejected(tiny_model: Path) -> None:
    with pytest.raises(ExpertError, match="dtype"):
        TransformersExpert(make_spec(tiny_model, dtype="int3"))


async def test_experts_loading_at_once_in_worker_threads_keep_their_tied_output_layer(tiny_tied_model: Path) -> None:
    """transformers 5 patches PreTrainedModel.tie_weights process-wide while it loads; loads in
    two threads at once used to leave it patched for good, and every later load of a tied
    model got a random lm_head (the LM experts wrote garbage after the policy's first load)."""
    from transformers.modeling_utils import PreTrainedModel

    original = PreTrainedModel.tie_weights
    for _ in range(2):
        experts = [TransformersExpert(make_spec(tiny_tied_model)) for _ in range(6)]
        await asyncio.gather(*(e.load() for e in experts))  # each in its own worker thread
        for e in experts:
            assert e._model.lm_head.weight is e._model.model.embed_tokens.weight
    assert PreTrainedModel.tie_weights is original


async def test_a_tied_model_that_loads_untied_is_refused(tiny_tied_model: Path, monkeypatch) -> None:
    """What a load outside maestro_core's lock could still do: refused, not garbage."""
    from transformers.modeling_utils import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "tie_weights", lambda self, *a, **k: None)
    with pytest.raises(ExpertError, match="untied"):
        await TransformersExpert(make_spec(tiny_tied_model)).load()
