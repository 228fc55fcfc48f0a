"""The Maestro-Mini build stage: splits, contamination, versions, storage, load and export."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest

from maestro_core.dataset import Item, load_jsonl
from maestro_core.errors import ConfigError
from maestro_core.objectstore import LocalObjectStore, open_object_store
from maestro_core.suite import (PREFIX, SPLITS, ContaminationError, SuiteConfig, build_suite, check_contamination,
                                ensure_suite, export_jsonl, load_suite, load_suite_meta, normalize_question)
from tests.store_helpers import moto_endpoint, new_bucket, s3_env  # noqa: F401 (fixtures)

SMALL = SuiteConfig(seed=5, train_per_benchmark=3, val_per_benchmark=2, test_per_benchmark=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    home = tmp_path_factory.mktemp("suite-home")
    calls = []
    build = build_suite(SMALL, home, progress=lambda done, total, stage: calls.append((done, total, stage)))
    return home, build, calls


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _content(items) -> list[tuple]:
    """Items without their (home-dependent) image paths, with the image bytes' hashes."""
    return [(i.id, i.benchmark, i.split, i.question, i.answer, i.scorer, tuple(_sha(p) for p in i.images))
            for i in items]


def _snapshot(objects: LocalObjectStore) -> dict[str, str]:
    return {k: hashlib.sha256(objects.get_bytes(k)).hexdigest() for k in objects.list(PREFIX + "/")}


def test_build_fills_disjoint_splits(built):
    home, build, calls = built
    assert build.counts == {"train": 15, "val": 10, "test": 10} and not build.reused
    assert all(c == {"train": 3, "val": 2, "test": 2} for c in build.counts_by_benchmark.values())
    assert list(build.counts_by_benchmark) == ["math", "charts", "text_reading", "hires", "digits"]
    items = build.items
    assert [i.split for i in items] == sorted((i.split for i in items), key=SPLITS.index)
    assert len({i.id for i in items}) == len(items)
    check_contamination(items)
    by_split = {s: [i for i in items if i.split == s] for s in SPLITS}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                ha = {_sha(p) for i in by_split[a] for p in i.images}
                hb = {_sha(p) for i in by_split[b] for p in i.images}
                assert not ha & hb
                qa = {normalize_question(i.question) for i in by_split[a] if not i.images}
                qb = {normalize_question(i.question) for i in by_split[b] if not i.images}
                assert not qa & qb
    # test is the head of every benchmark's stream: item 0 of each benchmark is a test item
    assert {i.id for i in by_split["test"]} >= {"math-00000", "chart-00000", "text-00000", "hires-00000",
                                               "digit-00000"}
    img_dir = home / "datasets" / build.version / "images"
    assert build.local_dir == home / "datasets" / build.version
    assert all(Path(p).parent == img_dir.resolve() and Path(p).is_file() for i in items for p in i.images)
    assert [p.name for p in (home / "datasets").iterdir()] == [build.version]  # no scratch left behind
    stages = {s for _, _, s in calls}
    assert {"generate math", "generate charts", "generate hires", "write"} <= stages
    assert all(0 <= d <= t for d, t, _ in calls)


def test_contamination_check_catches_injected_duplicates(built, tmp_path):
    _, build, _ = built
    items = list(build.items)
    test_img = next(i for i in items if i.split == "test" and i.benchmark == "digits")
    test_math = next(i for i in items if i.split == "test" and i.benchmark == "math")

    copied = dataclasses.replace(test_img, id="digit-99999", split="train")
    with pytest.raises(ContaminationError, match=r"digit-99999 \(train\) share the same image"):
        check_contamination(items + [copied])

    same_bytes = tmp_path / "copy.png"  # another file, the same pixels
    shutil.copyfile(test_img.images[0], same_bytes)
    disguised = dataclasses.replace(test_img, id="digit-99998", split="val", images=(str(same_bytes),))
    with pytest.raises(ContaminationError, match="same image"):
        check_contamination(items + [disguised])

    # the same problem text (case and spacing changed) in another split
    reworded = dataclasses.replace(test_math, id="math-99999", split="train",
                                   question="  " + test_math.question.upper().replace(" ", "  "))
    with pytest.raises(ContaminationError, match="same question"):
        check_contamination(items + [reworded])

    with pytest.raises(ContaminationError, match="appears twice"):
        check_contamination(items + [dataclasses.replace(items[0], split="val")])

    # a templated question alone is not a duplicate: every digit item asks the same thing
    check_contamination(items)


