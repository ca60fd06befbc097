"""Plain images in pixel units (the synthetic task's canvases): grayscale stays one channel."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nic_fast.slides import SlideError, open_slide


def test_grayscale_png_reads_as_one_channel(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(37, 53), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "g.png")
    with open_slide(tmp_path / "g.png", backend="image") as reader:
        assert reader.channels == 1 and reader.level_dims == [(37, 53)] and reader.mpp is None
        region = reader.read_region(0, 30, 50, 10, 10)
        assert region.shape == (10, 10, 1)
        np.testing.assert_array_equal(region[:7, :3, 0], pixels[30:, 50:])
        assert (region[7:] == 255).all() and (region[:, 3:] == 255).all()  # outside: white
        thumb = reader.thumbnail(2.0)
        assert thumb.shape == (19, 27, 1)
        assert thumb[0, 0, 0] == round(pixels[:2, :2].mean())
        with pytest.raises(SlideError, match="--mpp none"):
            reader.level_mpp(0)
        again = reader.reopen()
        np.testing.assert_array_equal(again.read_region(0, 0, 0, 37, 53)[..., 0], pixels)


def test_rgb_image_and_unreadable_file(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with open_slide(tmp_path / "c.png", backend="image") as reader:
        assert reader.channels == 3
        np.testing.assert_array_equal(reader.read_region(0, 0, 0, 20, 30), rgb)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(SlideError, match="bad.png"):
        open_slide(tmp_path / "bad.png", backend="image")
