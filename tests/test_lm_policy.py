"""The learned policy: tokenizer, tiny model, exact token accounting, logprobs, micro-batching."""

import asyncio

import pytest
import torch

from maestro_core.dataset import Item
from maestro_core.episode import EpisodeConfig, EpisodeRunner, build_messages
from maestro_core.errors import ConfigError
from maestro_core.experts import build_experts
from maestro_core.lm_policy import LMPolicy
from maestro_core.policy import EpisodeView, Policy
from maestro_core.policy_model import build_tiny_model, load_policy_model
from maestro_core.protocol import Answer, Call, parse_action
from maestro_core.tokenizer import (PROTOCOL_TAGS, load_policy_tokenizer, policy_corpus, policy_extra_tokens,
                                    train_policy_tokenizer)
from tests.conftest import python_only_registry

ITEMS = [Item(id=f"m{i}", benchmark="math", question=f"What is {i} + {i * 3}?", answer=str(4 * i), scorer="numeric")
         for i in range(1, 9)]


@pytest.fixture(scope="module")
def reg():
    return python_only_registry()


@pytest.fixture(scope="module")
def tok(reg):
    return train_policy_tokenizer(policy_corpus(reg), extra_tokens=policy_extra_tokens(reg))


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, hidden=64, layers=2, heads=2, seed=0)


def test_tokenizer_single_tokens_template_and_roundtrip(reg, tok, tmp_path):
    for t in (*PROTOCOL_TAGS, *reg.grammar().actions):
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    text = "<call>counter@@text/letters: how many letters in 'abc'?</call>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text  # tags and targets survive decode
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|bos|><|system|>S<|end|><|user|>Q<|end|><|assistant|>"
    tok.save_pretrained(tmp_path)
    tok2 = load_policy_tokenizer(tmp_path)
    assert tok2.encode(text, add_special_tokens=False) == ids and tok2.eos_token == "<|end|>"
    assert tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_tiny_model_seeded_and_from_pretrained_roundtrip(tok, tmp_path):
    a = build_tiny_model(tok, hidden=32, layers=1, heads=2, seed=7)
    b = build_tiny_model(tok, hidden=32, layers=1, heads=2, seed=7)
    x = torch.tensor([tok.encode("<call>calc@@math: 1+1</call>", add_special_tokens=False)])
    with torch.no_grad():
        la = a(x).logits
        assert torch.equal(la, b(x).logits)
        a.save_pretrained(tmp_path)
        c = load_policy_model(tmp_path)
        assert type(c).__name__ == "LlamaForCausalLM" and torch.allclose(la, c(x).logits, atol=1e-5)


def test_context_is_the_chat_template_token_by_token(reg, tok, model):
    """Prompt + turns (+EOS) + observations concatenate to exactly the template's tokenisation."""
    pol = LMPolicy(model, tok, reg)
    assert isinstance(pol, Policy)
    msgs = build_messages(reg, ITEMS[0])
    convo = msgs + [{"role": "assistant", "content": "<call>calc@@math: 1 + 3</call>"},
                    {"role": "user", "content": "<information>4 (confidence 1.00)</information>"},
                    {"role": "assistant", "content": "<answer>4</answer>"}]
    rendered = tok.apply_chat_template(convo, tokenize=False)
    want = tok(rendered, add_special_tokens=False)["input_ids"]
    got = list(pol.encode_prompt(msgs)) + list(pol._encode_turn(convo[2]["content"])) + \
        list(pol.encode_observation(convo[3])) + list(pol._encode_turn(convo[4]["content"]))
    assert [int(i) for i in got] == want
    assert pol.context_ids(convo[:4]) == list(tok(tok.apply_chat_template(convo[:4], tokenize=False,
                                                                          add_generation_prompt=True),
                                                  add_special_tokens=False)["input_ids"])


