"""The `policy:` section of a run config: which backend samples the rollouts of training.

    policy:
      backend: openai                        # 'transformers' (default): the CPU policy, nothing else read
      checkpoint: Qwen/Qwen3-VL-4B-Thinking  # the learner's initial weights; the server starts on them
      base_url: http://127.0.0.1:8000/v1
      model: maestro-policy
      sync: reload_weights                   # the other keys: OpenAIPolicy's keyword arguments

'transformers': the learner samples its own rollouts in process (rollout policy spec kind
"learned"): the tiny random-init policy built from `train.*` (the CPU default), or, with
`checkpoint`, a pretrained model loaded with transformers (`vision: true`: a vision-language
model with its processor, which then sees the episodes' images):

    policy: {backend: transformers, checkpoint: HuggingFaceTB/SmolLM2-135M-Instruct}
    policy: {backend: transformers, checkpoint: /models/qwen3-vl-4b, vision: true}

'openai': the learner
(model + tokenizer) is loaded from `checkpoint` with transformers, an OpenAI-compatible
server (vLLM) started on the same weights samples the rollouts (`OpenAIPolicy`, spec kind
"served"), and after each GRPO update the new checkpoint folder is pushed to the server
(`OpenAIPolicy.sync_weights`) before the next collection. The API key is not a field:
OpenAIPolicy reads it from the environment (`api_key_env`, else MAESTRO_API_KEY, then
OPENAI_API_KEY), so it never reaches a config, a rollout spec or a checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maestro_core.errors import ConfigError
from maestro_core.http_policy import STRUCTURED_FIELDS, SYNC_PRESETS

BACKENDS = ("transformers", "openai")
_NOT_OPENAI_KWARGS = ("backend", "checkpoint", "base_url", "model")
"""Fields that are not OpenAIPolicy keyword arguments (base_url and model are its positionals)."""
IN_PROCESS_FIELDS = ("backend", "checkpoint", "vision")
"""The fields backend 'transformers' reads."""


def _f(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class PolicyConfig:
    backend: str = _f("transformers", "'transformers': the CPU policy built from train.* samples its own rollouts "
                                      "in process; 'openai': an OpenAI-compatible server (vLLM) samples them and "
                                      "is synced to each new checkpoint.")
    checkpoint: str | None = _f(None, "The initial weights (hub id or local folder with config.json, weights and "
                                      "tokenizer); the learner is loaded from it with transformers. openai: the "
                                      "server must start on the same weights. transformers: the learner samples "
                                      "in process (no warm-up, cost_prior or start_uniform: those shape the "
                                      "policy built from train.*); without it, the CPU policy from train.*.")
    base_url: str | None = _f(None, "openai: the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1.")
    model: str = _f("maestro-policy", "openai: the served model name (vllm serve --served-model-name).")
    tokenizer: str | None = _f(None, "openai: hub id or folder of the tokenizer that encodes prompts and "
                                     "observations (must be the served checkpoint's own); default: checkpoint.")
    vision: bool = _f(False, "The checkpoint is a vision-language model (Qwen3-VL-class): the learner is loaded "
                             "with AutoModelForImageTextToText and its AutoProcessor, prompt ids are the processor's "
                             "(image placeholders expanded), and the GRPO update sees the images; openai: the "
                             "server gets each episode's images as image_url parts; transformers: a VLMPolicy "
                             "samples in process with the pixels.")
    temperature: float | None = _f(None, "Sampling temperature of rollouts; default: train.temperature, and it "
                                         "must equal it (TRL recomputes logprobs at grpo.temperature). vLLM reports "
                                         "logprobs before temperature unless served with --logprobs-mode "
                                         "processed_logprobs, so use 1.0 or that flag.")
    max_tokens: int | None = _f(None, "Tokens per policy turn; default: train.max_turn_tokens.")
    seed: int | None = _f(None, "Base seed of the per-request sampling seeds (offset per iteration and chunk); "
                                "default: train.seed.")
    constrained: bool = _f(True, "Send the registry's action grammar as a structured-output regex.")
    answer_on_last_turn: bool = _f(True, "On the episode's last turn allow only <answer>...</answer>.")
    structured_outputs: str = _f("structured_outputs", "Grammar request field: 'structured_outputs' (vLLM >= "
                                                       "0.12) or 'guided_regex' (older vLLM).")
    record_tokens: bool = _f(True, "Record the served token ids and logprobs (vLLM extensions); training needs "
                                   "them, so it must stay true.")
    strict_context: bool = _f(False, "Raise when the server's prompt ids differ from the recorded ones (else "
                                     "counted in stats.context_mismatches and warned once).")
    chat_template_kwargs: dict[str, Any] | None = _f(None, "Chat template kwargs sent to the server and used "
                                                           "locally, e.g. {enable_thinking: false}.")
    extra_body: dict[str, Any] | None = _f(None, "Extra request body fields (merged last).")
    api_key_env: str | None = _f(None, "Name of the environment variable holding the API key (never the key); "
                                       "default: MAESTRO_API_KEY, then OPENAI_API_KEY, else no key.")
    timeout_s: float = _f(300.0, "Per-request timeout (seconds).")
    max_retries: int = _f(5, "Retries of 429, 5xx, timeouts and connection errors (exponential backoff).")
    backoff_s: float = _f(0.5, "First retry delay (seconds), doubled per attempt.")
    backoff_cap_s: float = _f(16.0, "Longest retry delay (seconds).")
    max_concurrency: int = _f(256, "Most requests in flight per process.")
    trust_env: bool = _f(False, "Let httpx read proxy settings from the environment.")
    sync: str = _f("reload_weights", "How a new checkpoint reaches the server: 'reload_weights' (vLLM with "
                                     "VLLM_SERVER_DEV_MODE=1: /collective_rpc + /reset_prefix_cache), 'lora' "
                                     "(--enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) or 'none' (the caller "
                                     "restarts the server).")
    sync_requests: tuple[Any, ...] | None = _f(None, "Instead of `sync`: POSTs [[path, body], ...] from the "
                                                     "server root; '{checkpoint_dir}' and '{checkpoint_id}' in body "
                                                     "strings are substituted.")
    sync_timeout_s: float = _f(900.0, "Timeout of each sync request (seconds).")
    lora_name_prefix: str = _f("maestro-policy", "sync 'lora': adapter names are this prefix + the checkpoint id.")

    def __post_init__(self):
        def bad(name: str, msg: str, fix: str):
            raise ConfigError(msg, entry="policy", field=name, fix=fix)

        if self.backend not in BACKENDS:
            bad("backend", f"backend '{self.backend}' is unknown.", f"use one of {list(BACKENDS)}.")
        if self.backend == "transformers":
            for f in dataclasses.fields(self):
                if f.name not in IN_PROCESS_FIELDS and getattr(self, f.name) != f.default:
                    bad(f.name, f"'{f.name}' is set but backend is 'transformers' (the learner samples in "
                                "process), which does not read it.",
                        "set backend: openai to sample rollouts with a server, or delete the field.")
            if self.checkpoint is not None and (not isinstance(self.checkpoint, str) or not self.checkpoint):
                bad("checkpoint", f"checkpoint must be a hub id or a folder, got {self.checkpoint!r}.",
                    "write the hub id or folder of the pretrained policy, or delete it for the CPU policy.")
            if self.vision and not self.checkpoint:
                bad("vision", "vision is set without a checkpoint: the CPU policy built from train.* is text-only.",
                    "set checkpoint to a vision-language model (hub id or folder), or delete vision.")
            return
        for name, fix in (("checkpoint", "set it to the hub id or folder of the weights the server starts on."),
                          ("base_url", "set it to the server's API root, e.g. http://127.0.0.1:8000/v1.")):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                bad(name, f"backend 'openai' needs '{name}'.", fix)
        for name in ("tokenizer", "api_key_env"):
            if getattr(self, name) is not None and (not isinstance(getattr(self, name), str) or not getattr(self, name)):
                bad(name, f"{name} must be a non-empty string, got {getattr(self, name)!r}.",
                    f"write a string, or delete {name} for the default.")
        if not self.model:
            bad("model", "model is empty.", "set the served model name (vllm serve --served-model-name).")
        if not self.record_tokens:
            bad("record_tokens", "training needs the served token ids and logprobs.",
                "set record_tokens: true and serve the policy with vLLM.")
        if self.structured_outputs not in STRUCTURED_FIELDS:
            bad("structured_outputs", f"unknown structured_outputs field '{self.structured_outputs}'.",
                f"use one of {list(STRUCTURED_FIELDS)}.")
        if self.sync not in SYNC_PRESETS:
            bad("sync", f"unknown sync mode '{self.sync}'.", f"use one of {sorted(SYNC_PRESETS)} or set sync_requests.")
        for name in ("temperature", "timeout_s", "backoff_s", "backoff_cap_s", "sync_timeout_s"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                bad(name, f"{name} must be a number >= 0, got {v!r}.", f"write a non-negative number for {name}.")
        for name, low in (("max_tokens", 1), ("seed", 0), ("max_retries", 0), ("max_concurrency", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                bad(name, f"{name} must be an integer >= {low}, got {v!r}.", f"write an integer >= {low}.")
        for name in ("chat_template_kwargs", "extra_body"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                bad(name, f"{name} must be a mapping.", f"write '{name}:' followed by key: value lines.")
        if self.sync_requests is not None and not all(
                isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in self.sync_requests):
            bad("sync_requests", "sync_requests must be a list of [path, body] pairs.",
                "write e.g. [[/update_weights_from_disk, {model_path: '{checkpoint_dir}'}]].")

    @property
    def served(self) -> bool:
        """Whether rollouts are sampled by a server (backend 'openai')."""
        return self.backend == "openai"

    @property
    def pretrained(self) -> bool:
        """Whether the learner is loaded from `checkpoint` (always for backend 'openai', which
        requires it; else the CPU policy is built from train.*)."""
        return bool(self.checkpoint)

    def check_train(self, train) -> None:
        """ConfigError when this section contradicts the training config (a TrainConfig)."""
        if self.pretrained and not self.served:
            for name in ("cost_prior", "start_uniform"):
                if getattr(train, name):
                    raise ConfigError(f"train.{name} fits the output layer of the policy built from train.*; "
                                      f"policy.checkpoint loads a pretrained one.", entry="train", field=name,
                                      fix=f"delete train.{name}, or policy.checkpoint for the CPU policy.")
        if self.served and self.temperature is not None and float(self.temperature) != float(train.temperature):
            raise ConfigError(f"policy.temperature {self.temperature} differs from train.temperature "
                              f"{train.temperature}: TRL recomputes logprobs at grpo.temperature, so the server must "
                              "sample at the same.", entry="policy", field="temperature",
                              fix="delete policy.temperature (it defaults to train.temperature) or make them equal.")

    def openai_kwargs(self, train, registry=None) -> dict[str, Any]:
        """OpenAIPolicy keyword arguments (without base_url and model), defaults filled in from
        the training config `train`: temperature, max_tokens, seed, tokenizer (= checkpoint;
        a local folder as an absolute path, so a chunk in another working directory finds it);
        with `registry`, also the action space of `train` (`actions: level1`, `call_input:
        question` and `image_routing` narrow the served grammar as they narrow the in-process policy's)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_OPENAI_KWARGS}
        tok = kw["tokenizer"] or self.checkpoint
        kw["tokenizer"] = str(Path(tok).resolve()) if tok and Path(tok).is_dir() else tok
        kw["temperature"] = float(train.temperature if self.temperature is None else self.temperature)
        kw["max_tokens"] = int(train.max_turn_tokens if self.max_tokens is None else self.max_tokens)
        kw["seed"] = int(train.seed if self.seed is None else self.seed)
        if self.sync_requests is not None:
            kw["sync_requests"] = [list(r) for r in self.sync_requests]
        if registry is not None:
            from maestro_core.training import policy_kwargs

            decoding = policy_kwargs(train, registry)
            kw["actions"], kw["free_input"] = list(decoding["actions"]), decoding["free_input"]
            kw["image_routing"] = decoding["image_routing"]
        return {k: v for k, v in kw.items() if v is not None}

    def build(self, registry, train, **overrides: Any):
        """An OpenAIPolicy for this section (`overrides`: any of its keyword arguments, and
        `model`); a ConfigError for the transformers backend."""
        from maestro_core.http_policy import OpenAIPolicy

        if not self.served:
            raise ConfigError("backend 'transformers' has no served policy.", entry="policy", field="backend",
                              fix="set backend: openai.")
        kw = {**self.openai_kwargs(train, registry), **overrides}
        model = kw.pop("model", self.model)
        return OpenAIPolicy(self.base_url, model, registry, **kw)


def load_learner(checkpoint: str | Path, *, vision: bool = False):
    """The learner (model, tokenizer) from a hub id or a local folder, with transformers
    (`local_files_only` for a folder; float32 weights, as every checkpoint is loaded). The
    tokenizer gets a pad token (GRPO needs one: the EOS token when it has none) and pads on
    the left. With `vision`: (AutoModelForImageTextToText, AutoProcessor), the padding set on
    the processor's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from maestro_core.weights import model_loading

    hf_logging.disable_progress_bar()
    src = str(checkpoint)
    local = Path(src).is_dir()
    try:
        with model_loading():
            if vision:
                from transformers import AutoModelForImageTextToText

                proc = AutoProcessor.from_pretrained(src, local_files_only=local)
                model = AutoModelForImageTextToText.from_pretrained(src, local_files_only=local, dtype=torch.float32)
                if not hasattr(proc, "tokenizer"):
                    raise ValueError(f"{type(proc).__name__} is a tokenizer, not a vision-language processor")
                tok = proc.tokenizer
            else:
                tok = proc = AutoTokenizer.from_pretrained(src, local_files_only=local)
                model = AutoModelForCausalLM.from_pretrained(src, local_files_only=local, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the learner from '{src}': {e}", entry="policy", field="checkpoint",
                          fix="pass a folder with config.json, the weights and the tokenizer (with vision: the "
                              "processor) files, or a hub id that is downloaded (or in the Hugging Face cache when "
                              "offline); a text-only checkpoint needs vision: false.") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model.eval(), proc
