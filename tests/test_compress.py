"""`compress` end to end: the store contract, augmentation equivalence, failure isolation,
skip / overwrite / resume, zero tissue, unreadable regions, the downsample path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

import nic_fast
from nic_fast.cli import main
from nic_fast.batch import compress_slides
from nic_fast.compress import CompressOptions, Compressor
from nic_fast.engine import cpu as cpu_engine
from nic_fast.encoders import EncoderSpec, save_encoder
from nic_fast.grid import dihedral
from nic_fast.store import StoreError, open_store

PATCH_PX = 128


def write_tiff(path: Path, image: np.ndarray, mpp: float | None = 0.5) -> Path:
    """Single-level tiled TIFF, lossless (zlib) so a transformed copy has exactly transformed pixels."""
    height, width = image.shape[:2]
    desc = f"Aperio Image Library v12.0.0 \r\n{width}x{height} (128x128) RAW"
    if mpp is not None:
        desc += f"|AppMag = 20|MPP = {mpp}"
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib", description=desc, photometric="rgb")
    return path


def tissue_image(height: int, width: int, seed: int, background_right: int = 0) -> np.ndarray:
    """Pink-purple textured 'tissue'; the rightmost ``background_right`` px are glass."""
    rng = np.random.default_rng(seed)
    base = np.array([200, 110, 170], np.int16)
    image = np.clip(base + rng.integers(-60, 60, size=(height, width, 3)), 0, 255).astype(np.uint8)
    if background_right:
        image[:, width - background_right :] = 242
    return image


@pytest.fixture(scope="module")
def conv_encoder(tmp_path_factory) -> Path:
    """A deterministic encoder that is NOT invariant to rotations and flips."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.Tanh(), torch.nn.Flatten(),
                                 torch.nn.Linear(4 * 16 * 16, 6))
    spec = EncoderSpec(name="test-conv", input_px=PATCH_PX, mpp=0.5, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                       code_size=6, sha256="")
    return save_encoder(module, spec, tmp_path_factory.mktemp("enc") / "conv.pt")


def compress(slides, out: Path, **options) -> list:
    return compress_slides(slides, out, CompressOptions(**options)).results