async def test_episode_token_accounting_and_env_mask(reg, tok, model):
    pol = LMPolicy(model, tok, reg, max_turn_tokens=16, seed=1)
    runner = EpisodeRunner(reg, build_experts(reg), pol, config=EpisodeConfig(max_turns=3))
    trajs = await runner.run(ITEMS, group_size=2)
    n_obs = n_turns = n_canonical = n_exact = 0
    for item, tr in zip([it for it in ITEMS for _ in range(2)], trajs):
        convo = build_messages(reg, item)
        assert tr.prompt_ids == pol.encode_prompt(convo)
        full = list(tr.prompt_ids) + tr.completion_ids()
        mask = tr.env_mask()
        assert len(mask) == len(tr.completion_ids()) == len(tr.completion_logprobs())
        pos = 0
        for s in tr.steps:
            n_turns += 1
            assert s.action in ("call", "answer")  # constrained: never invalid
            assert s.completion_ids[-1] == tok.eos_token_id and len(s.logprobs) == len(s.completion_ids)
            assert all(lp <= 0.0 for lp in s.logprobs)
            assert mask[pos:pos + len(s.completion_ids)] == [1] * len(s.completion_ids)
            assert tok.decode(list(s.completion_ids), skip_special_tokens=False) == s.text + "<|end|>"
            canonical = list(s.completion_ids) == tok.encode(s.text, add_special_tokens=False) + [tok.eos_token_id]
            n_canonical += canonical
            pos += len(s.completion_ids)
            convo.append({"role": "assistant", "content": s.text})
            if s.observation_ids:
                n_obs += 1
                span = tr.completion_ids()[pos:pos + len(s.observation_ids)]
                assert mask[pos:pos + len(span)] == [0] * len(span)
                # exactly the template's tokens for this observation and the next generation prompt
                assert span == tok.encode(f"<|user|>{s.observation}<|end|><|assistant|>", add_special_tokens=False)
                assert span[0] == tok.convert_tokens_to_ids("<|user|>")
                assert span[-1] == tok.convert_tokens_to_ids("<|assistant|>")
                pos += len(span)
                convo.append({"role": "user", "content": s.observation})
        assert pos == len(mask)
        rendered = tok.apply_chat_template(convo, tokenize=False)
        # the sequence decodes to the template's rendering, and equals its tokenisation
        # wherever the sampled tokens are the canonical ones
        assert tok.decode(full, skip_special_tokens=False) == rendered
        if all(list(s.completion_ids) == tok.encode(s.text, add_special_tokens=False) + [tok.eos_token_id]
               for s in tr.steps):
            assert full == tok(rendered, add_special_tokens=False)["input_ids"]
            n_exact += 1
    assert n_obs > 0 and n_turns > len(trajs) and n_exact > 0


async def test_concurrent_acts_are_micro_batched(reg, tok, model):
    pol = LMPolicy(model, tok, reg, max_turn_tokens=12, seed=2)
    runner = EpisodeRunner(reg, build_experts(reg), pol, config=EpisodeConfig(max_turns=3))
    trajs = await runner.run(ITEMS * 2)
    turns = sum(len(t.steps) for t in trajs)
    assert pol.stats.turns == turns and pol.stats.batch_sizes[0] == 16
    assert pol.stats.batches <= turns / 3
    # per batch: the shared prefix, one prefill, one step per further token
    assert pol.stats.forward_passes <= pol.stats.batches * 13


@pytest.mark.parametrize("share_prefix", [True, False])
def test_sampling_logprobs_match_a_teacher_forced_pass(reg, tok, model, share_prefix):
    """Left padding, positions and the KV cache: the recorded logprobs are the processed
    distribution's, recomputed here one sequence at a time without padding."""
    pol = LMPolicy(model, tok, reg, max_turn_tokens=14, temperature=0.7, seed=4, share_prefix=share_prefix)
    base = list(pol.encode_prompt(build_messages(reg, ITEMS[0])))
    contexts = [base, base[:-9] + base[-1:], base + list(pol.encode_observation({"role": "user", "content": "x"}))]
    out = pol.generate(contexts, [pol.constraint.start() for _ in contexts])
    assert pol.stats.forward_passes - pol.stats.batches == (1 if share_prefix else 0) + max(len(i) for i, _ in out) - 1
    for ctx, (ids, lps) in zip(contexts, out):
        st = pol.constraint.start()
        with torch.no_grad():
            logits = model(torch.tensor([ctx + ids])).logits[0, len(ctx) - 1:-1].float()
        for k, t in enumerate(ids):
            m = st.mask()
            lp = torch.log_softmax(logits[k].masked_fill(~m, float("-inf")) / 0.7, -1)[t]
            assert abs(float(lp) - lps[k]) < 1e-4
            st.advance(t)
        assert st.done


