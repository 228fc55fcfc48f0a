"""OpenAIPolicy against a real loopback vLLM-like server; the paper registry and GPU config.

The server (tests/openai_server.py in `completion=` mode) behaves like vLLM for chat
completions: it renders the messages with the tokenizer's chat template, and a tiny causal LM
samples the turn token by token under the request's structured-output regex (only candidate
turns that fully match the regex can be produced), returning each token as `token_id:<id>`
with its sampling logprob, plus `prompt_token_ids` when asked (`return_token_ids`).
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from pathlib import Path

import pytest
import torch
import yaml

from maestro_core.config import build
from maestro_core.dataset import Item
from maestro_core.episode import EpisodeConfig, EpisodeRunner, build_messages
from maestro_core.errors import ConfigError, ExpertHTTPError
from maestro_core.experts import build_experts
from maestro_core.http_policy import ANSWER_ONLY_REGEX, OpenAIPolicy
from maestro_core.policy import EpisodeView, Policy
from maestro_core.policy_model import build_tiny_model
from maestro_core.protocol import Answer, parse_action
from maestro_core.registry import load_registry
from maestro_core.tokenizer import policy_corpus, policy_extra_tokens, train_policy_tokenizer
from maestro_core.training import TrainConfig
from tests.conftest import python_only_registry
from tests.openai_server import OpenAIServer

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-policy-test-0123456789-SECRET"
ITEMS = [Item(id=f"m{i}", benchmark="math", question=f"What is {i} + {i * 3}?", answer=str(4 * i), scorer="numeric")
         for i in range(1, 5)]


@pytest.fixture(autouse=True)
def _no_ambient_keys(monkeypatch):
    for env in ("MAESTRO_API_KEY", "OPENAI_API_KEY", "POLICY_KEY"):
        monkeypatch.delenv(env, raising=False)


@pytest.fixture(scope="module")
def reg():
    return python_only_registry()


@pytest.fixture(scope="module")
def tok_dir(reg, tmp_path_factory):
    """The served checkpoint's tokenizer files (the policy loads them with AutoTokenizer)."""
    tok = train_policy_tokenizer(policy_corpus(reg), extra_tokens=policy_extra_tokens(reg))
    path = tmp_path_factory.mktemp("ckpt")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, hidden=64, layers=2, heads=2, seed=0)


def candidates(messages: list[dict]) -> list[str]:
    """The turns the server's model may write: valid actions and junk (junk never matches the grammar)."""
    q = re.search(r"What is (\d+ \+ \d+)\?", messages[1]["content"])
    expr = q.group(1) if q else "1 + 1"
    a, b = (int(x) for x in expr.split(" + "))
    return [f"<call>calc@@math: {expr}</call>", f"<call>calc@@math/checked: {expr}</call>",
            f"<call>counter@@text: {expr}</call>", f"<think>add</think><call>calc@@math: {expr}</call>",
            f"<answer>{a + b}</answer>", f"<answer>{a + b + 1}</answer>",
            f"The answer is {a + b}", "<call>nobody@@math: 1</call>", f"<answer>{a + b}</answer> done"]


def sample_candidates(next_logits, prompt: list[int], seqs: list[tuple[int, ...]], body: dict, eos: int):
    """Sample token by token, as a grammar-constrained server does: only tokens that continue one
    of the allowed sequences `seqs` (each ending with EOS); `next_logits(ids)` is the model's
    last-position logits. Returns (ids, sampling logprobs at the request's temperature)."""
    gen = torch.Generator().manual_seed(int(body.get("seed", 0)))
    temperature = float(body.get("temperature", 1.0)) or 1.0
    out: list[int] = []
    lps: list[float] = []
    while len(out) < int(body.get("max_tokens", 256)):
        nxt = sorted({s[len(out)] for s in seqs if len(s) > len(out) and list(s[:len(out)]) == out})
        if not nxt:
            break
        logits = next_logits(prompt + out).float()
        mask = torch.full_like(logits, float("-inf"))
        mask[nxt] = 0.0
        logp = torch.log_softmax((logits + mask) / temperature, dim=-1)
        t = int(torch.multinomial(logp.exp(), 1, generator=gen))
        out.append(t)
        lps.append(float(logp[t]))
        if t == eos:
            break
    return out, lps


