"""The learned policy's tokenizer: a small byte-level BPE trained locally in seconds.

    tok = train_policy_tokenizer(policy_corpus(registry), extra_tokens=policy_extra_tokens(registry))
    tok = pretrained_policy_tokenizer(folder, extra_tokens=policy_extra_tokens(registry))  # or a pretrained vocabulary
    tok.save_pretrained(path); tok = load_policy_tokenizer(path)

Special tokens: `<|bos|>`, `<|end|>` (the EOS: it ends every chat turn), `<|pad|>` and the
role markers `<|system|>`, `<|user|>`, `<|assistant|>`. The protocol tags (`<call>`, ...) and
every registry action target (`calc@@math`, `calc@@math/calculator`, ...) are single added
tokens (not special: they survive `decode`).

The chat template renders `<|bos|>` then `<|role|>content<|end|>` per message, and the
generation prompt `<|assistant|>`. Every boundary is a special token, so the template's
tokenisation of a conversation is exactly the concatenation of its parts: the prompt, each
turn's tokens + `<|end|>`, and each observation as `<|user|>...<|end|><|assistant|>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from maestro_core.errors import ConfigError
from maestro_core.protocol import PROTOCOL_TEXT
from maestro_core.registry import Registry

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
PROTOCOL_TAGS = ("<think>", "</think>", "<call>", "</call>", "<answer>", "</answer>",
                 "<information>", "</information>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def policy_extra_tokens(registry: Registry) -> tuple[str, ...]:
    """Every valid action target of the registry (single tokens in the policy tokenizer)."""
    return tuple(registry.grammar().actions)


def policy_corpus(registry: Registry, extra: Iterable[str] = ()) -> list[str]:
    """A small training corpus: the catalogue, the protocol, and example turns/observations."""
    texts = [registry.catalogue(), PROTOCOL_TEXT]
    for a in registry.grammar().actions:
        texts.append(f"<call>{a}: What is 12 + 30?</call>")
    texts += ["<answer>42</answer>", "<information>42 (confidence 0.90)</information>",
              "<information>error (malformed): no action</information>",
              "Question: How many words are in 'the quick brown fox'?",
              "Question: What is the value of the largest bar in the chart?\n[image 1: 640x480]\nBudget: $0.01",
              "0123456789 + - * / = ( ) . , ; : ? ! ' \" $ % the a of and to in is what how many which"]
    texts += list(extra)
    return texts


def train_policy_tokenizer(texts: Sequence[str], vocab_size: int = 2048, extra_tokens: Iterable[str] = (),
                           *, min_frequency: int = 1, protocol_tokens: bool = True):
    """Train a byte-level BPE on `texts`; add specials, protocol tags and `extra_tokens`
    (e.g. `policy_extra_tokens(registry)`) as single tokens; set the chat template.
    `protocol_tokens=False` leaves the tags to BPE (multi-token tags, for tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    added = _policy_tokens(extra_tokens, protocol_tokens)
    if added:
        tok.add_tokens(added)
    return _policy_fast(tok)


def _policy_fast(tok):
    """The transformers tokenizer around `tok` (a tokenizers.Tokenizer holding the specials):
    the policy's BOS/EOS/PAD and role markers, left padding, the chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=list(ROLE_TOKENS), clean_up_tokenization_spaces=False,
                                   padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _policy_tokens(extra_tokens: Iterable[str], protocol_tokens: bool = True) -> list:
    """The protocol tags (unless `protocol_tokens` is False) and `extra_tokens`, as single added
    tokens (not special: they survive `decode`), for the tokenizers' `add_tokens`."""
    from tokenizers import AddedToken

    added, seen = [], {BOS, EOS, PAD, *ROLE_TOKENS}
    for t in (*(PROTOCOL_TAGS if protocol_tokens else ()), *extra_tokens):
        if t not in seen:
            seen.add(t)
            added.append(AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                    special=False))
    return added


def pretrained_policy_tokenizer(path: str | Path, extra_tokens: Iterable[str] = (), max_vocab: int = 0):
    """A pretrained model's byte-level BPE tokenizer with this policy's conventions added after
    its vocabulary: the specials, role markers, protocol tags and `extra_tokens` as tokens of
    their own, the chat template, left padding. Token i < `max_vocab` keeps its pretrained id (so
    it is row i of that model's embedding matrix); with `max_vocab` > 0 the vocabulary is cut to
    its first `max_vocab` tokens (the earliest merges, the most frequent pieces) and the merges
    that build the rest are dropped, so rarer words split into more pieces. 0: all of it."""
    import json

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    data = json.loads(source.backend_tokenizer.to_str())
    if data["model"].get("type") != "BPE":
        raise ConfigError(f"the tokenizer of '{path}' is {data['model'].get('type')}, not a byte-level BPE.",
                          field="vocab_from", fix="name a model with a byte-level BPE tokenizer (Llama-3, "
                                                  "SmolLM2, Qwen2 class), or leave vocab_from empty.")
    if max_vocab > 0:
        vocab = {t: i for t, i in data["model"]["vocab"].items() if i < max_vocab}
        merges = []
        for m in data["model"]["merges"]:
            a, b = m if isinstance(m, list) else m.split(" ", 1)
            if a in vocab and b in vocab and a + b in vocab:
                merges.append(m)
        data["model"]["vocab"], data["model"]["merges"] = vocab, merges
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < max_vocab]
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([BOS, EOS, PAD, *ROLE_TOKENS])
    tok.add_tokens(_policy_tokens(extra_tokens))
    return _policy_fast(tok)


def load_policy_tokenizer(path: str | Path):
    """Load a tokenizer saved with `save_pretrained` (ours or any HF tokenizer)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    return tok
