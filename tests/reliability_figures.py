"""The `figures` fixture of the reliability tests (crash safety, storage faults, load): a dict
the test fills, written under the test's id to `<pytest basetemp>/reliability.json` and printed
as a `FIGURES ...` line (`pytest -s` shows it). docs/RELIABILITY.md quotes these figures."""

from __future__ import annotations

import json
import threading

import pytest

_LOCK = threading.Lock()


@pytest.fixture
def figures(request, tmp_path_factory):
    """A dict the test fills; written under the test's id to <basetemp>/reliability.json."""
    out: dict = {}
    yield out
    path = tmp_path_factory.getbasetemp() / "reliability.json"
    with _LOCK:
        data = json.loads(path.read_text()) if path.exists() else {}
        data[request.node.name] = out
        path.write_text(json.dumps(data, indent=2, sort_keys=True))
    print(f"\nFIGURES {request.node.name}: {json.dumps(out, sort_keys=True)}\n  -> {path}")
