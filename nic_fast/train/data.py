"""Training inputs: the slide table (one compressed store and one label per row) and its folds.

The CSV has columns ``store`` (a store written by ``nic-fast compress``; relative paths
are relative to the CSV), ``label`` and optionally ``fold``. With a stores folder, a
``slide`` column (slide file names, as in ``nic-fast synth``'s labels.csv) may stand in
for ``store``: slide ``x.tif`` is ``STORES/x.zarr``, where ``compress -o STORES`` put it.

Cross-validation follows the paper: the slides are split into F partitions (4 by
default); rotation r tests on partition r, validates on r + 1 and trains on the rest, so
every slide is predicted exactly once by a model that never saw it.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

__all__ = ["InputError", "Rotation", "SlideRecord", "Task", "TASKS", "assign_folds", "class_count", "read_inputs",
           "rotations"]

Task = Literal["binary", "multiclass", "regression"]
TASKS: tuple[str, ...] = get_args(Task)


class InputError(ValueError):
    """The slide table cannot be used; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class SlideRecord:
    """One slide of the table: its store, its label, and its partition (None until assigned)."""

    store: Path
    label: float
    fold: int | None = None

    @property
    def name(self) -> str:
        return self.store.name.removesuffix(".zarr")


@dataclass(frozen=True)
class Rotation:
    """One cross-validation rotation: which partitions train, validate and test."""

    index: int
    train_folds: tuple[int, ...]
    val_fold: int
    test_fold: int

    def split(self, records: list[SlideRecord]) -> tuple[list[SlideRecord], list[SlideRecord], list[SlideRecord]]:
        """(train, validation, test) records of this rotation."""
        train = [r for r in records if r.fold in self.train_folds]
        val = [r for r in records if r.fold == self.val_fold]
        test = [r for r in records if r.fold == self.test_fold]
        return train, val, test


def read_inputs(csv_path: str | Path, task: Task, *, stores_dir: str | Path | None = None) -> list[SlideRecord]:
    """Parse and check the slide table; stores must exist (they are opened later)."""
    csv_path = Path(csv_path)
    if task not in TASKS:
        raise InputError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: no such file; give a CSV with columns store,label[,fold]")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # a BOM (Excel) is not part of the first column
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        rows = list(reader)
    _check_columns(csv_path, columns, stores_dir)
    if not rows:
        raise InputError(f"{csv_path} has a header but no slides")
    records = [_parse_row(csv_path, line, row, task, stores_dir) for line, row in enumerate(rows, start=2)]
    _check_unique(csv_path, records)
    _check_labels(csv_path, records, task)
    return records


def _check_columns(csv_path: Path, columns: set[str], stores_dir: str | Path | None) -> None:
    if "label" not in columns:
        raise InputError(f"{csv_path} has no 'label' column (columns: {', '.join(sorted(columns)) or 'none'})")
    if "store" in columns:
        return
    if "slide" in columns and stores_dir is not None:
        return
    if "slide" in columns:
        raise InputError(f"{csv_path} names slides, not stores: pass the folder `nic-fast compress -o` wrote "
                         "(--stores DIR), or add a 'store' column")
    raise InputError(f"{csv_path} needs a 'store' column (paths to compressed stores), or a 'slide' column "
                     "together with --stores DIR")


def _parse_row(csv_path: Path, line: int, row: dict[str, str], task: Task,
               stores_dir: str | Path | None) -> SlideRecord:
    where = f"{csv_path}, line {line}"
    if row.get("store"):
        store = Path(row["store"])
        store = store if store.is_absolute() else csv_path.parent / store
    elif row.get("slide") and stores_dir is not None:
        store = Path(stores_dir) / f"{Path(row['slide']).stem}.zarr"
    else:
        raise InputError(f"{where}: empty store/slide")
    if not store.is_dir():
        raise InputError(f"{where}: store {store} does not exist; run `nic-fast compress` on its slide first")
    return SlideRecord(store=store, label=_parse_label(where, row.get("label", ""), task),
                       fold=_parse_fold(where, row.get("fold")))


def _parse_label(where: str, text: str, task: Task) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: label {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"{where}: label {text!r} is not finite")
    if task == "binary" and value not in (0.0, 1.0):
        raise InputError(f"{where}: a binary label is 0 or 1, got {text!r} (use --task multiclass or regression)")
    if task == "multiclass" and (value < 0 or value != int(value)):
        raise InputError(f"{where}: a class label is an integer 0, 1, ..., got {text!r}")
    return value


def _parse_fold(where: str, text: str | None) -> int | None:
    if text is None or text.strip() == "":
        return None
    try:
        fold = int(text)
    except ValueError:
        raise InputError(f"{where}: fold {text!r} is not an integer") from None
    if fold < 0:
        raise InputError(f"{where}: fold must be >= 0, got {fold}")
    return fold


def _check_unique(csv_path: Path, records: list[SlideRecord]) -> None:
    seen: set[Path] = set()
    for record in records:
        key = record.store.resolve()
        if key in seen:
            raise InputError(f"{csv_path}: store {record.store} is listed twice; a slide must be in one fold only")
        seen.add(key)


def _check_labels(csv_path: Path, records: list[SlideRecord], task: Task) -> None:
    labels = {r.label for r in records}
    if task != "regression" and len(labels) < 2:
        raise InputError(f"{csv_path}: every slide has label {labels.pop():g}; a classifier needs two classes")
    if task == "multiclass" and labels != set(range(class_count(records))):
        missing = sorted(set(range(class_count(records))) - labels)
        raise InputError(f"{csv_path}: classes must be 0..K-1 with each present; missing {missing}")


def class_count(records: list[SlideRecord]) -> int:
    """K of a multi-class table (labels 0..K-1)."""
    return int(max(r.label for r in records)) + 1


def assign_folds(records: list[SlideRecord], folds: int, seed: int) -> list[SlideRecord]:
    """Give every record a partition 0..folds-1, stratified by label; given folds are kept.

    The table either gives a fold for every slide or for none. Stratification: shuffle,
    sort by label, deal round-robin, so each partition gets every class (classification)
    or every range of values (regression) in the same proportion.
    """
    if folds < 3:
        raise InputError(f"cross-validation needs at least 3 folds (train, validation, test), got {folds}")
    if len(records) < folds:
        raise InputError(f"{len(records)} slides cannot fill {folds} folds; add slides or lower --folds")
    if any(r.fold is not None for r in records):
        return _check_given_folds(records, folds)
    order = np.random.default_rng([seed, 7]).permutation(len(records))
    order = order[np.argsort([records[i].label for i in order], kind="stable")]
    fold_of = np.empty(len(records), dtype=int)
    fold_of[order] = np.arange(len(records)) % folds
    return [SlideRecord(r.store, r.label, int(f)) for r, f in zip(records, fold_of)]


def _check_given_folds(records: list[SlideRecord], folds: int) -> list[SlideRecord]:
    if any(r.fold is None for r in records):
        raise InputError("the 'fold' column is filled for some slides only: fill it for all, or leave it empty")
    present = {r.fold for r in records}
    if present != set(range(folds)):
        raise InputError(f"the 'fold' column holds {sorted(present)}; with --folds {folds} it must hold "
                         f"each of 0..{folds - 1}")
    return records


def rotations(folds: int) -> list[Rotation]:
    """The paper's rotations: test on partition r, validate on r + 1, train on the others."""
    return [Rotation(index=r, train_folds=tuple(f for f in range(folds) if f not in (r, (r + 1) % folds)),
                     val_fold=(r + 1) % folds, test_fold=r) for r in range(folds)]
