"""Token ids of a conversation as the policy sees it, from a tokenizer's chat template.

    enc = ChatEncoder(tokenizer)
    ids = enc.context_ids(messages, sampled_turns)    # prompt + (turn ids, observation ids)*

The prompt (system + user) is the chat template's tokenisation with the generation prompt;
an observation adds exactly what the template puts between the end of the policy's turn (its
EOS) and the next generation prompt; a turn the policy sampled enters with its sampled ids,
never re-tokenised. Shared by the in-process (LMPolicy) and served (OpenAIPolicy) backends,
so a trajectory's ids mean the same whichever generated it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Sequence

from maestro_core.errors import ConfigError

_CONV = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


class ChatEncoder:
    def __init__(self, tokenizer: Any, chat_template_kwargs: Mapping[str, Any] | None = None,
                 cache_size: int = 256):
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self._prompts: OrderedDict[tuple, tuple[int, ...]] = OrderedDict()
        self._cache_size = cache_size
        self._obs_frame = self._observation_frame()

    def render(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  **self.chat_template_kwargs)

    def tok(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, messages: Sequence[Mapping[str, str]]) -> tuple[int, ...]:
        key = tuple((m["role"], m["content"]) for m in messages)
        ids = self._prompts.get(key)
        if ids is None:
            ids = self.tok(self.render(messages, True))
            self._prompts[key] = ids
            if len(self._prompts) > self._cache_size:
                self._prompts.popitem(last=False)
        return ids

    def _observation_frame(self) -> tuple[str, str]:
        """(text before, text after) an observation's content, from the end of a turn's EOS
        to the next generation prompt, as the chat template renders them."""
        eos = self.tokenizer.eos_token
        marker = "\x00OBS\x00"
        s1 = self.render(_CONV, False)
        s2 = self.render(_CONV + [{"role": "user", "content": marker}], True)
        if not eos or not s2.startswith(s1) or eos not in s1 or s2.count(marker) != 1:
            raise ConfigError("the tokenizer's chat template does not render a conversation as a prefix of its "
                              "continuation (with the EOS token ending each turn), so turns and observations "
                              "cannot be encoded separately.", field="tokenizer",
                              fix="use a chat template that keeps earlier turns unchanged (e.g. set "
                                  "chat_template_kwargs, or serve a template without history rewriting).")
        tail = s1[s1.rfind(eos) + len(eos):]
        before, after = s2[len(s1):].split(marker)
        return tail + before, after

    def encode_observation(self, message: Mapping[str, str]) -> tuple[int, ...]:
        if message.get("role", "user") == "user":
            before, after = self._obs_frame
            return self.tok(before + message["content"] + after)
        s1, s2 = self.render(_CONV, False), self.render(_CONV + [dict(message)], True)
        eos = self.tokenizer.eos_token
        return self.tok(s1[s1.rfind(eos) + len(eos):] + s2[len(s1):])

    def encode_turn(self, text: str) -> tuple[int, ...]:
        """A turn that was not sampled here: its text's ids, then EOS."""
        return self.tok(text) + ((self.eos_id,) if self.eos_id is not None else ())

    def context_ids(self, messages: Sequence[Mapping[str, str]],
                    sampled: Mapping[int, tuple[str, tuple[int, ...]]] | None = None) -> list[int]:
        """prompt + (turn ids, observation ids)*; `sampled[k]` = (text, ids) of the k-th policy
        turn as sampled, reused when the message still has that text."""
        ids = list(self.encode_prompt(messages[:2]))
        seen = sampled or {}
        k = 0
        for m in messages[2:]:
            if m["role"] == "assistant":
                rec = seen.get(k)
                ids.extend(rec[1] if rec is not None and rec[0] == m["content"] else self.encode_turn(m["content"]))
                k += 1
            else:
                ids.extend(self.encode_observation(m))
        return ids
