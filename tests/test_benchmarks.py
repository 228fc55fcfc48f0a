"""The Maestro-Mini generators: deterministic, valid images, answers that follow from the
generators' own data (charts: recomputed from the vega table, not read by OCR), no leaks."""

from __future__ import annotations

import hashlib
import re
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maestro_core.benchmarks import _common, charts, digits, hires, math, text_reading
from maestro_core.dataset import SCORER_NAMES
from maestro_core.rewards import normalize_text, score_answer

MODULES = {"math": math, "charts": charts, "text_reading": text_reading, "hires": hires, "digits": digits}
N = 6
CODE_RE = re.compile(r"^[A-Z0-9]{3}-[0-9]{2}$")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """name -> (run A [(item, meta)], run B, run with another seed), N items each."""
    out = {}
    for name, mod in MODULES.items():
        base = tmp_path_factory.mktemp(name)
        a = mod.generate_with_meta(N, 7, base / "a")
        b = mod.generate_with_meta(N, 7, base / "b")
        c = mod.generate_with_meta(N, 8, base / "c")
        out[name] = (a, b, c)
    return out


def _digest(item) -> tuple:
    return (item.id, item.question, item.answer, item.scorer,
            tuple(hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in item.images))


@pytest.mark.parametrize("name", list(MODULES))
def test_deterministic_per_seed_and_prefix_stable(name, generated, tmp_path):
    mod = MODULES[name]
    a, b, c = generated[name]
    assert mod.BENCHMARK == name
    assert [_digest(i) for i, _ in a] == [_digest(i) for i, _ in b]  # same seed -> same bytes
    assert [m for _, m in a] == [m for _, m in b]
    assert [_digest(i)[1:] for i, _ in a] != [_digest(i)[1:] for i, _ in c]  # another seed -> other items
    tail = mod.generate(3, 7, tmp_path / "tail", start=3)  # item i depends only on (seed, i)
    assert [_digest(i) for i in tail] == [_digest(i) for i, _ in a[3:]]
    ids = [i.id for i, _ in a]
    assert ids == [f"{mod.ID_PREFIX}-{k:05d}" for k in range(N)] and len(set(ids)) == N


@pytest.mark.parametrize("name", list(MODULES))
def test_items_well_formed_and_questions_do_not_leak(name, generated):
    for item, meta in generated[name][0]:
        assert item.benchmark == name and item.scorer in SCORER_NAMES and item.answer.strip()
        assert item.split is None and item.choices is None
        assert score_answer(item.answer, item.answer, item.scorer) == 1.0
        q = normalize_text(item.question)
        if name == "math":  # the numbers of an expression may include the answer; "= answer" may not
            assert not re.search(r"=\s*" + re.escape(item.answer) + r"\b", item.question)
        else:
            assert normalize_text(item.answer) not in q
        if name == "text_reading":  # the font size class, noise and blur stay in the side table
            assert item.question in (text_reading.Q_WORD, text_reading.Q_CODE, text_reading.Q_LAST,
                                     text_reading.PAGE_QUESTION)
            assert not {"small", "large", "medium", "tiny", "noise", "blur"} & set(q.split())


@pytest.mark.parametrize("name,size", [("charts", (640, 480)), ("text_reading", (800, 300)),
                                       ("hires", None), ("digits", (96, 96))])
def test_images_are_png_of_the_intended_size(name, size, generated):
    for item, meta in generated[name][0]:
        assert len(item.images) == 1 and Path(item.images[0]).is_absolute()
        with Image.open(item.images[0]) as im:
            im.verify()
        with Image.open(item.images[0]) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            if name == "hires":
                assert tuple(im.size) in hires.CANVAS_SIZES and list(im.size) == meta["canvas"]
            elif name == "text_reading" and meta["layout"] == "page":
                assert im.size == (384, 191)
            else:
                assert im.size == size