def test_constrained_sampling_draws_over_the_allowed_columns_with_each_row_s_distribution():
    """_sample draws from the union of the rows' allowed tokens only (its cost no longer grows
    with the vocabulary); each row still gets its own tokens, at its own probabilities."""
    from maestro_core.lm_policy import _sample

    g = torch.Generator().manual_seed(0)
    vocab = 5000
    mask = torch.zeros(2, vocab, dtype=torch.bool)
    mask[0, [7, 4000, 4999]] = True
    mask[1, [3, 7]] = True
    logits = torch.zeros(2, vocab)
    logits[0, [7, 4000, 4999]] = torch.tensor([0.0, 1.0, 2.0])
    logits[1, [3, 7]] = torch.tensor([1.5, 0.0])
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    n = 4000
    draws = torch.cat([_sample(probs, mask, g) for _ in range(n)], dim=1)
    assert draws.shape == (2, n)
    for row in range(2):
        allowed = mask[row].nonzero().squeeze(1).tolist()
        assert set(draws[row].tolist()) <= set(allowed)
        for t in allowed:  # within 4 standard errors of the row's probability
            p, freq = float(probs[row, t]), float((draws[row] == t).float().mean())
            assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5, (row, t, freq, p)
    assert _sample(probs, None, g).shape == (2, 1)  # unconstrained: the whole row


async def test_act_returns_parsed_turns_and_unconstrained_policy(reg, tok, model):
    msgs = build_messages(reg, ITEMS[0])
    pol = LMPolicy(model, tok, reg, constrained=False, max_turn_tokens=8)
    turns = await asyncio.gather(*[pol.act(list(msgs), EpisodeView(f"e{i}", 0, 0)) for i in range(8)])
    assert pol.stats.batches == 1
    for t in turns:
        assert 1 <= len(t.token_ids) <= 8 and len(t.logprobs) == len(t.token_ids)
    pol_c = LMPolicy(model, tok, reg, answer_candidates=True, max_turn_tokens=12)
    convo = msgs + [{"role": "assistant", "content": "<call>calc@@math: 1 + 3</call>"},
                    {"role": "user", "content": "<information>4 (confidence 1.00)</information>"}]
    assert pol_c.candidates(convo) == ["4"]
    for _ in range(3):
        t = await pol_c.act(convo, EpisodeView("e", 0, 1))
        a = parse_action(t.text, reg)
        assert getattr(a, "text", "4") == "4"


async def test_answer_from_last_quotes_only_the_latest_reply(reg, tok, model):
    """answer_from='last' (a cascade: a second call replaces the first reply): the answer may
    quote the latest observation only; an error there leaves no candidate, so the turn must
    call; 'any' keeps every reply. An unknown value is a ConfigError naming both choices."""
    msgs = build_messages(reg, ITEMS[0])
    convo = msgs + [{"role": "assistant", "content": "<call>calc@@math: 1 + 3</call>"},
                    {"role": "user", "content": "<information>could not read it (confidence 0.00)</information>"},
                    {"role": "assistant", "content": "<call>calc@@math: 1 + 3</call>"},
                    {"role": "user", "content": "<information>4 (confidence 1.00)</information>"}]
    any_ = LMPolicy(model, tok, reg, answer_candidates=True, max_turn_tokens=12)
    last = LMPolicy(model, tok, reg, answer_candidates=True, max_turn_tokens=12, answer_from="last",
                    answer_on_last_turn=True)
    assert any_.candidates(convo) == ["could not read it", "4"]
    assert last.candidates(convo) == ["4"]
    for i in range(20):  # the last turn of 3, a random model at temperature 1: never the first reply
        action = parse_action((await last.act(convo, EpisodeView(f"l{i}", 0, 2, 3))).text, reg)
        assert isinstance(action, Answer) and action.text == "4"
    failed = convo[:-1] + [{"role": "user", "content": "<information>error (timeout): no reply</information>"}]
    assert last.candidates(failed) == [] and any_.candidates(failed) == ["could not read it"]
    for i in range(10):
        assert isinstance(parse_action((await last.act(failed, EpisodeView(f"f{i}", 0, 2, 4))).text, reg), Call)
    with pytest.raises(ConfigError) as e:
        LMPolicy(model, tok, reg, answer_from="first")
    assert "'any'" in e.value.fix and "'last'" in e.value.fix


