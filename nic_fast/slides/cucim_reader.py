"""cuCIM backend: the fast default for Aperio SVS and generic tiled pyramidal TIFF."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nic_fast.slides.base import SlideError, SlideReader, rgb_on_white
from nic_fast.slides.mpp import (
    MppEvidence,
    check_override_mpp,
    evidence_from_aperio,
    evidence_from_tiff_resolution,
    scanned_mpp,
)
from nic_fast.slides.tiff_support import forced_fault


class CucimReader(SlideReader):
    """A slide read with ``cucim.CuImage`` (CPU decoding; no GPU needed).

    Files cuCIM is known to crash on or to decode wrongly (see
    :mod:`nic_fast.slides.tiff_support`) are refused before cuCIM sees them, unless
    ``vetted`` says the caller has already checked.

    cuCIM takes the region's location in level-0 pixels and maps it to a level by
    flooring ``location / downsample``; its out-of-image pixels are white for JPEG
    tiles but black for others, which is why the base class clips every read.
    """

    backend = "cucim"

    def __init__(self, path: str | Path, *, slide_mpp: float | None = None, vetted: bool = False) -> None:
        from cucim import CuImage  # optional dependency, imported only when this backend is used

        self.path = Path(path)
        fault = None if vetted else forced_fault(self.path, "cucim")
        if fault:
            raise SlideError(f"{self.path}: cuCIM {fault}; read it with the tifffile backend (or auto)")
        try:
            self._image = CuImage(str(self.path))
        except Exception as exc:  # cuCIM raises ValueError/RuntimeError with no common base
            raise SlideError(f"{self.path}: cuCIM cannot open it ({exc})") from exc
        resolutions = self._image.resolutions
        self.level_dims = [(int(h), int(w)) for w, h in resolutions["level_dimensions"]]
        self.level_downsamples = [float(ds) for ds in resolutions["level_downsamples"]]
        if slide_mpp is not None:
            self.mpp = check_override_mpp(slide_mpp, source=f"{self.path}: --slide-mpp")
        else:
            self.mpp = scanned_mpp(self.path, self._mpp_evidence())

    def _mpp_evidence(self) -> list[MppEvidence]:
        metadata = self._image.metadata
        aperio = metadata.get("aperio") or {}
        tiff = metadata.get("tiff") or {}
        return [
            evidence_from_aperio(aperio.get("MPP")),
            evidence_from_tiff_resolution(tiff.get("x_resolution"), tiff.get("y_resolution"), tiff.get("resolution_unit")),
        ]

    def _read_inside(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        downsample = self.level_downsamples[level]
        # ceil, because cuCIM floors location / downsample: this lands exactly on (y, x).
        location = (math.ceil(x * downsample), math.ceil(y * downsample))
        try:
            region = self._image.read_region(location=location, size=(width, height), level=level)
        except Exception as exc:  # a codec cuCIM lacks (e.g. JPEG 2000 in some TIFFs) fails here
            raise SlideError(f"{self.path}: cuCIM cannot decode level {level} at (y={y}, x={x}) ({exc})") from exc
        return rgb_on_white(np.asarray(region))

    def reopen(self) -> CucimReader:
        return CucimReader(self.path, slide_mpp=self.mpp, vetted=True)

    def close(self) -> None:
        self._release_tile_access()
        self._image.close()
