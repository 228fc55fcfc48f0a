"""The training loop end to end on in-process experts: collect -> store -> GRPO update -> validate."""

import json
import os

import pytest

from maestro_core.config import build
from maestro_core.dataset import Item
from maestro_core.errors import ConfigError
from maestro_core.experts import build_experts
from maestro_core.grpo import GRPOSettings
from maestro_core.registry import parse_registry
from maestro_core.store import Store
from maestro_core.training import TrainConfig, hidden_cost_lambda_at, train_policy


def test_two_iterations_store_update_and_checkpoint(registry_dict, tmp_path):
    registry_dict["experts"] = registry_dict["experts"][:2]
    registry_dict["skills"] = registry_dict["skills"][:2]
    reg = parse_registry(registry_dict)
    items = [Item(f"a{i}", "arith", f"What is {i} + {i}?", str(2 * i), "numeric") for i in range(6)]
    cfg = TrainConfig(iterations=2, prompts_per_iteration=4, hidden=64, layers=2, heads=2, vocab_size=512,
                      eval_every=2, val_items=3, cost_lambdas=(0.0, 0.5, 1.0), budget_share=0.7, rl_contrast_lr=1e-3,
                      grpo=GRPOSettings.cpu_profile(num_generations=4, per_device_train_batch_size=8))
    with Store(tmp_path / "home") as store:
        res = train_policy(reg, items, items[:3], store=store, experts=build_experts(reg), config=cfg,
                           out_dir=tmp_path / "run", run_id="t1", log=lambda s: None)
        assert store.count_episodes("t1") == 2 * 4 * 4
        trajs = store.trajectories("t1", 0)
        assert all(t.prompt_ids and t.steps[-1].completion_ids for t in trajs)
        assert {t.checkpoint_id for t in trajs} == {"t1/ckpt-0"}
        assert len({t.cost_lambda for t in trajs}) > 1  # sampled per group, shared within it
        groups = {}
        for t in trajs:
            groups.setdefault(t.item_id, set()).add(t.cost_lambda)
        assert all(len(v) == 1 for v in groups.values())
        # request-time budgets are trained too: per group, in the prompt, none for the other groups
        budgets = {}
        for t in trajs:
            line = next((x for x in t.prompt_text.splitlines() if x.startswith("Budget: $")), None)
            budgets.setdefault(t.item_id, set()).add(line)
        assert all(len(v) == 1 for v in budgets.values())
        seen = {b for v in budgets.values() for b in v}
        assert {"Budget: $0.02", "Budget: $0.005", None} >= seen and seen - {None}
    assert [r["iteration"] for r in res.curve] == [0, 1] and "val_accuracy" in res.curve[1]
    assert all(r["contrast_loss"] > 0 for r in res.curve)  # the contrastive term kept during RL
    assert res.checkpoints and (tmp_path / "run" / "ckpt-2" / "config.json").exists()
    assert json.loads((tmp_path / "run" / "curve.json").read_text())[0]["mean_reward"] == res.curve[0]["mean_reward"]


def test_validation_items_spread_over_benchmarks():
    from maestro_core.training import spread
    items = [Item(f"{b}{i}", b, f"q {b} {i}", "1", "exact") for b in ("a", "b", "c") for i in range(10)]
    picked = spread(items, 6, seed=1)
    assert sorted(it.benchmark for it in picked) == ["a", "a", "b", "b", "c", "c"]
    assert spread(items, 6, seed=1) == picked and len(spread(items, 99)) == 30