def test_math_items_follow_reasoning_gym_and_exact_arithmetic(tmp_path):
    pairs = math.generate_with_meta(40, 3)
    kinds = [m["kind"] for _, m in pairs]
    assert kinds.count("gsm_symbolic") == 8 and kinds.count("basic_arithmetic") == 16
    for item, meta in pairs:
        assert item.scorer == "numeric" and not item.images
        if meta["kind"] == "gsm_symbolic":
            assert "Give the result as your final answer" in item.question
            continue
        assert meta["expression"] in item.question  # sent as-is: the expression is in the text
        value = math.exact_eval(meta["expression"])
        assert value.denominator == 1 and str(value.numerator) == item.answer
        assert abs(value) <= math.MAX_ABS_ANSWER
    assert math.exact_eval("-( 6 / 4 ) * 2") == -3
    with pytest.raises(ValueError):
        math.exact_eval("__import__('os')")


# --------------------------------------------------------------------------- charts

def _recompute(recipe: dict) -> dict[str, float]:
    """A second, independent implementation of the chart recipes (pandas on the vega table)."""
    import pandas as pd
    from vega_datasets import local_data

    df = getattr(local_data, recipe["table"].replace("-", "_"))()
    for col, op, val in recipe["filters"]:
        if op == "year":
            df = df[pd.to_datetime(df[col]).dt.year == val]
        elif pd.api.types.is_datetime64_any_dtype(df[col]):
            df = df[df[col] == pd.Timestamp(val)]
        else:
            df = df[df[col] == val]
    kind, col = recipe["group"]
    rename = recipe.get("rename") or {}
    if kind == "wide":
        (row,) = df.to_dict("records")
        back = {label: column for column, label in rename.items()}
        return {c: float(row[back.get(c, c)]) for c in recipe["categories"]}
    if kind == "month":
        key = pd.to_datetime(df[col]).dt.strftime("%b")
    elif kind == "year":
        key = pd.to_datetime(df[col]).dt.year.astype(str)
    else:
        key = df[col].astype(str).replace(rename)
    if recipe["agg"] == "count":
        agg = df.groupby(key.values).size()
    else:
        agg = df.groupby(key.values)[recipe["value"]].agg(recipe["agg"])
    return {c: float(agg.loc[c]) for c in recipe["categories"]}


@pytest.mark.filterwarnings("ignore:The 'convert_dates' keyword")
def test_chart_labels_and_answers_follow_the_table():
    kinds = set()
    tables = set()
    for i in range(60):
        spec = charts.make_chart(11, i)
        recipe = spec["recipe"]
        tables.add(recipe["table"])
        kinds.add(spec["kind"])
        values = _recompute(recipe)
        cats, labels, d = spec["categories"], spec["labels"], spec["decimals"]
        assert 3 <= len(cats) <= 7 and list(values) == cats
        assert labels == [f"{values[c]:.{d}f}" for c in cats]  # printed = table value, rounded
        assert len(set(labels)) == len(labels)  # no ties
        printed = dict(zip(cats, (Decimal(s) for s in labels)))
        q, a = spec["question"], spec["answer"]
        if spec["kind"] == "lookup":
            cat = re.fullmatch(r"What is the value for (.+)\?", q).group(1)
            assert spec["scorer"] == "numeric" and a == labels[cats.index(cat)]
        elif spec["kind"] == "extremum":
            which = re.fullmatch(r"Which category has the (highest|lowest) value\?", q).group(1)
            want = (max if which == "highest" else min)(printed, key=printed.get)
            assert spec["scorer"] == "exact" and a == want
        else:
            x, y = re.fullmatch(r"What is the difference between the values for (.+) and (.+) \(\1 minus \2\)\?",
                                q).groups()
            assert spec["scorer"] == "numeric" and Decimal(a) == printed[x] - printed[y] and Decimal(a) > 0
    assert kinds == {"lookup", "extremum", "difference"} and len(tables) >= 6


def test_chart_images_print_every_label(generated):
    for item, meta in generated["charts"][0]:
        assert meta["chart_type"] in charts.CHART_TYPES and meta["font_size"] >= 11
        png, drawn, ok = charts.render_chart(meta["chart_type"], meta["title"], meta["category_axis"],
                                             meta["value_name"], meta["categories"], meta["labels"], meta["color"],
                                             meta["font_size"])
        assert ok and drawn == meta["labels"]  # every value label drawn, none overlapping
        assert png == Path(item.images[0]).read_bytes()  # and that is the stored image


# --------------------------------------------------------------------------- text, hires, digits

