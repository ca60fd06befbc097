"""`nic-fast heatmap`: Grad-CAM of a trained run over a whole store, drawn on the slide,
with GeoJSON contours and a float32 TIFF that viewers align with the slide."""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from nic_fast.annotations import write_geojson
from nic_fast.cli.options import device_option, output_option
from nic_fast.store import StoreError, open_store
from nic_fast.train.evaluate import predict_store
from nic_fast.train.fit import RunError, TrainedRun
from nic_fast.train.gradcam import jaccard, lesion_cells, mask_to_grid, slide_heatmap
from nic_fast.train.heatmap_files import (
    DISPLAY_MPP,
    MAX_DISPLAY_PX,
    heatmap_geojson,
    save_overlay,
    slide_background,
    write_heatmap_tiff,
)
from nic_fast.train.sampler import StoreSampler


@click.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@output_option("out_png", dir_okay=False, old_names=("--out",),
               help="PNG to write; beside it go .npy (raw map), .json (scores), .geojson (contours) and .tif "
                   "(float32 map in slide coordinates).")
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
@click.option("--display-mpp", default=DISPLAY_MPP, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="µm/px of the slide image the PNG is drawn on (coarser where --max-px requires).")
@click.option("--max-px", default=MAX_DISPLAY_PX, show_default=True, type=click.IntRange(min=256),
              help="Long side of the PNG's slide image at most.")
@device_option("Where the networks run.")
def heatmap(run_dir: Path, store: Path, out_png: Path, mask_path: Path | None, lesion_value: int | None,
            target: int | None, smooth_cells: float, display_mpp: float, max_px: int, device: str) -> None:
    """Grad-CAM on the first conv layer over STORE's whole grid, drawn on the slide it came from.

    Writes OUT.png (heatmap over the original slide read at --display-mpp, or over the
    store's thumbnail when the slide file is gone; white outline: post-processed heatmap,
    green: the mask; colour bar, legend, scale bar), OUT.npy (raw heatmap, float32
    (H', W'), one value per grid cell), OUT.geojson (QuPath annotations: contours at 25,
    50 and 75 % of the maximum, level-0 px), OUT.tif (the map as a float32 TIFF with its
    µm/px, one pixel per cell) and OUT.json (prediction, networks used, Jaccard, files).
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
    background = slide_background(slide, display_mpp=display_mpp, max_px=max_px)
    if background.note:
        click.echo(f"note: {slide.path.name}: {background.note}", err=True)
    save_overlay(out_png, background, slide, raw, predicted=predicted, truth=truth, title=title)
    np.save(out_png.with_suffix(".npy"), raw)
    write_geojson(out_png.with_suffix(".geojson"), heatmap_geojson(slide, raw, smooth_cells=smooth_cells))
    tiff_mpp = write_heatmap_tiff(out_png.with_suffix(".tif"), slide, raw)
    report = {"store": str(store), "networks": which, "target": target, "prediction": prediction.tolist(),
              "jaccard": score, "mask": str(mask_path) if mask_path else None,
              "overlay": {"drawn_on": background.source, "mpp": background.mpp,
                          "level0_px_per_px": background.level0_px_per_px, "note": background.note or None},
              "files": {kind: str(out_png.with_suffix(suffix)) for kind, suffix in
                        (("overlay", ".png"), ("raw", ".npy"), ("contours", ".geojson"), ("map", ".tif"))},
              "map_mpp": tiff_mpp}
    out_png.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    click.echo(f"{out_png}: {title} ({which})")
