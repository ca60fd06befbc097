"""Slurm: job arrays of plain ``compress`` tasks, and Dask workers as Slurm jobs.

Two ways to use a Slurm cluster, both on a shared filesystem:

* **A job array** (:func:`array_script`): every task runs the same ``nic-fast compress
  --slides-from LIST -o OUT`` command. There is no cluster manager: the per-slide claims
  in ``OUT`` make each task take the next slide nobody holds, so tasks balance
  themselves; with ``--until-done`` (the default inside an array task) a task that runs
  out of slides keeps watching those other tasks hold, and takes over the slide of a
  task that was killed or preempted once its claim is older than the lease.
* **Dask on Slurm** (``compress --dask slurm``, :func:`open_slurm_cluster`): dask-jobqueue's
  ``SLURMCluster`` submits N jobs that each start Dask workers (one per GPU, tagged with
  a ``GPU`` resource) connected to a scheduler in the client's process.
"""
from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nic_fast.job import CompressOptions

__all__ = ["ARRAY_TASK_ENV", "SlurmJobs", "array_script", "dask_job_script", "in_array_task", "jobqueue_kwargs",
           "open_slurm_cluster"]

ARRAY_TASK_ENV = "SLURM_ARRAY_TASK_ID"  # set by Slurm in every task of a job array
SCHEDULER_PLACEHOLDER = "tcp://SCHEDULER:8786"


def in_array_task(environ: dict[str, str] | None = None) -> bool:
    """Whether this process runs inside a Slurm array task (``--until-done`` is then the default)."""
    return bool((os.environ if environ is None else environ).get(ARRAY_TASK_ENV, "").strip())


def array_script(*, slides_from: Path, out_dir: Path, tasks: int, concurrent: int | None = None,
                 gpus_per_task: int = 1, cpus_per_task: int = 8, memory: str = "32G", walltime: str = "24:00:00",
                 partition: str | None = None, account: str | None = None, job_name: str = "nic-fast",
                 log_dir: Path | None = None, lease_s: float = 120.0, compress_args: Sequence[str] = (),
                 command: Sequence[str] | None = None) -> str:
    """The sbatch file of a job array whose ``tasks`` tasks all run the same ``compress``.

    ``concurrent`` caps the tasks running at once (``--array=0-31%16``); ``command`` is how a
    node starts nic-fast (default: this Python with ``-m nic_fast``, which works on any node
    that sees the same installation).
    """
    if tasks < 1:
        raise ValueError(f"--tasks must be at least 1, got {tasks}")
    array = f"0-{tasks - 1}" + (f"%{concurrent}" if concurrent else "")
    directives = [f"--job-name={job_name}", f"--array={array}", f"--cpus-per-task={cpus_per_task}",
                  f"--mem={memory}", f"--time={walltime}"]
    if gpus_per_task:
        directives.insert(2, f"--gpus={gpus_per_task}")
    if partition:
        directives.append(f"--partition={partition}")
    if account:
        directives.append(f"--account={account}")
    if log_dir is not None:
        directives.append(f"--output={log_dir}/%x-%A_%a.out")
    device = ["--device", "cuda"] if gpus_per_task else ["--device", "cpu"]
    run = [*(command or [sys.executable, "-m", "nic_fast"]), "compress", "--slides-from", str(slides_from),
           "-o", str(out_dir), *device, "--until-done", "--lease", f"{lease_s:g}", *compress_args]
    lines = [
        "#!/usr/bin/env bash",
        "# nic-fast compress as a Slurm job array. Every task runs the same command: per-slide claims in the",
        "# output folder make each task take the next slide nobody holds, until none is left; a task that runs",
        "# out of slides waits on those other tasks hold, and takes over the slide of a killed or preempted",
        f"# task once its claim is older than the lease ({lease_s:g} s). Submit with: sbatch THIS_FILE",
        *(f"#SBATCH {directive}" for directive in directives),
        "set -euo pipefail",
        'echo "nic-fast array task ${SLURM_ARRAY_TASK_ID:-?} of job ${SLURM_ARRAY_JOB_ID:-?} on $(hostname)" >&2',
        "exec " + " ".join(shlex.quote(part) for part in run),
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class SlurmJobs:
    """What ``compress --dask slurm`` submits: ``jobs`` Slurm jobs of Dask workers."""

    jobs: int = 1
    gpus_per_job: int = 1  # 0: CPU workers (one per job)
    cpus_per_job: int = 8
    memory_per_job: str = "32GiB"
    walltime: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    interface: str | None = None  # network interface of scheduler and workers (ib0, eth0)
    job_extra: tuple[str, ...] = field(default_factory=tuple)  # more #SBATCH directives
    python: str = field(default_factory=lambda: sys.executable)
    log_dir: str | None = None


def jobqueue_kwargs(spec: SlurmJobs) -> dict[str, Any]:
    """Keyword arguments of dask-jobqueue's ``SLURMCluster`` / ``SLURMJob`` for ``spec``.

    One Dask worker process per GPU (``--nworkers G``), each tagged ``GPU=1`` and running
    one slide at a time; each gets ``cpus_per_job / G`` threads and an equal share of the
    job's memory (the nanny restarts a worker that outgrows it).
    """
    processes = max(1, spec.gpus_per_job)
    directives = [f"--gpus={spec.gpus_per_job}"] if spec.gpus_per_job else []
    kwargs: dict[str, Any] = {
        "name": "nic-fast-worker",
        "job_name": "nic-fast-dask",
        "cores": spec.cpus_per_job,
        "processes": processes,
        "memory": spec.memory_per_job,
        "walltime": spec.walltime,
        "queue": spec.partition,
        "account": spec.account,
        "interface": spec.interface,
        "python": spec.python,
        "job_extra_directives": [*directives, *spec.job_extra],
        "worker_extra_args": ["--resources", "GPU=1"] if spec.gpus_per_job else [],
        "log_directory": spec.log_dir,
    }
    return kwargs


def dask_job_script(spec: SlurmJobs, scheduler_address: str = SCHEDULER_PLACEHOLDER) -> str:
    """The job script ``compress --dask slurm`` submits per job (nothing is submitted here)."""
    _require_jobqueue()
    from dask_jobqueue.slurm import SLURMJob

    return SLURMJob(scheduler=scheduler_address, **jobqueue_kwargs(spec)).job_script()


def open_slurm_cluster(spec: SlurmJobs, options: CompressOptions) -> tuple[Any, CompressOptions]:
    """Start the scheduler here and submit ``spec.jobs`` worker jobs; (cluster, the workers' options)."""
    _require_jobqueue()
    from dask_jobqueue import SLURMCluster

    kwargs = jobqueue_kwargs(spec)
    scheduler_options = {"interface": spec.interface} if spec.interface else {}
    cluster = SLURMCluster(scheduler_options=scheduler_options, **kwargs)
    cluster.scale(jobs=spec.jobs)
    if options.workers is None:  # reader threads: the job's cores shared by its workers
        options = replace(options, workers=max(1, spec.cpus_per_job // max(1, spec.gpus_per_job)))
    return cluster, options


def _require_jobqueue() -> None:
    from nic_fast.batch.dask_cluster import CLUSTER_EXTRA, ClusterError, require_distributed

    require_distributed()
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError as exc:
        raise ClusterError(f"--dask slurm needs dask-jobqueue, which is not installed ({exc}); install it with "
                           f"{CLUSTER_EXTRA}") from exc
