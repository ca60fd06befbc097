"""OpenSlide backend: the fallback for the vendor formats cuCIM cannot read (NDPI, MRXS, DICOM, ...)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nic_fast.slides.base import SlideError, SlideReader, rgb_on_white
from nic_fast.slides.mpp import (
    MppEvidence,
    check_override_mpp,
    evidence_from_tiff_resolution,
    evidence_from_xy,
    scanned_mpp,
)
from nic_fast.slides.tiff_support import forced_fault


class OpenSlideReader(SlideReader):
    """A slide read with ``openslide.OpenSlide``.

    OpenSlide returns un-premultiplied RGBA with transparent pixels wherever the scanner
    stored nothing; those are composited onto white. At levels with a non-integer
    downsample OpenSlide interpolates sub-pixel positions, so the level-0 location is
    rounded to the nearest pixel to stay as close as possible to (y, x). A read error
    leaves an OpenSlide handle unusable, so the handle is reopened after one.
    """

    backend = "openslide"

    def __init__(self, path: str | Path, *, slide_mpp: float | None = None, vetted: bool = False) -> None:
        self.path = Path(path)
        fault = None if vetted else forced_fault(self.path, "openslide")
        if fault:
            raise SlideError(f"{self.path}: OpenSlide {fault}; read it with the tifffile backend (or auto)")
        self._slide = self._open()
        self.level_dims = [(int(h), int(w)) for w, h in self._slide.level_dimensions]
        self.level_downsamples = [float(ds) for ds in self._slide.level_downsamples]
        if slide_mpp is not None:
            self.mpp = check_override_mpp(slide_mpp, source=f"{self.path}: --slide-mpp")
        else:
            self.mpp = scanned_mpp(self.path, self._mpp_evidence())

    def _open(self) -> Any:
        import openslide

        try:
            return openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(f"{self.path}: OpenSlide cannot open it ({exc})") from exc

    def _mpp_evidence(self) -> list[MppEvidence]:
        props = self._slide.properties
        return [
            evidence_from_xy("OpenSlide", props.get("openslide.mpp-x"), props.get("openslide.mpp-y")),
            evidence_from_tiff_resolution(
                props.get("tiff.XResolution"), props.get("tiff.YResolution"), props.get("tiff.ResolutionUnit")
            ),
        ]

    def _read_inside(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        import openslide

        downsample = self.level_downsamples[level]
        location = (round(x * downsample), round(y * downsample))
        try:
            region = self._slide.read_region(location, level, (width, height))
        except openslide.OpenSlideError as exc:
            # After an error OpenSlide refuses every later read on the handle: start a new one.
            self._slide.close()
            self._slide = self._open()
            raise SlideError(f"{self.path}: OpenSlide cannot read level {level} at (y={y}, x={x}) ({exc})") from exc
        return rgb_on_white(np.asarray(region))

    def reopen(self) -> OpenSlideReader:
        return OpenSlideReader(self.path, slide_mpp=self.mpp, vetted=True)

    def close(self) -> None:
        self._release_tile_access()
        self._slide.close()
