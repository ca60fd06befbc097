"""`nic-fast compress`: a thin CLI over :func:`nic_fast.batch.run_batch`.

Exit codes: 0 every slide ok or skipped; 1 a slide failed (or is stale); 2 a bad command
line; 130 interrupted by Ctrl-C, 143 by SIGTERM — after writing the summary of what
finished, so the output folder always tells the truth.
"""
from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import click

from nic_fast.cli.cluster import ClusterDeviceType, dask_options, dask_target
from nic_fast.cli.options import BatchSizeParam, MppParam, output_option
from nic_fast.devices import DEVICE_CHOICES

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
TABLE_MAX_ROWS = 100  # longer batches print counts and the failures only


class Terminated(BaseException):
    """SIGTERM (a scheduler's kill, a preempted job): stop like Ctrl-C does."""


@contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _results_table(results: list, title: str):  # noqa: ANN202 - rich is imported lazily
    from rich.table import Table

    table = Table(title=title)
    for column in ("slide", "status", "grid", "tissue", "patches", "seconds", "patches/s", "invalid", "reason"):
        table.add_column(column, overflow="fold")
    style = {"ok": "green", "skipped": "yellow", "failed": "bold red", "stale": "bold magenta"}
    for r in results:
        table.add_row(Path(r.slide).name, f"[{style[r.status]}]{r.status}",
                      "×".join(map(str, r.grid_shape)) if r.grid_shape else "",
                      f"{r.tissue_fraction:.0%}" if r.tissue_fraction is not None else "", str(r.patches),
                      f"{r.seconds:.1f}", f"{r.patches_per_s:.0f}" if r.patches else "",
                      str(r.invalid_cells) if r.invalid_cells else "", r.reason)
    return table


def _workers_table(workers: list):  # noqa: ANN202
    from rich.table import Table

    table = Table(title="per worker")
    for column in ("worker", "ok", "failed", "skipped", "patches", "busy s", "patches/s", "restarts"):
        table.add_column(column)
    for w in workers:
        table.add_row(w.label, str(w.slides_ok), str(w.slides_failed), str(w.slides_skipped), str(w.patches),
                      f"{w.busy_s:.1f}", f"{w.patches_per_s:.0f}", str(w.restarts))
    return table


class _Display:
    """Progress bars on a terminal; one line per finished slide otherwise (logs, batch jobs)."""

    def __init__(self, total: int) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.interactive = self.console.is_terminal
        self.total = total
        self.done = 0
        self.bar = None
        self.tasks: dict[str, object] = {}

    def __enter__(self) -> _Display:
        if self.interactive:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True)
            self.bar.__enter__()
            self.slides_task = self.bar.add_task("slides", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)

    def event(self, event) -> None:  # noqa: ANN001 - a SchedulerEvent
        name = event.slide.name if event.slide else ""
        if event.kind == "died":
            self.console.print(f"[bold red]worker died[/] on {event.device} while compressing {name} "
                               f"(attempt {event.attempt}): {event.reason}")
        if event.kind == "done" and event.result is not None:
            self._finished(event.result)
        if self.bar is None or not event.device:
            return
        if event.device not in self.tasks:
            self.tasks[event.device] = self.bar.add_task(event.device, total=None)
        task = self.tasks[event.device]
        if event.kind == "planned":
            self.bar.reset(task, total=event.patches, description=f"{event.device} {name}")
        elif event.kind == "progress":
            self.bar.advance(task, event.patches)

    def _finished(self, result) -> None:  # noqa: ANN001 - a SlideResult
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.slides_task)
            if result.status in ("failed", "stale"):
                self.console.print(f"[bold red]{result.status}[/] {result.slide}: {result.reason}")
            return
        detail = result.reason or (f"{result.patches} patches, {result.seconds:.1f} s, {result.patches_per_s:.0f}/s"
                                   + (f", {result.invalid_cells} invalid cells" if result.invalid_cells else ""))
        click.echo(f"[{self.done}/{self.total}] {result.status} {result.slide}: {detail}", err=False)


