"""QC images and the HTML run report: the marks land on the right cells, the scale bar measures
what it says, real stores (invalid cells, plain images) draw, and the report lists every slide,
failed first, with links that resolve and text that cannot inject markup."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from PIL import Image
from test_compress import tissue_image, write_tiff

import nic_fast
from nic_fast.batch import compress_slides
from nic_fast.compress import CompressOptions
from nic_fast.encoders import EncoderSpec, save_encoder
from nic_fast.report import (
    ENCODED_ALPHA,
    ENCODED_RGB,
    INVALID_ALPHA,
    INVALID_RGB,
    QC_MAX_PX,
    QC_MIN_PX,
    STATUS_ORDER,
    TISSUE_RGB,
    _scale_bar,
    _Scale,
    _tissue_map,
    qc_path,
    write_qc_image,
    write_report,
)
from nic_fast.store import CellGeometry, StoreWriter
from nic_fast.synthetic import write_synthetic_slides

PX_PER_CELL = 8  # thumbnail px per grid stride: stride 128 px at 0.5 µm/px, thumbnail downsample 16


def _store(path: Path, thumbnail: np.ndarray, tissue: np.ndarray, valid: np.ndarray, *,
           mpp: float | None = 0.5, thumbnail_downsample: float = 16.0) -> Path:
    """A complete store with the given thumbnail and masks (embeddings irrelevant here)."""
    height, width = tissue.shape
    attrs = {"source": {"name": path.stem + ".tif"}, "mpp": mpp, "scanned_mpp": mpp, "downsample": 1,
             "patch_px": 128, "stride_px": 128, "thumbnail_downsample": thumbnail_downsample, "min_tissue": 0.1,
             "tissue_fraction": float(tissue.mean()), "grid_shape": [height, width]}
    geometry = CellGeometry(stride_px=128, patch_px=128, level0_px_per_px=1.0, level0_mpp=mpp,
                            thumbnail_downsample=thumbnail_downsample)
    writer = StoreWriter(path, variants=1, grid_shape=(height, width), code_size=1, tile_cells=16,
                         thumbnail=thumbnail, tissue=tissue, geometry=geometry, attrs=attrs, config={})
    for row, i0 in enumerate(range(0, height, 16)):
        for col, j0 in enumerate(range(0, width, 16)):
            block = valid[i0 : i0 + 16, j0 : j0 + 16]
            writer.write_tile(row, col, i0, j0, np.zeros((1, *block.shape, 1), np.float16), block)
    return writer.publish({}, overwrite=True)


def _tissue_thumbnail(height_px: int, width_px: int, box: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """Glass (near white, unsaturated) with a textured pink block of tissue at ``box`` (y0, y1, x0, x1)."""
    rng = np.random.default_rng(seed)
    image = np.full((height_px, width_px, 3), 242, np.uint8)
    y0, y1, x0, x1 = box
    pink = np.array([205, 120, 175]) + rng.integers(-25, 25, size=(y1 - y0, x1 - x0, 3))
    image[y0:y1, x0:x1] = np.clip(pink, 0, 255)
    return image


def _blend(pixel: np.ndarray, rgb: tuple[int, int, int], alpha: float) -> np.ndarray:
    return (pixel.astype(np.float32) * (1 - alpha) + np.asarray(rgb, np.float32) * alpha).astype(np.uint8)


def test_qc_marks_encoded_and_invalid_cells_and_outlines_tissue(tmp_path: Path) -> None:
    rows, cols = 75, 65  # thumbnail 600 x 520 px: drawn 1:1, so every pixel can be predicted
    box = (101, 427, 83, 390)
    thumbnail = _tissue_thumbnail(rows * PX_PER_CELL, cols * PX_PER_CELL, box)
    tissue = np.zeros((rows, cols), bool)
    tissue[12:54, 10:49] = True
    valid = np.ones((rows, cols), bool)
    valid[20:26, 20:26] = False  # unreadable tissue
    valid[70, 2] = False  # unreadable glass
    store = _store(tmp_path / "s.zarr", thumbnail, tissue, valid)
    out = write_qc_image(store, qc_path(tmp_path, store))
    assert out == tmp_path / "qc" / "s.png" and not list(out.parent.glob("*.partial"))
    qc = np.asarray(Image.open(out).convert("RGB"))
    assert qc.shape[1] == cols * PX_PER_CELL and qc.shape[0] > rows * PX_PER_CELL  # the legend below
    drawn = qc[: rows * PX_PER_CELL]
    for i in range(rows):
        for j in range(cols):
            y, x = i * PX_PER_CELL + 4, j * PX_PER_CELL + 4
            if (drawn[y, x] == TISSUE_RGB).all():
                continue  # on the tissue outline
            expected = thumbnail[y, x]
            if tissue[i, j]:
                expected = _blend(expected, ENCODED_RGB, ENCODED_ALPHA)
            if not valid[i, j]:
                expected = _blend(expected, INVALID_RGB, INVALID_ALPHA)
            np.testing.assert_allclose(drawn[y, x], expected, atol=1, err_msg=f"cell {i},{j}")
    outline = np.argwhere((drawn == TISSUE_RGB).all(axis=2))
    y0, y1, x0, x1 = box
    distance = np.minimum.reduce([abs(outline[:, 0] - y0), abs(outline[:, 0] - (y1 - 1)),
                                  abs(outline[:, 1] - x0), abs(outline[:, 1] - (x1 - 1))])
    assert len(outline) > (y1 - y0 + x1 - x0) and distance.max() <= 2  # it traces the tissue's edge only
    assert (drawn[12 * PX_PER_CELL, 10 * PX_PER_CELL + 4] == ENCODED_RGB).all()  # the encoded region's edge
    assert (drawn[20 * PX_PER_CELL, 20 * PX_PER_CELL + 4] == INVALID_RGB).all()


@pytest.mark.parametrize(("thumb_px", "expected_px"), [(40, QC_MIN_PX), (700, 700), (3000, QC_MAX_PX)])
def test_qc_size_is_bounded(tmp_path: Path, thumb_px: int, expected_px: int) -> None:
    cells = thumb_px // PX_PER_CELL
    thumbnail = _tissue_thumbnail(thumb_px, thumb_px // 2, (thumb_px // 4, thumb_px // 2, 2, thumb_px // 4))
    masks = np.ones((cells, cells // 2), bool)
    store = _store(tmp_path / "s.zarr", thumbnail, masks, masks)
    with Image.open(write_qc_image(store, tmp_path / "qc.png")) as qc:
        assert 0 < qc.height - expected_px <= 100 and qc.width >= expected_px // 2  # image, then the legend


def test_scale_bar_measures_what_its_label_says(tmp_path: Path) -> None:
    thumbnail = _tissue_thumbnail(600, 400, (100, 300, 100, 300))
    masks = np.ones((75, 50), bool)
    slide = nic_fast.open_store(_store(tmp_path / "s.zarr", thumbnail, masks, masks, mpp=0.5))
    scale = _Scale.of(slide, QC_MAX_PX)
    assert scale.um_per_px == pytest.approx(0.5 * 16) and scale.cell_px == pytest.approx(PX_PER_CELL)
    bar_px, label = _scale_bar(scale)
    assert label == "0.5 mm" and bar_px * scale.um_per_px == pytest.approx(500, abs=scale.um_per_px)
    plain = nic_fast.open_store(_store(tmp_path / "p.zarr", thumbnail, masks, masks, mpp=None, thumbnail_downsample=2))
    bar_px, label = _scale_bar(_Scale.of(plain, QC_MAX_PX))
    assert label == "100 px (level 0)" and bar_px == 50


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generated slides and a real one, compressed, with a name that needs quoting in a URL."""
    folder = tmp_path_factory.mktemp("slides")
    slides = write_synthetic_slides(folder, 2, size_px=768, seed=4)
    spaced = folder / "slide #2 (copy).tif"
    slides[1].path.rename(spaced)
    out = tmp_path_factory.mktemp("out")
    results = compress_slides([slides[0].path, spaced], out, CompressOptions(tile_cells=4)).results
    assert [r.status for r in results] == ["ok", "ok"]
    return out


