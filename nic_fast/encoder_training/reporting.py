"""What a training run shows and leaves behind: terminal progress, metric logs, PNG grids.

Training runs for hours on real slides; a person should see it move (a rich progress
bar and one line per epoch), be able to plot it afterwards (``metrics.csv`` for
spreadsheets, ``metrics.json`` with the configuration) and look at what the networks
produce (reconstructions, samples, augmented pairs as PNG grids).
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
GRID_GAP_PX = 2
MIN_PREVIEW_PX = 48  # small patches (9-px digits) are enlarged to at least this side

__all__ = ["Reporter", "RichReporter", "SilentReporter", "save_grid_png", "write_metrics"]


class Reporter(Protocol):
    """Receives a run's progress; :class:`RichReporter` draws it, :class:`SilentReporter` drops it."""

    def start(self, method: str, first_epoch: int, last_epoch: int, steps_per_epoch: int) -> None: ...

    def step(self, losses: Mapping[str, float]) -> None: ...

    def epoch(self, row: Mapping[str, Any]) -> None: ...

    def finish(self, message: str) -> None: ...


class SilentReporter:
    """For tests and library use: nothing on the terminal (the logs are still written)."""

    def start(self, method: str, first_epoch: int, last_epoch: int, steps_per_epoch: int) -> None:
        return None

    def step(self, losses: Mapping[str, float]) -> None:
        return None

    def epoch(self, row: Mapping[str, Any]) -> None:
        return None

    def finish(self, message: str) -> None:
        return None


class RichReporter:
    """A progress bar over all steps of the run and one summary line per epoch, on stderr."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task: Any = None

    def start(self, method: str, first_epoch: int, last_epoch: int, steps_per_epoch: int) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[losses]}"))
        self.progress = Progress(*columns, console=self.console, transient=True)
        self.progress.start()
        total = max(0, last_epoch - first_epoch + 1) * steps_per_epoch
        self.task = self.progress.add_task(f"{method} epoch {first_epoch}", total=total, losses="")

    def step(self, losses: Mapping[str, float]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, losses=_format(losses))

    def epoch(self, row: Mapping[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=f"epoch {int(row['epoch']) + 1}")
        shown = {k: v for k, v in row.items() if k not in ("epoch", "seconds")}
        self.console.print(f"epoch {row['epoch']}: {_format(shown)}")

    def finish(self, message: str) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.console.print(message)


def _format(values: Mapping[str, Any]) -> str:
    parts = []
    for key, value in values.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        else:
            parts.append(f"{key}={value}")
    return "  ".join(parts)


def write_metrics(run_dir: Path, history: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    """Rewrite ``metrics.csv`` (one row per epoch) and ``metrics.json`` (summary + history) from scratch.

    Rewriting from the checkpointed history, instead of appending, keeps the logs equal
    to the checkpoint after a crash between the two writes and a resume.
    """
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns]
    _atomic_write(run_dir / METRICS_CSV, _csv_text(columns, history))
    _atomic_write(run_dir / METRICS_JSON, json.dumps({**summary, "history": list(history)}, indent=2))


def _csv_text(columns: list[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_grid_png(path: Path, rows: Sequence[np.ndarray]) -> Path:
    """Tile rows of uint8 (n, P, P, C) patches into one PNG, on a mid-grey background.

    Patches smaller than 48 px are enlarged by an integer factor (nearest neighbour) so a
    9-px digit stays visible; rows of a smaller patch size (a BiGAN's pooled samples)
    are enlarged to the largest row's size.
    """
    side = max(row.shape[1] for row in rows)
    zoom = max(1, -(-MIN_PREVIEW_PX // side))
    cell = side * zoom
    columns = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (cell + GRID_GAP_PX) + GRID_GAP_PX, columns * (cell + GRID_GAP_PX) + GRID_GAP_PX, 3),
                     128, np.uint8)
    for r, row in enumerate(rows):
        factor = cell // row.shape[1]
        for c, patch in enumerate(row):
            big = patch.repeat(factor, axis=0).repeat(factor, axis=1)
            big = np.repeat(big, 3, axis=2) if big.shape[2] == 1 else big
            y, x = GRID_GAP_PX + r * (cell + GRID_GAP_PX), GRID_GAP_PX + c * (cell + GRID_GAP_PX)
            canvas[y : y + big.shape[0], x : x + big.shape[1]] = big
    Image.fromarray(canvas).save(path)
    return path