def test_real_svs_store_contract(cmu_svs, tmp_path):
    (result,) = compress([cmu_svs], tmp_path)
    assert result.status == "ok", result.reason
    store = nic_fast.open_store(tmp_path / "CMU-1-Small-Region.zarr")
    assert store.grid_shape == (23, 17)
    assert store.embeddings.dtype == np.float16 and store.embeddings.shape == (1, 23, 17, 3)
    assert store.tissue.dtype == bool and store.valid.dtype == bool and store.valid.all()
    assert store.thumbnail.dtype == np.uint8 and store.thumbnail.shape[2] == 3
    assert 0.2 < store.tissue.mean() < 0.8  # a skin section on glass
    a = store.attrs
    assert a["status"] == "complete" and a["format_version"] == 2
    assert a["level"] == 0 and a["downsample"] == 1 and abs(a["scanned_mpp"] - 0.499) < 1e-6
    assert a["encoder"]["name"] == "mean-rgb" and a["grid_shape"] == [23, 17]
    assert a["source"]["name"] == "CMU-1-Small-Region.svs" and len(a["source"]["header_sha256"]) == 64
    # mean-rgb of tissue cells equals the mean of their pixels; background holds the white patch's embedding
    from nic_fast.slides import open_slide

    with open_slide(cmu_svs) as reader:
        i, j = np.argwhere(store.tissue)[len(np.argwhere(store.tissue)) // 2]
        patch = reader.read_region(0, int(i) * 128, int(j) * 128, 128, 128)
    np.testing.assert_allclose(store.load()[i, j], patch.reshape(-1, 3).mean(0) / 255, atol=2e-3)
    np.testing.assert_array_equal(store.load()[~store.tissue], 1.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"] == {"ok": 1, "skipped": 0, "failed": 0, "stale": 0}
    assert summary["slides"][0]["patches"] == int(store.tissue.sum())


def test_augment_variant_k_equals_compressing_the_transformed_slide(tmp_path, conv_encoder):
    image = tissue_image(5 * PATCH_PX, 7 * PATCH_PX, seed=1)
    original = write_tiff(tmp_path / "slide.tif", image)
    compress([original], tmp_path / "aug", encoder=str(conv_encoder), augment=True)
    augmented = open_store(tmp_path / "aug" / "slide.zarr")
    assert augmented.embeddings.shape == (8, 5, 7, 6) and augmented.tissue.all()
    stacked = augmented.embeddings[...]
    assert not np.allclose(stacked[0], stacked[1], atol=1e-2)  # the encoder sees the transform
    for k in range(8):
        transformed = write_tiff(tmp_path / f"slide_t{k}.tif", np.ascontiguousarray(dihedral(image, k)))
        compress([transformed], tmp_path / f"t{k}", encoder=str(conv_encoder))
        direct = open_store(tmp_path / f"t{k}" / f"slide_t{k}.zarr").load()
        np.testing.assert_array_equal(dihedral(stacked[k], k), direct, err_msg=f"variant {k}")


def test_failed_slides_are_isolated_and_reported(tmp_path, cmu_svs):
    good = write_tiff(tmp_path / "good.tif", tissue_image(256, 384, seed=2))
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00 this is not a slide" * 100)
    no_mpp = write_tiff(tmp_path / "no_mpp.tif", tissue_image(256, 256, seed=3), mpp=None)
    runner = CliRunner()
    result = runner.invoke(main, ["compress", str(broken), str(good), str(tmp_path / "missing.svs"), str(no_mpp),
                                  "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {Path(s["slide"]).name: s for s in summary["slides"]}
    assert status["good.tif"]["status"] == "ok"
    assert status["broken.svs"]["status"] == "failed" and "broken.svs" in status["broken.svs"]["reason"]
    assert status["missing.svs"]["status"] == "failed"
    reason = status["no_mpp.tif"]["reason"]
    assert status["no_mpp.tif"]["status"] == "failed" and "--slide-mpp" in reason and "--slide-mpp-csv" in reason
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.tissue.geojson", "good.zarr", "qc", "records",
                                                                 "report.html", "runs", "summary.json"]
    assert (tmp_path / "out" / "qc" / "good.png").is_file()
    # the override rescues the slide without metadata; the good one is skipped, and the summary, rebuilt
    # from both runs' records, keeps its outcome
    result = runner.invoke(main, ["compress", str(good), str(no_mpp), "-o", str(tmp_path / "out"), "--slide-mpp", "0.5"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {s["name"]: s["status"] for s in summary["slides"]} == {"broken": "failed", "good": "ok",
                                                                  "missing": "failed", "no_mpp": "ok"}
    assert len(summary["runs"]) == 2


def test_skip_and_overwrite(tmp_path):
    slide = write_tiff(tmp_path / "s.tif", tissue_image(256, 256, seed=4))
    (first,) = compress([slide], tmp_path / "out")
    created = open_store(tmp_path / "out" / "s.zarr").attrs["timings"]
    (again,) = compress([slide], tmp_path / "out")
    assert (first.status, again.status) == ("ok", "skipped")
    (redo,) = compress([slide], tmp_path / "out", overwrite=True)
    assert redo.status == "ok"
    assert open_store(tmp_path / "out" / "s.zarr").attrs["timings"] != created
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["qc", "records", "report.html", "runs",
                                                                 "s.tissue.geojson", "s.zarr", "summary.json"]


def test_interrupted_slide_is_never_visible_and_resumes(tmp_path, conv_encoder, monkeypatch):
    image = tissue_image(6 * PATCH_PX, 5 * PATCH_PX, seed=5)
    slide = write_tiff(tmp_path / "s.tif", image)
    options = dict(encoder=str(conv_encoder), tile_cells=2, batch_size=4, workers=1)
    compress([slide], tmp_path / "clean", **options)
    clean = open_store(tmp_path / "clean" / "s.zarr").load()

    calls = {"n": 0}
    original = cpu_engine.encode_to_host

    def crashing(config, patches):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return original(config, patches)

    monkeypatch.setattr(cpu_engine, "encode_to_host", crashing)
    (result,) = compress([slide], tmp_path / "out", **options)
    assert result.status == "failed" and "simulated crash" in result.reason
    assert not (tmp_path / "out" / "s.zarr").exists()
    with pytest.raises(StoreError, match="not finished"):
        open_store(tmp_path / "out" / "s.zarr")
    done = (tmp_path / "out" / "s.zarr.partial" / "tiles_done.txt").read_text().split("\n")
    assert 1 <= len([line for line in done if line]) < 6

    encoded = []
    monkeypatch.setattr(cpu_engine, "encode_to_host", lambda config, p: (encoded.append(len(p)), original(config, p))[1])
    (result,) = compress([slide], tmp_path / "out", **options)
    assert result.status == "ok"
    assert sum(encoded) < 30  # finished tiles were not redone
    np.testing.assert_array_equal(open_store(tmp_path / "out" / "s.zarr").load(), clean)


def test_zero_tissue_gives_complete_empty_store(tmp_path, caplog):
    blank = np.full((384, 384, 3), 240, np.uint8)
    slide = write_tiff(tmp_path / "blank.tif", blank)
    with caplog.at_level("WARNING"):
        (result,) = compress([slide], tmp_path / "out")
    assert result.status == "ok" and result.patches == 0
    assert "no tissue" in caplog.text
    store = open_store(tmp_path / "out" / "blank.zarr")
    assert store.grid_shape == (3, 3) and not store.tissue.any()
    np.testing.assert_array_equal(store.load(), 1.0)  # the blank background embedding: mean-rgb of white


def test_an_undecodable_tile_costs_only_the_cells_it_touches(tmp_path, fail_region_reads_at_origin):
    slide = write_tiff(tmp_path / "s.tif", tissue_image(4 * PATCH_PX, 4 * PATCH_PX, seed=6))
    (clean,) = compress([slide], tmp_path / "clean", tile_cells=2)
    fail_region_reads_at_origin(4 * PATCH_PX)  # the 2×2-cell region at the origin fails; its tile (0, 0) keeps failing
    (result,) = compress([slide], tmp_path / "out", tile_cells=2)
    assert result.status == "ok" and result.invalid_cells == 1
    assert list(result.invalid_reasons) == [f"decode error: {slide}: JPEG decode error"]
    store, reference = open_store(tmp_path / "out" / "s.zarr"), open_store(tmp_path / "clean" / "s.zarr")
    expected = np.ones((4, 4), bool)
    expected[0, 0] = False
    np.testing.assert_array_equal(store.valid, expected)
    np.testing.assert_array_equal(store.load()[expected], reference.load()[expected])  # re-read, bit for bit


def test_downsample_path_for_quarter_micron_slide(tmp_path):
    image = tissue_image(4 * 256, 3 * 256, seed=8)
    slide = write_tiff(tmp_path / "x40.tif", image, mpp=0.25)
    (result,) = compress([slide], tmp_path / "out")
    store = open_store(tmp_path / "out" / "x40.zarr")
    assert result.status == "ok" and store.grid_shape == (4, 3)
    assert store.attrs["downsample"] == 2 and store.attrs["mpp"] == pytest.approx(0.5)
    i, j = 2, 1
    np.testing.assert_allclose(store.load()[i, j], image[i * 256 : (i + 1) * 256, j * 256 : (j + 1) * 256]
                               .reshape(-1, 3).mean(0) / 255, atol=2e-3)


def test_patch_size_must_match_encoder(tmp_path):
    with pytest.raises(ValueError, match="--patch-px 64"):
        Compressor(CompressOptions(patch_px=64))


def test_info_and_incomplete_store(tmp_path, cmu_svs):
    compress([cmu_svs], tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["info", str(tmp_path / "CMU-1-Small-Region.zarr")])
    assert result.exit_code == 0 and "23 × 17" in result.output and "tissue fraction" in result.output
    as_json = runner.invoke(main, ["info", "--json", str(tmp_path / "CMU-1-Small-Region.zarr")])
    assert json.loads(as_json.output)["grid_shape"] == [23, 17]
    (tmp_path / "fake.zarr").mkdir()
    result = runner.invoke(main, ["info", str(tmp_path / "fake.zarr")])
    assert result.exit_code != 0 and "not a nic-fast store" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_options_without_cuda_fail_with_the_fix(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["compress", "x.svs", "-o", str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code == 2 and "sees no CUDA device" in result.output and "use cpu" in result.output
    with pytest.raises(ValueError, match="--precision fp16 needs a GPU"):
        Compressor(CompressOptions(precision="fp16"))
    with pytest.raises(ValueError, match="--decode gpu needs --device cuda"):
        Compressor(CompressOptions(decode="gpu"))


def test_a_slide_prepared_ahead_is_used_once_claimed_and_shows_nothing_before(tmp_path, conv_encoder, monkeypatch):
    """The next slide's setup (open, level, thumbnail, tissue) runs while the current one
    streams, creating nothing on disk; compressing it then uses that setup, unless its
    file changed since; one never compressed is discarded with its reader closed."""
    slides = [write_tiff(tmp_path / f"s{k}.tif", tissue_image(384, 512, seed=k)) for k in range(3)]
    out = tmp_path / "out"
    out.mkdir()
    compressor = Compressor(CompressOptions(encoder=str(conv_encoder), tile_cells=2))
    compressor.prefetches = True  # as on a GPU engine
    prepared: list[str] = []
    real_prepare = compressor._prepare
    monkeypatch.setattr(compressor, "_prepare", lambda slide: prepared.append(slide.name) or real_prepare(slide))
    compressor.prefetch(slides[1])
    compressor.prefetch(slides[2])
    for prefetch in compressor._prefetched.values():
        prefetch.result()  # both prepared
    assert sorted(prepared) == ["s1.tif", "s2.tif"] and list(out.iterdir()) == []
    first = compressor.compress_slide(slides[1], out / "s1.zarr")
    assert first.status == "ok" and len(prepared) == 2  # s1 was not prepared again
    slides[2].touch()  # changed since it was prepared: prepared again
    second = compressor.compress_slide(slides[2], out / "s2.zarr")
    assert second.status == "ok" and prepared.count("s2.tif") == 2
    reference = compress([slides[1]], tmp_path / "plain", encoder=str(conv_encoder), tile_cells=2)[0]
    np.testing.assert_array_equal(open_store(out / "s1.zarr").embeddings[...],
                                  open_store(Path(reference.store)).embeddings[...])
    compressor.prefetch(slides[0])
    (pending,) = compressor._prefetched.values()
    reader = pending.result().reader
    closed: list[bool] = []
    monkeypatch.setattr(reader, "close", lambda: closed.append(True))
    compressor.close()
    assert closed == [True] and compressor._prefetched == {}
