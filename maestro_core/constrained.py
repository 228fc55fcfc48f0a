"""Grammar-constrained action decoding: every sampled turn is a valid action.

    grammar = ActionConstraint(tokenizer, registry.grammar().actions, max_tokens=24, allow_think=False)
    state = grammar.start()                       # one per sequence being sampled
    while not state.done:
        logits[~state.mask()] = -inf; tok = sample(logits); state.advance(tok)

A turn is `<call>` + one valid target + (`</call>` + EOS when `forward_question`: the
expert gets the task's question) or `:` + text (first token starts with a space; no '<'
anywhere; at least one non-space character) + `</call>` + EOS, or `<answer>` + text (no '<',
non-empty) + `</answer>` + EOS, optionally preceded by `<think>` + text + `</think>`
(`allow_think`). `free_input=False` (with `forward_question`) leaves only the forwarding form:
the policy routes, the experts read the task's question. The text is bounded: the state machine counts the tokens left and forces
the closing tag and EOS in time, so a turn never exceeds `max_tokens` tokens.

It works on the token level for any tokenizer: tags, targets (`calc@@math:`) and answer
candidates are matched through tries over their token sequences (single tokens in the policy
tokenizer, several tokens in e.g. SmolLM2's); the free-text token sets are precomputed from the
vocabulary once. `candidates=[...]` restricts the answer text to one of those strings (e.g.
what observations returned). `ActionLogitsProcessor` wraps it for `model.generate`.
"""

from __future__ import annotations

from typing import Hashable, Iterable, Mapping, Sequence

import torch

from maestro_core.errors import ConfigError


class TokenTrie:
    """A trie over token-id sequences, each ending at a labelled terminal node.

    `need[node]`: the fewest tokens from this node to a terminal plus that label's tail cost."""

    def __init__(self, seqs: Sequence[tuple[Sequence[int], Hashable]], tail_cost: dict | None = None):
        self.children: list[dict[int, int]] = [{}]
        self.label: list[Hashable | None] = [None]
        for ids, lab in seqs:
            if not ids:
                continue
            node = 0
            for t in ids:
                nxt = self.children[node].get(t)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][t] = nxt
                    self.children.append({})
                    self.label.append(None)
                node = nxt
            if self.label[node] is None:
                self.label[node] = lab
        tail = tail_cost or {}
        inf = 1 << 30
        self.need = [inf] * len(self.children)
        for node in range(len(self.children) - 1, -1, -1):  # children always have larger ids
            best = tail.get(self.label[node], 0) if self.label[node] is not None else inf
            for c in self.children[node].values():
                best = min(best, 1 + self.need[c])
            self.need[node] = best

    @property
    def empty(self) -> bool:
        return not self.children[0]


class _Vocab:
    """Per-token flags as boolean masks over the vocabulary."""

    def __init__(self, tokenizer, vocab_size: int):
        n = vocab_size
        special = set(tokenizer.all_special_ids)
        free = torch.zeros(n, dtype=torch.bool)
        content = torch.zeros(n, dtype=torch.bool)
        space = torch.zeros(n, dtype=torch.bool)
        for i in range(min(n, len(tokenizer))):
            if i in special:
                continue
            s = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if not s or "<" in s or "\ufffd" in s or any((ord(ch) < 32 and ch not in "\n\t") or ord(ch) == 127
                                                          for ch in s):
                continue
            free[i] = True
            content[i] = bool(s.strip())
            space[i] = s[0] == " "
        self.free_content = free & content
        self.free_ws = free & ~content
        self.space_content = self.free_content & space
        self.space_ws = self.free_ws & space
        self.n = n


def _ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False))


