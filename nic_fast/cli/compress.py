"""`nic-fast compress`: a thin CLI over :class:`nic_fast.compress.Compressor`."""
from __future__ import annotations

import sys
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
    TimeRemainingColumn,
)
from rich.table import Table

from nic_fast.compress import DECODERS, PRECISIONS, CompressOptions, Compressor, SlideResult
from nic_fast.batch.supervisor import DeviceSummary, Scheduler, SchedulerError, SchedulerEvent, cuda_devices


class MppParam(click.ParamType):
    """``--mpp``: a working resolution in µm/px, or ``none`` for plain images in pixel units."""

    name = "µm/px|none"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float | None:
        if value is None or isinstance(value, float):
            return value
        text = str(value).strip().lower()
        if text == "none":
            return None
        try:
            mpp = float(text)
        except ValueError:
            self.fail(f"{value!r} is neither a µm/px value nor 'none'", param, ctx)
        if not mpp > 0:
            self.fail(f"µm/px must be positive, got {value!r}", param, ctx)
        return mpp


def _results_table(results: list[SlideResult]) -> Table:
    table = Table(title="nic-fast compress")
    for column in ("slide", "status", "grid", "tissue", "patches", "seconds", "patches/s", "reason"):
        table.add_column(column, overflow="fold")
    style = {"ok": "green", "skipped": "yellow", "failed": "bold red"}
    for r in results:
        table.add_row(Path(r.slide).name, f"[{style[r.status]}]{r.status}",
                      "×".join(map(str, r.grid_shape)) if r.grid_shape else "",
                      f"{r.tissue_fraction:.0%}" if r.tissue_fraction is not None else "", str(r.patches),
                      f"{r.seconds:.1f}", f"{r.patches_per_s:.0f}" if r.patches else "", r.reason)
    return table


def _devices_table(devices: list[DeviceSummary]) -> Table:
    table = Table(title="per device")
    for column in ("device", "ok", "failed", "patches", "busy s", "wall s", "patches/s", "restarts"):
        table.add_column(column)
    for d in devices:
        table.add_row(d.device, str(d.slides_ok), str(d.slides_failed), str(d.patches), f"{d.busy_s:.1f}",
                      f"{d.wall_s:.1f}", f"{d.patches_per_s:.0f}", str(d.restarts))
    return table


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True)


def _run_single(options: CompressOptions, slides: list[Path], out_dir: Path, console: Console) -> list[SlideResult]:
    """One compressor in this process (``--device cpu`` or ``--device cuda``)."""
    try:
        compressor = Compressor(options)
    except (ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    with _progress() as bar:
        slides_task = bar.add_task("slides", total=len(slides))
        patches_task = bar.add_task("patches", total=None)

        def on_start(slide: Path, patches: int) -> None:
            bar.reset(patches_task, total=patches, description=f"patches of {slide.name}")

        def on_done(result: SlideResult) -> None:
            bar.advance(slides_task)
            if result.status == "failed":
                console.print(f"[bold red]failed[/] {result.slide}: {result.reason}")

        return compressor.run(slides, out_dir, on_slide_start=on_start,
                              progress=lambda n: bar.advance(patches_task, n), on_slide_done=on_done)


def _run_gpus(options: CompressOptions, gpus: str, slides: list[Path], out_dir: Path,
              console: Console) -> tuple[list[SlideResult], list[DeviceSummary]]:
    """One worker process per GPU, slides handed out largest first."""
    try:
        devices = cuda_devices(gpus)
    except SchedulerError as exc:
        raise click.ClickException(str(exc)) from exc
    with _progress() as bar:
        slides_task = bar.add_task("slides", total=len(slides))
        device_tasks: dict[str, TaskID] = {}

        def on_event(event: SchedulerEvent) -> None:
            if event.device not in device_tasks:
                device_tasks[event.device] = bar.add_task(event.device, total=None)
            task = device_tasks[event.device]
            name = event.slide.name if event.slide else ""
            if event.kind == "planned":
                bar.reset(task, total=event.patches, description=f"{event.device} {name}")
            elif event.kind == "progress":
                bar.advance(task, event.patches)
            elif event.kind == "died":
                console.print(f"[bold red]worker died[/] on {event.device} while compressing {name}: {event.reason}")
            elif event.kind == "done" and event.result is not None:
                bar.advance(slides_task)
                if event.result.status == "failed":
                    console.print(f"[bold red]failed[/] {event.result.slide}: {event.result.reason}")

        return Scheduler(options, devices, on_event=on_event).run(slides, out_dir)


@click.command()
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the stores (<slide-stem>.zarr) and summary.json.")
@click.option("--encoder", default="mean-rgb", show_default=True, help="Built-in name or encoder file (.pt, .pt2).")
@click.option("--mpp", default=0.5, show_default=True, type=MppParam(),
              help="Working resolution in µm/px; 'none' reads plain images (PNG, JPEG, untiled TIFF) pixel for "
                   "pixel at level 0, grayscale kept as one channel (every cell encoded: there is no stain to find).")
@click.option("--patch-px", type=int, default=None, help="Patch side in px [default: the encoder's input size, 128].")
@click.option("--stride-px", type=int, default=None, help="Grid stride in px [default: the patch size].")
@click.option("--augment/--no-augment", default=False, show_default=True,
              help="Also compress the 8 dihedral variants (A = 8).")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=None, type=click.IntRange(1),
              help="Reader threads per slide, each with its own slide handle [default: 2 on the CPU, every core "
                   "on a GPU, shared between GPUs].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where the encoder runs, in this process [default: cpu]; --gpus runs one process per GPU.")
