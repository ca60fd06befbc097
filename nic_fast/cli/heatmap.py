"""`nic-fast heatmap`: Grad-CAM of a trained run over a whole store, drawn on its thumbnail."""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from nic_fast.store import StoreError, open_store
from nic_fast.train.evaluate import predict_store
from nic_fast.train.fit import RunError, TrainedRun
from nic_fast.train.gradcam import jaccard, lesion_cells, mask_to_grid, save_overlay, slide_heatmap
from nic_fast.train.sampler import StoreSampler


@click.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", "out_png", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG to write; the raw heatmap goes beside it as .npy and the scores as .json.")
@click.option("--mask", "mask_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Ground-truth lesion mask image (non-zero = lesion), e.g. synth's <slide>_mask.png: "
                   "reports the Jaccard index of the post-processed heatmap.")
@click.option("--mask-value", "lesion_value", default=None, type=click.IntRange(1, 255),
              help="Only this mask value is lesion [default: any non-zero], e.g. 1 for the tilted rectangle of "
                   "synth mnist-rectangles masks (2 is the distractor).")
@click.option("--class", "target", default=None, type=click.IntRange(0),
              help="Class to explain (multi-class runs) [default: the predicted class].")
@click.option("--smooth-cells", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Gaussian blur (standard deviation, grid cells) before the post-processing threshold; "
                   "helps where the evidence is sparse cells inside the region (the synthetic digit canvases).")
@click.option("--device", default="cpu", show_default=True)
def heatmap(run_dir: Path, store: Path, out_png: Path, mask_path: Path | None, lesion_value: int | None,
            target: int | None, smooth_cells: float, device: str) -> None:
    """Grad-CAM on the first conv layer over STORE's whole grid, upsampled onto its thumbnail.

    Writes OUT.png (heatmap over the thumbnail; white outline: post-processed heatmap,
    green: the mask), OUT.npy (raw heatmap, float32 (H', W'), one value per grid cell)
    and OUT.json (prediction, networks used, Jaccard).
    """
    try:
        run = TrainedRun.open(run_dir)
        slide = open_store(store)
        models, which = run.models_for(store, device)
        prediction = predict_store(models, StoreSampler(slide), crop_px=run.config.crop_px,
                                   crops=run.config.tta_crops, device=device)
        outputs = models[0].network.config.outputs
        if target is None:
            target = int(prediction.argmax()) if run.config.task == "multiclass" else 0
        elif target >= outputs:
            raise click.ClickException(f"--class {target}: the run's networks have {outputs} output(s), "
                                       f"classes 0..{outputs - 1}")
        raw = slide_heatmap(models, slide, target=target, device=device)
        predicted = lesion_cells(raw, slide.tissue, smooth_cells=smooth_cells)
        truth = mask_to_grid(mask_path, slide, lesion_value) if mask_path else None
    except (RunError, StoreError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    score = jaccard(predicted, truth) if truth is not None else None
    shown = float(prediction.max()) if run.config.task == "multiclass" else float(prediction)
    title = f"{slide.path.name}: prediction {shown:.3f}" + (f", Jaccard {score:.3f}" if score is not None else "")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    save_overlay(out_png, slide, raw, predicted=predicted, truth=truth, title=title)
    np.save(out_png.with_suffix(".npy"), raw)
    report = {"store": str(store), "networks": which, "target": target, "prediction": prediction.tolist(),
              "jaccard": score, "mask": str(mask_path) if mask_path else None}
    out_png.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    click.echo(f"{out_png}: {title} ({which})")
