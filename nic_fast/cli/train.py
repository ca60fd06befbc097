"""`nic-fast train`: cross-validated training of the NIC CNN on compressed stores."""
from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from nic_fast.cli.options import AliasedOption, device_option, output_option
from nic_fast.store import StoreError
from nic_fast.train.data import TASKS, InputError, Rotation, Task, read_inputs
from nic_fast.train.evaluate import DEFAULT_TTA_CROPS, MetricResult
from nic_fast.train.fit import (
    CrossValidation,
    EpochLog,
    FitConfig,
    FitObserver,
    RunError,
    RunOptions,
    cross_validate,
)
from nic_fast.train.loader import Backend, dali_available, default_workers
from nic_fast.train.model import PAPER_STRIDES, checked_strides


class _ProgressObserver(FitObserver):
    """Epoch and step bars per rotation, and one line per finished rotation."""

    def __init__(self, progress: Progress, console: Console) -> None:
        self.progress, self.console = progress, console
        self.epochs: TaskID = progress.add_task("epochs", total=None)
        self.steps: TaskID = progress.add_task("steps", total=None)

    def rotation_started(self, rotation: Rotation, first_epoch: int, epochs: int, steps_per_epoch: int) -> None:
        self.progress.reset(self.epochs, total=epochs, completed=first_epoch,
                            description=f"rotation {rotation.index} epochs")
        self.progress.reset(self.steps, total=steps_per_epoch, description="steps")

    def step_done(self, rotation: Rotation, loss: float) -> None:
        self.progress.update(self.steps, advance=1, description=f"steps (loss {loss:.3f})")

    def epoch_done(self, rotation: Rotation, log: EpochLog) -> None:
        self.progress.update(self.epochs, advance=1, description=(
            f"rotation {rotation.index} epochs (val loss {log.val_loss:.3f}, metric {log.val_metric:.3f}, "
            f"lr {log.learning_rate:.0e}, {log.crops_per_s:.0f} crops/s)"))
        self.progress.reset(self.steps)

    def rotation_done(self, rotation: Rotation, result: MetricResult) -> None:
        self.console.print(f"rotation {rotation.index}: test {result}")


def _parse_strides(_context: click.Context, _parameter: click.Parameter, value: str) -> tuple[int, ...]:
    """``1,1,2`` → (1, 1, 2); a usage error naming --strides otherwise."""
    try:
        return checked_strides(int(part) for part in value.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: {exc} (comma-separated, e.g. 1,1,2)") from exc


def _summary(result: CrossValidation, run_dir: Path) -> Table:
    table = Table(title=f"nic-fast train → {run_dir}")
    for column in ("rotation", "test slides", "metric", "95 % CI"):
        table.add_column(column)
    for index, m in enumerate(result.per_rotation):
        table.add_row(str(index), str(m.n), f"{m.name} {m.value:.3f}", f"{m.low:.3f}-{m.high:.3f}")
    p = result.pooled
    table.add_row("[bold]All", f"[bold]{p.n}", f"[bold]{p.name} {p.value:.3f}", f"[bold]{p.low:.3f}-{p.high:.3f}")
    return table


@click.command()
@click.argument("csv_path", metavar="CSV", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@output_option("run_dir", file_okay=False, old_names=("--out",),
               help="Run folder: config, folds, logs, checkpoints, predictions, metrics. Rerun to resume.")
@click.option("--stores", "stores_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder `nic-fast compress -o` wrote: lets CSV name slides (column slide, e.g. synth's "
                   "labels.csv) instead of stores.")
@click.option("--task", type=click.Choice(TASKS), default="binary", show_default=True)
@click.option("--crop-cells", "crop_cells", cls=AliasedOption, hidden_aliases=("--crop-px",), default=400,
              show_default=True, type=click.IntRange(1),
              help="Training crop side in grid cells (pixels of the compressed image; the paper's 400).")
@click.option("--folds", default=4, show_default=True, type=click.IntRange(3),
              help="Partitions: each rotation trains on folds-2, validates on 1, tests on 1.")
@click.option("--epochs", default=50, show_default=True, type=click.IntRange(1), help="At most this many epochs.")
@click.option("--crops-per-slide", default=16, show_default=True, type=click.IntRange(1),
              help="Training crops per slide per epoch.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(2))
@click.option("--lr", "learning_rate", default=1e-2, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Initial learning rate (÷10 on validation plateaus down to 1e-5).")
@click.option("--tta-crops", default=DEFAULT_TTA_CROPS, show_default=True, type=click.IntRange(1),
              help="Test crops per slide, each under the 8 dihedral transforms.")
@click.option("--strides", default=",".join(map(str, PAPER_STRIDES)), show_default=True, metavar="LIST",
              callback=_parse_strides,
              help="Stride (1 or 2) of each separable conv block, comma-separated; the count sets the depth. The "
                   "default is the paper's network, for whole-slide grids. Small grids need fewer stride-2 layers "
                   "(six shrink a 60x60-cell canvas to 1x1), e.g. 1,1,2.")
@click.option("--dropout", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Channel dropout after each conv block: the paper's 0.2; try 0 on small grids, where 0.2 kept "
                   "the synthetic MNIST benchmark at chance.")
@click.option("--filters", default=128, show_default=True, type=click.IntRange(1),
              help="Filters of every conv block and width of the dense layer (the paper's 128).")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same folds, crops and weights.")
@device_option("Where the network trains (and DALI hands out crops, on a GPU).")
@click.option("--loader", type=click.Choice(["auto", "dali", "torch"]), default="auto", show_default=True,
              help="Crop loader: DALI when installed (auto), or the PyTorch DataLoader.")
@click.option("--workers", default=default_workers(), show_default=True, type=click.IntRange(0),
              help="Loader worker processes (DALI needs at least 1).")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="PyTorch CPU threads [default: the cores the loader workers leave free].")
def train(csv_path: Path, run_dir: Path, stores_dir: Path | None, task: Task, crop_cells: int, folds: int, epochs: int,
          crops_per_slide: int, batch_size: int, learning_rate: float, tta_crops: int, strides: tuple[int, ...],
          dropout: float, filters: int, seed: int, device: str, loader: Backend, workers: int,
          threads: int | None) -> None:
    """Cross-validated training on compressed stores listed in CSV (columns store,label[,fold]).

    Every slide is predicted by the network of the rotation that held it out; the pooled
    ("All") metric gets a bootstrap 95 % interval. Writes RUN/metrics.json and
    RUN/predictions.csv; running the same command again resumes an interrupted run.
    """
    console = Console(stderr=True)
    try:
        records = read_inputs(csv_path, task, stores_dir=stores_dir)
        config = FitConfig(task=task, crop_px=crop_cells, folds=folds, epochs=epochs, batch_size=batch_size,
                           crops_per_slide=crops_per_slide, learning_rate=learning_rate,
                           min_learning_rate=min(1e-5, learning_rate), tta_crops=tta_crops, seed=seed,
                           strides=strides, dropout=dropout, filters=filters)
        options = RunOptions(device=device, loader=loader, workers=workers, threads=threads)
        uses_dali = loader == "dali" or (loader == "auto" and dali_available())
        console.print(f"{len(records)} slides, {task}, loader: {'DALI' if uses_dali else 'PyTorch'}")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            result = cross_validate(records, config, run_dir, options, _ProgressObserver(progress, console))
    except (InputError, RunError, StoreError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    Console().print(_summary(result, run_dir))
    click.echo(f"All: {result.pooled}")
