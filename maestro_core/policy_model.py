"""The learned policy's model side: a tiny random Llama for the CPU profile, or any HF causal LM.

    model = build_tiny_model(tokenizer, hidden=256, layers=4, heads=4, seed=0)
    model.save_pretrained(path); tokenizer.save_pretrained(path)
    model, tokenizer = load_policy_model(path), load_policy_tokenizer(path)
    init_input_embeddings(model, projected_embeddings(source_folder, hidden=256))  # a pretrained vocabulary
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(tokenizer, hidden: int = 256, layers: int = 4, heads: int = 4, *, kv_heads: int | None = None,
                     intermediate: int | None = None, max_positions: int = 4096, seed: int = 0,
                     tie_embeddings: bool = True):
    """A randomly initialised (seeded) LlamaForCausalLM sized to the tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from maestro_core.weights import model_loading

    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}).")
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_embeddings, rms_norm_eps=1e-5)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with model_loading():  # another thread's load must not swap the init functions meanwhile
            model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def projected_embeddings(folder: str | Path, hidden: int, scale: float = 1.0, rows: int = 0):
    """The input embedding matrix of the causal LM saved in `folder` (safetensors; its first
    `rows` rows when `rows` > 0, the tokens a cut vocabulary keeps), centred and
    projected on its `hidden` leading principal components, then scaled so that its entries
    have standard deviation `scale` (one factor for the whole matrix: the geometry between
    words is kept). Rows are the source tokenizer's ids."""
    import torch
    from safetensors import safe_open

    from maestro_core.errors import ConfigError

    files = sorted(Path(folder).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as st:
            names = [k for k in st.keys() if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")]
            if names:
                matrix = st.get_tensor(names[0]).float()
                matrix = matrix[:rows] if rows > 0 else matrix
                break
    else:
        raise ConfigError(f"no input embedding (...embed_tokens.weight) in the safetensors files of '{folder}'.",
                          field="vocab_from", fix="name a causal LM folder saved with save_pretrained, or an "
                                                 "expert whose backend is a transformers LM (expert:NAME).")
    if hidden > min(matrix.shape):
        raise ConfigError(f"hidden {hidden} is wider than the source embeddings {tuple(matrix.shape)}.",
                          field="hidden", fix=f"use hidden <= {min(matrix.shape)} with this vocab_from.")
    centred = matrix - matrix.mean(0, keepdim=True)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)  # pca_lowrank is randomised
    try:
        _, _, v = torch.pca_lowrank(centred, q=hidden, center=False, niter=4)
    finally:
        torch.random.set_rng_state(state)
    out = centred @ v[:, :hidden]
    return out * (scale / out.std().clamp_min(1e-12))


def init_input_embeddings(model, vectors, scale: float = 1.0, seed: int = 0) -> None:
    """Rows [0, len(vectors)) of the model's input embedding become `vectors`; the rows after
    them (tokens added to the source vocabulary: specials, tags, actions) are drawn at the same
    scale (seeded)."""
    import torch

    emb = model.get_input_embeddings().weight
    n = vectors.shape[0]
    if vectors.shape[1] != emb.shape[1] or n > emb.shape[0]:
        raise ValueError(f"vectors {tuple(vectors.shape)} do not fit the embedding {tuple(emb.shape)}.")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb[:n] = vectors.to(emb.dtype)
        emb[n:] = torch.randn(emb.shape[0] - n, emb.shape[1], generator=gen).to(emb.dtype) * scale


DEVICE_ENV = "MAESTRO_POLICY_DEVICE"


def inference_device() -> str:
    """Where an in-process policy samples: $MAESTRO_POLICY_DEVICE when set ('cpu', 'cuda',
    'cuda:1', ...), else the first CUDA device when there is one, else the CPU. The learner's
    updates are placed by TRL (use_cpu off when a GPU is present); rollouts follow this."""
    import os

    import torch

    from maestro_core.errors import ConfigError

    name = os.environ.get(DEVICE_ENV, "").strip()
    if not name:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"{DEVICE_ENV}={name!r} is not a torch device: {e}", field=DEVICE_ENV,
                          fix="set it to cpu, cuda or cuda:N, or unset it (CUDA when available).") from e
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"{DEVICE_ENV}={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s).",
                          field=DEVICE_ENV, fix="set it to cpu, or to a CUDA device that exists, or unset it.")
    return str(dev)


def load_policy_model(path_or_hub_id: str | Path, *, dtype=None, device: str = "cpu"):
    """Any causal LM through `AutoModelForCausalLM.from_pretrained` (a local path or a hub id)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from maestro_core.weights import model_loading

    # every rollout chunk loads its checkpoint: no progress bar per load
    hf_logging.disable_progress_bar()
    with model_loading():
        model = AutoModelForCausalLM.from_pretrained(str(path_or_hub_id), dtype=dtype or torch.float32)
    return model.to(device).eval()
