"""Many slides: store names, per-slide claims and records, the summary, worker supervision.

Arrows point one way: the CLI and the cluster launchers call :func:`run_batch`; it uses
:mod:`~nic_fast.batch.supervisor` (worker processes) and :mod:`~nic_fast.batch.slide`
(one slide: skip, stale, claim, compress, record), which use :mod:`nic_fast.compress`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the claims/records/inputs modules stay importable without torch (cluster clients)
    from nic_fast.batch.run import BatchOutcome
    from nic_fast.job import CompressOptions

__all__ = ["compress_slides"]


def compress_slides(slides: Sequence[str | Path], out_dir: str | Path, options: CompressOptions | None = None, *,
                    store_names: str = "stem", devices: Sequence[str] | None = None, **kwargs: Any) -> BatchOutcome:
    """Compress slides (files or folders) into ``out_dir`` under the batch contract.

    ``devices=None`` runs in this process; ``["cpu"]`` or CUDA devices run supervised
    worker processes (a native crash then costs one slide). ``kwargs`` go to :func:`run_batch`.
    """
    from nic_fast.batch.inputs import collect_slides, name_stores
    from nic_fast.batch.run import run_batch
    from nic_fast.job import CompressOptions

    items = name_stores(collect_slides([Path(s) for s in slides]), store_names)
    return run_batch(options or CompressOptions(), items, Path(out_dir), devices=devices, **kwargs)