class TinyVLLM:
    """A vLLM-like `/v1/chat/completions` reply built by a tiny causal LM (see the module doc)."""

    def __init__(self, tok, model, *, with_logprobs: bool = True):
        self.tok, self.model, self.with_logprobs = tok, model, with_logprobs
        self.eos = tok.eos_token_id
        self.lock = threading.Lock()
        self.samples: list[tuple[tuple[int, ...], tuple[float, ...], tuple[int, ...]]] = []
        """(sampled ids, logprobs, prompt ids) per request."""

    def __call__(self, body: dict) -> dict:
        messages = body["messages"]
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = self.tok(text, add_special_tokens=False)["input_ids"]
        rx = (body.get("structured_outputs") or {}).get("regex") or body.get("guided_regex")
        allowed = [c for c in candidates(messages) if rx is None or re.fullmatch(rx, c, flags=re.DOTALL)]
        assert allowed, f"no candidate matches {rx}"
        seqs = [tuple(self.tok.encode(c, add_special_tokens=False)) + (self.eos,) for c in allowed]
        with self.lock, torch.no_grad():
            out, lps = sample_candidates(lambda ids: self.model(torch.tensor([ids])).logits[0, -1], prompt, seqs,
                                         body, self.eos)
            self.samples.append((tuple(out), tuple(lps), tuple(prompt)))
        body_ids = out[:-1] if out and out[-1] == self.eos else out
        content = self.tok.decode(body_ids, skip_special_tokens=True)
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop" if out and out[-1] == self.eos else "length"}
        if body.get("logprobs") and self.with_logprobs:
            as_ids = bool(body.get("return_tokens_as_token_ids"))
            choice["logprobs"] = {"content": [
                {"token": f"token_id:{t}" if as_ids else self.tok.decode([t]), "logprob": lp, "bytes": None,
                 "top_logprobs": []} for t, lp in zip(out, lps)]}
        reply = {"id": "chatcmpl-tiny", "object": "chat.completion", "model": body.get("model"), "choices": [choice],
                 "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(out),
                           "total_tokens": len(prompt) + len(out)}}
        if body.get("return_token_ids"):
            reply["prompt_token_ids"] = list(prompt)
            choice["token_ids"] = list(out)
        return reply


def make_policy(srv: OpenAIServer, reg, tok_dir, **kw) -> OpenAIPolicy:
    kw.setdefault("backoff_s", 0.01)
    return OpenAIPolicy(srv.base_url, "maestro-policy", reg, tokenizer=str(tok_dir), **kw)


async def test_episodes_record_the_servers_tokens_logprobs_and_grammar(reg, tok_dir, tok, model, monkeypatch):
    monkeypatch.setenv("MAESTRO_API_KEY", KEY)
    server = TinyVLLM(tok, model)
    with OpenAIServer(completion=server, api_key=KEY) as srv:  # a request without the Bearer key gets 401
        policy = make_policy(srv, reg, tok_dir, seed=123)
        assert isinstance(policy, Policy)
        runner = EpisodeRunner(reg, build_experts(reg), policy, config=EpisodeConfig(max_turns=2))
        trajs = await runner.run(ITEMS, group_size=3, run_id="r", iteration=0)
        await policy.aclose()
        bodies = list(srv.received)

    assert len(trajs) == 12 and srv.requests == len(bodies) == len(server.samples)
    sampled = {(ids, lps) for ids, lps, _ in server.samples}
    eos = tok.eos_token_id
    for t in trajs:
        assert t.prompt_ids and t.checkpoint_id == "maestro-policy"
        for s in t.steps:
            # exactly what the server sampled: ids (ending with EOS) and their logprobs
            assert (s.completion_ids, s.logprobs) in sampled
            assert s.completion_ids[-1] == eos and len(s.logprobs) == len(s.completion_ids)
            assert all(lp <= 0.0 for lp in s.logprobs)
            assert tok.decode(list(s.completion_ids[:-1]), skip_special_tokens=True) == s.text
            assert s.action != "invalid", s.text  # the grammar admits only valid actions
            if s.turn == 1:
                assert s.action == "answer"  # last turn: the answer-only grammar
        # prompt + turns + observations are the chat template's tokenisation of the conversation
        convo = build_messages(reg, next(i for i in ITEMS if i.id == t.item_id))
        for s in t.steps:
            convo.append({"role": "assistant", "content": s.text})
            if s.observation_ids:
                convo.append({"role": "user", "content": s.observation})
        rendered = tok.apply_chat_template(convo, tokenize=False)
        want = tok(rendered, add_special_tokens=False)["input_ids"]
        got = list(t.prompt_ids) + t.completion_ids()
        assert got == want

    # what the server conditioned on is what the trajectories record
    assert policy.stats.context_checks == len(bodies) and policy.stats.context_mismatches == 0

    answer_turns = 0
    for b in bodies:
        assert b["model"] == "maestro-policy" and b["temperature"] == 1.0
        assert b["logprobs"] is True and b["return_tokens_as_token_ids"] is True
        last = len(b["messages"]) == 4  # system, user, turn 0, observation: the second (last) turn
        want_rx = ANSWER_ONLY_REGEX if last else reg.grammar().regex()
        assert b["structured_outputs"] == {"regex": want_rx} and "guided_regex" not in b
        answer_turns += last
    assert answer_turns >= 1
    first_turn_seeds = [b["seed"] for b in bodies if len(b["messages"]) == 2]
    assert len(set(first_turn_seeds)) == len(first_turn_seeds) == 12  # each sample of a group differs

    # the key travels only in the Authorization header: never in a trajectory nor in the policy's repr
    assert all(KEY not in json.dumps(t.to_row(), default=str) for t in trajs)
    assert KEY not in repr(policy) and all(KEY not in json.dumps(b) for b in bodies)


