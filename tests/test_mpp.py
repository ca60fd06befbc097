"""Scanned µm/px: every metadata path through both backends, overrides, and the CSV table."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from nic_fast.slides import MppError, SlideError, load_mpp_csv, open_slide, resolve_slide_mpp
from nic_fast.slides.mpp import evidence_from_aperio, evidence_from_tiff_resolution, evidence_from_xy
from nic_fast.synthetic import write_pyramid_tiff

BACKENDS = ["cucim", "openslide"]
HINTS = ("--slide-mpp VALUE", "--slide-mpp-csv FILE")


def _tiny_slide(path: Path, **kwargs: object) -> Path:
    """A 256x384 single-level tiled JPEG TIFF with the given µm/px metadata options."""
    image = np.full((256, 384, 3), 230, dtype=np.uint8)
    image[64:192, 96:288] = (200, 120, 170)
    write_pyramid_tiff(path, image, **kwargs)
    return path


def _assert_names_file_and_overrides(message: str, path: Path) -> None:
    assert path.name in message
    for hint in HINTS:
        assert hint in message


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"mpp": 0.2527}, 0.2527),
        ({"mpp": 0.5, "mpp_metadata": "resolution", "resolution_unit": "centimeter"}, 0.5),
        ({"mpp": 0.25, "mpp_metadata": "resolution", "resolution_unit": "inch"}, 0.25),
    ],
    ids=["aperio", "tiff-cm", "tiff-inch"],
)
def test_mpp_from_metadata(tmp_path: Path, backend: str, options: dict, expected: float) -> None:
    path = _tiny_slide(tmp_path / "slide.tif", **options)
    with open_slide(path, backend=backend) as slide:
        assert slide.mpp == pytest.approx(expected, rel=1e-4)


def test_aperio_description_is_parsed_by_both_backends(tmp_path: Path) -> None:
    from cucim import CuImage
    import openslide

    path = _tiny_slide(tmp_path / "slide.tif", mpp=0.5)
    assert CuImage(str(path)).metadata["aperio"]["MPP"] == "0.5"
    with openslide.OpenSlide(str(path)) as os_slide:
        assert os_slide.properties["openslide.vendor"] == "aperio"
        assert float(os_slide.properties["openslide.mpp-x"]) == 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("options", "found"),
    [
        ({"mpp": None}, "no physical unit"),
        ({"mpp": 0.5, "mpp_metadata": "resolution", "resolution_unit": "none"}, "no physical unit"),
        ({"mpp": 0.01}, "implausible scanned µm/px 0.01"),
        ({"mpp": 50.0}, "implausible scanned µm/px 50"),
        ({"mpp": 0.01, "mpp_metadata": "resolution"}, "implausible scanned µm/px 0.01"),
    ],
    ids=["missing", "no-unit", "aperio-0.01", "aperio-50", "tiff-0.01"],
)
def test_unusable_mpp_is_refused_with_both_overrides(tmp_path: Path, backend: str, options: dict, found: str) -> None:
    path = _tiny_slide(tmp_path / "unusable.tif", **options)
    with pytest.raises(MppError) as info:
        open_slide(path, backend=backend)
    assert isinstance(info.value, SlideError)
    assert found in str(info.value)
    _assert_names_file_and_overrides(str(info.value), path)
    # The override makes the same file usable.
    with open_slide(path, backend=backend, slide_mpp=0.5) as slide:
        assert slide.mpp == 0.5


def test_auto_backend_reports_missing_mpp(tmp_path: Path) -> None:
    path = _tiny_slide(tmp_path / "nompp.tif", mpp=None)
    with pytest.raises(MppError) as info:
        open_slide(path)
    _assert_names_file_and_overrides(str(info.value), path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_override_wins_over_metadata_and_is_range_checked(cmu_svs: Path, backend: str) -> None:
    with open_slide(cmu_svs, backend=backend, slide_mpp=0.25) as slide:
        assert slide.mpp == 0.25
        assert slide.level_mpp(0) == 0.25
    for bad in (0.05, 11.0, float("nan")):
        with pytest.raises(MppError, match="implausible"):
            open_slide(cmu_svs, backend=backend, slide_mpp=bad)


def test_evidence_parsers() -> None:
    assert evidence_from_aperio("0.4990").mpp == pytest.approx(0.499)
    assert evidence_from_aperio(None).mpp is None
    assert evidence_from_aperio("n/a").mpp is None
    assert evidence_from_tiff_resolution(20000.0, 20000.0, "centimeter").mpp == pytest.approx(0.5)
    assert evidence_from_tiff_resolution("101600", "101600", "inch").mpp == pytest.approx(0.25)
    assert evidence_from_tiff_resolution(20000, 20000, 3).mpp == pytest.approx(0.5)
    assert evidence_from_tiff_resolution(20000, 20000, 2).mpp == pytest.approx(1.27)
    assert evidence_from_tiff_resolution(1.0, 1.0, "").mpp is None
    assert evidence_from_tiff_resolution(2.0, 2.0, "none").mpp is None
    assert evidence_from_tiff_resolution(None, None, None).found == "no TIFF resolution tags"
    assert evidence_from_xy("OpenSlide", "0.25", "0.2501").mpp == pytest.approx(0.25005)
    assert evidence_from_xy("OpenSlide", "0.25", "0.5").mpp is None, "non-square pixels"
    assert evidence_from_xy("OpenSlide", None, None).mpp is None


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_matches_name_stem_and_full_path(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    a, b, c, d = (slides / name for name in ("a.svs", "b.ndpi", "c.ome.tiff", "d.svs"))
    table = load_mpp_csv(
        _csv(tmp_path / "mpp.csv", f"slide,mpp,comment\na.svs,0.25,by name\nb,0.5,by stem\nc,0.3,\n{d},0.45,path\n")
    )
    assert table == {"a.svs": 0.25, "b": 0.5, "c": 0.3, str(d): 0.45}
    assert resolve_slide_mpp(a, None, table) == 0.25
    assert resolve_slide_mpp(b, None, table) == 0.5
    assert resolve_slide_mpp(c, None, table) == 0.3
    assert resolve_slide_mpp(d, None, table) == 0.45
    relative = Path(os.path.relpath(d))
    assert resolve_slide_mpp(relative, None, table) == 0.45
    assert resolve_slide_mpp(slides / "other.svs", None, table) is None
    assert resolve_slide_mpp(tmp_path / "elsewhere" / "d.svs", None, table) is None


def test_csv_row_wins_over_global_value_which_applies_to_the_rest(tmp_path: Path) -> None:
    table = {"a.svs": 0.25}
    assert resolve_slide_mpp(tmp_path / "a.svs", 0.5, table) == 0.25
    assert resolve_slide_mpp(tmp_path / "b.svs", 0.5, table) == 0.5
    assert resolve_slide_mpp(tmp_path / "b.svs", 0.5, None) == 0.5
    assert resolve_slide_mpp(tmp_path / "b.svs", None, None) is None
    with pytest.raises(MppError, match="--slide-mpp: µm/px 20 is implausible"):
        resolve_slide_mpp(tmp_path / "b.svs", 20.0, None)


def test_csv_override_opens_a_slide_without_mpp(tmp_path: Path) -> None:
    path = _tiny_slide(tmp_path / "nompp.tif", mpp=None)
    table = load_mpp_csv(_csv(tmp_path / "mpp.csv", "slide,mpp\nnompp,0.5\n"))
    with open_slide(path, slide_mpp=resolve_slide_mpp(path, None, table)) as slide:
        assert slide.mpp == 0.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,mpp\na.svs,0.5\n", "missing column 'slide'"),
        ("slide,um\na.svs,0.5\n", "missing column 'mpp'"),
        ("", "missing column 'slide' and 'mpp'"),
        ("slide,mpp\na.svs,0.5\nb.svs,abc\n", "line 3: mpp 'abc' for slide 'b.svs' is not a positive number"),
        ("slide,mpp\na.svs,-1\n", "line 2: mpp '-1'"),
        ("slide,mpp\na.svs,0.01\n", "line 2 (slide 'a.svs'): µm/px 0.01 is implausible"),
        ("slide,mpp\n,0.5\n", "line 2: empty slide name"),
        ("slide,mpp\na.svs,0.5\na.svs,0.25\n", "line 3: slide 'a.svs' is listed twice"),
    ],
    ids=["no-slide", "no-mpp", "empty", "bad-number", "negative", "implausible", "empty-name", "duplicate"],
)
def test_bad_csv_names_the_file_and_row(tmp_path: Path, text: str, message: str) -> None:
    path = _csv(tmp_path / "table.csv", text)
    with pytest.raises(MppError) as info:
        load_mpp_csv(path)
    assert message in str(info.value)
    assert "table.csv" in str(info.value)


def test_csv_tolerates_blank_lines_bom_and_header_case(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("\ufeffSlide , MPP\n a.svs , 0.5 \n\n,\n")
    assert load_mpp_csv(path) == {"a.svs": 0.5}


def test_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(MppError, match="absent.csv: cannot read it"):
        load_mpp_csv(tmp_path / "absent.csv")
