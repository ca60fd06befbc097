"""Regions decoded from a level's JPEG tiles in batches with nvImageCodec.

The CPU decoders (cuCIM, tifffile, OpenSlide) decode a region tile by tile on one core
each; a GPU has hardware JPEG engines (NVJPG: A100, H100, H200) and, everywhere, a CUDA
JPEG decoder, fed a batch of streams at once. :class:`TileRegionReader` takes the tiles
a region needs as stand-alone streams (:mod:`nic_fast.slides.jpeg_tiles`: tables
spliced in, Aperio's RGB coding marked), decodes them in one nvImageCodec call and
places each tile's part in the region: on the device for the patchify kernel, or on the
host with nvImageCodec's CPU backend (libjpeg-turbo), which needs no GPU and is how the
tests run this path.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nic_fast.slides.base import WHITE, SlideError
from nic_fast.slides.jpeg_tiles import JpegLevel, TilePiece, place

__all__ = ["NvImageCodec", "TileRegionReader", "nvimgcodec_available"]

RGB = 3


def nvimgcodec_available() -> bool:
    """True where nvImageCodec (``nvidia-nvimgcodec-cu13``, the ``gpu`` extra) imports."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


class NvImageCodec:
    """nvImageCodec's batch JPEG decoder.

    On a GPU (``device_index``) it may use the hardware engines where the GPU has them
    and the CUDA decoder otherwise (nvImageCodec picks per image among the backends it
    is allowed); ``device_index=None`` gives its CPU backend.
    """

    def __init__(self, device_index: int | None) -> None:
        from nvidia import nvimgcodec  # optional: the gpu extra

        self._codec = nvimgcodec
        if device_index is None:
            self.decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                              backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)])
        else:
            self.decoder = nvimgcodec.Decoder(device_id=device_index,
                                              backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY),
                                                        nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)])
        self.params = nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.SRGB)
        self.on_device = device_index is not None

    def decode(self, streams: Sequence[bytes], cuda_stream: int = 0) -> list[Any]:
        """The decoded (h, w, 3) images, in order; raises when any stream fails."""
        images = self.decoder.decode([self._codec.CodeStream(s) for s in streams], params=self.params,
                                     cuda_stream=cuda_stream)
        failed = sum(image is None for image in images)
        if failed:
            raise SlideError(f"nvImageCodec could not decode {failed} of {len(streams)} JPEG tiles")
        return images


class TileRegionReader:
    """One slide level's regions from its JPEG tiles; safe to share between threads
    (the tiles are read with ``pread`` and each call decodes its own batch)."""

    def __init__(self, level: JpegLevel, codec: NvImageCodec) -> None:
        self.level, self.codec = level, codec

    def _pieces(self, y: int, x: int, height: int, width: int,
                skip: Sequence[tuple[int, int]]) -> tuple[list[TilePiece], list[bytes], bool]:
        pieces = self.level.pieces(y, x, height, width, skip)
        return pieces, self.level.streams(pieces), self.level.covers(pieces, height, width)

    def read_host(self, y: int, x: int, height: int, width: int, skip: Sequence[tuple[int, int]] = (), *,
                  out: np.ndarray | None = None) -> np.ndarray:
        """The region as (height, width, 3) uint8 on the host (the CPU backend): white
        outside the level and over zero-length or ``skip`` tiles."""
        pieces, streams, covered = self._pieces(y, x, height, width, skip)
        region = np.empty((height, width, RGB), np.uint8) if out is None else out
        if not covered:
            region[...] = WHITE
        if pieces:
            place(region, pieces, [np.asarray(image.cpu()) for image in self.codec.decode(streams)])
        return region

    def read_device(self, y: int, x: int, height: int, width: int, device: Any,
                    skip: Sequence[tuple[int, int]] = ()) -> tuple[Any, list[Any]]:
        """The region as a (height, width, 3) uint8 tensor on ``device``, queued on the
        current stream, and the decoded images it was assembled from (keep them until
        that stream has run the copies)."""
        import torch

        pieces, streams, covered = self._pieces(y, x, height, width, skip)
        stream = torch.cuda.current_stream(device)
        region = torch.empty((height, width, RGB), dtype=torch.uint8, device=device)
        if not covered:
            region.fill_(WHITE)
        images = self.codec.decode(streams, cuda_stream=stream.cuda_stream) if pieces else []
        tiles = [torch.as_tensor(image, device=device) for image in images]  # __cuda_array_interface__: no copy
        place(region, pieces, tiles)
        return region, images
