"""Synthetic slides: determinism, label/mask consistency, content, pyramids, labels.csv and the CLI."""
from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from nic_fast.cli.synth import synth
from nic_fast.slides import open_slide
from nic_fast.synthetic import (
    MASK_DOWNSAMPLE,
    SyntheticSlide,
    pyramid_dims,
    read_mask_downsample,
    write_pyramid_tiff,
    write_synthetic_slide,
    write_synthetic_slides,
)


def _pixels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [page.asarray() for page in tif.pages]


def _mask(slide: SyntheticSlide) -> np.ndarray:
    return np.asarray(Image.open(slide.mask_path))


@pytest.fixture(scope="module")
def slide_set(tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticSlide]:
    return write_synthetic_slides(tmp_path_factory.mktemp("set"), 6, size_px=1536, seed=3)


def test_same_seed_gives_identical_pixels_and_bytes(tmp_path: Path) -> None:
    a = write_synthetic_slide(tmp_path / "a.tif", height=1280, width=1536, seed=42, lesion=True, workers=1)
    b = write_synthetic_slide(tmp_path / "b.tif", height=1280, width=1536, seed=42, lesion=True, workers=2)
    c = write_synthetic_slide(tmp_path / "c.tif", height=1280, width=1536, seed=43, lesion=True)
    for page_a, page_b in zip(_pixels(a.path), _pixels(b.path), strict=True):
        np.testing.assert_array_equal(page_a, page_b)
    assert hashlib.sha256(a.path.read_bytes()).digest() == hashlib.sha256(b.path.read_bytes()).digest()
    np.testing.assert_array_equal(_mask(a), _mask(b))
    assert not np.array_equal(_pixels(a.path)[0], _pixels(c.path)[0])


def test_slide_set_is_deterministic_per_seed(tmp_path: Path, slide_set: list[SyntheticSlide]) -> None:
    again = write_synthetic_slides(tmp_path, 2, size_px=1536, seed=3)
    for first, second in zip(slide_set[:2], again, strict=True):
        assert (first.height, first.width, first.label) == (second.height, second.width, second.label)
        np.testing.assert_array_equal(_pixels(first.path)[0], _pixels(second.path)[0])


def test_slide_set_labels_masks_and_csv(slide_set: list[SyntheticSlide]) -> None:
    out_dir = slide_set[0].path.parent
    assert [s.path.name for s in slide_set] == [f"slide_{i:03d}.tif" for i in range(6)]
    assert sum(s.label for s in slide_set) == 3
    with open(out_dir / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["slide", "label"]
    assert rows[1:] == [[s.path.name, str(s.label)] for s in slide_set]
    for slide in slide_set:
        mask = _mask(slide)
        assert slide.mask_path == slide.path.with_name(f"{slide.path.stem}_mask.png")
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert mask.shape == (math.ceil(slide.height / MASK_DOWNSAMPLE), math.ceil(slide.width / MASK_DOWNSAMPLE))
        assert slide.mask_downsample == MASK_DOWNSAMPLE == read_mask_downsample(slide.mask_path)
        assert mask.any() == bool(slide.label)
        assert 0.35 <= slide.tissue_fraction <= 0.65
        if slide.label:
            assert 0.03 <= slide.lesion_fraction <= 0.15
        else:
            assert slide.lesion_fraction == 0.0
        # Sides vary around the requested size, rounded to 256 px at 0.5 µm/px.
        assert slide.height % 256 == 0 and slide.width % 256 == 0
        assert 1024 <= slide.height <= 1536 and 1280 <= slide.width <= 1792


@pytest.mark.parametrize(("n", "positives"), [(1, None), (2, 1), (3, None), (4, 2)])
def test_about_half_have_a_lesion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int, positives: int | None) -> None:
    import nic_fast.synthetic as synthetic

    labels = []

    def fake(path: Path, *, lesion: bool, **_: object) -> SyntheticSlide:
        labels.append(int(lesion))
        return SyntheticSlide(path, path, int(lesion), 1, 1, 0.5, 0.5, 0.0, MASK_DOWNSAMPLE)

    monkeypatch.setattr(synthetic, "write_synthetic_slide", fake)
    synthetic.write_synthetic_slides(tmp_path, n, seed=7)
    if positives is None:
        assert abs(sum(labels) - n / 2) <= 0.5
    else:
        assert sum(labels) == positives


def test_content_looks_like_h_and_e(slide_set: list[SyntheticSlide]) -> None:
    slide = next(s for s in slide_set if s.label)
    with open_slide(slide.path) as reader:
        level0 = reader.read_region(0, 0, 0, slide.height, slide.width).astype(np.float32)
    # Corners are background: near white, slightly noisy.
    corner = level0[:64, :64]
    assert 230 <= corner.mean() <= 250 and corner.std() < 6
    # Lesion pixels (from the mask) are darker and more purple than the other tissue.
    mask = np.kron(_mask(slide) > 0, np.ones((MASK_DOWNSAMPLE, MASK_DOWNSAMPLE), dtype=bool))
    mask = mask[: slide.height, : slide.width]
    brightness = level0.mean(axis=2)
    tissue = (brightness < 225) & ~mask
    lesion_mean, tissue_mean = level0[mask].mean(axis=0), level0[tissue].mean(axis=0)
    assert lesion_mean.mean() < tissue_mean.mean() - 15
    assert tissue_mean[0] > tissue_mean[1] + 30, "stroma is pink: red well above green"
    assert lesion_mean[2] > lesion_mean[1], "nuclei are purple: blue above green"