def test_qc_of_real_stores_reuses_compress_tissue_detection(compressed: Path, cmu_svs: Path, tmp_path: Path) -> None:
    (result,) = compress_slides([cmu_svs], tmp_path).results
    stores = [*compressed.glob("*.zarr"), Path(result.store)]
    for store in stores:
        slide = nic_fast.open_store(store)
        tissue = _tissue_map(slide)
        assert tissue is not None and tissue.threshold == slide.attrs["tissue_threshold"]
        np.testing.assert_array_equal(tissue.cells, slide.tissue, err_msg=str(store))
        with Image.open(write_qc_image(store, qc_path(tmp_path, store))) as qc:
            assert (np.asarray(qc.convert("RGB")) == TISSUE_RGB).all(axis=2).sum() > 100


def test_qc_of_a_store_with_unreadable_cells(tmp_path: Path, fail_region_reads_at_origin) -> None:
    slide = write_tiff(tmp_path / "s.tif", tissue_image(6 * 128, 6 * 128, seed=6))
    fail_region_reads_at_origin(4 * 128)
    (result,) = compress_slides([slide], tmp_path / "out", CompressOptions(tile_cells=2)).results
    assert result.status == "ok" and result.invalid_cells == 1  # the failing tile at the origin
    qc = np.asarray(Image.open(write_qc_image(result.store, tmp_path / "qc.png")).convert("RGB"))
    cell_px = _Scale.of(nic_fast.open_store(result.store), QC_MAX_PX).cell_px
    corner = qc[: int(cell_px), : int(cell_px)].reshape(-1, 3).astype(int)
    assert ((corner[:, 0] > 150) & (corner[:, 1] < 110)).mean() > 0.9  # the invalid cell is red
    rest = qc[int(3 * cell_px) : int(5 * cell_px), int(3 * cell_px) : int(5 * cell_px)].reshape(-1, 3).astype(int)
    assert ((rest[:, 0] > 150) & (rest[:, 1] < 110)).mean() < 0.05


