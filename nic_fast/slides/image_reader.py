"""Plain (non-pyramidal) images in pixel units: PNG, JPEG, BMP, untiled TIFF, grayscale or RGB.

The paper's synthetic benchmark (MNIST digits on a canvas) and many teaching data sets
are ordinary image files without a pyramid or a physical resolution; `compress --mpp
none` reads them through this backend, one level, pixel for pixel. Grayscale images
stay one channel so that grayscale encoders see exactly the stored values.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nic_fast.slides.base import SlideError, SlideReader

# Plain images are read whole: refuse what would not fit comfortably in memory, and
# point to the pyramidal path instead.
MAX_PLAIN_IMAGE_PX = 1 << 30


class ImageReader(SlideReader):
    """One plain image file held in memory; ``mpp`` is None (pixel units)."""

    backend = "image"

    def __init__(self, path: str | Path, *, pixels: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self._pixels = self._load(self.path) if pixels is None else pixels
        height, width, self.channels = self._pixels.shape
        self.level_dims = [(height, width)]
        self.level_downsamples = [1.0]
        self.mpp = None  # type: ignore[assignment]  # pixel units: no physical resolution

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                if image.width * image.height > MAX_PLAIN_IMAGE_PX:
                    raise SlideError(f"{path}: {image.width}x{image.height} px is too large for a plain image; "
                                     "store it as a tiled pyramidal TIFF and give its µm/px instead of --mpp none")
                mode = "L" if image.mode in ("1", "L", "I;16", "I", "F") else "RGB"
                pixels = np.asarray(image.convert(mode))
        except (UnidentifiedImageError, OSError) as exc:
            raise SlideError(f"{path}: not an image file that can be read in pixel units ({exc})") from exc
        return np.ascontiguousarray(pixels[..., None] if pixels.ndim == 2 else pixels)

    def level_mpp(self, level: int) -> float:
        raise SlideError(f"{self.path}: a plain image has no µm/px (pixel units); compress it with --mpp none")

    def _read_inside(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        return self._pixels[y : y + height, x : x + width]

    def _tile_access(self) -> None:
        """The pixels were decoded whole when the file was opened: nothing left to check."""

    def reopen(self) -> ImageReader:
        return ImageReader(self.path, pixels=self._pixels)  # read-only sharing: no second decode

    def close(self) -> None:
        """Nothing to release: the pixels are shared by every reopened handle."""

    def __repr__(self) -> str:
        height, width = self.level_dims[0]
        return f"ImageReader({str(self.path)!r}, {height}x{width}x{self.channels}, pixel units)"