async def test_grammar_is_what_the_server_enforces(reg, tok_dir, tok, model):
    server = TinyVLLM(tok, model)
    msgs = build_messages(reg, ITEMS[0])
    with OpenAIServer(completion=server) as srv:
        free = make_policy(srv, reg, tok_dir, constrained=False, seed=1)
        guided = make_policy(srv, reg, tok_dir, structured_outputs="guided_regex", seed=1)
        free_texts = [(await free.act(msgs, EpisodeView(f"e{k}", 0, 0, 4))).text for k in range(24)]
        guided_texts = [(await guided.act(msgs, EpisodeView(f"e{k}", 0, 0, 4))).text for k in range(24)]
        last = await guided.act(msgs, EpisodeView("e-last", 0, 3, 4))
        await free.aclose()
        await guided.aclose()
        bodies = list(srv.received)
    assert all("structured_outputs" not in b and "guided_regex" not in b for b in bodies[:24])
    assert all(b["guided_regex"] == reg.grammar().regex() for b in bodies[24:48])
    assert bodies[48]["guided_regex"] == ANSWER_ONLY_REGEX
    invalid = [t for t in free_texts if not re.fullmatch(reg.grammar().regex(), t)]
    assert invalid, "unconstrained sampling should sometimes write junk"
    assert all(re.fullmatch(reg.grammar().regex(), t) for t in guided_texts)
    assert re.fullmatch(ANSWER_ONLY_REGEX, last.text) and isinstance(parse_action(last.text, reg), Answer)


async def test_429_then_200_is_retried(reg, tok_dir, tok, model):
    with OpenAIServer(completion=TinyVLLM(tok, model), faults=[429, 503, "ok"]) as srv:
        policy = make_policy(srv, reg, tok_dir)
        turn = await policy.act(build_messages(reg, ITEMS[0]), EpisodeView("e", 0, 0, 4))
        await policy.aclose()
    assert srv.requests == 3 and policy.stats.retries == 2
    assert turn.token_ids and len(turn.token_ids) == len(turn.logprobs)


async def test_server_without_logprobs_or_token_ids_is_a_clear_error(reg, tok_dir, tok, model):
    msgs, view = build_messages(reg, ITEMS[0]), EpisodeView("e", 0, 0, 4)
    # an OpenAI-compatible server that ignores return_tokens_as_token_ids: tokens as text
    with OpenAIServer(reply=lambda m: "<answer>4</answer>") as srv:
        policy = make_policy(srv, reg, tok_dir)
        with pytest.raises(ConfigError, match="not as 'token_id:<id>'.*vLLM.*record_tokens=False"):
            await policy.act(msgs, view)
        await policy.aclose()
    # a server that returns no logprobs at all
    with OpenAIServer(completion=TinyVLLM(tok, model, with_logprobs=False)) as srv:
        policy = make_policy(srv, reg, tok_dir)
        with pytest.raises(ConfigError, match="no token logprobs.*serve the policy with vLLM.*record_tokens=False"):
            await policy.act(msgs, view)
        await policy.aclose()
    # evaluation-only use: no vLLM extensions requested; ids from the local tokenizer, no logprobs
    with OpenAIServer(reply=lambda m: "<answer>4</answer>") as srv:
        policy = make_policy(srv, reg, tok_dir, record_tokens=False, constrained=False)
        turn = await policy.act(msgs, view)
        await policy.aclose()
        body = srv.received[0]
    assert turn.text == "<answer>4</answer>" and turn.logprobs == ()
    assert turn.token_ids == tuple(tok.encode("<answer>4</answer>", add_special_tokens=False)) + (tok.eos_token_id,)
    assert not {"logprobs", "return_tokens_as_token_ids", "structured_outputs"} & set(body)
    # recording tokens without the served checkpoint's tokenizer is refused up front
    with pytest.raises(ConfigError, match="tokenizer"):
        OpenAIPolicy("http://127.0.0.1:9/v1", "m", reg)