def test_batch_weights_set_each_benchmarks_share_of_an_iteration():
    from collections import Counter

    from maestro_core.training import check_batch_weights, spread
    items = [Item(f"{b}{i}", b, f"q {b} {i}", "1", "exact")
             for b, k in (("a", 30), ("b", 30), ("c", 30), ("d", 2)) for i in range(k)]

    def shares(weights, n=16, seed=1):
        picked = spread(items, n, seed=seed, weights=weights)
        assert len({it.id for it in picked}) == len(picked)  # no item twice
        return dict(Counter(it.benchmark for it in picked))

    assert shares(None) == {"a": 5, "b": 5, "c": 4, "d": 2}  # d has only 2: the rest goes round
    assert shares({"a": 1}) == shares(None)  # weights of 1 are the default's shares
    assert shares({"a": 2, "b": 2}) == {"a": 6, "b": 5, "c": 3, "d": 2}
    assert shares({"c": 0}) == {"a": 7, "b": 7, "d": 2}  # 0 leaves c out; d's short share goes to a, b
    assert shares({"a": 2, "b": 2}, seed=2) == shares({"a": 2, "b": 2})  # the shares do not depend on the seed
    assert spread(items, 16, seed=2, weights={"a": 2}) != spread(items, 16, seed=1, weights={"a": 2})
    assert shares({"a": 3}, n=200) == {"a": 30, "b": 30, "c": 30, "d": 2}  # never more than a benchmark has

    check_batch_weights({"a": 2, "d": 0}, items)
    with pytest.raises(ConfigError, match="lacks: \\['charts'\\]") as e:
        check_batch_weights({"charts": 2}, items)
    assert "['a', 'b', 'c', 'd']" in e.value.fix
    with pytest.raises(ConfigError, match="every benchmark"):
        check_batch_weights({"a": 0, "b": 0, "c": 0, "d": 0}, items)
    with pytest.raises(ConfigError, match="batch_weights"):
        TrainConfig(batch_weights={"a": -1})
    with pytest.raises(ConfigError, match="balanced_batches"):
        TrainConfig(batch_weights={"a": 2}, balanced_batches=False)
    with pytest.raises(ConfigError, match="mapping"):
        build(TrainConfig, {"batch_weights": [2, 1]})
    assert build(TrainConfig, {"batch_weights": {"a": 2}}).batch_weights == {"a": 2}


def _action_states(reg, items, cfg: TrainConfig) -> dict:
    """The first action's state (after the prompt and `<call>`) of each item, by benchmark, for a
    policy built and warmed up by build_policy with `cfg`."""
    from maestro_core.episode import build_messages
    from maestro_core.training import build_policy

    msgs = [build_messages(reg, it, compact=True) for it in items]
    model, tok, pol = build_policy(reg, [it.question for it in items], cfg, messages=msgs)
    return _states_of(reg, items, model, tok, pol)


def _states_of(reg, items, model, tok, pol) -> dict:
    """The first action's state of each item under `model`, by benchmark."""
    import torch

    from maestro_core.episode import build_messages

    call = tok("<call>", add_special_tokens=False)["input_ids"]
    hs: dict = {}
    for it in items:
        with torch.no_grad():
            h = model(torch.tensor([list(pol.encode_prompt(build_messages(reg, it, compact=True))) + call]),
                      output_hidden_states=True)
        hs.setdefault(it.benchmark, []).append(h.hidden_states[-1][0, -1])
    return hs


def _four_kinds() -> list:
    """Ten questions of each of four kinds (benchmarks arith, words, color, date)."""
    kinds = {"arith": lambda i: f"What is {i} + {2 * i}?",
             "words": lambda i: f"How many words are in '{' '.join(['ab'] * (i + 2))}' here?",
             "color": lambda i: f"Which colour is item {i} in the picture?",
             "date": lambda i: f"On which day of week was event {i} held?"}
    return [Item(f"{k}{i}", k, f(i), "0", "exact") for k, f in kinds.items() for i in range(10)]


def _centroid_cosine(hs: dict) -> float:
    """Mean cosine between the benchmarks' centroids of `hs` (1: one vector for all)."""
    import itertools

    import torch

    cents = [torch.stack(v).mean(0) for v in hs.values()]
    pairs = list(itertools.combinations(cents, 2))
    return sum(float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in pairs) / len(pairs)


def test_label_free_warm_up_makes_the_action_position_read_the_question():
    """pretrain_reader: the state where the first action is sampled separates questions of
    different kinds (no answers or routes used) far better than the random init does."""
    import torch

    reg = parse_registry(__import__("tests.conftest", fromlist=["BASE_REGISTRY"]).BASE_REGISTRY)
    items = ([Item(f"a{i}", "arith", f"What is {i} + {2 * i}?", "0", "numeric") for i in range(12)]
             + [Item(f"w{i}", "words", f"How many words are in '{' '.join(['ab'] * (i + 2))}' here?", "0", "exact")
                for i in range(12)])

    def separation(steps):
        hs = _action_states(reg, items, TrainConfig(hidden=64, layers=2, heads=2, vocab_size=512,
                                                    pretrain_steps=steps, pretrain_contrast=0.0))
        c = {b: torch.stack(v).mean(0) for b, v in hs.items()}
        within = sum(float((torch.stack(v) - c[b]).norm(dim=-1).mean()) for b, v in hs.items()) / 2
        return float((c["arith"] - c["words"]).norm()) / within

    assert separation(150) > 2 * separation(0)