def test_pyramid_levels_and_40x_keeps_the_layout(tmp_path: Path) -> None:
    assert pyramid_dims(4096, 5000) == [(1, 4096, 5000), (4, 1024, 1250), (16, 256, 313)]
    assert pyramid_dims(1024, 1000) == [(1, 1024, 1000)]
    x20 = write_synthetic_slide(tmp_path / "x20.tif", height=1024, width=1280, mpp=0.5, seed=9, lesion=True)
    x40 = write_synthetic_slide(tmp_path / "x40.tif", height=2048, width=2560, mpp=0.25, seed=9, lesion=True)
    assert x40.tissue_fraction == pytest.approx(x20.tissue_fraction, abs=0.01)
    assert x40.lesion_fraction == pytest.approx(x20.lesion_fraction, abs=0.01)
    mask20 = _mask(x20) > 0
    mask40 = _mask(x40).reshape(mask20.shape[0], 2, mask20.shape[1], 2).mean(axis=(1, 3)) > 0.5
    assert (mask20 != mask40).mean() < 0.01
    with open_slide(x40.path, backend="openslide") as slide:
        assert slide.level_dims == [(2048, 2560), (512, 640)]
        assert slide.mpp == 0.25


def test_write_pyramid_tiff_from_a_tile_function(tmp_path: Path) -> None:
    calls: set[int] = set()

    def stripes(downsample: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        calls.add(downsample)
        cols = (np.arange(x, x + width) * downsample // 64) % 2
        return np.broadcast_to((cols * 200 + 30).astype(np.uint8)[None, :, None], (height, width, 3)).copy()

    dims = write_pyramid_tiff(tmp_path / "s.tif", stripes, height=1100, width=4100, mpp=1.0, tile_px=128, workers=2)
    assert dims == [(1100, 4100), (275, 1025), (69, 257)]
    assert calls == {1, 4, 16}
    with open_slide(tmp_path / "s.tif") as slide:
        assert slide.level_count == 3 and slide.mpp == 1.0
        row = slide.read_region(0, 500, 0, 1, 256)[0, :, 0].astype(int)
    assert abs(row[:60].mean() - 30) < 4 and abs(row[68:124].mean() - 230) < 4


def test_write_pyramid_tiff_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_pyramid_tiff(tmp_path / "f.tif", np.zeros((64, 64, 3), dtype=np.float32), mpp=0.5)
    with pytest.raises(ValueError, match="height and width"):
        write_pyramid_tiff(tmp_path / "f.tif", lambda *a: np.zeros((16, 16, 3), np.uint8), mpp=0.5)
    with pytest.raises(ValueError, match="multiple of 16"):
        write_pyramid_tiff(tmp_path / "f.tif", np.zeros((64, 64, 3), dtype=np.uint8), mpp=0.5, tile_px=100)


def test_cli_synth_slides(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(synth, ["slides", "-o", str(out), "--n", "2", "--size", "512", "--mpp", "0.25", "--seed", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3
    assert "slide_000.tif" in lines[0] and "slide_001.tif" in lines[1]
    assert "0.25 µm/px" in lines[0]
    assert lines[2] == f"labels: {out / 'labels.csv'}"
    with open_slide(out / "slide_000.tif") as slide:
        assert slide.mpp == 0.25
        assert slide.level_dims[0] == (1024, 1024), "40x: twice the px per side of --size at 0.5 µm/px"
    assert (out / "slide_001_mask.png").exists()


def test_cli_synth_is_a_group_and_validates() -> None:
    runner = CliRunner()
    assert "slides" in runner.invoke(synth, ["--help"]).output
    result = runner.invoke(synth, ["slides", "-o", "x", "--n", "0"])
    assert result.exit_code != 0 and "--n" in result.output


def _stripes(downsample: int, y: int, x: int, height: int, width: int) -> np.ndarray:
    cols = (np.arange(x, x + width) * downsample // 64) % 2
    return np.broadcast_to((cols * 200 + 30).astype(np.uint8)[None, :, None], (height, width, 3)).copy()


@pytest.mark.parametrize("mpp_metadata", ["aperio", "resolution"])
def test_every_reader_sees_every_level(tmp_path: Path, mpp_metadata: str) -> None:
    """tifffile's series (what TIAToolbox's TIFFWSIReader opens), OpenSlide, cuCIM and our
    tifffile backend agree on the levels; an Aperio file is an SVS to all, with its
    associated images."""
    import openslide
    import zarr
    from cucim import CuImage

    path = tmp_path / "s.tif"
    dims = write_pyramid_tiff(path, _stripes, height=1100, width=4100, mpp=0.5, tile_px=128, workers=2,
                              mpp_metadata=mpp_metadata)
    assert len(dims) == 3
    with tifffile.TiffFile(path) as tif:
        assert tif.is_svs == (mpp_metadata == "aperio")
        tifffile_levels = [level.shape[-3:-1] for level in tif.series[0].levels]
        names = [series.name for series in tif.series]
    group = zarr.open(tifffile.imread(path, series=0, aszarr=True), mode="r")
    zarr_levels = [group[key].shape[-3:-1] for key in sorted(group.keys(), key=int)]
    with openslide.OpenSlide(str(path)) as slide:
        openslide_levels = [(h, w) for w, h in slide.level_dimensions]
        openslide_images = set(slide.associated_images)
        vendor = slide.properties["openslide.vendor"]
    image = CuImage(str(path))
    cucim_levels = [(h, w) for w, h in image.resolutions["level_dimensions"]]
    with open_slide(path, backend="tifffile") as reader:
        ours = reader.level_dims
    assert tifffile_levels == zarr_levels == openslide_levels == cucim_levels == ours == dims
    if mpp_metadata == "aperio":
        assert names == ["Baseline", "Thumbnail", "Label", "Macro"]
        assert vendor == "aperio" and openslide_images == {"thumbnail", "label", "macro"}
        assert set(image.associated_images) == {"thumbnail", "label", "macro"}
        with tifffile.TiffFile(path) as tif:
            thumbnail = tif.series[1].asarray()
        assert max(thumbnail.shape[:2]) <= 768 and abs(thumbnail.mean() - 130) < 10  # the stripes, scaled down
    else:
        assert vendor == "generic-tiff" and not openslide_images and not image.associated_images


def test_synthetic_slide_is_an_svs_with_all_levels(tmp_path: Path) -> None:
    slide = write_synthetic_slide(tmp_path / "s.tif", height=4352, width=1280, seed=4, lesion=False)
    with tifffile.TiffFile(slide.path) as tif:
        assert tif.is_svs
        assert [level.shape[:2] for level in tif.series[0].levels] == [(h, w) for _, h, w in pyramid_dims(4352, 1280)]
        label = tif.series[2].asarray()
    again = write_synthetic_slide(tmp_path / "t.tif", height=4352, width=1280, seed=4, lesion=False)
    assert hashlib.sha256(slide.path.read_bytes()).digest() == hashlib.sha256(again.path.read_bytes()).digest()
    assert label.min() < 50 < 200 < label.max(), "the label carries a barcode"


def test_ink_strokes_change_only_the_pixels_they_cover(tmp_path: Path) -> None:
    from scipy.ndimage import binary_dilation

    inked = write_synthetic_slide(tmp_path / "inked.tif", height=1536, width=1792, seed=21, lesion=True, ink=True)
    clean = write_synthetic_slide(tmp_path / "clean.tif", height=1536, width=1792, seed=21, lesion=True)
    assert inked.ink_mask_path == tmp_path / "inked_ink.png" and clean.ink_mask_path is None
    assert not (tmp_path / "clean_ink.png").exists()
    ink = np.asarray(Image.open(inked.ink_mask_path)) > 0
    assert ink.shape == _mask(inked).shape and read_mask_downsample(inked.ink_mask_path) == MASK_DOWNSAMPLE
    assert inked.ink_fraction == pytest.approx(ink.mean()) and 0.02 < inked.ink_fraction < 0.6
    assert (inked.tissue_fraction, inked.lesion_fraction) == (clean.tissue_fraction, clean.lesion_fraction)
    np.testing.assert_array_equal(_mask(inked), _mask(clean))
    a, b = _pixels(inked.path)[0], _pixels(clean.path)[0]
    # Away from the strokes (their soft edge, the JPEG blocks around it and their chroma upsampling) the
    # pixels are the clean slide's.
    near = np.kron(binary_dilation(ink, iterations=3), np.ones((MASK_DOWNSAMPLE,) * 2, bool))[: a.shape[0], : a.shape[1]]
    np.testing.assert_array_equal(a[~near], b[~near])
    inside = np.kron(ink, np.ones((MASK_DOWNSAMPLE,) * 2, bool))[: a.shape[0], : a.shape[1]]
    assert (a[inside].astype(int).sum(axis=-1) < b[inside].astype(int).sum(axis=-1) - 60).mean() > 0.9, "ink darkens"


def test_cli_synth_slides_with_ink(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(synth, ["slides", "-o", str(out), "--n", "2", "--size", "1024", "--ink"])
    assert result.exit_code == 0, result.output
    first, second = result.output.splitlines()[:2]
    assert "ink=" in first and "ink=" not in second
    assert (out / "slide_000_ink.png").exists() and not (out / "slide_001_ink.png").exists()
