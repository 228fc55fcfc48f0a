"""The learned policy's model side: a tiny random Llama for the CPU profile, or any HF causal LM.

    model = build_tiny_model(tokenizer, hidden=256, layers=4, heads=4, seed=0)
    model.save_pretrained(path); tokenizer.save_pretrained(path)
    model, tokenizer = load_policy_model(path), load_policy_tokenizer(path)
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(tokenizer, hidden: int = 256, layers: int = 4, heads: int = 4, *, kv_heads: int | None = None,
                     intermediate: int | None = None, max_positions: int = 4096, seed: int = 0,
                     tie_embeddings: bool = True):
    """A randomly initialised (seeded) LlamaForCausalLM sized to the tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

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
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def load_policy_model(path_or_hub_id: str | Path, *, dtype=None, device: str = "cpu"):
    """Any causal LM through `AutoModelForCausalLM.from_pretrained` (a local path or a hub id)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # every rollout chunk loads its checkpoint: no progress bar per load
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(path_or_hub_id), dtype=dtype or torch.float32)
    return model.to(device).eval()
