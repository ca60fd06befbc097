"""`compress --mpp none`: plain images in pixel units, grayscale with one-channel encoders.

The synthetic MNIST benchmark compresses grayscale canvases with 9-px, one-channel
encoders; these tests pin down what such a store holds (level 0, null µm/px, every cell
encoded, a 3-channel gray thumbnail, codes equal to the encoder applied to each patch)
and that mismatched channels or µm/px options fail with the fix in the message.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from nic_fast.cli import main
from nic_fast.batch import compress_slides
from nic_fast.compress import CompressOptions, Compressor
from nic_fast.encoder_training import mean_pixel_encoder
from nic_fast.encoders import EncoderSpec, load_encoder, save_encoder
from nic_fast.store import open_store

PATCH_PX = 9


@pytest.fixture(scope="module")
def gray_mean_encoder(tmp_path_factory) -> Path:
    """The paper's mean baseline on 9-px grayscale patches: its code is each patch's mean / 255."""
    module, spec = mean_pixel_encoder(PATCH_PX, channels=1, mpp=None)
    return save_encoder(module, spec, tmp_path_factory.mktemp("enc") / "mean9.pt")


@pytest.fixture(scope="module")
def gray_conv_encoder(tmp_path_factory) -> Path:
    """A one-channel encoder that is not invariant to where ink lies in the patch."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(PATCH_PX * PATCH_PX, 5))
    spec = EncoderSpec(name="gray-linear", input_px=PATCH_PX, mpp=None, channels=1, mean=(0.5,), std=(0.5,),
                       code_size=5, sha256="")
    return save_encoder(module, spec, tmp_path_factory.mktemp("enc") / "linear9.pt")


def gray_canvas(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A black canvas with random bright pixels (like pasted digits), saved as an 8-bit PNG."""
    rng = np.random.default_rng(seed)
    pixels = np.where(rng.random((height, width)) < 0.2, 255, 0).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path)
    return pixels


def compress(slides: list[Path], out: Path, **options) -> list:
    return compress_slides(slides, out, CompressOptions(mpp=None, **options)).results


def test_grayscale_store_in_pixel_units(tmp_path, gray_mean_encoder):
    pixels = gray_canvas(tmp_path / "canvas.png", 95, 130)
    (result,) = compress([tmp_path / "canvas.png"], tmp_path / "out", encoder=str(gray_mean_encoder))
    assert result.status == "ok", result.reason
    store = open_store(result.store)
    assert store.grid_shape == (95 // PATCH_PX, 130 // PATCH_PX)  # edge cells past the image are dropped
    assert store.attrs["mpp"] is None and store.attrs["scanned_mpp"] is None and store.attrs["level_mpp"] is None
    assert store.attrs["level"] == 0 and store.attrs["downsample"] == 1 and store.attrs["source"]["reader"] == "image"
    assert store.tissue.all() and store.attrs["tissue_fraction"] == 1.0  # every grayscale cell is encoded
    thumbnail = store.thumbnail
    assert thumbnail.ndim == 3 and thumbnail.shape[2] == 3
    assert (thumbnail[..., 0] == thumbnail[..., 1]).all() and (thumbnail[..., 1] == thumbnail[..., 2]).all()
    rows, cols = store.grid_shape
    blocks = pixels[: rows * PATCH_PX, : cols * PATCH_PX].reshape(rows, PATCH_PX, cols, PATCH_PX)
    expected = blocks.mean(axis=(1, 3)) / 255
    np.testing.assert_allclose(store.load()[..., 0].astype(np.float32), expected, atol=1e-3)


def test_codes_match_the_encoder_on_each_patch_with_stride(tmp_path, gray_conv_encoder):
    pixels = gray_canvas(tmp_path / "c.png", 40, 50, seed=3)
    stride_px = 4
    (result,) = compress([tmp_path / "c.png"], tmp_path / "out", encoder=str(gray_conv_encoder), stride_px=stride_px,
                         precision="fp32")  # auto may pick bf16 where it is faster
    assert result.status == "ok", result.reason
    grid = open_store(result.store).load()
    encoder = load_encoder(str(gray_conv_encoder))
    for i, j in [(0, 0), (3, 7), (grid.shape[0] - 1, grid.shape[1] - 1)]:
        patch = pixels[i * stride_px : i * stride_px + PATCH_PX, j * stride_px : j * stride_px + PATCH_PX]
        x = torch.from_numpy(patch.astype(np.float32) / 255 * 2 - 1)[None, None]
        np.testing.assert_allclose(grid[i, j].astype(np.float32), encoder(x)[0].detach().numpy(), atol=2e-3)


def test_rgb_plain_image_keeps_the_tissue_mask(tmp_path):
    rgb = np.full((256, 384, 3), 240, np.uint8)
    rgb[:, :128] = (200, 90, 170)  # saturated "tissue" in the left third only
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    (result,) = compress([tmp_path / "rgb.png"], tmp_path / "out")  # mean-rgb, 128 px
    assert result.status == "ok", result.reason
    store = open_store(result.store)
    assert store.attrs["mpp"] is None
    np.testing.assert_array_equal(store.tissue, [[True, False, False], [True, False, False]])


def test_channel_mismatch_fails_the_slide_with_the_fix(tmp_path, gray_mean_encoder):
    gray_canvas(tmp_path / "gray.png", 256, 256)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "rgb.png")
    gray, rgb = compress([tmp_path / "gray.png"], tmp_path / "a")[0], \
        compress([tmp_path / "rgb.png"], tmp_path / "b", encoder=str(gray_mean_encoder))[0]
    assert gray.status == "failed" and "grayscale (1 channel(s))" in gray.reason and "3-channel" in gray.reason
    assert rgb.status == "failed" and "RGB (3 channel(s))" in rgb.reason and "1-channel" in rgb.reason


def test_not_an_image_fails_only_that_file(tmp_path, gray_mean_encoder):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    gray_canvas(tmp_path / "good.png", 30, 30)
    results = compress([tmp_path / "bad.png", tmp_path / "good.png"], tmp_path / "out",
                       encoder=str(gray_mean_encoder))
    assert [r.status for r in results] == ["failed", "ok"]
    assert "pixel units" in results[0].reason


def test_slide_mpp_options_are_refused_in_pixel_units():
    with pytest.raises(ValueError, match="--mpp none"):
        Compressor(CompressOptions(mpp=None, slide_mpp=0.5))


def test_cli_mpp_none(tmp_path, gray_mean_encoder):
    gray_canvas(tmp_path / "c.png", 27, 36)
    runner = CliRunner()
    ok = runner.invoke(main, ["compress", str(tmp_path / "c.png"), "-o", str(tmp_path / "out"), "--mpp", "none",
                              "--encoder", str(gray_mean_encoder)])
    assert ok.exit_code == 0, ok.output
    assert open_store(tmp_path / "out" / "c.zarr").grid_shape == (3, 4)
    info = runner.invoke(main, ["info", str(tmp_path / "out" / "c.zarr")])
    assert info.exit_code == 0 and "pixel units" in info.output, info.output
    bad = runner.invoke(main, ["compress", str(tmp_path / "c.png"), "-o", str(tmp_path / "o2"), "--mpp", "fine"])
    assert bad.exit_code == 2 and "neither a µm/px value nor 'none'" in bad.output
    refused = runner.invoke(main, ["compress", str(tmp_path / "c.png"), "-o", str(tmp_path / "o3"), "--mpp", "none",
                                   "--slide-mpp", "0.25"])
    assert refused.exit_code == 2 and "leave out --slide-mpp" in refused.output