class ActionConstraint:
    """The grammar of one policy turn over a tokenizer's vocabulary (build once, share)."""

    def __init__(self, tokenizer, actions: Iterable[str], *, max_tokens: int = 24, allow_think: bool = False,
                 forward_question: bool = False, free_input: bool = True, vocab_size: int | None = None,
                 prices: Mapping[str, float] | None = None):
        actions = tuple(actions)
        if not actions:
            raise ConfigError("the registry grammar has no actions.", fix="check the registry's experts and skills.")
        self.tokenizer, self.max_tokens, self.allow_think = tokenizer, max_tokens, allow_think
        self.eos = tokenizer.eos_token_id
        self.vocab = _Vocab(tokenizer, vocab_size or len(tokenizer))
        enc = lambda s: _ids(tokenizer, s)  # noqa: E731
        self.open = {k: enc(f"<{k}>") for k in ("think", "call", "answer")}
        self.close = {k: enc(f"</{k}>") for k in ("think", "call", "answer")}
        # after the text: the close tag, then EOS (call/answer) or the action (think)
        self.text_tail = {"call": len(self.close["call"]) + 1, "answer": len(self.close["answer"]) + 1}
        if not (free_input or forward_question):
            raise ConfigError("free_input=False needs forward_question=True (otherwise no call can be written).",
                              fix="set forward_question=True, or keep free_input=True.")
        seqs = [(enc(f"{a}:"), a) for a in actions] if free_input else []
        tails = {a: 1 + self.text_tail["call"] for a in actions} if free_input else {}
        if forward_question:
            # `<call>TARGET</call>`: forward the task's question (then only EOS follows)
            seqs += [(enc(a) + self.close["call"], ("forward", a)) for a in actions]
            tails.update({("forward", a): 1 for a in actions})
        self.targets = TokenTrie(seqs, tails)
        self.after_open = {"call": self.targets.need[0], "answer": 1 + self.text_tail["answer"]}
        self.openers = TokenTrie([(self.open[k], k) for k in ("call", "answer")], self.after_open)
        self.min_action = self.openers.need[0]
        self.text_tail["think"] = len(self.close["think"]) + self.min_action
        self.after_open["think"] = self.text_tail["think"]
        self.openers_think = TokenTrie([(self.open[k], k) for k in ("think", "call", "answer")], self.after_open)
        self.openers_answer = TokenTrie([(self.open["answer"], "answer")], self.after_open)
        self.openers_call = TokenTrie([(self.open["call"], "call")], self.after_open)
        for trie in (self.openers, self.openers_think, self.targets):
            if any(trie.label[n] is not None and trie.children[n] for n in range(len(trie.children))):
                raise ConfigError("a tag or target tokenises as a prefix of another.", fix="use a different tokenizer.")
        if self.min_action > max_tokens:
            raise ConfigError(f"max_turn_tokens={max_tokens} is too small: the shortest valid turn takes "
                              f"{self.min_action} tokens.", field="max_turn_tokens", fix=f"set it >= {self.min_action}.")
        self._cache: dict = {}
        missing = sorted(set(actions) - set(prices)) if prices is not None else []
        if missing:
            raise ConfigError(f"no price for the actions {missing}.",
                              fix="pass a price (USD per call) for every action.")
        self.prices = {a: float(prices[a]) for a in actions} if prices is not None else None
        """Estimated price (USD) of a call to each action: what TurnState.price_bias reads."""

    def start(self, candidates: Sequence[str] | None = None, *, answer_only: bool = False,
              call_until_candidates: bool = False) -> "TurnState":
        """A fresh state for one turn; `candidates` restricts the answer text to those strings;
        `answer_only` allows only `<answer>` (the episode's last turn: no call can be answered);
        `call_until_candidates` allows only `<call>` while no candidate is usable (answers are
        restricted to what observations returned, and none has returned anything yet)."""
        cand = None
        if candidates:
            seqs = []
            for c in dict.fromkeys(c.strip() for c in candidates):
                if c and "<" not in c:
                    ids = _ids(self.tokenizer, c)
                    if ids and all(bool(self.vocab.free_content[i] | self.vocab.free_ws[i]) for i in ids):
                        seqs.append((ids, c))
            trie = TokenTrie(seqs, {c: self.text_tail["answer"] for _, c in seqs})
            if not trie.empty and len(self.open["answer"]) + trie.need[0] <= self.max_tokens:
                cand = trie
        return TurnState(self, cand, answer_only=answer_only,
                         call_only=call_until_candidates and cand is None and not answer_only)

    # cached masks -------------------------------------------------------------------------
    def _mask_of(self, key, build) -> torch.Tensor:
        m = self._cache.get(key)
        if m is None:
            m = build()
            if len(self._cache) < 100_000:
                self._cache[key] = m
        return m

    def _price_bias(self, trie: TokenTrie, node: int) -> torch.Tensor | None:
        """Per token allowed at `node`: how much the cheapest call reachable through it costs more
        than the cheapest reachable from `node` (USD; 0 for an answer). Along any path the
        biases add up to the chosen call's price (minus the node's minimum, the same for all)."""
        key = ("p", id(trie), node)
        if key in self._cache:
            return self._cache[key]
        low = self._cache.get(("p", id(trie)))
        if low is None:
            cheapest_call = min(self.prices.values())

            def price(lab) -> float:
                if trie is self.targets:
                    return self.prices[lab[1] if isinstance(lab, tuple) else lab]
                return cheapest_call if lab == "call" else 0.0
            inf = float("inf")
            low = [inf] * len(trie.children)
            for n in range(len(trie.children) - 1, -1, -1):  # children always have larger ids
                best = price(trie.label[n]) if trie.label[n] is not None else inf
                low[n] = min([best] + [low[c] for c in trie.children[n].values()])
            self._cache[("p", id(trie))] = low
        bias = None
        if len({low[c] for c in trie.children[node].values()}) > 1:
            bias = torch.zeros(self.vocab.n)
            for t, c in trie.children[node].items():
                bias[t] = low[c] - low[node]
        self._cache[key] = bias
        return bias

    def _ids_mask(self, ids: Iterable[int]) -> torch.Tensor:
        m = torch.zeros(self.vocab.n, dtype=torch.bool)
        ids = list(ids)
        if ids:
            m[torch.tensor(ids)] = True
        return m


