"""`maestro trace EPISODE_ID`: one stored episode, turn by turn, as readable text.

    with Store(home) as st:
        print(trace_episode(st, "3f2a9c0d1e4b5a6c7d8e"))

Shows the episode (run, item, benchmark, checkpoint), the task the policy saw, then every
turn: what the policy wrote, the call (expert@@skill/solver and its input), the observation,
the call's cost, latency and cache status, any error; then the reward breakdown
(total = outcome + format_score + cost_term, see maestro_core.rewards).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from maestro_core.errors import ConfigError

MAX_CHARS = 800
"""Texts longer than this (policy turns, inputs, observations) are cut, saying how much was left out."""


def find_episode(store, episode_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The episode row and its step rows (by turn). An unknown id raises ConfigError, naming
    the stored ids that start with it when there are any."""
    episode_id = episode_id.strip()  # pasted ids may carry spaces or a CSV line's \r
    rows = store.query("SELECT * FROM episodes WHERE episode_id = ?", [episode_id]).to_pylist()
    if not rows:
        raise ConfigError(f"no episode '{episode_id}' in the store {store.db_path}.", field="EPISODE_ID",
                          fix=_unknown_fix(store, episode_id))
    return rows[0], store.steps(episode_id).to_pylist()


def _unknown_fix(store, episode_id: str) -> str:
    starts = [r["episode_id"] for r in store.query(
        "SELECT episode_id FROM episodes WHERE starts_with(episode_id, ?) ORDER BY episode_id LIMIT 6",
        [episode_id]).to_pylist()] if episode_id else []
    if len(starts) == 1:
        return f"did you mean {starts[0]}? (the only stored episode id that starts with '{episode_id}')"
    if starts:
        more = ", ..." if len(starts) > 5 else ""
        return (f"give the whole id: several stored ids start with '{episode_id}' "
                f"({', '.join(starts[:5])}{more}).")
    n = store.count_episodes()
    if not n:
        return (f"this store ({store.home}) holds no episodes: pass the home the run used "
                "(--home DIR or $MAESTRO_HOME).")
    newest = [r["episode_id"] for r in store.query(
        "SELECT episode_id FROM episodes ORDER BY created_at DESC, episode_id LIMIT 3").to_pylist()]
    return (f"use an id from the episode_id column of an eval's results.csv, or from the store ({n} episodes; "
            f"the newest: {', '.join(newest)}).")


def trace_episode(store, episode_id: str, *, max_chars: int | None = MAX_CHARS) -> str:
    """The readable trace of one stored episode (see the module docstring)."""
    episode, steps = find_episode(store, episode_id)
    return format_trace(episode, steps, max_chars=max_chars)


def trace_from_home(episode_id: str, home: str | Path | None = None, *, max_chars: int | None = MAX_CHARS) -> str:
    """`maestro trace`: open the home's store (never creating one) and trace the episode."""
    from maestro_core.home import resolve_home
    from maestro_core.store import DB_FILENAME, Store
    root = resolve_home(home)
    if not (root / DB_FILENAME).exists():
        raise ConfigError(f"no Maestro store at {root / DB_FILENAME}.", field="--home",
                          fix="pass the home the run used (--home DIR or $MAESTRO_HOME).")
    with Store(root) as store:
        return trace_episode(store, episode_id, max_chars=max_chars)


def _cut(text: str | None, max_chars: int | None) -> str:
    text = "" if text is None else str(text)
    if max_chars is not None and len(text) > max_chars:
        return f"{text[:max_chars]}... ({len(text) - max_chars} more characters)"
    return text


def _block(label: str, text: str | None, max_chars: int | None, indent: str = "    ") -> list[str]:
    """'label: text', continuation lines indented under it."""
    lines = _cut(text, max_chars).splitlines() or [""]
    pad = indent + " " * (len(label) + 2)
    return [f"{indent}{label}: {lines[0]}"] + [pad + ln for ln in lines[1:]]


def _task(prompt_text: str) -> str:
    """The user message of the prompt (the question, its images, the budget)."""
    k = prompt_text.rfind("Question: ")
    return prompt_text[k:] if k >= 0 else prompt_text


def _money(x: float | None) -> str:
    return f"${(x or 0.0):.6f}"


def format_trace(episode: Mapping[str, Any], steps: Sequence[Mapping[str, Any]], *,
                 max_chars: int | None = MAX_CHARS) -> str:
    """Format an episode row and its step rows (store.episodes / store.steps layout)."""
    e = episode
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["created_at"])) if e.get("created_at") else "?"
    n_calls = e.get("n_calls") or 0
    out = [f"episode {e['episode_id']}",
           f"  run {e['run_id']}, iteration {e['iteration']}, chunk {e['chunk']}, sample {e['sample_index']}; "
           f"created {when}",
           f"  item {e['item_id']} (benchmark {e['benchmark']}); checkpoint {e['checkpoint_id']}; "
           f"registry {e['registry_version']}"]
    out += _block("task", _task(e.get("prompt_text") or ""), max_chars, indent="  ")
    out += ["", f"{len(steps)} turns, {n_calls} call{'s' if n_calls != 1 else ''}:"]
    for s in steps:
        head = f"turn {s['turn']}  {s['action']}"
        if s["action"] == "call" and s.get("expert"):
            pair = f"{s['expert']}@@{s['skill']}" + (f"/{s['solver']}" if s.get("solver") else "")
            head += f"  {pair}"
            facts = [f"cost {_money(s.get('cost'))}", f"latency {s.get('latency_s') or 0.0:.3f} s"]
            if s.get("cache_hit") is not None:
                facts.append("cache hit" if s["cache_hit"] else "cache miss")
            if s.get("tokens_in") or s.get("tokens_out"):
                facts.append(f"tokens {s.get('tokens_in') or 0} in / {s.get('tokens_out') or 0} out")
            if (s.get("expert_calls") or 0) > 1:
                facts.append(f"{s['expert_calls']} expert calls inside the solver")
            if s.get("confidence") is not None:
                facts.append(f"confidence {s['confidence']:.2f}")
            head += "  (" + ", ".join(facts) + ")"
        out.append(head)
        out += _block("policy", s.get("text"), max_chars)
        if s["action"] == "call" and s.get("call_input") is not None:
            out += _block("input", s["call_input"], max_chars)
        if s.get("observation"):
            out += _block("observation", s["observation"], max_chars)
        if s.get("error"):
            out += _block("error", s["error"] + (f": {s['error_message']}" if s.get("error_message") else ""),
                          max_chars)
    out += ["", f"finish: {e['finish_reason']}; final answer: "
                f"{'(none)' if e.get('final_answer') is None else repr(e['final_answer'])}",
            f"reward {e['reward']:.4f} = outcome {e['outcome']:.4f} + format {e['format_score']:.4f} "
            f"+ cost term {e['cost_term']:.4f} (cost lambda {e['cost_lambda']:g})",
            f"total: cost {_money(e.get('total_cost'))}, latency {e.get('total_latency_s') or 0.0:.3f} s, "
            f"{n_calls} call{'s' if n_calls != 1 else ''}, {e.get('n_cache_hits') or 0} cache hits, "
            f"expert compute spent now {e.get('spent_s') or 0.0:.3f} s"]
    return "\n".join(out) + "\n"
