"""Batches of training crops from compressed stores: NVIDIA DALI, or a PyTorch DataLoader.

Both loaders run the same per-sample function, :class:`CropSource`, in parallel worker
processes, and every random choice of a sample (its slide, centre and dihedral
transform) is a function of (seed, epoch, index in epoch) only. So whichever loader
runs, with however many workers, a seed gives the same crops in the same order, and a
resumed run gets exactly the crops it would have had.

DALI (``fn.external_source`` with ``parallel=True``) is used when installed: it keeps
the workers fed ahead of the step and, with a GPU, hands out device tensors. Without it
(macOS, a GPU machine missing the wheel) the DataLoader takes over with the same
semantics.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch

from nic_fast.train.reader import EmbeddingReader
from nic_fast.train.sampler import StoreSampler, read_crop

__all__ = ["Backend", "Batch", "CropLoader", "CropSource", "DaliCropLoader", "TorchCropLoader", "dali_available",
           "default_workers", "make_loader"]

Backend = Literal["auto", "dali", "torch"]
Batch = tuple[torch.Tensor, torch.Tensor]


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported here."""
    return importlib.util.find_spec("nvidia.dali") is not None


@dataclass
class CropSource:
    """Sample ``index`` of ``epoch``: a (crop_px, crop_px, C) float16 crop and its (1,) float32 label.

    An epoch holds ``crops_per_epoch`` samples: the slides repeated evenly, in an order
    shuffled per epoch. Picklable; each process opens the stores' embeddings lazily.
    ``first_epoch`` maps DALI's epoch counter (0 at pipeline start) onto the run's
    epochs, so a resumed run continues the sequence.
    """

    samplers: list[StoreSampler]
    labels: np.ndarray  # float32 (n_slides,)
    crop_px: int
    seed: int
    crops_per_epoch: int
    first_epoch: int = 0
    _readers: dict[int, EmbeddingReader] = field(default_factory=dict, repr=False, compare=False)
    _orders: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.samplers) != len(self.labels) or not self.samplers:
            raise ValueError(f"need one label per store and at least one store, got {len(self.samplers)} stores "
                             f"and {len(self.labels)} labels")
        codes = {s.code_size for s in self.samplers}
        if len(codes) != 1:
            raise ValueError(f"stores mix code sizes {sorted(codes)}: compress every slide with the same encoder")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"], state["_orders"] = {}, {}  # open Zarr handles stay in their own process
        return state

    @property
    def code_size(self) -> int:
        return self.samplers[0].code_size

    def slide_order(self, epoch: int) -> np.ndarray:
        """Which slide each sample of ``epoch`` comes from."""
        if epoch not in self._orders:
            repeated = np.resize(np.arange(len(self.samplers)), self.crops_per_epoch)
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(repeated)}
        return self._orders[epoch]

    def sample(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        slide = int(self.slide_order(epoch)[index])
        sampler = self.samplers[slide]
        spec = sampler.random_crop(np.random.default_rng([self.seed, epoch, index]), self.crop_px)
        crop = read_crop(self._embeddings(slide), spec, self.crop_px, sampler.background)
        return crop, self.labels[slide : slide + 1].astype(np.float32)

    def _embeddings(self, slide: int) -> Any:
        if slide not in self._readers:
            self._readers[slide] = EmbeddingReader(self.samplers[slide].path)
        return self._readers[slide]

    def __call__(self, info: Any) -> tuple[np.ndarray, np.ndarray]:
        """DALI's per-sample callback (``info`` is a ``nvidia.dali.types.SampleInfo``)."""
        if info.idx_in_epoch >= self.crops_per_epoch:
            raise StopIteration
        return self.sample(self.first_epoch + info.epoch_idx, info.idx_in_epoch)


class CropLoader(Protocol):
    """Yields the (crops NHWC float16, labels (N,) float32) batches of one epoch at a time."""

    def epoch(self, epoch: int) -> Iterator[Batch]: ...

    def close(self) -> None: ...


class DaliCropLoader:
    """DALI pipeline around :class:`CropSource`: parallel Python workers, CPU or GPU output.

    Epochs must be read whole and in order from ``source.first_epoch`` (DALI counts
    them itself); asking for another epoch is an error rather than silently other crops.
    """

    def __init__(self, source: CropSource, *, batch_size: int, workers: int, device: torch.device) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if source.crops_per_epoch % batch_size:
            raise ValueError(f"crops_per_epoch ({source.crops_per_epoch}) must be a multiple of the batch size "
                             f"({batch_size})")
        on_gpu = device.type == "cuda"
        # Forked workers must not inherit a CUDA context; once one exists, spawn them.
        start_method = "spawn" if torch.cuda.is_initialized() else "fork"
        self._pipe = _crop_pipeline(source, on_gpu, batch_size=batch_size, num_threads=1,
                                    device_id=(device.index or 0) if on_gpu else None,
                                    py_num_workers=max(1, workers), py_start_method=start_method,
                                    prefetch_queue_depth=2)
        self._pipe.build()
        self._iterator = DALIGenericIterator(self._pipe, ["crops", "labels"], auto_reset=True)
        self._next_epoch = source.first_epoch

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if epoch != self._next_epoch:
            raise ValueError(f"the DALI loader is at epoch {self._next_epoch}, asked for {epoch}: epochs are read in "
                             "order (build a new loader with first_epoch to jump)")
        self._next_epoch += 1
        for batch in self._iterator:
            yield batch[0]["crops"], batch[0]["labels"].reshape(-1)

    def close(self) -> None:
        """Stop the pipeline and its worker processes."""
        self._iterator = None
        self._pipe = None


def _crop_pipeline(source: CropSource, on_gpu: bool, **pipeline_args: Any) -> Any:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def crops_and_labels() -> tuple[Any, Any]:
        crops, labels = fn.external_source(source=source, num_outputs=2, batch=False, parallel=True,
                                           dtype=[types.FLOAT16, types.FLOAT], layout=["HWC", None])
        if on_gpu:
            return crops.gpu(), labels.gpu()
        return crops, labels

    return crops_and_labels(**pipeline_args)


class _EpochIndices(torch.utils.data.Sampler):
    """(epoch, index) pairs of the current epoch, so workers need no shared epoch state."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in range(self.length))

    def __len__(self) -> int:
        return self.length


class _CropDataset(torch.utils.data.Dataset):
    def __init__(self, source: CropSource) -> None:
        self.source = source

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        return self.source.sample(*key)

    def __len__(self) -> int:
        return self.source.crops_per_epoch


class TorchCropLoader:
    """PyTorch DataLoader around :class:`CropSource`: the fallback when DALI is absent."""

    def __init__(self, source: CropSource, *, batch_size: int, workers: int, device: torch.device) -> None:
        if source.crops_per_epoch % batch_size:
            raise ValueError(f"crops_per_epoch ({source.crops_per_epoch}) must be a multiple of the batch size "
                             f"({batch_size})")
        self._indices = _EpochIndices(source.crops_per_epoch)
        self._device = device
        self._loader = torch.utils.data.DataLoader(
            _CropDataset(source), batch_size=batch_size, sampler=self._indices, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=device.type == "cuda",
            prefetch_factor=2 if workers > 0 else None)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self._indices.epoch = epoch
        for crops, labels in self._loader:
            yield crops.to(self._device, non_blocking=True), labels.reshape(-1).to(self._device, non_blocking=True)

    def close(self) -> None:
        """Stop the worker processes."""
        self._loader = None


def make_loader(source: CropSource, *, batch_size: int, workers: int, device: torch.device,
                backend: Backend = "auto") -> CropLoader:
    """DALI when installed (or asked for), the PyTorch DataLoader otherwise (or when asked for)."""
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"loader backend must be auto, dali or torch, got {backend!r}")
    if backend == "dali" and not dali_available():
        raise RuntimeError("the DALI loader was asked for but nvidia.dali is not installed: "
                           "pip install nvidia-dali-cuda130, or use the torch loader")
    use_dali = backend == "dali" or (backend == "auto" and dali_available())
    loader_class = DaliCropLoader if use_dali else TorchCropLoader
    return loader_class(source, batch_size=batch_size, workers=workers, device=device)


def default_workers() -> int:
    """Loader worker processes: all cores but the one the training step uses, at least one."""
    return max(1, (os.cpu_count() or 2) - 1)