def test_build_drops_duplicates_deterministically(tmp_path, monkeypatch):
    import maestro_core.benchmarks.math as bench_math

    original = bench_math.generate_with_meta

    def with_repeats(n, seed, image_dir=None, *, start=0, progress=None):
        out = []
        for item, meta in original(n, seed, image_dir, start=start, progress=progress):
            i = int(item.id.split("-")[1])
            if i % 3 == 1:  # repeat the previous item's question
                prev, _ = original(1, seed, image_dir, start=i - 1)[0]
                item = dataclasses.replace(item, question=prev.question, answer=prev.answer)
            out.append((item, meta))
        return out

    monkeypatch.setattr(bench_math, "generate_with_meta", with_repeats)
    cfg = SuiteConfig(seed=1, train_per_benchmark=6, val_per_benchmark=3, test_per_benchmark=4, benchmarks=("math",))
    a = build_suite(cfg, tmp_path / "a")
    b = build_suite(cfg, tmp_path / "b", reuse=False)
    assert a.counts == {"train": 6, "val": 3, "test": 4}
    assert a.dropped and a.dropped == b.dropped and a.version == b.version
    assert all(reason.startswith("duplicate of math-") for _, reason in a.dropped)
    assert len({normalize_question(i.question) for i in a.items}) == len(a.items)
    check_contamination(a.items)
    manifest = open_object_store(tmp_path / "a" / "objects").get_bytes(f"{PREFIX}/{a.version}/manifest.json")
    assert a.dropped[0][0].encode() in manifest


def test_version_is_stable_and_rebuilding_writes_nothing_new(built, tmp_path):
    home, build, _ = built
    objects = LocalObjectStore(home / "objects")
    before = _snapshot(objects)
    version_keys = {f"{PREFIX}/{build.version}/{f}" for f in ("manifest.json", "meta.jsonl", "README.md")}
    version_keys |= {f"{PREFIX}/{build.version}/data/{s}-00000-of-00001.parquet" for s in SPLITS}
    build_records = {k for k in before if k.startswith(f"{PREFIX}/builds/")}
    assert len(build_records) == 1 and set(before) == version_keys | build_records | {f"{PREFIX}/LATEST"}
    again = build_suite(SMALL, home)  # the build record is found: nothing generated
    assert again.reused and again.version == build.version and again.items == build.items
    regenerated = build_suite(SMALL, home, reuse=False)  # generated again: same bytes, same version
    assert not regenerated.reused and regenerated.version == build.version and regenerated.items == build.items
    assert _snapshot(objects) == before  # no new or rewritten object
    elsewhere = build_suite(SMALL, tmp_path / "other-home")
    assert elsewhere.version == build.version and _content(elsewhere.items) == _content(build.items)
    other_seed = build_suite(dataclasses.replace(SMALL, seed=6), tmp_path / "other-home")
    assert other_seed.version != build.version
    assert load_suite(tmp_path / "other-home")[0].id == other_seed.items[0].id  # LATEST follows the last build


def test_worker_processes_build_the_same_suite_as_one_process(built, tmp_path, monkeypatch):
    """The first batches generated in 2 spawned workers, in chunks of 3 items, give the items,
    image bytes and version of the in-process build, and progress reaches each benchmark's total."""
    import maestro_core.suite as suite

    home, build, _ = built
    monkeypatch.setattr(suite, "CHUNK_ITEMS", 3)
    calls = []
    par = build_suite(SMALL, tmp_path / "par", workers=2, progress=lambda d, t, stage: calls.append((d, t, stage)))
    assert not par.reused and par.version == build.version and _content(par.items) == _content(build.items)
    total = sum(SMALL.per_split().values())
    for name in SMALL.benchmarks:
        assert (total, total, f"generate {name}") in calls


