"""`maestro trace`: one stored episode as text, and a clear error for an unknown id."""

import pytest

from flows.cli import main
from maestro_core.errors import ConfigError
from maestro_core.store import Store
from maestro_core.trace import trace_episode, trace_from_home
from tests.store_helpers import make_chunk


@pytest.fixture
def stored(tmp_path):
    """A real store in a tmp home holding one chunk of 4 three-turn episodes (2 calls, then an answer)."""
    home = tmp_path / "home"
    trajs = make_chunk("run-t", n=4)
    with Store(home) as st:
        st.write_and_ingest(trajs, "run-t", 0, 0)
    return home, trajs


def test_trace_shows_every_turn_and_the_reward(stored):
    home, trajs = stored
    t = trajs[1]
    with Store(home) as st:
        text = trace_episode(st, t.episode_id)
    lines = text.splitlines()
    assert lines[0] == f"episode {t.episode_id}"
    assert "run run-t, iteration 0, chunk 0, sample 0" in text
    assert "item item-1 (benchmark gsm8k); checkpoint ckpt-0" in text
    assert "task: What is 1?" in text  # no 'Question: ' in this prompt: the whole prompt is shown
    assert "3 turns, 2 calls:" in text
    # turn 0: a cache miss; turn 1: a cache hit that timed out
    turn0 = lines.index(next(ln for ln in lines if ln.startswith("turn 0")))
    assert lines[turn0].startswith("turn 0  call  e1@@math/direct  (cost $0.001000, latency 0.500 s, cache miss, "
                                   "tokens 12 in / 4 out, confidence 0.75)")
    assert lines[turn0 + 1:turn0 + 4] == ["    policy: <call>e1@@math: 1+0</call>", "    input: 1+0",
                                          "    observation: <obs>1</obs>"]
    assert any(ln.startswith("turn 1  call  e1@@math/direct  (cost $0.002000") and "cache hit" in ln for ln in lines)
    assert "    error: timeout: took too long" in lines
    assert "turn 2  answer" in lines and "    policy: <answer>1</answer>" in lines
    assert "finish: answer; final answer: '1'" in text
    assert "reward 0.5000 = outcome 1.0000 + format 1.0000 + cost term -0.0100 (cost lambda 0.1)" in text
    assert "total: cost $0.003000, latency 1.000 s, 2 calls, 1 cache hits" in text
    with Store(home) as st:  # an id pasted with spaces or cut from a CSV line (\r\n) still works
        assert trace_episode(st, f" {t.episode_id}\r\n") == text


def test_trace_cuts_long_texts(tmp_path):
    from dataclasses import replace
    home = tmp_path / "home"
    t = make_chunk("run-l", n=1)[0]
    steps = (replace(t.steps[0], observation="x" * 2000),) + t.steps[1:]
    t = replace(t, steps=steps)
    with Store(home) as st:
        st.write_and_ingest([t], "run-l", 0, 0)
        assert "x" * 800 + "... (1200 more characters)" in trace_episode(st, t.episode_id)
        assert "x" * 2000 in trace_episode(st, t.episode_id, max_chars=None)


def test_unknown_episode_id_is_a_config_error_with_a_fix(stored):
    home, trajs = stored
    ids = [t.episode_id for t in trajs]
    # the shortest prefix of ids[0] no other id shares
    n = next(k for k in range(1, 21) if sum(i.startswith(ids[0][:k]) for i in ids) == 1)
    with Store(home) as st:
        with pytest.raises(ConfigError) as e:
            trace_episode(st, ids[0][:n])
        assert f"did you mean {ids[0]}?" in str(e.value) and e.value.fix
        with pytest.raises(ConfigError) as e:
            trace_episode(st, "zz-not-an-episode")
        msg = str(e.value)
        assert "no episode 'zz-not-an-episode'" in msg and "Fix:" in msg and "4 episodes" in msg
    with pytest.raises(ConfigError, match="no Maestro store"):
        trace_from_home(ids[0], home.parent / "elsewhere")
    assert not (home.parent / "elsewhere").exists()  # tracing never creates a store


def test_cli_trace(stored, capsys):
    home, trajs = stored
    eid = trajs[2].episode_id
    assert main(["--home", str(home), "trace", eid]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"episode {eid}\n") and "turn 1  call  e1@@math/direct" in out
    assert main(["trace", eid, "--home", str(home)]) == 0
    assert capsys.readouterr().out == out
    assert main(["trace", "nope", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no episode 'nope'" in err and "Fix:" in err