async def test_api_key_bearer_wrong_key_and_named_variable(reg, tok_dir, tok, model, monkeypatch):
    msgs, view = build_messages(reg, ITEMS[0]), EpisodeView("e", 0, 0, 4)
    wrong = "sk-wrong-key-9876543210"
    monkeypatch.setenv("POLICY_KEY", wrong)
    with OpenAIServer(completion=TinyVLLM(tok, model), api_key=KEY) as srv:
        policy = make_policy(srv, reg, tok_dir, api_key_env="POLICY_KEY")
        with pytest.raises(ExpertHTTPError) as ei:
            await policy.act(msgs, view)  # the server echoes the key it got: it must be redacted
        await policy.aclose()
        assert ei.value.status == 401 and srv.requests == 1  # 4xx is not retried
        assert wrong not in str(ei.value) and "***" in str(ei.value)
        monkeypatch.setenv("POLICY_KEY", KEY)
        policy = make_policy(srv, reg, tok_dir, api_key_env="POLICY_KEY")
        assert (await policy.act(msgs, view)).token_ids
        await policy.aclose()
    monkeypatch.delenv("POLICY_KEY")
    policy = OpenAIPolicy("http://127.0.0.1:9/v1", "m", reg, tokenizer=str(tok_dir), api_key_env="POLICY_KEY")
    with pytest.raises(ConfigError, match="POLICY_KEY"):
        await policy.act(msgs, view)


