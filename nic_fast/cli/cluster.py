"""`nic-fast cluster`: Slurm job files; and the `--dask` options that `compress` takes from here.

``nic-fast cluster slurm-script`` prints the sbatch file of a job array whose tasks all
run the same ``compress --slides-from`` (no cluster manager: per-slide claims balance
the tasks). ``nic-fast cluster dask-slurm-script`` prints the job script that
``compress --dask slurm`` would submit per Dask worker job.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from nic_fast.cli.options import DeviceType

SLURM_HELP = "With --dask slurm: "


def _slurm_job_options(prefix: str = "") -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """Options of the Dask-on-Slurm jobs, shared by `compress --dask slurm` and `dask-slurm-script`."""
    return [
        click.option("--jobs", default=1, show_default=True, type=click.IntRange(1),
                     help=f"{prefix}Slurm jobs of Dask workers to submit."),
        click.option("--gpus-per-job", default=1, show_default=True, type=click.IntRange(0),
                     help=f"{prefix}GPUs per job, one Dask worker each (0: one CPU worker per job)."),
        click.option("--cpus-per-job", default=8, show_default=True, type=click.IntRange(1),
                     help=f"{prefix}CPU cores per job."),
        click.option("--memory-per-job", default="32GiB", show_default=True, help=f"{prefix}Memory per job."),
        click.option("--partition", default=None, help=f"{prefix}Slurm partition (-p)."),
        click.option("--walltime", default="24:00:00", show_default=True, help=f"{prefix}Time limit per job."),
        click.option("--account", default=None, help=f"{prefix}Slurm account (-A)."),
        click.option("--interface", default=None, help=f"{prefix}Network interface of scheduler and workers (ib0)."),
        click.option("--job-extra", multiple=True, metavar="DIRECTIVE",
                     help=f"{prefix}More #SBATCH directives, e.g. --job-extra=--constraint=a100 (repeatable)."),
    ]


class ClusterDeviceType(DeviceType):
    """``--device`` of `compress`: checked against this machine, except with ``--dask``, whose
    workers bring their own devices (and this process, the client, never touches CUDA)."""

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if ctx is None or not ctx.params.get("dask"):
            return super().convert(value, param, ctx)
        text = str(value).strip().lower()
        if text not in ("cpu", "cuda"):
            self.fail(f"{value!r}: with --dask give cpu or cuda (each Dask worker uses its own GPU; pick this "
                      "machine's GPUs with --dask local --gpus 0,1)", param, ctx)
        return text


def dask_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The `--dask` options of `compress`; they arrive in its ``**cluster`` keyword arguments."""
    options = [
        click.option("--dask", "dask", default=None, metavar="ADDRESS|local[:N]|slurm", is_eager=True,
                     help="Run on a Dask cluster: a scheduler's address (tcp://host:8786), a local cluster of N "
                          "worker processes on 127.0.0.1 (default: one per GPU with --device cuda, else 1), or "
                          "Dask workers submitted as Slurm jobs (needs pip install 'nic-fast[cluster]')."),
        click.option("--dask-wait", "dask_wait_s", default=300.0, show_default=True, type=click.FloatRange(1),
                     help="Seconds to wait for a Dask worker (the first one, or a replacement when all left)."),
        *_slurm_job_options(SLURM_HELP),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def dask_target(cluster: dict[str, Any], *, gpus: str | None, device: str | None) -> Any:
    """The :class:`~nic_fast.batch.dask_cluster.DaskTarget` of `compress`'s `--dask` options, or None."""
    from nic_fast.batch.dask_cluster import ClusterError, local_gpus, parse_target, require_distributed
    from nic_fast.batch.slurm import SlurmJobs

    if cluster["dask"] is None:
        return None
    try:
        target = parse_target(cluster["dask"])
        require_distributed()
    except ClusterError as exc:
        raise click.UsageError(str(exc)) from exc
    wait_s = cluster["dask_wait_s"]
    if target.kind == "local":
        indices = _gpu_indices(gpus, local_gpus) if gpus is not None else ()
        return type(target)("local", n_workers=target.n_workers, gpus=indices, wait_s=wait_s)
    if gpus is not None:
        raise click.UsageError(f"--gpus picks GPUs of this machine; with --dask {cluster['dask']} the workers bring "
                               "their own: use --device cuda")
    if target.kind == "address":
        return type(target)("address", address=target.address, wait_s=wait_s)
    if cluster["gpus_per_job"] and device == "cpu":
        raise click.UsageError("--dask slurm --device cpu: give --gpus-per-job 0 for CPU workers")
    if not cluster["gpus_per_job"] and device == "cuda":
        raise click.UsageError("--dask slurm --device cuda needs --gpus-per-job 1 (or more)")
    spec = SlurmJobs(jobs=cluster["jobs"], gpus_per_job=cluster["gpus_per_job"], cpus_per_job=cluster["cpus_per_job"],
                     memory_per_job=cluster["memory_per_job"], walltime=cluster["walltime"],
                     partition=cluster["partition"], account=cluster["account"], interface=cluster["interface"],
                     job_extra=tuple(cluster["job_extra"]))
    return type(target)("slurm", slurm=spec, wait_s=wait_s)


def _gpu_indices(gpus: str, count: Callable[[], int]) -> tuple[int, ...]:
    """``--gpus all|0,1`` for ``--dask local``, checked against the GPUs found without CUDA."""
    available = count()
    if available == 0:
        raise click.UsageError(f"--gpus {gpus}: no GPU found (nvidia-smi, CUDA_VISIBLE_DEVICES); compress on the "
                               "CPU with --device cpu (and leave out --gpus)")
    if gpus.strip().lower() == "all":
        return tuple(range(available))
    try:
        indices = tuple(int(part) for part in gpus.split(",") if part.strip())
    except ValueError as exc:
        raise click.UsageError(f"--gpus {gpus!r}: give 'all' or device indices such as 0,1") from exc
    missing = [i for i in indices if not 0 <= i < available]
    if not indices or len(set(indices)) != len(indices) or missing:
        raise click.UsageError(f"--gpus {gpus}: give 'all' or distinct indices of this machine's {available} "
                               f"GPU(s) (0..{available - 1})")
    return indices


@click.group()
def cluster() -> None:
    """Job files for clusters: Slurm job arrays, Dask workers on Slurm."""


@cluster.command("slurm-script")
@click.option("--slides-from", required=True, type=click.Path(path_type=Path),
              help="The slide list every task reads (on the shared filesystem).")
@click.option("-o", "--output", "--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="The shared output folder of all tasks.")
@click.option("--tasks", default=32, show_default=True, type=click.IntRange(1), help="Array tasks.")
@click.option("--concurrent", default=None, type=click.IntRange(1),
              help="At most this many tasks at once (--array=0-31%16).")
@click.option("--gpus-per-task", default=1, show_default=True, type=click.IntRange(0),
              help="GPUs per task (0: compress on the CPU).")
@click.option("--cpus-per-task", default=8, show_default=True, type=click.IntRange(1))
@click.option("--mem", "memory", default="32G", show_default=True, help="Memory per task.")
@click.option("--partition", default=None, help="Slurm partition.")
@click.option("--walltime", default="24:00:00", show_default=True, help="Time limit per task.")
@click.option("--account", default=None, help="Slurm account.")
@click.option("--job-name", default="nic-fast", show_default=True)
@click.option("--log-dir", default=None, type=click.Path(path_type=Path),
              help="Folder for the tasks' logs (must exist when the job starts) [default: Slurm's].")
@click.option("--lease", "lease_s", default=120.0, show_default=True, type=click.FloatRange(1),
              help="Seconds after which a silent task's slide is taken over.")
@click.argument("compress_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- COMPRESS OPTIONS...]")
def slurm_script(slides_from: Path, out_dir: Path, tasks: int, concurrent: int | None, gpus_per_task: int,
                 cpus_per_task: int, memory: str, partition: str | None, walltime: str, account: str | None,
                 job_name: str, log_dir: Path | None, lease_s: float, compress_args: tuple[str, ...]) -> None:
    """Print the sbatch file of a job array whose tasks all run the same `compress`.

    Options after `--` go to `compress` (e.g. -- --encoder bigan.pt --augment). Paths are
    made absolute: tasks start in the submission folder, on other nodes.
    """
    from nic_fast.batch.slurm import array_script

    script = array_script(slides_from=slides_from.absolute(), out_dir=out_dir.absolute(), tasks=tasks,
                          concurrent=concurrent, gpus_per_task=gpus_per_task, cpus_per_task=cpus_per_task,
                          memory=memory, walltime=walltime, partition=partition, account=account, job_name=job_name,
                          log_dir=log_dir.absolute() if log_dir else None, lease_s=lease_s,
                          compress_args=list(compress_args))
    click.echo(script, nl=False)


def _dask_slurm_script_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_slurm_job_options()):
        command = option(command)
    return command


@cluster.command("dask-slurm-script")
@click.option("--scheduler", "scheduler_address", default="tcp://SCHEDULER:8786", show_default=True,
              help="Scheduler address written into the script (compress --dask slurm fills in its own).")
@_dask_slurm_script_options
def dask_slurm_script(scheduler_address: str, jobs: int, gpus_per_job: int, cpus_per_job: int, memory_per_job: str,
                      partition: str | None, walltime: str, account: str | None, interface: str | None,
                      job_extra: tuple[str, ...]) -> None:
    """Print the job script `compress --dask slurm` submits for each of its --jobs (submits nothing)."""
    from nic_fast.batch.dask_cluster import ClusterError
    from nic_fast.batch.slurm import SlurmJobs, dask_job_script

    spec = SlurmJobs(jobs=jobs, gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job, memory_per_job=memory_per_job,
                     walltime=walltime, partition=partition, account=account, interface=interface,
                     job_extra=tuple(job_extra))
    try:
        click.echo(dask_job_script(spec, scheduler_address))
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from exc