@click.option("--gpus", default=None, metavar="all|0,1,...",
              help="One worker process per listed GPU; slides are handed out largest first.")
@click.option("--precision", type=click.Choice(["auto", *PRECISIONS]), default="auto", show_default=True,
              help="Encoder precision: auto = fp32 on the CPU, fp16 on a GPU; the error against fp32 is "
                   "measured per slide and stored in its attributes.")
@click.option("--decode", type=click.Choice(DECODERS), default="auto", show_default=True,
              help="On a GPU run, where cuCIM decodes: cpu threads, the gpu, or auto (measured once per format).")
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True,
              help="Replay the fixed-size encoder batch as a CUDA graph.")
@click.option("--slide-mpp", type=float, default=None, help="Scanned µm/px for all given slides (overrides metadata).")
@click.option("--slide-mpp-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV with columns slide,mpp giving each slide's scanned µm/px.")
@click.option("--min-tissue", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Tissue fraction a cell needs to be encoded.")
@click.option("--background", type=click.Choice(["blank", "zero"]), default="blank", show_default=True,
              help="What background cells hold: the embedding of a white patch, or zeros.")
@click.option("--overwrite", is_flag=True, help="Recompress slides whose store is already complete.")
def compress(slides: tuple[Path, ...], out_dir: Path, encoder: str, mpp: float | None, patch_px: int | None,
             stride_px: int | None, augment: bool, batch_size: int, workers: int | None, device: str | None,
             gpus: str | None, precision: str, decode: str, cuda_graph: bool, slide_mpp: float | None,
             slide_mpp_csv: Path | None, min_tissue: float, background: str, overwrite: bool) -> None:
    """Compress whole-slide images into latent grids, one Zarr store per slide.

    A failed slide is reported and skipped; the exit code is 1 when any slide failed.
    """
    if gpus is not None and device == "cpu":
        raise click.UsageError("--gpus runs the encoder on GPUs: leave out --device cpu, or leave out --gpus")
    if mpp is None and (slide_mpp is not None or slide_mpp_csv is not None):
        raise click.UsageError("--mpp none reads plain images in pixel units, which have no µm/px: leave out "
                               "--slide-mpp and --slide-mpp-csv, or give --mpp in µm/px")
    options = CompressOptions(encoder=encoder, mpp=mpp, patch_px=patch_px, stride_px=stride_px, augment=augment,
                              batch_size=batch_size, workers=workers, device="cuda" if gpus else device or "cpu",
                              precision=precision, decode=decode, cuda_graph=cuda_graph, slide_mpp=slide_mpp,
                              slide_mpp_csv=slide_mpp_csv, overwrite=overwrite, min_tissue=min_tissue,
                              background=background)
    console = Console(stderr=True)
    if gpus is None:
        results = _run_single(options, list(slides), out_dir, console)
    else:
        results, devices = _run_gpus(options, gpus, list(slides), out_dir, console)
        Console().print(_devices_table(devices))
    Console().print(_results_table(results))
    console.print(f"summary: {out_dir / 'summary.json'}")
    if any(r.status == "failed" for r in results):
        sys.exit(1)