def test_qc_of_a_grayscale_plain_image(tmp_path: Path) -> None:
    canvas = np.zeros((540, 540), np.uint8)
    canvas[100:200, 300:400] = 255
    Image.fromarray(canvas).save(tmp_path / "canvas.png")
    spec = EncoderSpec(name="gray-mean", input_px=9, mpp=None, channels=1, mean=(0.0,), std=(1.0,), code_size=1,
                       sha256="")
    module = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    encoder_file = save_encoder(module, spec, tmp_path / "gray.pt")
    (result,) = compress_slides([tmp_path / "canvas.png"], tmp_path / "out",
                                CompressOptions(encoder=str(encoder_file), mpp=None)).results
    assert result.status == "ok", result.reason
    slide = nic_fast.open_store(result.store)
    assert _tissue_map(slide) is None and slide.tissue.all()
    bar_px, label = _scale_bar(_Scale.of(slide, QC_MAX_PX))
    assert label.endswith("px (level 0)")
    qc = np.asarray(Image.open(write_qc_image(result.store, tmp_path / "qc.png")).convert("RGB"))
    assert not (qc == TISSUE_RGB).all(axis=2).any()


# -- the report -----------------------------------------------------------------------------


class _Page(HTMLParser):
    """The slide rows (status, data-slide) in order, every link, and every tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, str]] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.texts: list[str] = []
        self._in_slides = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.tags.add(tag)
        if tag == "table" and values.get("class") == "slides":
            self._in_slides = True
        if tag == "tr" and self._in_slides and "data-slide" in values:
            self.rows.append((values["class"] or "", values["data-slide"] or ""))
        for name in ("href", "src"):
            if values.get(name):
                self.links.append(values[name])  # type: ignore[arg-type]

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_slides = False

    def handle_data(self, data: str) -> None:
        self.texts.append(data)


def _summary(out: Path, slides: list[dict]) -> dict:
    return {"nic_fast_version": nic_fast.__version__, "updated_at": "2025-01-02T03:04:05+00:00", "out_dir": str(out),
            "counts": {status: sum(s["status"] == status for s in slides) for status in STATUS_ORDER},
            "runs": [{"run_id": "r1", "host": "node-1", "pid": 11, "started_at": "2025-01-02T03:00:00+00:00",
                      "finished_at": None, "command": "nic-fast compress slides/*.tif -o out",
                      "options": {"encoder": "mean-rgb", "mpp": 0.5, "augment": False}},
                     {"run_id": "r2", "host": "node-2", "pid": 12, "started_at": "2025-01-02T03:01:00+00:00",
                      "finished_at": "2025-01-02T03:04:00+00:00", "command": "nic-fast compress ...",
                      "options": {"encoder": "mean-rgb", "mpp": 0.5, "augment": False}}],
            "workers": [{"run_id": "r1", "host": "node-1", "device": "cpu", "slides": 3, "busy_s": 12.5,
                         "patches_per_s": 810.0, "restarts": 1}],
            "slides": slides}


def _slide(path: str, store: str | None, status: str, reason: str = "", **fields: object) -> dict:
    return {"slide": path, "store": store, "status": status, "reason": reason, "seconds": 1.5, "patches": 120,
            "patches_per_s": 80.0, "grid_shape": [6, 6], "tissue_fraction": 0.42, "invalid_cells": 0,
            "invalid_reasons": {}, "device": "cpu", "attempts": 1, "host": "node-1", "pid": 11, "run_id": "r1",
            "finished_at": "2025-01-02T03:02:00+00:00", **fields}


def test_report_lists_every_slide_failed_first_with_links_that_resolve(compressed: Path) -> None:
    stores = sorted(compressed.glob("*.zarr"))
    for store in stores:
        write_qc_image(store, qc_path(compressed, store))
    slides = [
        _slide("/data/slide_000.tif", str(stores[1]), "ok"),
        _slide("/data/gone.svs", None, "failed", "SlideError: /data/gone.svs: no such file", patches=0,
               grid_shape=None, tissue_fraction=None, attempts=2),
        _slide("/data/slide #2 (copy).tif", str(stores[0]), "skipped", "complete store exists"),
        _slide("/data/b<script>alert(1)</script>.svs", str(compressed / "b.zarr"), "stale",
               "source changed: <b>size</b> differs", invalid_cells=3, invalid_reasons={"JPEG decode error": 3}),
        _slide("/data/crashed.svs", str(compressed / "crashed.zarr"), "failed", "worker died (signal 11)"),
    ]
    path = write_report(compressed, _summary(compressed, slides))
    assert path == compressed / "report.html" and not list(compressed.glob("*.partial"))
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    assert sorted(slide for _, slide in page.rows) == sorted(s["slide"] for s in slides)
    statuses = [status for status, _ in page.rows]
    assert statuses == sorted(statuses, key=STATUS_ORDER.index) and statuses[:2] == ["failed", "failed"]
    assert "script" not in page.tags and "b" not in page.tags  # slide names and reasons are text, not markup
    assert any("<script>alert(1)</script>" in text for text in page.texts)
    images = [link for link in page.links if link.endswith(".png")]
    assert len(images) == 2 * len(stores)  # an <a href> and an <img src> per QC image, none for the others
    for link in page.links:
        assert not urlparse(link).scheme and not link.startswith("/"), link  # relative: the folder can move
        assert (compressed / unquote(link)).is_file(), link
    text = " ".join(page.texts)
    for expected in ("worker died (signal 11)", "JPEG decode error: 3", "42.0 %", "node-2", "810", "no QC image",
                     '"mean-rgb"', "2 run(s)"):
        assert expected in text, expected


def test_report_of_a_real_batch(tmp_path: Path) -> None:
    """The summary compress itself writes, with two slides of one file name in two folders."""
    for folder in ("a", "b"):
        write_synthetic_slides(tmp_path / "slides" / folder, 1, size_px=512, seed=len(folder) + ord(folder))
    slides = [tmp_path / "slides" / folder / "slide_000.tif" for folder in ("a", "b")]
    out = tmp_path / "out"
    outcome = compress_slides([*slides, tmp_path / "gone.svs"], out, store_names="relative")
    stores = [r.store for r in outcome.results if r.status == "ok"]
    assert len(stores) == 2
    images = {write_qc_image(store, qc_path(out, store)) for store in stores}
    assert len(images) == 2 and all(image.is_relative_to(out / "qc") for image in images)  # one per store
    page = _Page()
    page.feed(write_report(out, outcome.summary).read_text(encoding="utf-8"))
    assert [status for status, _ in page.rows] == ["failed", "ok", "ok"]
    assert sorted(slide for _, slide in page.rows) == sorted(s["slide"] for s in outcome.summary["slides"])
    linked = {out / unquote(link) for link in page.links if link.endswith(".png")}
    assert linked == images


def test_report_of_many_slides_stays_small(tmp_path: Path) -> None:
    slides = [_slide(f"/data/s{i:05d}.svs", str(tmp_path / f"s{i:05d}.zarr"), "ok" if i % 50 else "failed",
                     "" if i % 50 else "SlideError: no µm/px") for i in range(3000)]
    path = write_report(tmp_path, _summary(tmp_path, slides))
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    statuses = [status for status, _ in page.rows]
    assert len(statuses) == 3000 and statuses[:60] == ["failed"] * 60 and set(statuses[60:]) == {"ok"}
    assert path.stat().st_size < 3000 * 1500


def test_report_of_a_summary_without_runs(tmp_path: Path) -> None:
    summary = json.loads(json.dumps({"counts": {"ok": 1}, "slides": [_slide("/data/a.svs", None, "ok")]}))
    page = _Page()
    page.feed(write_report(tmp_path, summary).read_text(encoding="utf-8"))
    assert page.rows == [("ok", "/data/a.svs")]
