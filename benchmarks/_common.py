"""Shared plumbing of the benchmark scripts: arguments, machine facts, tables, JSON results,
loopback expert servers and registries.

Each benchmark is `benchmarks/<name>.py [--small] [--out DIR]`: it prints a table and writes
`DIR/<name>.json` (default DIR: benchmarks/results). `--small` is the seconds-long version the
tests run; the figures in benchmarks/README.md come from runs without it.

Run as a script, this module serves one loopback OpenAI-compatible expert in its own process
(`ExpertServerProcess` starts it), so the server's Python work does not share the benchmarked
process's GIL, as a vLLM or llama.cpp server would not:

    python benchmarks/_common.py serve --latency 0.05 --reply 42
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")  # another job shares the 2 cores; threads are not measured
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.openai_server: the loopback server the test suite uses

RESULTS = ROOT / "benchmarks" / "results"


def parse_args(doc: str | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    p.add_argument("--small", action="store_true", help="a few seconds: tiny sizes (what the tests run).")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON result (default: %(default)s).")
    return p.parse_args()


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy it was when the run started."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import duckdb

    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "duckdb": duckdb.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "loadavg_1m_at_start": os.getloadavg()[0]}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def write_result(name: str, args: argparse.Namespace, payload: dict[str, Any], started: float) -> Path:
    out = {"benchmark": name, "small": bool(args.small), "command": " ".join([".venv/bin/python", *sys.argv]),
           "machine": machine_at_start, "wall_s": round(time.perf_counter() - started, 2), **payload}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"\nwrote {path}")
    return path


machine_at_start = machine()


# ---------------------------------------------------------------------------------------
# loopback experts
# ---------------------------------------------------------------------------------------

def http_registry(servers: dict[str, str], *, max_concurrency: int = 64, deterministic: bool = True,
                  timeout_s: float = 30.0):
    """One skill `chat` (a single prompt step) and one HTTP expert per `name -> base_url`, so the
    valid pairs are `<name>@@chat`."""
    from maestro_core.registry import parse_registry

    return parse_registry({
        "name": "bench",
        "capabilities": {"text": "reads and writes text"},
        "experts": [{"name": name, "description": f"loopback model {name}", "capabilities": ["text"],
                     "backend": {"kind": "http", "base_url": url, "model": name, "max_retries": 0},
                     "price": {"input_per_1m": 1.0, "output_per_1m": 4.0}, "timeout_s": timeout_s,
                     "max_concurrency": max_concurrency, "deterministic": deterministic}
                    for name, url in servers.items()],
        "skills": [{"name": "chat", "description": "answer the question",
                    "solvers": [{"name": "direct", "steps": [{"prompt": "{input}"}]}]}],
    }, source="benchmarks")


class ExpertServerProcess:
    """A tests.openai_server.OpenAIServer in a child process (its own GIL), replying `reply`
    after `latency_s`. `stats()` after stop: requests served, most in flight, server CPU seconds."""

    def __init__(self, latency_s: float, reply: str = "42"):
        self.latency_s, self.reply = latency_s, reply
        self.proc: subprocess.Popen | None = None
        self.base_url = ""
        self._stats: dict[str, Any] = {}

    def __enter__(self) -> "ExpertServerProcess":
        self.proc = subprocess.Popen([sys.executable, __file__, "serve", "--latency", str(self.latency_s),
                                      "--reply", self.reply], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http://"):
            raise RuntimeError(f"the expert server did not start (said {self.base_url!r})")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.stdin.close()  # the server's signal to print its stats and stop
        line = self.proc.stdout.readline()
        self.proc.wait(timeout=30)
        self._stats = json.loads(line) if line.strip() else {}

    def stats(self) -> dict[str, Any]:
        return self._stats


def instant_model():
    """A python-backend model factory: an async model that answers at once (no expert time)."""
    async def model(text: str, images: list) -> dict:
        return {"text": "387", "confidence": 0.9}
    return model


def _serve(latency_s: float, reply: str) -> None:
    from tests.openai_server import OpenAIServer

    with OpenAIServer(lambda messages: reply, latency_s=latency_s, usage=True) as srv:
        cpu0 = time.process_time()
        print(srv.base_url, flush=True)
        sys.stdin.read()  # until the parent closes our stdin
        stats = {"requests": srv.requests, "max_in_flight": srv.max_in_flight,
                 "cpu_s": time.process_time() - cpu0}
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["serve"])
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--reply", default="42")
    a = ap.parse_args()
    _serve(a.latency, a.reply)
