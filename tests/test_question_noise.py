"""Training-time question noise: what it does to a question, and that only the policy sees it."""

import random
from types import SimpleNamespace

import pytest

from maestro_core.dataset import Item
from maestro_core.episode import EpisodeRunner
from maestro_core.errors import ConfigError
from maestro_core.experts import build_experts
from maestro_core.policy import ScriptedPolicy
from maestro_core.question_noise import QuestionNoise
from maestro_core.training import TrainConfig, TrainingRun

Q = "Which category has the lowest value in the chart shown above?"


def test_noise_drops_and_replaces_words_at_about_its_rates_and_is_seeded():
    noise = QuestionNoise(drop=0.3, replace=0.2)
    outs = [noise(Q, random.Random(s)) for s in range(400)]
    assert outs[:5] == [noise(Q, random.Random(s)) for s in range(5)]  # same seed, same question
    words = Q.split()
    kept = [len(o.split()) / len(words) for o in outs]
    assert 0.62 < sum(kept) / len(kept) < 0.78  # 1 - drop
    replaced = [sum(w not in words for w in o.split()) / max(1, len(o.split())) for o in outs]
    assert 0.12 < sum(replaced) / len(replaced) < 0.28  # replace, among the kept words
    assert all(o.split() for o in outs)


def test_noise_keeps_a_word_and_line_breaks_and_off_is_identity():
    heavy = QuestionNoise(drop=0.99)
    assert all(len(heavy("a b c", random.Random(s)).split()) == 1 for s in range(50))
    assert QuestionNoise(drop=0.2)("one two\nthree four", random.Random(1)).count("\n") == 1
    assert not QuestionNoise().active and QuestionNoise()(Q, random.Random(0)) == Q


@pytest.mark.parametrize("bad", [dict(drop=1.0), dict(replace=-0.1)])
def test_bad_rates_are_config_errors(bad):
    with pytest.raises(ConfigError, match="question noise"):
        QuestionNoise(**bad)
    with pytest.raises(ConfigError):
        TrainConfig(question_noise_share=0.5, **{f"question_{k}": v for k, v in bad.items()})
    with pytest.raises(ConfigError, match="question_noise_share"):
        TrainConfig(question_noise_share=1.5)


def test_one_noisy_view_per_group_for_the_configured_share():
    items = [Item(id=f"c{i}", benchmark="charts", question=f"{Q} ({i})", answer="x", scorer="exact")
             for i in range(200)]
    cfg = TrainConfig(question_noise_share=0.5)
    run = SimpleNamespace(config=cfg)
    views = TrainingRun.question_views_for(run, 3, items)
    g = cfg.grpo.num_generations
    assert len(views) == len(items) * g
    groups = [views[i * g:(i + 1) * g] for i in range(len(items))]
    assert all(len(set(grp)) == 1 for grp in groups)  # the whole group reads the same prompt
    noisy = [grp[0] for grp in groups if grp[0] is not None]
    assert 0.38 < len(noisy) / len(items) < 0.62
    assert all(v != it.question for v, it in zip((grp[0] for grp in groups), items) if v is not None)
    assert views == TrainingRun.question_views_for(run, 3, items)  # seeded by the iteration
    assert views != TrainingRun.question_views_for(run, 4, items)
    assert TrainingRun.question_views_for(SimpleNamespace(config=TrainConfig(question_noise_share=0)), 3, items) is None


async def test_the_prompt_shows_the_view_and_the_call_forwards_the_items_question(registry):
    item = Item(id="m1", benchmark="math", question="What is 2 + 3?", answer="5", scorer="numeric")
    runner = EpisodeRunner(registry, build_experts(registry),
                           ScriptedPolicy.from_turns(["<call>calc@@math</call>", "<answer>5</answer>"]))
    (clean, noisy) = await runner.run([item, item], question_view=lambda k: [None, "qzx 2 + 3?"][k])
    assert "Question: What is 2 + 3?" in clean.prompt_text and "Question: qzx 2 + 3?" in noisy.prompt_text
    assert "What is" not in noisy.prompt_text
    for t in (clean, noisy):
        assert t.steps[0].call_input == "What is 2 + 3?" and t.outcome == 1.0


def test_chunk_specs_split_the_views_with_their_items(tmp_path):
    from maestro_core.rollouts import chunk_specs

    items = [Item(id=f"m{i}", benchmark="math", question=f"q{i}", answer="1", scorer="exact") for i in range(5)]
    views = [f"v{i}" if i % 2 else None for i in range(5) for _ in range(2)]
    specs = chunk_specs(items, run_id="r", iteration=0, chunk_size=2, policy_spec={"kind": "scripted"},
                        object_store=str(tmp_path), registry_path=None, group_size=2, question_views=views)
    assert [len(s.items) for s in specs] == [2, 2, 1]
    assert [s.question_views for s in specs] == [(None, None, "v1", "v1"), (None, None, "v3", "v3"), (None, None)]