def test_the_warm_up_runs_the_shared_system_prompt_once_with_the_same_steps(monkeypatch):
    """pretrain_reader scores its batches with the system prompt every row shares run once
    (shared_prefix_token_logps): the losses and weights of scoring each row whole."""
    import copy

    import torch

    import maestro_core.training as training
    from maestro_core.episode import build_messages
    from maestro_core.training import build_policy, pretrain_reader, warmup_examples

    reg = parse_registry(__import__("tests.conftest", fromlist=["BASE_REGISTRY"]).BASE_REGISTRY)
    items = _four_kinds()
    cfg = TrainConfig(hidden=64, layers=2, heads=2, vocab_size=512, pretrain_steps=0, seed=1)
    msgs = [build_messages(reg, it, compact=True) for it in items]
    model, tok, _ = build_policy(reg, [it.question for it in items], cfg, messages=msgs)
    examples = warmup_examples(tok, msgs)
    shared_calls = []
    real = training.shared_prefix_token_logps
    runs = {}
    for share in (True, False):
        monkeypatch.setattr(training, "shared_prefix_token_logps",
                            (lambda *a: shared_calls.append(real(*a)) or shared_calls[-1]) if share else
                            (lambda *a: None))
        m = copy.deepcopy(model)
        runs[share] = (pretrain_reader(m, tok, examples, steps=5, seed=3), list(m.parameters()))
    assert len(shared_calls) == 5 and all(r is not None for r in shared_calls)
    assert torch.allclose(torch.tensor(runs[True][0]), torch.tensor(runs[False][0]), atol=1e-5)
    for a, b in zip(runs[True][1], runs[False][1]):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_contrastive_warm_up_keeps_the_kinds_apart_at_the_action_position():
    """pretrain_contrast: with the contrastive term the first action's states of four kinds of
    question share less (the mean cosine between the kinds' centroids is lower) than with word
    prediction alone, at each seed tried; a negative weight is refused."""
    import pytest

    from maestro_core.errors import ConfigError

    reg = parse_registry(__import__("tests.conftest", fromlist=["BASE_REGISTRY"]).BASE_REGISTRY)
    items = _four_kinds()

    def centroid_cosine(contrast, seed):
        return _centroid_cosine(_action_states(reg, items, TrainConfig(
            hidden=64, layers=2, heads=2, vocab_size=512, pretrain_steps=100, seed=seed, pretrain_contrast=contrast)))

    for seed in (0, 2):
        plain, contrast = centroid_cosine(0.0, seed), centroid_cosine(1.0, seed)
        print(f"seed {seed}: centroid cosine {plain:.3f} plain, {contrast:.3f} with the contrastive term")
        assert contrast < plain - 0.08
    with pytest.raises(ConfigError, match="pretrain_contrast"):
        TrainConfig(pretrain_contrast=-1.0)


