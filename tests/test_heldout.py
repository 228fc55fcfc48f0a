"""The held-out generalisation set (maestro_core.benchmarks.heldout): deterministic, loadable,
disjoint from the suite, worded differently, answers consistent with the generators' data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maestro_core.benchmarks import heldout as ho
from maestro_core.benchmarks._common import WORDS, sklearn_digits
from maestro_core.benchmarks.charts import load_table
from maestro_core.dataset import load_jsonl
from maestro_core.protocol import Call
from maestro_core.registry import load_registry
from maestro_core.skills import resolve_solver
from maestro_core.suite import ContaminationError, SuiteConfig, build_suite

N = 6
SEED = 1000
REGISTRY = Path(__file__).resolve().parents[1] / "registry" / "maestro-mini.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout")
    path = ho.build_heldout(out, n_per_benchmark=N, seed=SEED)
    return out, path, load_jsonl(path), ho.load_heldout_meta(out)


@pytest.fixture(scope="module")
def suite_items(tmp_path_factory):
    home = tmp_path_factory.mktemp("suite-home")
    cfg = SuiteConfig(seed=0, train_per_benchmark=3, val_per_benchmark=2, test_per_benchmark=3)
    return list(build_suite(cfg, home).items)


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic(built, tmp_path):
    out, path, _, _ = built
    again = ho.build_heldout(tmp_path / "again", n_per_benchmark=N, seed=SEED)
    assert again.name == ho.JSONL_NAME
    assert _tree(out) == _tree(tmp_path / "again")
    other = ho.generate_heldout(2, SEED + 1, tmp_path / "other", benchmarks=("math", "digits"))
    first = [it for it in load_jsonl(path) if it.benchmark in ("math", "digits")]
    assert [o.question for o, _ in other] != [it.question for it in first[:2]] or \
        [o.answer for o, _ in other] != [it.answer for it in first[:2]]


def test_loads_with_counts(built):
    out, path, items, meta = built
    assert len(items) == N * len(ho.BENCHMARKS)
    assert len({it.id for it in items}) == len(items)
    for b in ho.BENCHMARKS:
        assert sum(it.benchmark == b for it in items) == N
    for it in items:
        assert it.id in meta
        assert it.scorer in ("exact", "numeric")
        assert (it.benchmark == "math") == (not it.images)
        for p in it.images:
            assert Path(p).is_file() and Path(p).parent == (out / "images").resolve()
    # relative paths in the file
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert all(not Path(p).is_absolute() for r in rows for p in r["images"])


def test_no_overlap_with_suite(built, suite_items):
    _, _, items, _ = built
    ho.check_against_suite(items, suite_items)
    suite_hashes = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for it in suite_items for p in it.images}
    ours = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for it in items for p in it.images}
    assert len(ours) == sum(len(it.images) for it in items)  # no image repeats inside the set either
    assert not ours & suite_hashes
    # the check does catch a shared item
    leaked = dataclasses.replace(next(it for it in suite_items if it.images), id="heldout-leak", split=None)
    with pytest.raises(ContaminationError):
        ho.check_against_suite([*items, leaked], suite_items)
    leaked_q = dataclasses.replace(next(it for it in suite_items if it.benchmark == "math"), id="heldout-q")
    with pytest.raises(ContaminationError):
        ho.check_against_suite([*items, leaked_q], suite_items)


def test_wording_differs_from_suite(built, suite_items):
    _, _, items, _ = built
    # the patterns recognise the suite's own questions ...
    assert all(ho.matches_suite_template(it.question) for it in suite_items), \
        [it.question for it in suite_items if not ho.matches_suite_template(it.question)]
    # ... and (almost) none of the held-out ones
    same = [it.question for it in items if ho.matches_suite_template(it.question)]
    assert len(same) <= len(items) // 10, same
    suite_q = {it.question for it in suite_items}
    assert not suite_q & {it.question for it in items}


def test_solvers_dispatch_as_intended(built):
    _, _, items, meta = built
    reg = load_registry(REGISTRY)
    for it in items:
        m = meta[it.id]
        if it.benchmark == "math":
            call, want = Call("calc", "math", None, it.question), "calculator"
        elif it.benchmark == "charts":
            call = Call("rapidocr", "chart", None, it.question)
            want = {"lookup": "value_lookup", "extremum": "extremum", "difference": "difference"}[m["kind"]]
        elif it.benchmark == "text_reading":
            call, want = Call("rapidocr", "text_reading", None, it.question), "full_page"
        elif it.benchmark == "hires" and m["kind"] == "code":
            call, want = Call("rapidocr", "text_reading", None, it.question), "zoom_region"
        elif it.benchmark == "hires":
            call, want = Call("digit-cnn", "perception", None, it.question), "zoom_digit"
        else:
            call, want = Call("digit-cnn", "perception", None, it.question), "digit"
        assert resolve_solver(reg, call).name == want, (it.id, it.question)


def _recompute_chart(recipe: dict) -> dict[str, float]:
    t = recipe["table"]
    if t == "wheat":
        df = load_table("wheat")
        return {y: float(df[df["year"] == int(y)][recipe["column"]].iloc[0]) for y in recipe["years"]}
    if t == "anscombe":
        s = load_table("anscombe").groupby("Series")[recipe["column"]].agg(recipe["agg"])
        return dict(zip(["First", "Second", "Third", "Fourth"], (float(s[k]) for k in ["I", "II", "III", "IV"])))
    if t == "la-riots":
        g = load_table("la-riots").groupby(recipe["group"])
        s = g.size() if recipe["value"] is None else g["age"].mean()
        return {recipe["rename"].get(k, k): float(v) for k, v in s.items()}
    if t == "ohlc":
        df = load_table("ohlc")
        out = {}
        for d in recipe["dates"]:
            row = df[df["date"].dt.strftime("%Y-%m-%d") == d].iloc[0]
            out[f"{row['date']:%b} {row['date'].day}"] = float(row[recipe["column"]])
        return out
    assert t == "seattle-temps"
    df = load_table("seattle-temps")
    s = df.groupby(df["date"].dt.month)["temp"].agg(recipe["agg"])
    return {ho.MONTH_NAMES[m - 1]: float(s[m]) for m in recipe["months"]}


def test_answers_match_generator_data(built):
    _, _, items, meta = built
    images, targets = sklearn_digits()
    suite_words = set(WORDS)
    for it in items:
        m = meta[it.id]
        if it.benchmark == "math":
            assert m["expression"] in it.question
            value = ho._decimal_eval(m["expression"])
            assert Fraction(Decimal(it.answer)) == value
        elif it.benchmark == "charts":
            table = _recompute_chart(m["recipe"])
            cats, labels, d = m["categories"], m["labels"], m["decimals"]
            assert [f"{table[c]:.{d}f}" for c in cats] == labels
            printed = [Decimal(s) for s in labels]
            with Image.open(it.images[0]) as im:
                assert list(im.size) == list(m["size"])
            if m["kind"] == "lookup":
                c = next(c for c in cats if it.question.rstrip("?.").endswith(c))
                assert it.answer == labels[cats.index(c)]
            elif m["kind"] == "extremum":
                assert it.answer in (cats[printed.index(max(printed))], cats[printed.index(min(printed))])
            else:
                diffs = {str(a - b) for a in printed for b in printed if a > b}
                assert it.answer in diffs
        elif it.benchmark == "text_reading":
            words = [ln["text"] for ln in m["lines"]]
            target = {"top": 0}.get(m["layout"], len(words) - 1)
            assert it.answer == words[target]
            assert m["font"] not in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
            assert not suite_words & set(words)
        elif it.benchmark == "hires":
            with Image.open(it.images[0]) as im:
                assert list(im.size) == m["canvas"]
                gray = np.asarray(im.convert("L"))
            x0, y0, x1, y1 = m["box"]
            assert gray[y0, x0:x1].max() <= 60 and gray[y0:y1, x0].max() <= 60  # dark frame
            assert m["border_px"] in ho.BORDERS
            if m["kind"] == "digit":
                assert m["sklearn_index"] % 4 != 3 and it.answer == str(targets[m["sklearn_index"]])
            else:
                assert re.fullmatch(r"[A-Z]{2}-\d{3}|([A-Z]\d){2}", it.answer) and "small box" in it.question
        else:
            assert m["sklearn_index"] % 4 == 3  # never in the suite's `digits` pool
            assert it.answer == str(targets[m["sklearn_index"]])
            with Image.open(it.images[0]) as im:
                assert im.size == (ho.DIGIT_SIZE, ho.DIGIT_SIZE)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        ho.generate_heldout(-1, SEED, tmp_path)
    with pytest.raises(ValueError):
        ho.generate_heldout(1, SEED, tmp_path, benchmarks=("nope",))