async def test_a_budget_offers_only_the_calls_it_can_pay_for(reg, tok, model):
    """Request-time budget knob: calc costs 0.001 per call, counter 0.002. With 0.0015 left a
    random model never samples a counter action; with nothing left it can only answer; the
    episode runner hands the policy what the budget still allows."""
    assert reg.affordable(reg.grammar().actions, None) == reg.grammar().actions
    assert {a.split("@@")[0] for a in reg.affordable(reg.grammar().actions, 0.0015)} == {"calc"}
    pol = LMPolicy(model, tok, reg, temperature=3.0, max_turn_tokens=8, forward_question=True, free_input=False)
    msgs = build_messages(reg, ITEMS[0], cost_budget=0.0015)
    experts_seen = set()
    for i in range(200):
        turn = await pol.act(msgs, EpisodeView(f"b{i}", 0, 0, 4, budget_left=0.0015))
        action = parse_action(turn.text, reg)
        if isinstance(action, Call):
            experts_seen.add(action.expert)
    assert experts_seen == {"calc"}
    for i in range(20):
        turn = await pol.act(msgs, EpisodeView(f"z{i}", 0, 0, 4, budget_left=0.0))
        assert isinstance(parse_action(turn.text, reg), Answer)
    seen = []

    class Spy(LMPolicy):
        async def act(self, messages, view):
            seen.append(view.budget_left)
            return await super().act(messages, view)

    spy = Spy(model, tok, reg, temperature=1.0, max_turn_tokens=8, forward_question=True, free_input=False)
    runner = EpisodeRunner(reg, build_experts(reg), spy, config=EpisodeConfig(max_turns=2, cost_budget=0.0015))
    [t] = await runner.run(ITEMS[:1])
    assert seen[0] == pytest.approx(0.0015) and "Budget: $0.0015" in t.prompt_text
    assert all(s.expert in (None, "calc") for s in t.steps)


async def test_image_routing_offers_an_image_task_s_first_call_only_the_skills_that_see_images(tok, model):
    """image_routing 'first', on a registry whose `text` skill reads the image ('required') and
    whose `math` skill is text only ('ignored'): a random model's first call on a task with an
    image always goes to `text`, on a task without images never; later calls go to both, as
    every call does with 'any'. An unknown routing is refused with the fix."""
    import copy

    from maestro_core.registry import parse_registry
    from tests.conftest import BASE_REGISTRY

    d = copy.deepcopy(BASE_REGISTRY)
    d["experts"] = [e for e in d["experts"] if e["name"] != "llm"]
    d["skills"] = [dict(s, images={"math": "ignored", "text": "required"}[s["name"]])
                   for s in d["skills"] if s["name"] != "chat"]
    reg = parse_registry(d, source="unit.yaml")
    msgs = build_messages(reg, ITEMS[0])
    kw = dict(temperature=3.0, max_turn_tokens=8, forward_question=True, free_input=False)
    first, every = LMPolicy(model, tok, reg, image_routing="first", **kw), LMPolicy(model, tok, reg, **kw)

    async def skills(pol, turn, images, n=120):
        out = set()
        for i in range(n):
            action = parse_action((await pol.act(msgs, EpisodeView(f"{turn}{images}{i}", 0, turn, 4,
                                                                   images=images))).text, reg)
            if isinstance(action, Call):
                out.add(action.skill)
        return out

    assert await skills(first, 0, ("a.png",)) == {"text"}
    assert await skills(first, 0, ()) == {"math"}
    assert await skills(first, 1, ("a.png",)) == {"math", "text"}
    assert await skills(every, 0, ("a.png",)) == {"math", "text"}
    with pytest.raises(ConfigError) as e:
        LMPolicy(model, tok, reg, image_routing="sometimes")
    assert "'first'" in e.value.fix