def test_text_reading_answers_are_the_drawn_text(generated, tmp_path):
    pairs = text_reading.generate_with_meta(30, 5, tmp_path)
    layouts = {m["layout"] for _, m in pairs}
    assert layouts == {"single", "lines", "page"}
    classes = {line["size_class"] for _, m in pairs for line in m.get("lines", [])}
    assert classes == {"small", "medium", "large"}
    for item, meta in pairs:
        if meta["layout"] == "page":
            assert item.id == "text-00003" and item.answer == "Region-based segmentation"
            continue
        last = meta["lines"][-1]
        assert item.answer == last["text"]
        lo, hi = text_reading.SIZE_CLASSES[last["size_class"]]
        assert lo <= last["size"] <= hi
        if meta["layout"] == "lines":
            assert item.question == text_reading.Q_LAST and last["box"][1] == max(l["box"][1] for l in meta["lines"])
        else:
            assert item.question in (text_reading.Q_WORD, text_reading.Q_CODE)
        if item.question == text_reading.Q_CODE:
            assert CODE_RE.match(item.answer)
        else:
            assert item.answer in _common.WORDS
        x0, y0, x1, y1 = last["box"]
        assert 0 <= x0 < x1 <= text_reading.WIDTH and 0 <= y0 < y1 <= text_reading.HEIGHT
        img = np.asarray(Image.open(item.images[0]).convert("L"), dtype=float)
        if meta["noise_sigma"] == 0 and meta["blur_radius"] == 0:  # the ink really is in the box
            assert img[y0:y1, x0:x1].min() <= meta["ink"] + 40


def test_hires_box_is_small_bordered_and_holds_the_answer(tmp_path):
    pairs = hires.generate_with_meta(8, 2, tmp_path)
    assert {m["kind"] for _, m in pairs} == {"code", "digit"}
    images, targets = _common.sklearn_digits()
    for item, meta in pairs:
        w, h = meta["canvas"]
        x0, y0, x1, y1 = meta["box"]
        assert hires.EDGE_MARGIN <= x0 < x1 <= w - hires.EDGE_MARGIN
        assert hires.EDGE_MARGIN <= y0 < y1 <= h - hires.EDGE_MARGIN
        assert (x1 - x0) * (y1 - y0) < 0.01 * w * h and x1 - x0 < 0.1 * w
        g = np.asarray(Image.open(item.images[0]).convert("L"), dtype=int)
        assert g[y0, x0:x1].max() <= 60 and g[y0:y1, x0].max() <= 60  # dark border
        b = meta["border_px"]
        inner = g[y0 + b + 1:y1 - b, x0 + b + 1:x1 - b]
        assert np.median(inner) == 255 and inner.min() < 100  # white inside, ink present
        outside = g.copy()
        outside[y0:y1 + 1, x0:x1 + 1] = 255
        for d in meta["distractors"]:
            dx0, dy0, dx1, dy1 = d["box"]
            outside[dy0:dy1 + 1, dx0:dx1 + 1] = 255
            assert normalize_text(d["text"]) != normalize_text(item.answer)
        assert outside.min() >= 100  # nothing else on the canvas is as dark as the box
        if meta["kind"] == "digit":
            assert item.question == hires.Q_DIGIT and item.answer == str(targets[meta["sklearn_index"]])
            assert meta["sklearn_index"] % 4 == 3  # the hires pool, disjoint from `digits`
        else:
            assert item.question == hires.Q_CODE and CODE_RE.match(item.answer)


def test_digits_answers_are_sklearn_targets(generated, tmp_path):
    images, targets = _common.sklearn_digits()
    pairs = digits.generate_with_meta(40, 1, tmp_path)
    samples = [m["sklearn_index"] for _, m in pairs]
    assert len(set(samples)) == 40 and all(s % 4 != 3 for s in samples)
    for item, meta in pairs[:10]:
        assert item.answer == str(targets[meta["sklearn_index"]]) and item.question == digits.QUESTION
        g = np.asarray(Image.open(item.images[0]).convert("L"))
        assert g[:12].min() == 255 and g.min() < 80  # dark ink on a white background


def test_generators_reject_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        digits.generate(-1, 0, tmp_path)
    with pytest.raises(ValueError):
        math.generate(2, 0, start=-3)
    assert digits.generate(0, 0, tmp_path) == []
