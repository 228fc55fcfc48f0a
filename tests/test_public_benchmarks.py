"""Public-benchmark loaders (on tiny fixtures in each dataset's published layout) and their
official metrics (table cases). Fixtures: tests/fixtures/public/ (make_fixtures.py)."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest

from maestro_core.benchmarks.public import PUBLIC_BENCHMARKS, _common, get_benchmark, load_public
from maestro_core.benchmarks.public import charxiv, chartqa, hrbench, mathverse, mathvision, mathvista
from maestro_core.benchmarks.public import mme_realworld, vstar
from maestro_core.benchmarks.public.metrics import clean_prediction, relaxed_accuracy
from maestro_core.dataset import Item
from maestro_core.errors import ConfigError
from maestro_core.rewards import SCORERS

FIXTURES = Path(__file__).parent / "fixtures" / "public"


def _load(module, source, tmp_path, **kw):
    items = module.load(source, image_dir=tmp_path / "img", **kw)
    for item in items:
        assert isinstance(item, Item)
        assert item.benchmark == module.BENCHMARK
        assert item.scorer in SCORERS
        assert item.question.strip() and item.answer.strip()
        for p in item.images:
            assert Path(p).is_absolute() and Path(p).is_file(), p
            assert Path(p).read_bytes()[:3] in (b"\x89PN", b"\xff\xd8\xff"), p  # PNG or JPEG
    assert len({i.id for i in items}) == len(items)
    return items


# --------------------------------------------------------------------------- loaders

def test_registry_lists_the_eight_benchmarks():
    assert sorted(PUBLIC_BENCHMARKS) == ["chartqa", "charxiv", "hrbench", "mathverse", "mathvision", "mathvista",
                                         "mme_realworld", "vstar"]
    for name, module in PUBLIC_BENCHMARKS.items():
        assert module.BENCHMARK == name
        assert callable(module.load) and callable(module.metric)
    assert get_benchmark("MME-RealWorld") is mme_realworld
    assert get_benchmark("V*") is vstar
    with pytest.raises(ConfigError, match="unknown public benchmark"):
        get_benchmark("mmmu")


def test_chartqa_hf_parquet(tmp_path):
    items = _load(chartqa, FIXTURES / "chartqa", tmp_path)
    assert len(items) == 4
    first = items[0]
    assert first.id == "chartqa-test-human-00000"
    assert first.question == "What is the value of the tallest bar?"
    assert (first.answer, first.scorer, first.choices, first.split) == ("100", "numeric", None, "test")
    assert Path(first.images[0]).parent == (tmp_path / "img").resolve()
    assert (items[1].answer, items[1].scorer) == ("Japan", "exact")
    assert items[2].id.startswith("chartqa-test-augmented-") and items[2].images[0].endswith(".jpg")
    assert chartqa.metric("104", first) == 1.0 and chartqa.metric("106", first) == 0.0


def test_chartqa_original_json_layout(tmp_path):
    items = _load(chartqa, FIXTURES / "chartqa" / "original", tmp_path)
    assert [(i.answer, Path(i.images[0]).name) for i in items] == [("45.5", "two_col_1.png"),
                                                                   ("2015", "multi_col_7.png")]
    # images named by a relative path are used in place, not copied
    assert Path(items[0].images[0]).parent == (FIXTURES / "chartqa/original/test/png").resolve()


def test_mathvista_testmini(tmp_path):
    items = _load(mathvista, FIXTURES / "mathvista", tmp_path)
    assert [i.id for i in items] == ["mathvista-testmini-1", "mathvista-testmini-2", "mathvista-testmini-3",
                                     "mathvista-testmini-4"]
    mc, integer, float1, float2 = items
    assert mc.question.startswith("Hint: Please answer the question and provide the correct option letter")
    assert "(B) equal to" in mc.question
    assert (mc.answer, mc.scorer, mc.choices) == ("B", "choice", ("larger than", "equal to", "smaller than"))
    assert (integer.answer, integer.scorer, integer.choices) == ("3", "numeric", None)
    assert (float1.answer, float2.answer) == ("1.5", "0.60")  # float golds carry `precision` decimals


def test_vstar_official_jsonl(tmp_path):
    items = _load(vstar, FIXTURES / "vstar", tmp_path)
    assert len(items) == 3
    first = items[0]
    assert first.id == "vstar-0"
    assert first.question.startswith("What is the color of the umbrella?\n(A) red\n(B) white")
    assert first.question.endswith("Answer with the option's letter from the given choices directly.")
    assert (first.answer, first.scorer, first.choices) == ("A", "choice", ("red", "white", "black", "green"))
    assert items[2].choices == ("left", "right")
    assert Path(first.images[0]) == (FIXTURES / "vstar/direct_attributes/sa_101.jpg").resolve()


def test_hrbench_parquet_and_tsv(tmp_path):
    items = _load(hrbench, FIXTURES / "hrbench", tmp_path)
    assert len(items) == 3
    first = items[0]
    assert first.id == "hrbench-4k-0" and first.split == "4k"
    assert first.question.startswith("What is the number on the red bus?\n(A) 12\n(B) 21\n(C) 112\n(D) 7")
    assert (first.answer, first.scorer, first.choices) == ("B", "choice", ("12", "21", "112", "7"))
    assert first.images[0].endswith(".jpg")  # the base64 JPEG is written as is
    eight = _load(hrbench, FIXTURES / "hrbench", tmp_path, split="8k")  # the TSV twin
    assert [(i.id, i.answer) for i in eight] == [("hrbench-8k-100", "B"), ("hrbench-8k-101", "C")]
    with pytest.raises(ConfigError, match="unknown split"):
        hrbench.load(FIXTURES / "hrbench", split="2k", image_dir=tmp_path)


def test_mme_realworld_official_json(tmp_path):
    items = _load(mme_realworld, FIXTURES / "mme_realworld", tmp_path)
    assert len(items) == 3
    first = items[0]
    assert first.id == "mme_realworld-perception/remote_sensing/color/0001"
    assert first.question.startswith("What is the color of the roof of the building at the top left? "
                                     "The choices are listed below:\n(A) red\n(B) green\n(C) white")
    assert "(E) The image does not feature the building." in first.question
    assert (first.answer, first.scorer) == ("C", "choice")
    assert first.choices == ("red", "green", "white", "black", "The image does not feature the building.")
    assert items[2].answer == "E"


def test_charxiv_reasoning(tmp_path):
    items = _load(charxiv, FIXTURES / "charxiv", tmp_path)
    assert len(items) == 4  # one reasoning question per chart; descriptive ones are not loaded
    text1, text2, num3, num4 = items
    assert text1.id == "charxiv-validation-0000" and text1.split == "validation"
    assert text1.question.startswith("Which two methods have the lowest final loss?\n* ")
    assert (text1.answer, text1.scorer) == ("SGD, Adam", "exact")
    assert (text2.answer, text2.scorer) == ("decreases", "exact")
    assert (num3.answer, num3.scorer) == ("0.5", "numeric")
    assert num4.question.endswith("* Your final answer must be an exact integer.")


def test_mathverse_testmini(tmp_path):
    items = _load(mathverse, FIXTURES / "mathverse", tmp_path)
    assert [i.id for i in items] == ["mathverse-testmini-1", "mathverse-testmini-6", "mathverse-testmini-7",
                                     "mathverse-testmini-13"]
    mc, vision_only, free, latex = items
    assert mc.question.startswith("Please directly answer the question and provide the correct option letter")
    assert (mc.answer, mc.scorer, mc.choices) == ("C", "choice", ("40°", "50°", "130°", "150°"))
    assert (vision_only.scorer, vision_only.choices) == ("choice", None)  # options drawn in the image
    assert (free.answer, free.scorer) == ("5", "math")
    assert latex.answer == "\\frac{\\sqrt{3}}{3}"


def test_mathvision_test(tmp_path):
    items = _load(mathvision, FIXTURES / "mathvision", tmp_path, limit=3)
    assert len(items) == 3  # limit
    mc = items[0]
    assert mc.id == "mathvision-test-1"
    assert mc.question.startswith("Which number is written on the hidden face?\n<image1>\n(A) 1\n(B) 2")
    assert (mc.answer, mc.scorer, mc.choices) == ("B", "choice", ("1", "2", "3", "4", "5"))
    assert (items[2].answer, items[2].scorer, items[2].choices) == ("14", "math", None)


def test_load_public_and_bad_arguments(tmp_path):
    assert len(load_public("vstar", str(FIXTURES / "vstar"), image_dir=tmp_path, limit=2)) == 2
    with pytest.raises(ConfigError, match="limit"):
        load_public("vstar", FIXTURES / "vstar", image_dir=tmp_path, limit=0)
    with pytest.raises(ConfigError, match="local path not found"):
        load_public("vstar", tmp_path / "missing", image_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown split"):
        load_public("mathvista", FIXTURES / "mathvista", split="train", image_dir=tmp_path)
    with pytest.raises(ConfigError, match="no data file for split 'testmini'"):
        load_public("mathvista", FIXTURES / "vstar", image_dir=tmp_path)


def test_missing_image_file_names_the_fix(tmp_path):
    (tmp_path / "test_questions.jsonl").write_text(
        '{"image": "direct_attributes/gone.jpg", "text": "Q?\\n(A) x\\n(B) y", "question_id": 9, "label": "A"}\n')
    with pytest.raises(ConfigError, match="image file 'direct_attributes/gone.jpg' not found") as e:
        vstar.load(tmp_path, image_dir=tmp_path / "img")
    assert "Fix:" in str(e.value)


def test_hub_name_offline_raises_config_error_with_fix(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    start = time.monotonic()
    for module in PUBLIC_BENCHMARKS.values():
        with pytest.raises(ConfigError) as e:
            module.load(module.HUB_NAME, image_dir=tmp_path / "img")
        message = str(e.value)
        assert module.HUB_NAME in message and "Hugging Face Hub" in message
        assert "Fix: pass the local path" in message
    assert time.monotonic() - start < 20


def test_hub_code_path_maps_rows_like_local_files(tmp_path, monkeypatch):
    # datasets.load_dataset on a folder with the Hub repo's file layout runs the same code
    # (Image columns cast to decode=False, ClassLabel ints, list columns) as a Hub snapshot.
    import datasets

    modules = ((chartqa, "chartqa"), (mathvista, "mathvista"), (mathvision, "mathvision"))
    local = {m.BENCHMARK: m.load(FIXTURES / folder, image_dir=tmp_path / "local") for m, folder in modules}
    monkeypatch.setattr(datasets, "load_dataset",
                        functools.partial(datasets.load_dataset, cache_dir=str(tmp_path / "cache")))
    monkeypatch.setattr(_common, "local_path", lambda *a, **k: None)  # treat the folder as a Hub name
    for module, folder in modules:
        via_hub = module.load(str(FIXTURES / folder), image_dir=tmp_path / "hub")
        expected = local[module.BENCHMARK]
        assert [(i.id, i.question, i.answer, i.scorer, i.choices) for i in via_hub] == \
               [(i.id, i.question, i.answer, i.scorer, i.choices) for i in expected]
        assert [Path(p).read_bytes() for i in via_hub for p in i.images] == \
               [Path(p).read_bytes() for i in expected for p in i.images]


def test_split_without_answers_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(FIXTURES / "mathvista/data/testmini-00000-of-00001.parquet")
    table = table.set_column(table.schema.get_field_index("answer"), "answer", pa.array([""] * table.num_rows))
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet")
    with pytest.raises(ConfigError, match="no gold answer"):
        mathvista.load(tmp_path, split="test", image_dir=tmp_path / "img")


# --------------------------------------------------------------------------- metrics

def _item(answer, scorer, choices=None, benchmark="x"):
    return Item(id="t", benchmark=benchmark, question="q", answer=answer, scorer=scorer,
                choices=tuple(choices) if choices else None)


@pytest.mark.parametrize("prediction, target, expected", [
    ("104", "100", 1.0), ("106", "100", 0.0), ("95", "100", 1.0), ("94.9", "100", 0.0),
    ("105", "100", 1.0), ("5", "15", 0.0), ("15", "5", 0.0), ("0.57", "0.57", 1.0), ("0.6", "0.57", 0.0),
    ("-104", "-100", 1.0), ("1,000", "1000", 1.0), ("1e2", "100", 1.0),
    ("45%", "0.45", 1.0), ("45%", "45", 0.0),  # pix2struct: a trailing % divides by 100
    ("0", "0", 1.0), ("0.0", "0", 1.0), ("0.01", "0", 0.0),
    ("Japan", "Japan", 1.0), ("japan", "Japan", 1.0), ("Japan.", "Japan", 1.0), ("  Japan ", "Japan", 1.0),
    ("Japan and China", "Japan", 0.0), ("Jap", "Japan", 0.0), ("China", "Japan", 0.0),
    ("\\boxed{104}", "100", 1.0), ("The answer is 104", "100", 1.0), ("about 104", "100", 0.0),
    ("104", "Japan", 0.0), ("Japan", "100", 0.0), ("", "100", 0.0), (None, "100", 0.0),
])
def test_chartqa_relaxed_accuracy(prediction, target, expected):
    assert relaxed_accuracy(prediction, target) == expected
    assert chartqa.metric(prediction, _item(target, "exact")) == expected


@pytest.mark.parametrize("module", [vstar, hrbench])
@pytest.mark.parametrize("prediction, expected", [
    ("B", 1.0), ("b", 1.0), ("(B)", 1.0), ("B.", 1.0), ("Option B", 1.0), ("white", 1.0), ("(B) white", 1.0),
    ("The answer is B", 1.0), ("\\boxed{B}", 1.0),
    ("A", 0.0), ("red", 0.0), ("(B) red", 0.0), ("A or B", 0.0), ("I think B", 0.0), ("whit", 0.0),
    ("E", 0.0), ("", 0.0), (None, 0.0),
])
def test_multiple_choice_letter(module, prediction, expected):
    item = _item("B", "choice", ["red", "white", "black", "green"])
    assert module.metric(prediction, item) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("E", 1.0), ("(E)", 1.0), ("The image does not feature the buses", 1.0), ("D", 0.0), ("6", 0.0),
    ("F", 0.0), ("E or D", 0.0),
])
def test_mme_realworld_letters_a_to_e(prediction, expected):
    item = _item("E", "choice", ["13", "90", "77", "6", "The image does not feature the buses"])
    assert mme_realworld.metric(prediction, item) == expected


@pytest.mark.parametrize("answer, scorer, choices, prediction, expected", [
    # multiple choice: letter or the exact option text, never a fuzzy/most-similar option
    ("B", "choice", ["larger than", "equal to", "smaller than"], "B", 1.0),
    ("B", "choice", ["larger than", "equal to", "smaller than"], "equal to", 1.0),
    ("B", "choice", ["larger than", "equal to", "smaller than"], "(B) equal to", 1.0),
    ("B", "choice", ["larger than", "equal to", "smaller than"], "A", 0.0),
    ("B", "choice", ["larger than", "equal to", "smaller than"], "equal", 0.0),
    # integer: str(int(float(x))) == answer, the official truncation
    ("3", "numeric", None, "3", 1.0), ("3", "numeric", None, "3.0", 1.0), ("3", "numeric", None, "3.7", 1.0),
    ("3", "numeric", None, "3 objects", 1.0), ("3", "numeric", None, "4", 0.0), ("3", "numeric", None, "13", 0.0),
    ("3", "numeric", None, "3 or 4", 0.0), ("3", "numeric", None, "three", 0.0),
    # float: round(x, precision) == answer, precision = the gold's decimals
    ("1.5", "numeric", None, "1.5", 1.0), ("1.5", "numeric", None, "1.54", 1.0), ("1.5", "numeric", None, "1.46", 1.0),
    ("1.5", "numeric", None, "1.44", 0.0), ("1.5", "numeric", None, "1.56", 0.0), ("1.5", "numeric", None, "15", 0.0),
    ("0.60", "numeric", None, "0.6", 1.0), ("0.60", "numeric", None, "0.604", 1.0),
    ("0.60", "numeric", None, "3/5", 1.0),
    ("0.60", "numeric", None, "0.61", 0.0),
    # list and text
    ("[1, 2]", "exact", None, "[1,2]", 1.0), ("[1, 2]", "exact", None, "[2, 1]", 0.0),
    ("Paris", "exact", None, "paris", 1.0), ("Paris", "exact", None, "Paris, France", 0.0),
    ("3", "numeric", None, "", 0.0), ("3", "numeric", None, None, 0.0),
])
def test_mathvista_metric(answer, scorer, choices, prediction, expected):
    assert mathvista.metric(prediction, _item(answer, scorer, choices)) == expected


@pytest.mark.parametrize("answer, scorer, prediction, expected", [
    ("0.5", "numeric", "0.5", 1.0), ("0.5", "numeric", "0.50", 1.0), ("0.5", "numeric", "5e-1", 1.0),
    ("0.5", "numeric", "The answer is 0.5.", 1.0), ("0.5", "numeric", "0.51", 0.0), ("0.5", "numeric", "10.5", 0.0),
    ("12", "numeric", "12", 1.0), ("12", "numeric", "1", 0.0), ("1500", "numeric", "1.5e3", 1.0),
    ("SGD, Adam", "exact", "SGD, Adam", 1.0), ("SGD, Adam", "exact", "Adam, SGD", 1.0),
    ("SGD, Adam", "exact", "sgd,adam", 1.0), ("SGD, Adam", "exact", "SGD", 0.0),
    ("SGD, Adam", "exact", "SGD, Adam, RMSProp", 0.0),
    ("decreases", "exact", "Decreases.", 1.0), ("decreases", "exact", "it decreases", 0.0),
    ("(b)", "exact", "b", 1.0), ("(b)", "exact", "(b)", 1.0), ("(b)", "exact", "c", 0.0),
    ("[50, 100]", "exact", "[50, 100]", 1.0), ("[50, 100]", "exact", "[100, 50]", 0.0),
    ("decreases", "exact", None, 0.0),
])
def test_charxiv_metric(answer, scorer, prediction, expected):
    assert charxiv.metric(prediction, _item(answer, scorer)) == expected


@pytest.mark.parametrize("module", [mathverse, mathvision])
@pytest.mark.parametrize("answer, scorer, choices, prediction, expected", [
    ("C", "choice", ["40°", "50°", "130°", "150°"], "C", 1.0),
    ("C", "choice", ["40°", "50°", "130°", "150°"], "130°", 1.0),
    ("C", "choice", ["40°", "50°", "130°", "150°"], "B", 0.0),
    ("C", "choice", None, "(C)", 1.0), ("C", "choice", None, "D", 0.0),
    ("\\frac{\\sqrt{3}}{3}", "math", None, "\\sqrt{3}/3", 1.0),
    ("\\frac{\\sqrt{3}}{3}", "math", None, "1/\\sqrt{3}", 1.0),
    ("\\frac{\\sqrt{3}}{3}", "math", None, "0.577350269", 1.0),
    ("\\frac{\\sqrt{3}}{3}", "math", None, "\\sqrt{3}", 0.0),
    ("5", "math", None, "5", 1.0), ("5", "math", None, "5.0", 1.0), ("5", "math", None, "\\boxed{5}", 1.0),
    ("5", "math", None, "15", 0.0), ("15", "math", None, "5", 0.0), ("5", "math", None, None, 0.0),
    ("60", "math", None, "60°", 1.0),
])
def test_math_benchmarks_metric(module, answer, scorer, choices, prediction, expected):
    assert module.metric(prediction, _item(answer, scorer, choices)) == expected


def test_metrics_on_loaded_items(tmp_path):
    [mc, integer, float1, float2] = mathvista.load(FIXTURES / "mathvista", image_dir=tmp_path)
    assert mathvista.metric("B", mc) == 1.0 and mathvista.metric("equal to", mc) == 1.0
    assert mathvista.metric("3", integer) == 1.0 and mathvista.metric("1.46", float1) == 1.0
    assert mathvista.metric("0.6", float2) == 1.0 and mathvista.metric("0.62", float2) == 0.0
    [vs] = vstar.load(FIXTURES / "vstar", image_dir=tmp_path, limit=1)
    assert vstar.metric("A", vs) == 1.0 and vstar.metric("red", vs) == 1.0 and vstar.metric("B", vs) == 0.0
    mme = mme_realworld.load(FIXTURES / "mme_realworld", image_dir=tmp_path)
    assert [mme_realworld.metric(i.answer, i) for i in mme] == [1.0, 1.0, 1.0]
    cx = charxiv.load(FIXTURES / "charxiv", image_dir=tmp_path)
    assert [charxiv.metric(p, i) for p, i in zip(["Adam, SGD", "Decreases", "0.50", "12"], cx)] == [1.0] * 4


def test_metric_rejects_non_string_prediction():
    with pytest.raises(TypeError):
        chartqa.metric(104, _item("100", "numeric"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mathvista.metric(3, _item("3", "numeric"))  # type: ignore[arg-type]


def test_clean_prediction():
    assert clean_prediction("  The answer is \\boxed{42}. ") == "42"
    assert clean_prediction("**B**") == "B"
    assert clean_prediction("Answer: $1.5$") == "1.5"