def _check_explored_draws(pol, model, reg, explored) -> set[int]:
    """Draw 64 first turns of ITEMS[0] at temperature 0.7 and check every recorded logprob
    against the policy's own distribution, mixed at the target positions with
    `pol.explore` x uniform over `explored(state, mask)`; returns the target tokens drawn."""
    ctx = list(pol.encode_prompt(build_messages(reg, ITEMS[0])))
    out = pol.generate([ctx] * 64, [pol.constraint.start() for _ in range(64)])
    targets, e = set(), pol.explore
    for ids, lps in out:
        st = pol.constraint.start()
        with torch.no_grad():
            logits = model(torch.tensor([ctx + ids])).logits[0, len(ctx) - 1:-1].float()
        for k, t in enumerate(ids):
            m = st.mask()
            p = torch.softmax(logits[k].masked_fill(~m, float("-inf")) / 0.7, -1)
            if st.choosing_target:
                keep = explored(st, m)
                p = (1 - e) * p + e * keep.float() / keep.sum()
                targets.add(t)
            assert abs(float(p[t].log()) - lps[k]) < 1e-4
            st.advance(t)
    return targets


def test_explore_mixes_uniform_into_call_targets_and_records_the_mixture(reg, tok, model):
    """LMPolicy.explore: at the target position the token is drawn from (1 - e) x policy +
    e x uniform over the allowed targets, and the recorded logprob is that mixture's; the
    other positions are the policy's own distribution."""
    pol = LMPolicy(model, tok, reg, max_turn_tokens=14, temperature=0.7, seed=3, explore=0.5,
                   forward_question=True, free_input=False)
    targets = _check_explored_draws(pol, model, reg, lambda st, m: m)
    # with half the mass uniform over the targets, 64 draws reach most of them
    assert len(targets) >= min(len(reg.grammar().actions), 4)
    with pytest.raises(ValueError, match="explore"):
        LMPolicy(model, tok, reg, explore=1.0)


def test_explore_within_a_price_explores_only_the_cheap_targets(reg, tok, model):
    """LMPolicy.explore_within (train.explore_within): the uniform share goes only to the targets
    whose call costs at most that much over the cheapest, the recorded logprob is that mixture's,
    and the dear targets keep only the policy's own share."""
    prices = {a: reg.call_price(a) for a in reg.grammar().actions}
    cheap = {a for a, p in prices.items() if p <= min(prices.values()) + 0.0005}
    assert cheap and cheap != set(prices)  # the registry has cheap and dear targets
    pol = LMPolicy(model, tok, reg, max_turn_tokens=14, temperature=0.7, seed=3, explore=0.9, explore_within=0.0005,
                   forward_question=True, free_input=False)

    def cheap_only(st, m):
        b = st.price_bias()
        keep = m & (b <= 0.0005) if b is not None else m
        assert b is None or keep.sum() < m.sum()  # a dear target was left out of the uniform share
        return keep
    _check_explored_draws(pol, model, reg, cheap_only)
    with pytest.raises(ConfigError, match="explore_within"):
        LMPolicy(model, tok, reg, explore=0.5, explore_within=-0.01)


