"""Store format 2: what other tools read (xarray, plain zarr-python), format-1 stores still
read, and damage found instead of read back as zeros (verify, open_store, load)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from nic_fast.batch import compress_slides
from nic_fast.cli import main
from nic_fast.job import CompressOptions
from nic_fast.store import StoreError, open_store, verify_store

PATCH_PX = 128


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A real store of a 0.25 µm/px slide read at 0.5 (downsample 2), so µm, level-0 px and
    working px all differ; 20 × 18 cells, tiles of 8 cells, 8 dihedral variants."""
    folder = tmp_path_factory.mktemp("slide")
    rng = np.random.default_rng(0)
    image = np.clip(np.array([200, 110, 170]) + rng.integers(-60, 60, size=(20 * 256, 18 * 256, 3)), 0, 255)
    desc = "Aperio Image Library v12.0.0 \r\n4608x5120 (256x256) RAW|AppMag = 40|MPP = 0.25"
    tifffile.imwrite(folder / "s.tif", image.astype(np.uint8), tile=(256, 256), compression="zlib",
                     description=desc, photometric="rgb")
    out = folder / "out"
    (result,) = compress_slides([folder / "s.tif"], out, CompressOptions(tile_cells=8, augment=True)).results
    assert result.status == "ok", result.reason
    return out / "s.zarr"


def test_xarray_opens_a_store_as_it_is_in_slide_coordinates(store):
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(store)
    assert ds["embeddings"].dims == ("variant", "row", "col", "channel")
    assert ds["embeddings"].shape == (8, 20, 18, 3) and ds["tissue"].dims == ("row", "col")
    assert ds["thumbnail"].dims == ("thumb_row", "thumb_col", "rgb")
    # cell (i, j) spans working px [128 i, 128 i + 128) = level-0 px [256 i, 256 i + 256) = 64 µm per cell
    np.testing.assert_allclose(ds["row"].values, 64.0 * np.arange(20) + 32.0)
    np.testing.assert_allclose(ds["col_px"].values, 256.0 * np.arange(18) + 128.0)
    assert ds["row"].attrs["units"] == "µm" and "row_px" in ds.coords
    thumb_um_per_px = ds["thumb_col"].values[1] - ds["thumb_col"].values[0]
    assert thumb_um_per_px == pytest.approx(open_store(store).attrs["thumbnail_downsample"] * 0.25)
    np.testing.assert_array_equal(ds["embeddings"].values[0], open_store(store).load(0))
    # select a region in µm, as a viewer would
    window = ds["embeddings"].sel(row=slice(0, 320), col=slice(0, 320))
    assert window.shape == (8, 5, 5, 3)


def test_plain_zarr_reads_it_with_consolidated_metadata(store):
    root = json.loads((store / "zarr.json").read_text())
    assert "consolidated_metadata" in root
    group = zarr.open_group(store, mode="r")
    assert group["embeddings"].metadata.dimension_names == ("variant", "row", "col", "channel")
    codecs = [type(c).__name__ for c in group["embeddings"].metadata.codecs]
    assert codecs[-1] == "Crc32cCodec"
    assert group.attrs["nic_fast"]["format_version"] == 2


def test_a_format_1_store_is_still_read(store, tmp_path):
    old = tmp_path / "old.zarr"
    group = zarr.open_group(old, mode="w", zarr_format=3)  # as nic-fast 0.1 wrote it: no names, no checksums
    embeddings = open_store(store).embeddings[...]
    group.create_array("embeddings", shape=embeddings.shape, dtype="float16", chunks=(1, 8, 8, 3), fill_value=0)
    group["embeddings"][...] = embeddings
    for name in ("tissue", "valid"):
        group.create_array(name, shape=(20, 18), dtype="bool", chunks=(20, 18))[...] = getattr(open_store(store), name)
    thumbnail = open_store(store).thumbnail
    group.create_array("thumbnail", shape=thumbnail.shape, dtype="uint8", chunks=thumbnail.shape)[...] = thumbnail
    group.attrs["nic_fast"] = {**open_store(store).attrs, "format_version": 1}
    old_store = open_store(old)
    np.testing.assert_array_equal(old_store.load(3), open_store(store).load(3))
    assert verify_store(old) == []
    from nic_fast.train.reader import EmbeddingReader
    from nic_fast.train.sampler import StoreSampler

    sampler = StoreSampler.open(old)  # the training loaders read it too
    assert sampler.grid_shape == (20, 18)
    np.testing.assert_array_equal(EmbeddingReader(old)[5, 0:20, 0:18, :], open_store(store).load(5))


def _damaged_copy(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "s.zarr"
    shutil.copytree(store, copy)
    return copy


def test_verify_finds_deleted_truncated_and_overwritten_chunks(store, tmp_path):
    assert verify_store(store) == []
    copy = _damaged_copy(store, tmp_path)
    (copy / "embeddings" / "c" / "2" / "1" / "1" / "0").unlink()  # variant 2, cells rows 8-15, cols 8-15
    chunk = copy / "embeddings" / "c" / "0" / "0" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])  # truncated: cells rows 0-7, cols 16-17
    valid = copy / "valid" / "c" / "1" / "0"
    data = bytearray(valid.read_bytes())
    data[len(data) // 2] ^= 0xFF
    valid.write_bytes(bytes(data))
    (copy / "tissue" / "c" / "0" / "0").unlink()
    problems = {(p.array, p.chunk): p for p in verify_store(copy)}
    assert set(problems) == {("embeddings", (2, 1, 1, 0)), ("embeddings", (0, 0, 2, 0)), ("valid", (1, 0)),
                             ("tissue", (0, 0))}
    assert problems[("embeddings", (2, 1, 1, 0))].problem == "missing"
    assert problems[("embeddings", (2, 1, 1, 0))].describe().endswith("(cells rows 8-15, cols 8-15)")
    assert problems[("embeddings", (0, 0, 2, 0))].describe().endswith("(cells rows 0-7, cols 16-17)")
    assert problems[("valid", (1, 0))].problem == "checksum mismatch"
    result = CliRunner().invoke(main, ["verify", str(store), str(copy)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == f"ok {store}"
    assert lines[1].startswith(f"damaged {copy}: 4 chunk(s) in embeddings, tissue, valid")


def test_a_damaged_store_is_refused_on_open_and_on_load(store, tmp_path):
    copy = _damaged_copy(store, tmp_path)
    (copy / "valid" / "c" / "0" / "0").unlink()
    with pytest.raises(StoreError, match=r"missing chunks in valid \(1 chunk\).*nic-fast verify"):
        open_store(copy)
    result = CliRunner().invoke(main, ["info", str(copy)])
    assert result.exit_code == 1 and "missing chunks" in result.output and "Traceback" not in result.output
    copy = _damaged_copy(store, tmp_path / "b")
    chunk = copy / "embeddings" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x01
    chunk.write_bytes(bytes(data))
    opened = open_store(copy)  # the masks are intact
    np.testing.assert_array_equal(opened.load(0), open_store(store).load(0))
    with pytest.raises(StoreError, match="checksum mismatch"):
        opened.load(1)
    shutil.rmtree(copy / "thumbnail")
    with pytest.raises(StoreError, match="thumbnail missing"):
        open_store(copy)