def test_contrast_regulariser_pulls_collapsed_states_apart():
    """ContrastRegulariser (rl_contrast_lr, the contrastive term kept during RL): from a policy
    whose first-action states of four kinds of question are nearly one vector, its steps lower
    the InfoNCE loss and the centroid cosine; it changes parameters; bad settings are refused."""
    import pytest
    import torch

    from maestro_core.episode import build_messages
    from maestro_core.errors import ConfigError
    from maestro_core.training import ContrastRegulariser, build_policy, warmup_examples

    reg = parse_registry(__import__("tests.conftest", fromlist=["BASE_REGISTRY"]).BASE_REGISTRY)
    items = _four_kinds()
    cfg = TrainConfig(hidden=64, layers=2, heads=2, vocab_size=512, pretrain_steps=0, seed=1)
    msgs = [build_messages(reg, it, compact=True) for it in items]
    model, tok, pol = build_policy(reg, [it.question for it in items], cfg, messages=msgs)
    before = _centroid_cosine(_states_of(reg, items, model, tok, pol))
    w0 = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)
    reg_c = ContrastRegulariser(model, tok, warmup_examples(tok, msgs), lr=1e-3, steps=2, seed=1)
    losses = [reg_c.step(i) for i in range(40)]
    after = _centroid_cosine(_states_of(reg, items, model, tok, pol))
    print(f"centroid cosine {before:.3f} -> {after:.3f}; loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}")
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3
    assert after < before - 0.1
    assert any(not torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    for bad in (dict(rl_contrast_lr=-1.0), dict(rl_contrast_lr=float("inf")), dict(rl_contrast_steps=0)):
        with pytest.raises(ConfigError, match="rl_contrast"):
            TrainConfig(**bad)


def test_question_views_change_only_the_question_tokens():
    """pretrain_views 'question': a contrastive view drops or replaces (by another question
    token) only the user message's tokens, found as its last occurrence in the prompt; 'prompt'
    views drop anywhere but the last two tokens; an unknown kind is refused."""
    import random

    import pytest

    from maestro_core.errors import ConfigError
    from maestro_core.training import _last_index, _noisy_view

    q = [7, 8, 9, 7]
    p = [1, 2, 7, 8, 3] + q + [4, 5, 6]
    start = _last_index(p, q)
    assert start == 5 and _last_index(p, [42]) is None
    rng = random.Random(0)
    seen_change = False
    for _ in range(200):
        v = _noisy_view(p, (start, start + len(q)), rng, pool=[7, 8, 9])
        assert v[:5] == p[:5] and v[-3:] == p[-3:]          # catalogue and the generation prompt kept
        middle = v[5:-3]
        assert len(middle) <= len(q) and set(middle) <= {7, 8, 9}
        seen_change |= middle != q
        w = _noisy_view(p, None, rng, pool=[7, 8, 9])
        assert w[-2:] == p[-2:] and len(w) <= len(p) and set(w) <= set(p)
    assert seen_change
    with pytest.raises(ConfigError, match="pretrain_views"):
        TrainConfig(pretrain_views="words")


def test_cost_prior_starts_the_first_call_on_the_cheap_targets():
    """fit_action_prior: after the warm-up, the first call's constrained target distribution is
    the price prior for every question (output layer only: the reader's state is untouched);
    cost_prior 0 leaves it near uniform."""
    import pytest
    import torch

    from maestro_core.episode import build_messages
    from maestro_core.errors import ConfigError
    from maestro_core.training import action_prior, build_policy, policy_kwargs

    reg = parse_registry(__import__("tests.conftest", fromlist=["BASE_REGISTRY"]).BASE_REGISTRY)
    items = [Item(f"a{i}", "arith", f"What is {i} + {2 * i}?", "0", "numeric") for i in range(8)]
    msgs = [build_messages(reg, it, compact=True) for it in items]

    def first_call(beta):
        cfg = TrainConfig(hidden=64, layers=2, heads=2, vocab_size=512, pretrain_steps=50, cost_prior=beta,
                          cost_scale=0.001)
        model, tok, pol = build_policy(reg, [it.question for it in items], cfg, messages=msgs)
        acts = policy_kwargs(cfg, reg)["actions"]
        idx = [tok(a, add_special_tokens=False)["input_ids"][0] for a in acts]
        call = tok("<call>", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = [torch.softmax(model(torch.tensor([list(pol.encode_prompt(m)) + call])).logits[0, -1, idx], -1)
                   for m in msgs]
        return acts, torch.stack(out), action_prior(reg, acts, beta or 1.0, cfg.cost_scale), model, cfg

    acts, fitted, prior, model, cfg = first_call(2.0)
    assert all(p.requires_grad for p in model.parameters())
    assert float((fitted - torch.tensor(prior)).abs().max()) < 0.05, (acts, prior, fitted[0])
    cheap, dear = acts.index("calc@@math"), acts.index("counter@@text")
    assert prior[cheap] > 5 * prior[dear]  # $0.001 against $0.002 per call, at cost_scale $0.001: e^2
    _, flat, *_ = first_call(0.0)
    assert float(flat[:, cheap].mean()) < 2.5 / len(acts)
    with pytest.raises(ConfigError, match="cost_prior"):
        TrainConfig(cost_prior=-1.0)


def test_a_partial_grpo_section_overrides_the_cpu_profile_not_the_paper_defaults():
    from maestro_core.config import build
    cfg = build(TrainConfig, {"iterations": 3, "grpo": {"scale_rewards": "none"}}, section="train")
    cpu = GRPOSettings.cpu_profile()
    assert cfg.grpo.scale_rewards == "none" and cfg.iterations == 3
    assert cfg.grpo.learning_rate == cpu.learning_rate != GRPOSettings.paper().learning_rate
    assert cfg.grpo.num_iterations == cpu.num_iterations


def test_balanced_batches_take_each_benchmark_in_turn():
    from collections import Counter
    from types import SimpleNamespace

    from maestro_core.training import TrainingRun

    items = [Item(id=f"{b}-{i}", benchmark=b, question=f"q {b} {i}", answer="1", scorer="exact")
             for b, n in (("charts", 40), ("math", 10), ("text", 25)) for i in range(n)]
    run = SimpleNamespace(config=TrainConfig(balanced_batches=True), train_items=items)
    batches = [TrainingRun.items_for(run, it) for it in range(20)]
    for batch in batches:
        counts = Counter(it.benchmark for it in batch)
        assert len(batch) == 16 and len(set(batch)) == 16 and max(counts.values()) - min(counts.values()) <= 1
    assert batches[0] == TrainingRun.items_for(run, 0) and batches[0] != batches[1]  # seeded by the iteration
    uniform = SimpleNamespace(config=TrainConfig(balanced_batches=False), train_items=items)
    assert any(Counter(it.benchmark for it in TrainingRun.items_for(uniform, k))["math"] < 5 for k in range(20))
    weighted = SimpleNamespace(config=TrainConfig(batch_weights={"charts": 2}), train_items=items)
    assert all(Counter(it.benchmark for it in TrainingRun.items_for(weighted, k)) == {"charts": 8, "math": 4, "text": 4}
               for k in range(5))


SEEN_THREADS: list[int] = []


def make_thread_recording_calculator():
    """The calculator, recording the torch thread count of the thread each call runs in."""
    import torch

    from maestro_core.pymodels import calculator

    calc = calculator()

    def model(text, images):
        SEEN_THREADS.append(torch.get_num_threads())
        return calc(text, images)

    return model


def test_collection_runs_its_experts_on_collect_threads_and_restores_torch_threads(registry_dict, tmp_path):
    import pytest
    import torch

    from maestro_core.errors import ConfigError
    from maestro_core.training import TrainingRun, collect_threads, torch_threads

    registry_dict["experts"][0]["backend"]["callable"] = "tests.test_training:make_thread_recording_calculator"
    reg = parse_registry(registry_dict)
    items = [Item(f"a{i}", "arith", f"What is {i} + {i}?", str(2 * i), "numeric") for i in range(4)]
    cfg = TrainConfig(iterations=1, prompts_per_iteration=4, hidden=64, layers=2, heads=2, vocab_size=512,
                      pretrain_steps=0, eval_every=5, val_items=2, budget_share=0.0, collect_threads=1,
                      grpo=GRPOSettings.cpu_profile(num_generations=4, per_device_train_batch_size=8))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    SEEN_THREADS.clear()
    try:
        with Store(tmp_path / "home") as store:
            run = TrainingRun(reg, items, items[:2], store=store, experts=build_experts(reg), config=cfg,
                              out_dir=tmp_path / "run", run_id="ct", log=lambda s: None)
            run.collect(0)
            assert torch.get_num_threads() == 2  # restored for the update
        assert SEEN_THREADS and set(SEEN_THREADS) == {1}
        with torch_threads(None):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert collect_threads(TrainConfig(collect_threads=-1)) is None
    assert collect_threads(TrainConfig(collect_threads=3)) == 3
    assert collect_threads(TrainConfig()) == max(1, (os.cpu_count() or 2) // 2)
    with pytest.raises(ConfigError, match="collect_threads"):
        TrainConfig(collect_threads=-2)


def test_image_routing_is_validated_and_a_config_stored_without_it_keeps_every_action():
    """TrainConfig.image_routing reaches the policy's decoding settings ('first' by default); a
    checkpoint's stored config from before the setting decodes as it was trained ('any')."""
    import pytest

    from maestro_core.errors import ConfigError
    from maestro_core.registry import DEFAULT_REGISTRY, load_registry
    from maestro_core.training import policy_kwargs

    reg = load_registry(DEFAULT_REGISTRY)
    assert policy_kwargs(TrainConfig(), reg)["image_routing"] == "first"
    assert policy_kwargs(TrainConfig(image_routing="match"), reg)["image_routing"] == "match"
    assert policy_kwargs({"actions": "level1", "call_input": "question"}, reg)["image_routing"] == "any"
    with pytest.raises(ConfigError, match="image_routing") as e:
        TrainConfig(image_routing="images")
    assert "'any'" in e.value.fix


def test_the_default_cost_weight_is_one_the_policy_was_trained_with():
    from maestro_core.training import default_cost_lambda

    assert default_cost_lambda({}) is None and default_cost_lambda({"cost_lambdas": [0.0]}) is None
    assert default_cost_lambda({"cost_lambdas": [0.0, 0.5]}) == 0.0
    assert default_cost_lambda({"cost_lambdas": [0.3]}) == 0.3  # not 0: the policy never read "Cost weight: 0"
    assert default_cost_lambda({"cost_lambdas": [0.6, 0.2]}) == 0.2
    assert default_cost_lambda({"cost_lambda_max": 0.5}) == 0.0  # older configs: a [0, max] range


def test_a_kl_term_is_taken_against_ckpt_0_the_uniform_start(registry_dict, tmp_path):
    """grpo.beta > 0: TRL's reference policy is ckpt-0 (the policy before RL), which with
    start_uniform routes uniformly: the reference's first call is uniform over the targets
    while the updated policy has moved; a resumed run keeps ckpt-0 as its reference."""
    import torch

    from maestro_core.episode import build_messages
    from maestro_core.grpo import updater_for
    from maestro_core.training import TrainingRun, policy_kwargs

    registry_dict["experts"] = registry_dict["experts"][:2]
    registry_dict["skills"] = registry_dict["skills"][:2]
    reg = parse_registry(registry_dict)
    items = [Item(f"a{i}", "arith", f"What is {i} + {i}?", str(2 * i), "numeric") for i in range(6)]
    cfg = TrainConfig(iterations=1, prompts_per_iteration=4, hidden=64, layers=2, heads=2, vocab_size=512,
                      pretrain_steps=30, start_uniform=True, eval_every=5, val_items=3, budget_share=0.0,
                      grpo=GRPOSettings.cpu_profile(num_generations=4, per_device_train_batch_size=8, beta=0.1))
    with Store(tmp_path / "home") as store:
        run = TrainingRun(reg, items, items[:3], store=store, experts=build_experts(reg), config=cfg,
                          out_dir=tmp_path / "run", run_id="kl", log=lambda s: None)
        assert run.model.config._name_or_path == str(tmp_path / "run" / "ckpt-0")
        run.collect(0)
        run.ingest(0)
        run.update(0)
        ref = updater_for(run.model).trainer.ref_model
        acts = policy_kwargs(cfg, reg)["actions"]
        idx = [run.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in acts]
        call = run.tokenizer("<call>", add_special_tokens=False)["input_ids"]
        text = run.tokenizer.apply_chat_template(build_messages(reg, items[0], compact=True), tokenize=False,
                                                 add_generation_prompt=True)
        x = torch.tensor([run.tokenizer(text, add_special_tokens=False)["input_ids"] + call])
        with torch.no_grad():
            p_ref = ref(x).logits[0, -1, idx].softmax(-1)
            p_new = run.model(x).logits[0, -1, idx].softmax(-1)
        assert float((p_ref - 1 / len(acts)).abs().max()) < 0.05, p_ref
        assert not torch.allclose(p_ref, p_new)
        again = TrainingRun(reg, items, items[:3], store=store, experts=build_experts(reg), config=cfg,
                            out_dir=tmp_path / "run", run_id="kl", log=lambda s: None)
        assert again.start == 1 and again.model.config._name_or_path == str(tmp_path / "run" / "ckpt-0")


def test_a_hidden_cost_weight_prices_the_reward_without_a_prompt_line(registry_dict, tmp_path):
    import pytest

    from maestro_core.errors import ConfigError

    reg = parse_registry(registry_dict)
    items = [Item(f"a{i}", "arith", f"What is {i} + {i}?", str(2 * i), "numeric") for i in range(4)]
    cfg = TrainConfig(iterations=1, prompts_per_iteration=4, hidden=64, layers=2, heads=2, vocab_size=512,
                      eval_every=1, val_items=2, hidden_cost_lambda=2.0, cost_scale=0.01, budget_share=0.0,
                      grpo=GRPOSettings.cpu_profile(num_generations=4, per_device_train_batch_size=8))
    with Store(tmp_path / "home") as store:
        train_policy(reg, items, items[:2], store=store, experts=build_experts(reg), config=cfg,
                     out_dir=tmp_path / "run", run_id="h1", log=lambda s: None)
        trajs = store.trajectories("h1", 0)
    assert trajs and all("Cost weight" not in t.prompt_text and t.cost_lambda == 2.0 for t in trajs)
    assert any(t.total_cost > 0 for t in trajs)
    for t in trajs:
        assert t.cost_term == pytest.approx(-2.0 * t.total_cost / 0.01)
        assert t.reward == pytest.approx(t.outcome + t.format_score + t.cost_term)
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(hidden_cost_lambda=1.0, cost_lambdas=(0.5,))
    with pytest.raises(ConfigError, match="hidden_cost_lambda"):
        TrainConfig(hidden_cost_lambda=-1.0)
    with pytest.raises(ConfigError, match="hidden_cost_warmup"):
        TrainConfig(hidden_cost_lambda=1.0, hidden_cost_warmup=-1)
    with pytest.raises(ConfigError, match="would do nothing"):
        TrainConfig(hidden_cost_warmup=30)  # a ramp without a weight


def test_the_hidden_cost_weight_ramps_up_over_its_warmup(registry_dict, tmp_path):
    cfg = TrainConfig(hidden_cost_lambda=1.1, hidden_cost_warmup=30)
    assert [hidden_cost_lambda_at(cfg, i) for i in (0, 15, 30, 59)] == pytest.approx([0.0, 0.55, 1.1, 1.1])
    assert hidden_cost_lambda_at(cfg, None) == 1.1  # outside training (validation): the full weight
    assert hidden_cost_lambda_at(TrainConfig(hidden_cost_lambda=1.1), 0) == 1.1  # no warmup: full from the start

    reg = parse_registry(registry_dict)
    items = [Item(f"a{i}", "arith", f"What is {i} + {i}?", str(2 * i), "numeric") for i in range(4)]
    cfg = TrainConfig(iterations=2, prompts_per_iteration=4, hidden=64, layers=2, heads=2, vocab_size=512,
                      eval_every=2, val_items=2, hidden_cost_lambda=2.0, hidden_cost_warmup=2, cost_scale=0.01,
                      budget_share=0.0, grpo=GRPOSettings.cpu_profile(num_generations=4, per_device_train_batch_size=8))
    with Store(tmp_path / "home") as store:
        train_policy(reg, items, items[:2], store=store, experts=build_experts(reg), config=cfg,
                     out_dir=tmp_path / "run", run_id="w1", log=lambda s: None)
        by_it = {it: store.trajectories("w1", it) for it in (0, 1)}
    for it, lam in ((0, 0.0), (1, 1.0)):  # the stored episodes carry the weight their reward used
        assert by_it[it] and all(t.cost_lambda == lam for t in by_it[it])
        for t in by_it[it]:
            assert t.cost_term == pytest.approx(-lam * t.total_cost / 0.01)
    assert any(t.total_cost > 0 and t.cost_term < 0 for t in by_it[1])


def test_answer_from_last_trains_and_reloads_a_cascade(registry_dict, tmp_path):
    """max_turns 3 with answer_from 'last': every episode that answers after a call quotes its
    latest reply (a second call replaces the first), and the checkpoint reloads with the same
    rule; 'last' with two turns, or an unknown value, is a ConfigError."""
    from maestro_core.checkpoints import load_checkpoint_policy
    from maestro_core.policy import information_text
    from maestro_core.protocol import unescape

    reg = parse_registry(registry_dict)
    items = [Item(f"a{i}", "arith", f"What is {i} + {i}?", str(2 * i), "numeric") for i in range(4)]
    cfg = TrainConfig(iterations=1, prompts_per_iteration=4, hidden=64, layers=2, heads=2, vocab_size=512,
                      eval_every=1, val_items=2, max_turns=3, answer_from="last", budget_share=0.0,
                      grpo=GRPOSettings.cpu_profile(num_generations=4, per_device_train_batch_size=8))
    with Store(tmp_path / "home") as store:
        res = train_policy(reg, items, items[:2], store=store, experts=build_experts(reg), config=cfg,
                           out_dir=tmp_path / "run", run_id="c1", log=lambda s: None)
        trajs = store.trajectories("c1", 0)
    replies = {t.episode_id: unescape(information_text(t.steps[-2].observation) or "").strip()
               for t in trajs if t.steps[-1].action == "answer" and len(t.steps) > 1}
    answered = [t for t in trajs if t.episode_id in replies and not replies[t.episode_id].startswith("error (")]
    assert answered and any(len(t.steps) == 3 for t in answered)  # some answered after two calls
    for t in answered:  # (an error as the last reply leaves no candidate: not counted)
        assert t.final_answer.strip() == replies[t.episode_id]
    assert load_checkpoint_policy(res.checkpoints[-1], reg).answer_from == "last"
    with pytest.raises(ConfigError, match="max_turns: 3"):
        TrainConfig(answer_from="last")
    with pytest.raises(ConfigError, match="'any' or 'last'"):
        TrainConfig(answer_from="first", max_turns=3)


@pytest.mark.slow
def test_a_pretrained_vocabulary_keeps_its_ids_and_its_embedding_geometry():
    """train.vocab_from: the policy takes an LM expert's tokenizer (SmolLM2's ids unchanged, the
    policy's specials, tags and actions added as single tokens, text round-trips) and its input
    embeddings projected on `hidden` principal components, which keep which words are near."""
    import torch

    from maestro_core.registry import DEFAULT_REGISTRY, load_registry
    from maestro_core.tokenizer import load_policy_tokenizer
    from maestro_core.training import build_policy, vocab_source

    reg = load_registry(DEFAULT_REGISTRY)
    folder = vocab_source("expert:smollm2-135m", reg)
    source = load_policy_tokenizer(folder)
    model, tok, _ = build_policy(reg, [], TrainConfig(vocab_from="expert:smollm2-135m", vocab_size=0, hidden=64,
                                                      layers=1, heads=2, pretrain_steps=0))
    text = "Name the handwritten digit in this picture. What is 2.1 - 1.47?"
    assert tok(text, add_special_tokens=False)["input_ids"] == source(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    for action in reg.grammar().actions:
        assert len(tok(action, add_special_tokens=False)["input_ids"]) == 1
    assert tok.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False,
                                   add_generation_prompt=True) == "<|bos|><|user|>Q?<|end|><|assistant|>"

    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape == (len(tok), 64) and abs(float(emb[:len(source)].std()) - 1.0) < 0.01

    def nearest(word: str, among: list[str]) -> str:
        ids = [source.convert_tokens_to_ids(w) for w in [word, *among]]
        v = torch.nn.functional.normalize(emb[ids], dim=-1)
        return among[int((v[1:] @ v[0]).argmax())]

    assert nearest("Ġlargest", ["Ġhighest", "Ġtitle", "Ġcompute", "Ġprinted"]) == "Ġhighest"
    assert nearest("Ġwritten", ["Ġprinted", "Ġlargest", "Ġcompute", "Ġtitle"]) == "Ġprinted"

    # cut to its first 8192 tokens: rarer words split into more pieces, the text still round-trips
    small, cut, _ = build_policy(reg, [], TrainConfig(vocab_from="expert:smollm2-135m", vocab_size=8192, hidden=64,
                                                      layers=1, heads=2, pretrain_steps=0))
    ids = cut(text, add_special_tokens=False)["input_ids"]
    assert cut.decode(ids) == text and max(ids) < 8192 < len(cut) < 8192 + 50
    assert len(ids) > len(source(text, add_special_tokens=False)["input_ids"])  # "handwritten", "digit" in pieces
    assert small.get_input_embeddings().weight.shape == (len(cut), 64)
    with pytest.raises(ConfigError, match="no transformers expert 'calc'.*expert:smollm2-135m"):
        vocab_source("expert:calc", reg)
    with pytest.raises(ConfigError, match="not a folder"):
        vocab_source("/no/such/model", reg)