async def test_sync_weights_posts_the_configured_requests(reg, tok_dir, tok, model, tmp_path, monkeypatch):
    monkeypatch.setenv("MAESTRO_API_KEY", KEY)
    routes = {"/collective_rpc": lambda b: {"results": [None]}, "/reset_prefix_cache": lambda b: {},
              "/v1/load_lora_adapter": lambda b: "ok", "/v1/unload_lora_adapter": lambda b: "ok",
              "/update_weights_from_disk": lambda b: {"success": True}}
    with OpenAIServer(completion=TinyVLLM(tok, model), api_key=KEY, routes=routes) as srv:
        # default: vLLM dev-mode collective_rpc reload_weights + prefix cache reset
        policy = make_policy(srv, reg, tok_dir)
        policy.sync_weights(tmp_path / "step-3")
        assert srv.route_requests == [
            ("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path / "step-3")}}),
            ("/reset_prefix_cache", None)]
        assert policy.checkpoint_id == "step-3" and policy.stats.syncs == 1
        # any other server: a configured sequence of POSTs
        srv.route_requests.clear()
        custom = make_policy(srv, reg, tok_dir, sync_requests=[
            ("/update_weights_from_disk", {"model_path": "{checkpoint_dir}", "tag": "{checkpoint_id}"})])
        custom.sync_weights(str(tmp_path / "step-4"), checkpoint_id="it-4")
        assert srv.route_requests == [("/update_weights_from_disk",
                                       {"model_path": str(tmp_path / "step-4"), "tag": "it-4"})]
        # LoRA: load the new adapter under a new name, use it, unload the previous one
        srv.route_requests.clear()
        lora = make_policy(srv, reg, tok_dir, sync="lora")
        lora.sync_weights(tmp_path / "a1")
        lora.sync_weights(tmp_path / "a2")
        assert srv.route_requests == [
            ("/v1/load_lora_adapter", {"lora_name": "maestro-policy-a1", "lora_path": str(tmp_path / "a1")}),
            ("/v1/load_lora_adapter", {"lora_name": "maestro-policy-a2", "lora_path": str(tmp_path / "a2")}),
            ("/v1/unload_lora_adapter", {"lora_name": "maestro-policy-a1"})]
        await lora.act(build_messages(reg, ITEMS[0]), EpisodeView("e", 0, 0, 4))
        await lora.aclose()
        assert srv.received[-1]["model"] == "maestro-policy-a2" and lora.checkpoint_id == "a2"
    # a server without the dev endpoints: a clear error naming the switch
    with OpenAIServer(completion=TinyVLLM(tok, model)) as srv:
        with pytest.raises(ExpertHTTPError, match="VLLM_SERVER_DEV_MODE=1"):
            make_policy(srv, reg, tok_dir).sync_weights(tmp_path / "step-5")


async def test_context_mismatch_is_counted_or_raised(reg, tok_dir, tok, model):
    """A server that renders the chat differently (another template) is caught by prompt_token_ids."""
    inner = TinyVLLM(tok, model)

    def other_template(body: dict) -> dict:
        reply = inner(body)
        reply["prompt_token_ids"] = [tok.bos_token_id] + reply["prompt_token_ids"]
        return reply

    msgs, view = build_messages(reg, ITEMS[0]), EpisodeView("e", 0, 0, 4)
    with OpenAIServer(completion=other_template) as srv:
        lenient = make_policy(srv, reg, tok_dir)
        assert (await lenient.act(msgs, view)).token_ids
        assert lenient.stats.context_checks == 1 and lenient.stats.context_mismatches == 1
        strict = make_policy(srv, reg, tok_dir, strict_context=True)
        with pytest.raises(ConfigError, match="first difference at position 1"):
            await strict.act(msgs, view)
        await lenient.aclose()
        await strict.aclose()


def test_paper_registry_loads_offline_with_the_paper_experts_and_skills():
    reg = load_registry(ROOT / "registry" / "maestro-paper.yaml")
    experts = {"chart-r1", "glm-4.6v-flash", "qwen3-vl-8b-instruct", "intern-s1-mini", "medgemma-1.5-4b-it"}
    helpers = {"glm-ocr", "pr1-detection", "deepeyes-7b"}
    skills = {"geometric", "chart", "science", "counting", "perception"}
    assert set(reg.experts) == experts | helpers and set(reg.skills) == skills
    assert all(e.kind == "http" and e.backend["base_url"].startswith("http") for e in reg.experts.values())
    assert all(e.price.output_per_1m > 0 for e in reg.experts.values())
    actions = reg.grammar().actions
    assert {a for a in actions if "/" not in a} == {f"{e}@@{s}" for e in experts for s in skills}
    assert not any(a.split("@@")[0] in helpers for a in actions)  # helpers run inside skills only
    assert {"chart-r1@@chart/ocr_typed", "glm-4.6v-flash@@geometric/program",
            "qwen3-vl-8b-instruct@@counting/detect_count", "medgemma-1.5-4b-it@@perception/zoom_answer"} <= set(actions)
    assert reg.helper_experts("counting", "detect_count") == ("pr1-detection",)
    backends = build_experts(reg)  # HTTP clients are built lazily: no server needed
    assert set(backends) == set(reg.experts)


def test_gpu_paper_config_sections_build():
    raw = yaml.safe_load((ROOT / "infra" / "configs" / "train-gpu-paper.yaml").read_text())
    assert (ROOT / "infra" / "configs" / raw["registry"]).resolve() == (ROOT / "registry" / "maestro-paper.yaml")
    tcfg = build(TrainConfig, raw["train"], section="train")
    g = tcfg.grpo
    assert (g.num_generations, g.learning_rate, g.epsilon, g.beta, g.temperature, g.max_turns) == (8, 1e-6, 0.2, 0.0,
                                                                                                   1.0, 4)
    assert tcfg.max_turns == 4 and build(EpisodeConfig, raw["episode"], section="episode").max_turns == 4
    policy = dict(raw["policy"])
    assert policy.pop("backend") == "openai" and "Qwen3-VL-4B" in policy.pop("checkpoint")
    params = inspect.signature(OpenAIPolicy).parameters
    assert set(policy) <= set(params) - {"registry"}, set(policy) - set(params)


def test_a_budget_narrows_the_served_grammar(reg):
    """The structured-output regex sent to the server offers only the calls the budget left
    can pay for, and only an answer when none fits."""
    import re as _re

    from maestro_core.policy import EpisodeView
    policy = OpenAIPolicy("http://127.0.0.1:9/v1", "m", reg, record_tokens=False)
    full = policy.turn_regex(EpisodeView("e", 0, 0, 4))
    cheap = min(reg.experts.values(), key=lambda e: e.call_cost_estimate())
    rx = policy.turn_regex(EpisodeView("e", 0, 0, 4, budget_left=cheap.call_cost_estimate()))
    assert rx != full
    for a in reg.grammar().actions:
        ok = reg.experts[a.split("@@")[0]].call_cost_estimate() <= cheap.call_cost_estimate()
        assert bool(_re.fullmatch(rx, f"<call>{a}</call>")) == ok, a
    none = policy.turn_regex(EpisodeView("e", 0, 0, 4, budget_left=0.0))
    assert not _re.fullmatch(none, f"<call>{reg.grammar().actions[0]}</call>")
    assert _re.fullmatch(none, "<answer>7</answer>")


def test_image_routing_narrows_the_served_grammar(reg):
    """With image_routing 'first' the regex sent for an image task's first call offers only the
    skills that see images; a task without images gets none of the 'required' ones; the
    training config carries the setting to the served policy."""
    import copy
    import re as _re

    from maestro_core.policy import EpisodeView
    from maestro_core.policy_config import PolicyConfig
    from maestro_core.registry import parse_registry
    from maestro_core.training import TrainConfig
    from tests.conftest import BASE_REGISTRY

    d = copy.deepcopy(BASE_REGISTRY)
    d["experts"] = [e for e in d["experts"] if e["name"] != "llm"]
    d["skills"] = [dict(s, images={"math": "ignored", "text": "required"}[s["name"]])
                   for s in d["skills"] if s["name"] != "chat"]
    imaged = parse_registry(d, source="unit.yaml")
    kw = PolicyConfig(backend="openai", checkpoint="c", base_url="u").openai_kwargs(TrainConfig(), imaged)
    assert kw["image_routing"] == "first"
    policy = OpenAIPolicy("http://127.0.0.1:9/v1", "m", imaged, record_tokens=False, actions=kw["actions"],
                          free_input=kw["free_input"], image_routing=kw["image_routing"])
    calls = lambda rx: {a.split("@@")[1] for a in kw["actions"] if _re.fullmatch(rx, f"<call>{a}</call>")}  # noqa: E731
    assert calls(policy.turn_regex(EpisodeView("e", 0, 0, 4, images=("a.png",)))) == {"text"}
    assert calls(policy.turn_regex(EpisodeView("e", 0, 0, 4))) == {"math"}
    assert calls(policy.turn_regex(EpisodeView("e", 0, 1, 4, images=("a.png",)))) == {"math", "text"}
    assert _re.fullmatch(policy.turn_regex(EpisodeView("e", 0, 0, 4, images=("a.png",))), "<answer>4</answer>")


def test_the_served_grammar_follows_the_training_action_space(reg):
    """`actions: level1` and `call_input: question` narrow the regex sent to the server as they
    narrow the in-process policy's constraint, under a budget too."""
    import re as _re

    from maestro_core.errors import ConfigError
    from maestro_core.policy import EpisodeView
    from maestro_core.policy_config import PolicyConfig
    from maestro_core.training import TrainConfig

    every = reg.grammar().actions
    level1 = [a for a in every if "/" not in a]
    level2 = [a for a in every if "/" in a]
    assert level1 and level2
    pcfg = PolicyConfig(backend="openai", checkpoint="c", base_url="http://127.0.0.1:9/v1")
    kw = pcfg.openai_kwargs(TrainConfig(), reg)  # the CPU default: level-1 actions, the question forwarded
    assert kw["actions"] == level1 and kw["free_input"] is False
    policy = OpenAIPolicy("http://127.0.0.1:9/v1", "m", reg, record_tokens=False, actions=kw["actions"],
                          free_input=kw["free_input"])
    for view in (EpisodeView("e", 0, 0, 4), EpisodeView("e", 0, 0, 4, budget_left=1.0)):
        rx = policy.turn_regex(view)
        assert all(_re.fullmatch(rx, f"<call>{a}</call>") for a in level1)
        assert not any(_re.fullmatch(rx, f"<call>{a}</call>") for a in level2)
        assert not _re.fullmatch(rx, f"<call>{level1[0]}: 2 + 2</call>") and _re.fullmatch(rx, "<answer>4</answer>")
    free = PolicyConfig(backend="openai", checkpoint="c", base_url="u").openai_kwargs(
        TrainConfig(actions="all", call_input="free"), reg)
    assert free["actions"] == list(every) and free["free_input"] is True
    assert "actions" not in pcfg.openai_kwargs(TrainConfig())  # without a registry: the server's full grammar
    with pytest.raises(ConfigError, match="not in registry"):
        OpenAIPolicy("http://127.0.0.1:9/v1", "m", reg, record_tokens=False, actions=["nobody@@math"])