async def test_target_cost_calibrates_the_smallest_price_tilt_on_the_items_given(reg, tok, tmp_path):
    """calibrate_price_tilt (maestro eval --target-cost): the tilt it returns is the smallest
    tried whose greedy cost per task on the given items is within the target, every smaller
    tilt tried costs more, and a target below the cheapest route is refused with the fix."""
    from maestro_core.checkpoints import save_checkpoint
    from maestro_core.errors import ConfigError
    from maestro_core.evaluation import calibrate_price_tilt

    m = build_tiny_model(tok, hidden=64, layers=2, heads=2, seed=11)
    items = ITEMS[:6]
    probe = LMPolicy(m, tok, reg, forward_question=True, free_input=False)
    call = tok.encode("<call>", add_special_tokens=False)
    with torch.no_grad():  # a policy that starts on the dearer counter expert: its rows follow the call state
        h = torch.stack([m(torch.tensor([list(probe.encode_prompt(build_messages(reg, it, compact=True))) + call]),
                           output_hidden_states=True).hidden_states[-1][0, -1] for it in items]).mean(0)
        ids = [tok.convert_tokens_to_ids(a) for a in reg.grammar().actions if a.startswith("counter@@")]
        m.lm_head.weight[ids] += 4 * h / h.square().sum()
    path = save_checkpoint(m, tok, tmp_path / "ckpt-1", {"run_id": "t", "iteration": 1, "config": {
        "max_turns": 2, "max_turn_tokens": 12, "call_input": "question", "actions": "level1"}})
    experts = build_experts(reg)
    tilt, tried = await calibrate_price_tilt(reg, experts, items, path, cache=None, target_cost=0.0012, steps=5)
    assert tried[0]["price_tilt"] == 0.0 and tried[0]["cost_per_task"] > 0.0012
    ok = [p for p in tried if p["cost_per_task"] <= 0.0012]
    assert tilt == min(p["price_tilt"] for p in ok) and tilt > 0
    assert all(p["cost_per_task"] > 0.0012 for p in tried if p["price_tilt"] < tilt)
    with pytest.raises(ConfigError, match="raise the target"):
        await calibrate_price_tilt(reg, experts, items, path, cache=None, target_cost=0.0005, max_tilt=64)
    # a cost weight reaches the calibration's prompts as it reaches the evaluation's: refused for
    # this checkpoint (trained without one), and shown with unseen_cost_weight
    with pytest.raises(ConfigError, match="without a cost weight"):
        await calibrate_price_tilt(reg, experts, items, path, cache=None, target_cost=0.0012, cost_lambda=1.0)
    weighted, _ = await calibrate_price_tilt(reg, experts, items, path, cache=None, target_cost=0.0012, steps=5,
                                             cost_lambda=1.0, unseen_cost_weight=True)
    assert weighted > 0


def test_a_tokenizer_larger_than_the_output_layer_is_refused_with_the_fix(reg, tok):
    from maestro_core.errors import ConfigError

    small = build_tiny_model(tok, hidden=32, layers=1, heads=2, seed=0)
    small.resize_token_embeddings(len(tok) - 1)
    with pytest.raises(ConfigError, match=rf"{len(tok)} tokens but the model's output layer {len(tok) - 1}") as e:
        LMPolicy(small, tok, reg)
    assert "resize_token_embeddings" in e.value.fix
    LMPolicy(small, tok, reg, constrained=False)  # unconstrained: tokens past the layer are never asked for
    small.resize_token_embeddings(len(tok) + 7)  # a larger output layer (padded vocabularies) is fine
    LMPolicy(small, tok, reg)


async def test_first_call_scores_rank_the_targets_as_greedy_decoding_does(reg, tok, model):
    """frontier.first_call_scores (benchmarks/route_bias_bound.py): on the compact prompt, the
    argmax of the scores is the target that greedy constrained decoding calls (a policy that
    must call on its first turn: answer_candidates), and each row is a distribution."""
    import math

    from maestro_core.frontier import first_call_scores

    items = [Item(f"f{i}", "math", f"What is {i} + {2 * i}?", str(3 * i), "numeric") for i in range(6)]
    pol = LMPolicy(model, tok, reg, temperature=0.0, max_turn_tokens=14, answer_candidates=True)
    scores = first_call_scores(pol, reg, items)
    assert len(scores) == len(items) and all(len(r) == len(pol.actions) for r in scores)
    assert all(abs(math.log(sum(math.exp(x) for x in r))) < 1e-4 for r in scores)
    for item, row in zip(items, scores):
        turn = await pol.act(build_messages(reg, item, compact=True), EpisodeView(f"e-{item.id}", 0, 0))
        action = parse_action(turn.text, reg)
        assert isinstance(action, Call)
        called = f"{action.expert}@@{action.skill}" + (f"/{action.solver}" if action.solver else "")
        assert called == pol.actions[max(range(len(row)), key=row.__getitem__)]
