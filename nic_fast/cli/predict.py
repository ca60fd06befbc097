"""`nic-fast predict`: slide predictions of a trained run, with test-time augmentation."""
from __future__ import annotations

import csv
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from nic_fast.cli.options import device_option, output_option
from nic_fast.store import StoreError
from nic_fast.train.evaluate import predict_store
from nic_fast.train.fit import RunError, TrainedRun
from nic_fast.train.sampler import StoreSampler


def _prediction_fields(task: str, prediction: np.ndarray) -> dict[str, str]:
    if task == "multiclass":
        return {"prediction": str(int(prediction.argmax())), **{f"p_{k}": f"{p:.6g}" for k, p in enumerate(prediction)}}
    return {"prediction": f"{float(prediction):.6g}"}


@click.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("stores", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@output_option("out_csv", dir_okay=False, old_names=("--out",), help="CSV with one row per store.")
@click.option("--tta-crops", type=click.IntRange(1), default=None,
              help="Test crops per slide (× 8 transforms) [default: the run's].")
@device_option("Where the networks run.")
def predict(run_dir: Path, stores: tuple[Path, ...], out_csv: Path, tta_crops: int | None, device: str) -> None:
    """Predict stores with a trained run: P(label 1), the class and its probabilities, or the value.

    A slide of the run is predicted by the network that held it out (its cross-validated
    prediction); any other slide by the mean of all rotations' networks.
    """
    try:
        run = TrainedRun.open(run_dir)
        rows = []
        with Progress(console=Console(stderr=True), transient=True) as progress:
            for store in progress.track(stores, description="predicting"):
                models, which = run.models_for(store, device)
                prediction = predict_store(models, StoreSampler.open(store), crop_px=run.config.crop_px,
                                           crops=tta_crops or run.config.tta_crops, device=device)
                rows.append({"store": str(store), **_prediction_fields(run.config.task, prediction), "networks": which})
    except (RunError, StoreError) as exc:
        raise click.ClickException(str(exc)) from exc
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = Table(title=f"nic-fast predict → {out_csv}")
    for column in ("store", "prediction", "networks"):
        table.add_column(column)
    for row in rows:
        table.add_row(Path(row["store"]).name, row["prediction"], row["networks"])
    Console().print(table)