def test_load_suite_round_trip(built, tmp_path):
    home, build, _ = built
    assert load_suite(home) == list(build.items)
    assert load_suite(home, build.version, split="test") == [i for i in build.items if i.split == "test"]
    assert [i.split for i in load_suite(home, split=["test", "val"])] == ["val"] * 10 + ["test"] * 10
    victim = Path(build.items[-1].images[0])
    original = victim.read_bytes()
    victim.unlink()
    assert load_suite(home, split="test") == [i for i in build.items if i.split == "test"]
    assert victim.read_bytes() == original  # re-extracted from the stored dataset
    meta = load_suite_meta(home)
    assert set(meta) == {i.id for i in build.items}
    text_meta = [m for k, m in meta.items() if k.startswith("text-")]
    assert all("target_size_class" in m for m in text_meta)
    with pytest.raises(ConfigError, match="not found"):
        load_suite(home, "0000000000000000")
    with pytest.raises(ConfigError, match="unknown split"):
        load_suite(home, split="dev")
    with pytest.raises(ConfigError, match="no Maestro-Mini dataset"):
        load_suite(tmp_path / "empty-home")


def test_stored_dataset_is_a_hugging_face_dataset(built, tmp_path):
    import datasets

    home, build, _ = built
    root = home / "objects" / PREFIX / build.version
    ds = datasets.Dataset.from_parquet(str(root / "data" / "test-00000-of-00001.parquet"),
                                       cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 10 and isinstance(ds.features["images"], datasets.List)
    assert isinstance(ds.features["images"].feature, datasets.Image)
    row = next(r for r in ds if r["benchmark"] == "charts")
    assert row["images"][0].size == (640, 480)
    card = (root / "README.md").read_text()
    assert "- split: test" in card and "path: data/test-*" in card


def test_load_suite_from_s3_downloads_to_the_local_folder(built, s3_env, tmp_path):
    home, build, _ = built
    local = LocalObjectStore(home / "objects")
    s3 = open_object_store(f"s3://{new_bucket(s3_env)}/maestro")
    for key in local.list(PREFIX + "/"):
        s3.put_bytes(key, local.get_bytes(key))
    other = tmp_path / "worker-home"
    items = load_suite(other, object_store=s3)
    assert _content(items) == _content(build.items)
    assert all(Path(p).is_relative_to(other.resolve()) for i in items for p in i.images)
    data = other / "datasets" / build.version / "data"
    assert sorted(p.name for p in data.iterdir()) == sorted(f"{s}-00000-of-00001.parquet" for s in SPLITS)
    assert load_suite(other, object_store=s3, split="val") == [i for i in items if i.split == "val"]


def test_export_jsonl_round_trip(built, tmp_path):
    _, build, _ = built
    path = export_jsonl(build.items, tmp_path / "out" / "suite.jsonl")
    assert load_jsonl(path) == list(build.items)
    assert '"images": ["../' in path.read_text()  # relative to the file
    copied = export_jsonl(build.items, tmp_path / "bundle" / "suite.jsonl", copy_images=True)
    back = load_jsonl(copied)
    assert _content(back) == _content(build.items)
    assert all(Path(p).parent == (tmp_path / "bundle" / "images").resolve() for i in back for p in i.images)


def test_suite_config_is_validated_and_buildable_from_yaml_values():
    from maestro_core.config import build

    default = SuiteConfig()
    assert sum(1 for _ in default.benchmarks) * default.test_per_benchmark >= 150
    assert all(f.metadata.get("help") for f in dataclasses.fields(SuiteConfig))
    cfg = build(SuiteConfig, {"seed": 2, "test_per_benchmark": 5, "benchmarks": ["digits", "math"]})
    assert cfg.benchmarks == ("math", "digits") and cfg.test_per_benchmark == 5
    for bad in ({"benchmarks": ["ocr"]}, {"benchmarks": []}, {"seed": -1}, {"test_per_benchmark": -2},
                {"train_per_benchmark": 0, "val_per_benchmark": 0, "test_per_benchmark": 0}):
        with pytest.raises(ConfigError):
            SuiteConfig(**bad)


def test_ensure_suite_builds_once_then_loads(tmp_path):
    from maestro_core.store import Store

    cfg = SuiteConfig(seed=3, train_per_benchmark=2, val_per_benchmark=1, test_per_benchmark=2,
                      benchmarks=("math", "digits"))
    logs: list[str] = []
    with Store(tmp_path / "home") as store:
        first = ensure_suite(store, cfg, log=logs.append)
        assert len(first) == 10 and any("suite version" in m for m in logs)
        assert ensure_suite(store) == first  # no config: the latest version
    assert all(isinstance(i, Item) and i.split in SPLITS for i in first)
