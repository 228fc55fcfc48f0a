"""The learned policy: a causal LM that samples one turn per `act`, micro-batched across episodes.

    policy = LMPolicy(model, tokenizer, registry, temperature=1.0, max_turn_tokens=24, constrained=True)
    runner = EpisodeRunner(registry, experts, policy)

Concurrent `act` calls (one per episode in flight) are queued and sampled together: one
left-padded prefill and one batched decode step per token for the whole batch, run in a
worker thread so expert calls keep running meanwhile. `stats` counts batches, forward passes
and turns.

Token accounting is exact. `encode_prompt(messages)` is the chat template's tokenisation
with the generation prompt; each turn's ids are exactly the sampled ids (ending with EOS)
with the log-softmax of the distribution they were sampled from (after the grammar mask,
at `temperature`); `encode_observation(message)` is what the observation and the next
generation prompt add. The context of a later turn is built by concatenating those ids (the
sampled ids are reused, never re-tokenised), so prompt_ids + completion_ids of a trajectory
is exactly the sequence the policy saw, and decodes to the chat template's rendering of
the conversation. (A turn cut at `max_turn_tokens` without EOS, possible only unconstrained,
enters the context without the EOS the template would add.)
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from maestro_core.chat_encoding import ChatEncoder
from maestro_core.constrained import ActionConstraint, TurnState
from maestro_core.errors import ConfigError
from maestro_core.policy import EpisodeView, PolicyTurn, information_text, offered_actions
from maestro_core.protocol import ANSWER_FROM, unescape
from maestro_core.registry import Registry, check_image_routing


@dataclass
class _Request:
    context: list[int]
    state: TurnState | None
    future: asyncio.Future


@dataclass
class PolicyStats:
    batches: int = 0
    forward_passes: int = 0
    turns: int = 0
    tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class LMPolicy:
    def __init__(self, model, tokenizer, registry: Registry, *, temperature: float = 1.0, max_turn_tokens: int = 24,
                 constrained: bool = True, allow_think: bool = False, answer_candidates: bool = False,
                 forward_question: bool = False, free_input: bool = True, answer_on_last_turn: bool = False,
                 actions: Sequence[str] | None = None, answer_from: str = "any",
                 checkpoint_id: str = "lm-policy", max_batch_size: int = 64, batch_window_s: float = 0.005,
                 seed: int = 0, threaded: bool = True, share_prefix: bool = True, explore: float = 0.0,
                 explore_within: float | None = None, price_tilt: float = 0.0, image_routing: str = "any"):
        if temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy).")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        n_out = getattr(getattr(head, "weight", None), "shape", (None,))[0]
        if constrained and n_out is not None and len(tokenizer) > n_out:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's output layer {n_out}: the "
                              "grammar's tokens past the output layer could never be sampled.",
                              source="LMPolicy", field="tokenizer",
                              fix="use the tokenizer saved with the checkpoint, or resize the model to it "
                                  "(model.resize_token_embeddings(len(tokenizer))) before training.")
        self.model, self.tokenizer, self.registry = model, tokenizer, registry
        self.temperature, self.max_turn_tokens = temperature, max_turn_tokens
        self.constrained, self.answer_candidates = constrained, answer_candidates
        self.answer_on_last_turn = answer_on_last_turn
        if answer_from not in ANSWER_FROM:
            raise ConfigError(f"answer_from {answer_from!r} is not one of {list(ANSWER_FROM)}.", source="LMPolicy",
                              field="answer_from", fix="use 'any' (every observation's payload) or 'last' (the "
                                                        "latest observation's).")
        self.answer_from = answer_from
        self.checkpoint_id = checkpoint_id
        self.max_batch_size, self.batch_window_s, self.threaded = max_batch_size, batch_window_s, threaded
        self.share_prefix = share_prefix
        if not 0.0 <= explore < 1.0:
            raise ValueError(f"explore must be in [0, 1), got {explore}.")
        self.explore = explore
        """Exploration of call targets (training rollouts): a target token is drawn from
        (1 - explore) x the policy's distribution + explore x uniform over the allowed targets,
        and the recorded logprob is that mixture's. 0: the policy's own distribution."""
        if explore_within is not None and not explore_within >= 0:
            raise ConfigError(f"explore_within must be >= 0 (USD), got {explore_within}.", field="explore_within",
                              fix="use e.g. 0.011 (the targets within 1.1 cents of the cheapest), or none for all.")
        self.explore_within = explore_within
        """With explore: the uniform share goes only to the targets whose cheapest call costs at
        most this much (USD) more than the cheapest allowed one (registry price estimates, as the
        price tilt reads them); None: all allowed targets."""
        if not price_tilt >= 0:
            raise ConfigError(f"price_tilt must be >= 0, got {price_tilt}.", field="--price-tilt",
                              fix="use 0 (off) or a positive weight in nats per cent, e.g. 2.5.")
        if price_tilt and not constrained:
            raise ConfigError("price_tilt needs constrained decoding (it acts where the grammar picks a call).",
                              field="--price-tilt", fix="keep constrained decoding on, or price_tilt 0.")
        self.price_tilt = price_tilt
        """Decode-time price tilt, in nats per cent: where a token picks a call target (or a call
        over an answer), its logit is lowered by price_tilt x (the extra price of its cheapest call,
        in US cents; registry price estimates), so a trained policy takes cheaper routes at
        request time without retraining. 0: off (training rollouts)."""
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self.actions = tuple(actions) if actions is not None else registry.grammar().actions
        unknown = sorted(set(self.actions) - set(registry.grammar().actions))
        if unknown:
            raise ValueError(f"actions {unknown} are not in registry '{registry.name}'.")
        # the registry's price estimate per call: what a price tilt (set now or later) lowers logits by
        prices = {a: registry.call_price(a) for a in self.actions}
        self._constraint_kw = dict(max_tokens=max_turn_tokens, allow_think=allow_think,
                                   forward_question=forward_question, free_input=free_input, prices=prices)
        self.constraint = ActionConstraint(tokenizer, self.actions, **self._constraint_kw) if constrained else None
        self.image_routing = check_image_routing(image_routing)
        """Which actions a turn offers given the task's images (Registry.for_images): 'any' (all),
        'match' (no image-reading skill on a task without images), 'first' (also: an image task's
        first call goes to a skill that sees its images)."""
        self._narrowed: dict[tuple[str, ...], ActionConstraint] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.stats = PolicyStats()
        self._queue: list[_Request] = []
        self._worker: asyncio.Task | None = None
        self._turns: OrderedDict[str, dict[int, tuple[str, tuple[int, ...]]]] = OrderedDict()
        self.encoder = ChatEncoder(tokenizer)

    # -- encoding (maestro_core.chat_encoding) -------------------------------------------------
    def encode_prompt(self, messages: Sequence[Mapping[str, str]]) -> tuple[int, ...]:
        return self.encoder.encode_prompt(messages)

    def encode_observation(self, message: Mapping[str, str]) -> tuple[int, ...]:
        return self.encoder.encode_observation(message)

    def _encode_turn(self, text: str) -> tuple[int, ...]:
        return self.encoder.tok(text) + (self.eos_id,)

    def context_ids(self, messages: Sequence[Mapping[str, str]], view: EpisodeView | None = None) -> list[int]:
        """The token context for the next turn: prompt + (turn ids, observation ids)*."""
        return self.encoder.context_ids(messages, self._turns.get(view.episode_id) if view is not None else None)

    def candidates(self, messages: Sequence[Mapping[str, str]]) -> list[str]:
        """Answer candidates: the payloads of the episode's `<information>` observations (with
        `answer_from="last"`, of the latest observation only: a second call replaces the first
        reply, as in a cascade that escalates to a dearer expert). An error is no candidate."""
        observed = [m for m in messages[2:] if m["role"] != "assistant"]
        if self.answer_from == "last":
            observed = observed[-1:]
        out = []
        for m in observed:
            info = information_text(m["content"])
            if info is not None and not info.startswith("error ("):
                out.append(unescape(info).strip())
        return out

    # -- acting -----------------------------------------------------------------------------
    async def act(self, messages: Sequence[Mapping[str, str]], view: EpisodeView) -> PolicyTurn:
        ctx = self.context_ids(messages, view)
        state = None
        if self.constraint is not None:
            last = view is not None and view.max_turns > 0 and view.turn >= view.max_turns - 1
            constraint, none_affordable = self.constraint_for(view)
            state = constraint.start(self.candidates(messages) if self.answer_candidates else None,
                                     answer_only=(last and self.answer_on_last_turn) or none_affordable,
                                     call_until_candidates=self.answer_candidates)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append(_Request(ctx, state, fut))
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._worker = loop.create_task(self._serve())
        ids, lps = await fut
        body = ids[:-1] if ids and ids[-1] == self.eos_id else ids
        text = self.tokenizer.decode(list(body), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        rec = self._turns.setdefault(view.episode_id, {})
        self._turns.move_to_end(view.episode_id)
        rec[view.turn] = (text, tuple(ids))
        while len(self._turns) > 8192:
            self._turns.popitem(last=False)
        return PolicyTurn(text, tuple(ids), tuple(lps))

    def constraint_for(self, view: EpisodeView | None) -> tuple[ActionConstraint, bool]:
        """The turn grammar of this episode turn: only the actions its images allow
        (image_routing, Registry.for_images) that the budget left can pay for (Registry.
        affordable); one grammar per distinct set, cached; (grammar, True) when no call is
        offered (the turn must answer)."""
        ok = offered_actions(self.registry, self.actions, self.image_routing, view)
        if ok == self.actions:
            return self.constraint, False
        if not ok:
            return self.constraint, True
        g = self._narrowed.get(ok)
        if g is None:
            g = self._narrowed[ok] = ActionConstraint(self.tokenizer, ok, **self._constraint_kw)
        return g, False

    async def _serve(self):
        while self._queue:
            n = -1
            while n != len(self._queue) and len(self._queue) < self.max_batch_size:
                n = len(self._queue)
                await asyncio.sleep(self.batch_window_s)
            batch = [r for r in self._queue[:self.max_batch_size] if not r.future.done()]
            del self._queue[:self.max_batch_size]
            if not batch:
                continue
            try:
                if self.threaded:
                    results = await asyncio.to_thread(self.generate, [r.context for r in batch], [r.state for r in batch])
                else:
                    results = self.generate([r.context for r in batch], [r.state for r in batch])
            except Exception as e:  # surface the failure in every waiting act()
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
            else:
                for r, res in zip(batch, results):
                    if not r.future.done():
                        r.future.set_result(res)

    @torch.inference_mode()
    def generate(self, contexts: Sequence[Sequence[int]], states: Sequence[TurnState | None]
                 ) -> list[tuple[list[int], list[float]]]:
        """Sample one turn for each context in one batch (left padding, KV cache)."""
        model, B = self.model, len(contexts)
        dev = next(model.parameters()).device
        P = _common_prefix(contexts) if self.share_prefix and B > 1 else 0
        P = min(P, min(len(c) for c in contexts) - 1)
        past = None
        if P >= 16:  # the shared system prompt: prefill it once, then repeat its cache per row
            out = model(input_ids=torch.tensor([list(contexts[0][:P])], device=dev), use_cache=True, logits_to_keep=1)
            self.stats.forward_passes += 1
            past = out.cache
            past.batch_repeat_interleave(B)
        else:
            P = 0
        L = max(len(c) for c in contexts) - P
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for i, c in enumerate(contexts):
            input_ids[i, L - len(c) + P:] = torch.tensor(c[P:], dtype=torch.long)
            attn[i, L - len(c) + P:] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        pos = P + (attn.cumsum(-1) - 1).clamp(min=0)
        if P:
            attn = torch.cat([torch.ones((B, P), dtype=attn.dtype, device=dev), attn], dim=1)
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, cache=past, use_cache=True,
                    logits_to_keep=1)
        self.stats.forward_passes += 1
        self.stats.batches += 1
        self.stats.batch_sizes.append(B)
        past, logits = out.cache, out.logits[:, -1, :].float()
        toks: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        active = [True] * B
        pos_last = pos[:, -1:]
        for step in range(self.max_turn_tokens):
            if self.constraint is not None:
                mask = torch.stack([st.mask() for st in states]).to(dev)  # finished rows: EOS only
                if mask.shape[1] < logits.shape[1]:
                    mask = torch.nn.functional.pad(mask, (0, logits.shape[1] - mask.shape[1]), value=False)
                logits = logits.masked_fill(~mask, float("-inf"))
                if self.price_tilt:
                    logits = self._tilt(logits, states, active)
            scaled = logits / self.temperature if self.temperature > 0 else logits
            logp = torch.log_softmax(scaled, dim=-1)
            if self.explore > 0 and self.temperature > 0 and self.constraint is not None:
                rows = [i for i in range(B) if active[i] and states[i] is not None and states[i].choosing_target]
                if rows:
                    allowed = mask[rows].float()
                    if self.explore_within is not None:
                        allowed = self._within_price(allowed, [states[i] for i in rows])
                    mix = (1 - self.explore) * logp[rows].exp() + self.explore * allowed / allowed.sum(-1, keepdim=True)
                    logp[rows] = mix.log()
            if self.temperature > 0:
                nxt = _sample(logp.exp(), mask if self.constraint is not None else None, self.generator)
            else:
                nxt = logp.argmax(-1, keepdim=True)
            chosen = logp.gather(1, nxt).clamp(max=0.0).squeeze(1).tolist()
            nxt_list = nxt.squeeze(1).tolist()
            for i in range(B):
                if not active[i]:
                    continue
                t = nxt_list[i]
                toks[i].append(t)
                lps[i].append(float(chosen[i]))
                if states[i] is not None:
                    states[i].advance(t)
                if t == self.eos_id or (states[i] is not None and states[i].done):
                    active[i] = False
            if not any(active) or step == self.max_turn_tokens - 1:
                break
            feed = torch.tensor([t if a else self.pad_id for t, a in zip(nxt_list, active)], device=dev)[:, None]
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], dim=1)
            pos_last = pos_last + 1
            out = model(input_ids=feed, attention_mask=attn, position_ids=pos_last, cache=past,
                        use_cache=True, logits_to_keep=1)
            self.stats.forward_passes += 1
            past, logits = out.cache, out.logits[:, -1, :].float()
        self.stats.turns += B
        self.stats.tokens += sum(len(t) for t in toks)
        return list(zip(toks, lps))

    def _within_price(self, allowed: torch.Tensor, states: Sequence[TurnState]) -> torch.Tensor:
        """`allowed` (rows x vocab, 0/1) without the tokens whose cheapest call costs more than
        `explore_within` over the row's cheapest; a row keeps its own mask where prices do not
        differ or nothing would be left."""
        for j, st in enumerate(states):
            b = st.price_bias()
            if b is None:
                continue
            keep = torch.zeros_like(allowed[j])
            n = min(b.shape[0], keep.shape[0])
            keep[:n] = (b[:n].to(keep.device) <= self.explore_within + 1e-12).to(keep.dtype)
            if (allowed[j] * keep).sum() > 0:
                allowed[j] = allowed[j] * keep
        return allowed

    def _tilt(self, logits: torch.Tensor, states: Sequence[TurnState | None], active: Sequence[bool]) -> torch.Tensor:
        """The price tilt on the rows choosing a call (see `price_tilt`)."""
        rows, bias = [], []
        for i, st in enumerate(states):
            b = st.price_bias() if st is not None and active[i] else None
            if b is not None:
                rows.append(i)
                bias.append(b)
        if not rows:
            return logits
        b = torch.stack(bias).to(logits.device)
        if b.shape[1] < logits.shape[1]:
            b = torch.nn.functional.pad(b, (0, logits.shape[1] - b.shape[1]))
        logits = logits.clone()
        logits[rows] -= (100.0 * self.price_tilt) * b[:, :logits.shape[1]]
        return logits


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def _sample(probs: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` (rows x vocabulary), as a (rows, 1) tensor on its device.
    With a constraint `mask`, the draw runs over the columns some row may take: the other
    columns have probability 0 in every row, so the distribution is the same, and
    torch.multinomial's cost (one random number per column drawn from) no longer grows with
    the vocabulary (a 49k pretrained one, or the 8k cut of it, against a dozen allowed tokens)."""
    dev = probs.device
    if mask is None:
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(dev)
    cols = mask.any(0).nonzero().squeeze(1)
    return cols[torch.multinomial(probs[:, cols].cpu(), 1, generator=generator).to(dev)]