@click.command()
@click.argument("slides", nargs=-1, type=click.Path(path_type=Path))
@output_option("out_dir", old_names=("--out",),
               help="Folder for the stores (<name>.zarr), their records, summary.json, QC images and report.html.")
@click.option("--slides-from", "slides_from", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Text file with one slide path per line (relative to the file's folder), for long "
                                 "lists; combined with SLIDES.")
@click.option("--recursive", is_flag=True, help="Find slides in sub-folders of folder arguments too.")
@click.option("--ext", default=None, metavar="svs,tif,...",
              help="File extensions that count as slides in folder arguments [default: the whole-slide formats "
                   "nic-fast reads].")
@click.option("--store-names", type=click.Choice(["stem", "relative"]), default="stem", show_default=True,
              help="Store name: the file name without extension, or the path below the slides' common folder "
                   "(for slides that share a file name).")
@click.option("--encoder", default="mean-rgb", show_default=True, help="Built-in name or encoder file (.pt, .pt2).")
@click.option("--mpp", default="encoder", show_default=True, type=MppParam(),
              help="Working resolution in µm/px [default: the encoder's, 0.5 for most]; 'none' reads plain images (PNG, JPEG, untiled TIFF) pixel for "
                   "pixel at level 0, grayscale kept as one channel (every cell encoded: there is no stain to find).")
@click.option("--patch-px", type=click.IntRange(1), default=None,
              help="Patch side in px [default: the encoder's input size, 128].")
@click.option("--stride-px", type=click.IntRange(1), default=None, help="Grid stride in px [default: the patch size].")
@click.option("--augment/--no-augment", default=False, show_default=True,
              help="Also compress the 8 dihedral variants (A = 8).")
@click.option("--batch-size", default="auto", show_default=True, type=BatchSizeParam(),
              help="Patches per encoder batch; auto: the largest batch whose forward fits the device's free "
                   "memory (measured by two trial batches), at most 128 on a CPU and 256 on a GPU.")
@click.option("--workers", default=None, type=click.IntRange(1),
              help="Reader threads per slide, each with its own slide handle [default: 2 on the CPU, every core "
                   "on a GPU, shared between GPUs].")
@click.option("--device", type=ClusterDeviceType(), metavar=DEVICE_CHOICES, default=None,
              help="Where the encoder runs [default: cpu]; --gpus runs one worker process per GPU.")
@click.option("--gpus", default=None, metavar="all|0,1,...",
              help="One worker process per listed GPU; slides are handed out largest first.")
@click.option("--reader", type=click.Choice(["auto", "cucim", "openslide", "tifffile"]), default="auto",
              show_default=True, help="Slide reader: auto picks per file; force one when a reader fails on your files.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="Encoder precision: auto = fp16 on a GPU; on a CPU bf16 only where a trial on the first "
                   "slide's patches shows it >= 1.3x faster and within 1e-2 of fp32. The error against fp32 is "
                   "stored in each store's attributes.")
@click.option("--compile", "compile_mode", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="torch.compile the encoder: auto when a slide's patches repay the compile time (measured and "
                   "cached per machine), on, or off.")
@click.option("--fast-path/--no-fast-path", default=True, show_default=True,
              help="Exact encoder rewrites (leading pool into patchify, BatchNorm folding), the bf16 trial and "
                   "compilation; --no-fast-path runs the encoder file as it is.")
@click.option("--decode", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="On a GPU run, where cuCIM decodes: cpu threads, the gpu, or auto (measured).")
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True,
              help="Replay the fixed-size encoder batch as a CUDA graph.")