class TurnState:
    """Where one sequence is in the turn grammar. `mask()` -> allowed ids; `advance(token)`."""

    __slots__ = ("g", "cand", "n", "phase", "node", "trie", "forced", "pos", "kind", "has_content", "n_text",
                 "think_done", "after_forced")

    def __init__(self, g: ActionConstraint, cand: TokenTrie | None, *, answer_only: bool = False,
                 call_only: bool = False):
        self.g, self.cand, self.n = g, cand, 0
        self.think_done = not g.allow_think
        if answer_only:
            self.think_done = True
            self._enter_trie(g.openers_answer)
        elif call_only:
            self.think_done = True
            self._enter_trie(g.openers_call)
        else:
            self._enter_trie(g.openers if self.think_done else g.openers_think)
        self.kind = None
        self.has_content = False
        self.n_text = 0
        self.forced, self.pos, self.after_forced = (), 0, None

    @property
    def done(self) -> bool:
        return self.phase == "done"

    @property
    def choosing_target(self) -> bool:
        """At a token that picks (part of) the call's EXPERT@@SKILL target."""
        return self.phase == "trie" and self.trie is self.g.targets

    @property
    def remaining(self) -> int:
        return self.g.max_tokens - self.n

    def price_bias(self) -> torch.Tensor | None:
        """Where this token chooses between calls of different prices (or between a call and an
        answer): the extra price in USD of each allowed token's cheapest call (ActionConstraint.
        _price_bias), for a decode-time price tilt; None elsewhere or without prices."""
        g = self.g
        if g.prices is None or self.phase != "trie" or self.trie is self.cand:
            return None
        return g._price_bias(self.trie, self.node)

    def _enter_trie(self, trie: TokenTrie):
        self.phase, self.trie, self.node = "trie", trie, 0

    def _enter_forced(self, ids: Sequence[int], after: str, pos: int = 0):
        self.phase, self.forced, self.pos, self.after_forced = "forced", tuple(ids), pos, after
        if self.pos >= len(self.forced):
            self._after_forced()

    def _enter_text(self, kind: str):
        self.phase, self.kind, self.has_content, self.n_text = "text", kind, False, 0

    # -- the grammar -----------------------------------------------------------------------
    def mask(self) -> torch.Tensor:
        g, rem1 = self.g, self.remaining - 1
        if self.phase == "done":
            return g._mask_of(("f", g.eos), lambda: g._ids_mask([g.eos]))
        if self.phase == "forced":
            return g._mask_of(("f", self.forced[self.pos]), lambda: g._ids_mask([self.forced[self.pos]]))
        if self.phase == "trie":
            trie, node = self.trie, self.node
            close_ok = trie is self.cand and trie.label[node] is not None and \
                len(g.close["answer"]) - 1 + 1 <= rem1
            key = ("t", id(trie), node, min(rem1, g.max_tokens), close_ok)

            def build():
                ids = [t for t, c in trie.children[node].items() if trie.need[c] <= rem1]
                if close_ok:
                    ids.append(g.close["answer"][0])
                return g._ids_mask(ids)
            return build() if trie is self.cand else g._mask_of(key, build)
        # free text
        kind, v = self.kind, g.vocab
        tail = g.text_tail[kind]
        needs_content = kind != "think" and not self.has_content
        close_ok = not needs_content and tail - 1 <= rem1
        content_ok = tail <= rem1
        ws_ok = (tail + needs_content) <= rem1
        first_space = kind == "call" and self.n_text == 0
        key = ("x", kind, close_ok, content_ok, ws_ok, first_space)

        def build():
            m = torch.zeros(v.n, dtype=torch.bool)
            if content_ok:
                m |= v.space_content if first_space else v.free_content
            if ws_ok:
                m |= v.space_ws if first_space else v.free_ws
            if close_ok:
                m[g.close[kind][0]] = True
            return m
        return g._mask_of(key, build)

    def advance(self, token: int) -> None:
        g = self.g
        self.n += 1
        if self.phase == "done":
            return
        if self.phase == "forced":
            if token != self.forced[self.pos]:
                raise ValueError(f"token {token} breaks the forced sequence {self.forced}.")
            self.pos += 1
            if self.pos >= len(self.forced):
                self._after_forced()
            return
        if self.phase == "trie":
            trie = self.trie
            nxt = trie.children[self.node].get(token)
            if nxt is None:
                if trie is self.cand and trie.label[self.node] is not None and token == g.close["answer"][0]:
                    self._enter_forced(g.close["answer"], "eos", pos=1)
                    return
                raise ValueError(f"token {token} is not allowed here.")
            self.node = nxt
            lab = trie.label[nxt]
            if lab is None or trie.children[nxt]:
                return
            if trie is self.cand:
                self._enter_forced(g.close["answer"], "eos")
            elif trie is g.targets:
                if isinstance(lab, tuple):  # a forwarded call: the close tag is in; EOS ends the turn
                    self._enter_forced((g.eos,), "done")
                else:
                    self._enter_text("call")
            elif lab == "think":
                self._enter_text("think")
            elif lab == "call":
                self._enter_trie(g.targets)
            elif lab == "answer":
                if self.cand is not None:
                    self._enter_trie(self.cand)
                else:
                    self._enter_text("answer")
            return
        # text
        kind = self.kind
        if token == g.close[kind][0] and (kind == "think" or self.has_content):
            self._enter_forced(g.close[kind], "action" if kind == "think" else "eos", pos=1)
            return
        self.n_text += 1
        if bool(g.vocab.free_content[token]):
            self.has_content = True

    def _after_forced(self):
        g = self.g
        if self.after_forced == "eos":
            self.after_forced = "done"
            self.phase, self.forced, self.pos = "forced", (g.eos,), 0
        elif self.after_forced == "done":
            self.phase = "done"
        elif self.after_forced == "action":
            self.think_done = True
            self._enter_trie(g.openers)


class ActionLogitsProcessor:
    """A `transformers` LogitsProcessor: one TurnState per row; the prompt is what it first sees.

    Rows that finished get only EOS allowed (generate pads them)."""

    def __init__(self, constraint: ActionConstraint, batch_size: int, candidates: Sequence[Sequence[str] | None] | None = None):
        self.states = [constraint.start(candidates[i] if candidates else None) for i in range(batch_size)]
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        elif input_ids.shape[1] > self.prompt_len:
            for st, tok in zip(self.states, input_ids[:, -1].tolist()):
                if not st.done:
                    st.advance(tok)
        mask = torch.stack([st.mask() for st in self.states])
        if mask.shape[1] < scores.shape[1]:
            mask = torch.nn.functional.pad(mask, (0, scores.shape[1] - mask.shape[1]), value=False)
        return scores.masked_fill(~mask, float("-inf"))
