"""The slide table: parsing, clear errors, stratified folds and the paper's rotations."""
from __future__ import annotations

from pathlib import Path

import pytest

from nic_fast.train.data import InputError, SlideRecord, assign_folds, read_inputs, rotations


def _stores(folder: Path, n: int) -> list[Path]:
    paths = [folder / f"slide_{i:03d}.zarr" for i in range(n)]
    for path in paths:
        path.mkdir(parents=True)
    return paths


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_store_paths_are_relative_to_the_csv(tmp_path: Path) -> None:
    _stores(tmp_path / "compressed", 2)
    table = _csv(tmp_path / "t.csv", "store,label\ncompressed/slide_000.zarr,1\ncompressed/slide_001.zarr,0\n")
    records = read_inputs(table, "binary")
    assert [r.store for r in records] == [tmp_path / "compressed" / "slide_000.zarr",
                                          tmp_path / "compressed" / "slide_001.zarr"]
    assert [r.label for r in records] == [1.0, 0.0] and records[0].name == "slide_000"


def test_a_synth_labels_csv_with_a_stores_folder(tmp_path: Path) -> None:
    _stores(tmp_path / "c", 2)
    table = _csv(tmp_path / "labels.csv", "slide,label\nslide_000.tif,1\nslide_001.tif,0\n")
    assert [r.store for r in read_inputs(table, "binary", stores_dir=tmp_path / "c")] == \
        [tmp_path / "c" / "slide_000.zarr", tmp_path / "c" / "slide_001.zarr"]
    with pytest.raises(InputError, match="--stores DIR"):
        read_inputs(table, "binary")


@pytest.mark.parametrize(("text", "task", "message"), [
    ("store\nslide_000.zarr\n", "binary", "no 'label' column"),
    ("store,label\nslide_000.zarr,2\nslide_001.zarr,0\n", "binary", r"t.csv, line 2: a binary label is 0 or 1"),
    ("store,label\nslide_000.zarr,x\n", "binary", "line 2: label 'x' is not a number"),
    ("store,label\nslide_000.zarr,1\nmissing.zarr,0\n", "binary", "line 3: store .*missing.zarr does not exist"),
    ("store,label\nslide_000.zarr,1\nslide_000.zarr,0\n", "binary", "listed twice"),
    ("store,label\nslide_000.zarr,1\nslide_001.zarr,1\n", "binary", "a classifier needs two classes"),
    ("store,label\nslide_000.zarr,0\nslide_001.zarr,2\n", "multiclass", r"missing \[1\]"),
    ("store,label\nslide_000.zarr,1.5\nslide_001.zarr,0\n", "multiclass", "an integer"),
    ("store,label,fold\nslide_000.zarr,1,a\n", "binary", "fold 'a' is not an integer"),
])
def test_bad_tables_name_the_file_the_line_and_the_fix(tmp_path: Path, text: str, task: str, message: str) -> None:
    _stores(tmp_path, 2)
    with pytest.raises(InputError, match=message):
        read_inputs(_csv(tmp_path / "t.csv", text), task)  # type: ignore[arg-type]


def test_regression_labels_are_real_numbers(tmp_path: Path) -> None:
    _stores(tmp_path, 2)
    records = read_inputs(_csv(tmp_path / "t.csv", "store,label\nslide_000.zarr,3.25\nslide_001.zarr,-1e3\n"),
                          "regression")
    assert [r.label for r in records] == [3.25, -1000.0]


def _records(labels: list[float]) -> list[SlideRecord]:
    return [SlideRecord(Path(f"s{i}.zarr"), label) for i, label in enumerate(labels)]


def test_folds_are_stratified_balanced_and_seeded() -> None:
    records = _records([1.0] * 10 + [0.0] * 14)
    folded = assign_folds(records, 4, seed=3)
    for fold in range(4):
        members = [r for r in folded if r.fold == fold]
        assert len(members) == 6
        assert sum(r.label for r in members) in (2, 3)
    assert [r.fold for r in folded] == [r.fold for r in assign_folds(records, 4, seed=3)]
    assert [r.fold for r in folded] != [r.fold for r in assign_folds(records, 4, seed=4)]


def test_given_folds_are_kept_and_checked() -> None:
    given = [SlideRecord(Path(f"s{i}.zarr"), i % 2, i % 4) for i in range(8)]
    assert assign_folds(given, 4, seed=0) == given
    with pytest.raises(InputError, match="some slides only"):
        assign_folds([*given[:7], SlideRecord(Path("s7.zarr"), 1)], 4, seed=0)
    with pytest.raises(InputError, match="each of 0..4"):
        assign_folds(given, 5, seed=0)
    with pytest.raises(InputError, match="cannot fill 4 folds"):
        assign_folds(_records([0, 1, 0]), 4, seed=0)


def test_rotations_test_each_fold_once_and_never_train_on_it() -> None:
    folded = assign_folds(_records([0.0, 1.0] * 6), 4, seed=0)
    tested = []
    for rotation in rotations(4):
        train, val, test = rotation.split(folded)
        assert rotation.test_fold == rotation.index and rotation.val_fold == (rotation.index + 1) % 4
        assert len(train) == 6 and len(val) == 3 and len(test) == 3
        assert not {r.store for r in test} & {r.store for r in train + val}
        assert not {r.store for r in val} & {r.store for r in train}
        tested += [r.store for r in test]
    assert sorted(tested) == sorted(r.store for r in folded)
