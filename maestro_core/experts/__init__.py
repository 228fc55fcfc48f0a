"""Experts: frozen models behind one async interface (`ExpertBackend.generate`).

Backends: `http` (OpenAI-compatible chat completions: vLLM, llama.cpp server, any API),
`transformers` (an in-process Hugging Face causal LM) and `python` (an in-process Python
model such as an OCR engine or a classifier). `build_expert(spec)` makes the right one from a
registry entry; `build_experts(registry)` makes them all.
"""

from maestro_core.experts.base import ExpertBackend, ExpertReply, build_expert, build_experts

__all__ = ["ExpertBackend", "ExpertReply", "build_expert", "build_experts"]