@click.option("--slide-mpp", type=float, default=None, help="Scanned µm/px for all given slides (overrides metadata).")
@click.option("--slide-mpp-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV with columns slide,mpp giving each slide's scanned µm/px.")
@click.option("--tissue-masks", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of tissue masks to use instead of the automatic one: per slide <stem>.geojson (QuPath "
                   "annotations: Tissue or unclassified, minus Ignore*) or a binary <stem>.png/.tif at any size.")
@click.option("--min-tissue", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Tissue fraction a cell needs to be encoded.")
@click.option("--background", type=click.Choice(["blank", "zero"]), default="blank", show_default=True,
              help="What background cells hold: the embedding of a white patch, or zeros.")
@click.option("--overwrite", is_flag=True,
              help="Recompress slides whose store is complete (stores finished before this run started).")
@click.option("--lease", "lease_s", default=120.0, show_default=True, type=click.FloatRange(1),
              help="Seconds after which another process's silent claim on a slide is taken over.")
@click.option("--max-attempts", default=2, show_default=True, type=click.IntRange(1),
              help="Tries per slide when its worker process dies (a crash, out of memory).")
@click.option("--stuck-timeout", "stuck_s", default=600.0, show_default=True, type=click.FloatRange(1),
              help="Seconds without progress after which a worker is killed and its slide retried.")
@click.option("--qc/--no-qc", default=True, show_default=True,
              help="Draw OUT/qc/<name>.png per slide (tissue outline, encoded and invalid cells, scale bar) and "
                   "OUT/report.html.")
@click.option("--until-done/--no-until-done", default=None,
              help="Keep watching slides other processes hold until they are complete, taking over those whose "
                   "claim goes stale (a killed task's) [default: on inside a Slurm array task].")
@dask_options
@click.pass_context
def compress(ctx: click.Context, slides: tuple[Path, ...], out_dir: Path, slides_from: Path | None, recursive: bool,
             ext: str | None, store_names: str, encoder: str, mpp: float | str | None, patch_px: int | None,
             stride_px: int | None, augment: bool, batch_size: int | str, workers: int | None, device: str | None,
             gpus: str | None, reader: str, precision: str, compile_mode: str, fast_path: bool, decode: str,
             cuda_graph: bool, slide_mpp: float | None,
             slide_mpp_csv: Path | None, tissue_masks: Path | None, min_tissue: float, background: str, overwrite: bool, lease_s: float,
             max_attempts: int, stuck_s: float, qc: bool, until_done: bool | None, **cluster: object) -> None:
    """Compress whole-slide images into latent grids, one Zarr store per slide.

    SLIDES are files or folders (slides found inside by extension). Each slide runs in a
    supervised worker process: a crash costs that slide only. Several runs (or machines)
    may share one output folder: each slide is claimed by one process at a time. With
    --dask the slides run on a Dask cluster under the same contract.
    """
    from nic_fast.batch.inputs import (
        DEFAULT_EXTENSIONS,
        InputError,
        collect_slides,
        name_stores,
        read_slide_list,
    )
    from nic_fast.batch.slurm import in_array_task
    from nic_fast.job import CompressOptions, check_options
    from nic_fast.slides import SlideError

    if gpus is not None and device is not None:
        raise click.UsageError("--gpus picks the GPUs itself: leave out --device, or leave out --gpus")
    target = dask_target(cluster, gpus=gpus, device=device)
    if target is not None and target.kind == "slurm" and device is None:
        device = "cuda" if cluster["gpus_per_job"] else "cpu"
    if mpp is None and (slide_mpp is not None or slide_mpp_csv is not None):
        raise click.UsageError("--mpp none reads plain images in pixel units, which have no µm/px: leave out "
                               "--slide-mpp and --slide-mpp-csv, or give --mpp in µm/px")
    extensions = tuple(e.strip() for e in ext.split(",") if e.strip()) if ext else DEFAULT_EXTENSIONS
    try:
        inputs = list(slides) + (read_slide_list(slides_from) if slides_from else [])
        if not inputs:
            raise click.UsageError("give slides (files or folders) or --slides-from FILE")
        items = name_stores(collect_slides(inputs, recursive=recursive, extensions=extensions), store_names)
        options = CompressOptions(encoder=encoder, mpp=mpp, patch_px=patch_px, stride_px=stride_px, augment=augment,
                                  batch_size=batch_size, workers=workers, device="cuda" if gpus else device or "cpu",
                                  precision=precision, compile=compile_mode, fast_path=fast_path, decode=decode,
                                  cuda_graph=cuda_graph, reader=reader,
                                  slide_mpp=slide_mpp, slide_mpp_csv=slide_mpp_csv, overwrite=overwrite,
                                  tissue_masks=tissue_masks, min_tissue=min_tissue, background=background)
        check_options(options)
    except (InputError, ValueError, SlideError) as exc:
        raise click.UsageError(str(exc)) from exc
    devices = _devices(gpus, options.device) if target is None else None  # Dask workers bring their own
    _make_output_folder(out_dir)
    _run(ctx, options, items, out_dir, devices, dask=target, lease_s=lease_s, max_attempts=max_attempts,
         stuck_s=stuck_s, qc=qc, until_done=in_array_task() if until_done is None else until_done)


def _make_output_folder(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        blocker = next((p for p in [out_dir, *out_dir.parents] if p.exists() and not p.is_dir()), out_dir)
        raise click.UsageError(f"-o {out_dir}: cannot create the output folder: {blocker} is a file; "
                               "choose another folder") from exc
    except OSError as exc:
        raise click.UsageError(f"-o {out_dir}: cannot create the output folder ({exc.strerror or exc})") from exc


def _devices(gpus: str | None, device: str) -> list[str]:
    from nic_fast.batch.supervisor import SchedulerError, cuda_devices

    if gpus is None:
        return [device]  # --device was checked against this machine when parsed
    try:
        return cuda_devices(gpus)
    except SchedulerError as exc:
        raise click.UsageError(str(exc)) from exc


def _run(ctx: click.Context, options: object, items: list, out_dir: Path, devices: list[str] | None,
         **batch: object) -> None:
    from rich.console import Console

    from nic_fast.batch.run import run_batch
    from nic_fast.batch.supervisor import SchedulerError

    console = Console(stderr=True)
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    code = 0
    try:
        with _sigterm_as_exception(), _Display(len(items)) as display:
            outcome = run_batch(options, items, out_dir, devices=devices, command=command, on_event=display.event,
                                **batch)  # type: ignore[arg-type]
    except SchedulerError as exc:
        raise click.UsageError(str(exc)) from exc
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except Terminated:
        code = EXIT_TERMINATED
    if code:
        console.print(f"interrupted: finished slides are recorded in {out_dir / 'summary.json'}; rerun the same "
                      "command to resume (partial stores continue from their finished tiles)")
        ctx.exit(code)
    _report(outcome, out_dir, console)
    if outcome.summary_error:
        console.print(f"[bold red]could not write the summary[/]: {outcome.summary_error}; the per-slide records "
                      f"are in {out_dir / 'records'} (rebuild with `nic-fast summarize {out_dir}`)")
    failed = any(r.status in ("failed", "stale") for r in outcome.results)
    ctx.exit(EXIT_FAILED if failed or outcome.summary_error else 0)


def _report(outcome, out_dir: Path, console) -> None:  # noqa: ANN001
    from rich.console import Console

    results = outcome.results
    out = Console()
    if len(outcome.workers) > 1 or any(w.restarts for w in outcome.workers):
        out.print(_workers_table(outcome.workers))
    shown = results if len(results) <= TABLE_MAX_ROWS else [r for r in results if r.status in ("failed", "stale")]
    if shown:
        title = "nic-fast compress" if shown is results else f"nic-fast compress: the {len(shown)} slides not ok"
        out.print(_results_table(shown, title))
    counts = {status: sum(r.status == status for r in results) for status in ("ok", "skipped", "stale", "failed")}
    report = out_dir / "report.html"
    where = f"; summary: {out_dir / 'summary.json'}" + (f", report: {report}" if report.exists() else "")
    console.print(", ".join(f"{n} {status}" for status, n in counts.items() if n) + where)
