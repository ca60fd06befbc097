"""The GPU engine: its host-side buffer logic (on any machine), and, on a CUDA device,
`compress --device cuda` against the CPU engine on the same slides (augmentation, half
precision and its recorded error, CUDA graphs on and off, GPU decode and its choice per
level, failed regions, resume). The decoders' logic without a GPU: test_gpu_decoders.py."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from nic_fast.batch import compress_slides
from nic_fast.compress import CompressOptions
from nic_fast.encoders import EncoderSpec, save_encoder
from nic_fast.engine.cuda import EventReleaser, StagingRing
from nic_fast.store import open_store

PATCH_PX = 128


def on_gpu(test: Callable[..., None]) -> Callable[..., None]:
    """Mark a test `gpu` and skip it where there is no CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


# -- host-side logic, no GPU needed -------------------------------------------------------------


def test_staging_ring_blocks_when_every_buffer_is_in_use():
    ring = StagingRing(2, capacity_bytes=64 * 64 * 3, max_cells=4, pin=False)
    a, b = ring.acquire(), ring.acquire()
    view = a.pixel_view(10, 20)
    assert view.shape == (10, 20, 3) and view.base is not None
    view[...] = 7
    assert a.pixels[: 10 * 20 * 3].eq(7).all()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(ring.acquire()))
    waiter.start()
    time.sleep(0.1)
    assert not got and ring.free == 0  # the third reader waits for a buffer
    ring.release(b)
    waiter.join(timeout=5)
    assert got == [b]


def test_event_releaser_releases_in_order_after_each_wait_even_when_a_wait_fails():
    released: list[int] = []
    gate = threading.Event()
    releaser = EventReleaser()
    releaser.put(lambda: gate.wait(5), lambda: released.append(1))
    releaser.put(lambda: None, lambda: released.append(2))
    time.sleep(0.1)
    assert released == []  # the first wait holds the queue, as a pending copy would
    gate.set()

    def failing_wait() -> None:
        raise RuntimeError("device error")

    releaser.put(failing_wait, lambda: released.append(3))
    with pytest.raises(RuntimeError, match="device error"):
        releaser.close()
    assert released == [1, 2, 3]


# -- the engine on a GPU ------------------------------------------------------------------------


def write_tiff(path: Path, image: np.ndarray, *, compression: str = "zlib", mpp: float = 0.5) -> Path:
    height, width = image.shape[:2]
    desc = f"Aperio Image Library v12.0.0 \r\n{width}x{height} (128x128) RAW|AppMag = 20|MPP = {mpp}"
    tifffile.imwrite(path, image, tile=(128, 128), compression=compression, description=desc, photometric="rgb")
    return path


def tissue_image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.clip(np.array([200, 110, 170]) + rng.integers(-60, 60, size=(height, width, 3)), 0, 255)
    image[:, -PATCH_PX:] = 242  # a column of glass: background cells
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def conv_encoder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.Tanh(), torch.nn.Flatten(),
                                 torch.nn.Linear(8 * 16 * 16, 16))
    spec = EncoderSpec(name="test-conv", input_px=PATCH_PX, mpp=0.5, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                       code_size=16, sha256="")
    return save_encoder(module, spec, tmp_path_factory.mktemp("enc") / "conv.pt")


def compress(slide: Path, out: Path, **options) -> tuple[np.ndarray, dict]:
    (result,) = compress_slides([slide], out, CompressOptions(**options)).results
    assert result.status == "ok", result.reason
    store = open_store(out / f"{slide.stem}.zarr")
    return store.embeddings[...].astype(np.float32), store.attrs


@on_gpu
@pytest.mark.parametrize("precision,atol,max_relative_error", [("fp16", 3e-2, 1e-2), ("bf16", 0.2, 5e-2)])
def test_gpu_matches_cpu_with_augmentation_and_records_its_error(tmp_path, conv_encoder, precision, atol,
                                                                 max_relative_error):
    slide = write_tiff(tmp_path / "s.tif", tissue_image(7 * PATCH_PX, 9 * PATCH_PX, seed=1))
    options = dict(encoder=str(conv_encoder), augment=True, tile_cells=4, batch_size=16)
    cpu, _ = compress(slide, tmp_path / "cpu", **options)
    gpu, attrs = compress(slide, tmp_path / "gpu", device="cuda", precision=precision, workers=3, **options)
    assert gpu.shape == cpu.shape == (8, 7, 9, 16)
    np.testing.assert_allclose(gpu, cpu, atol=atol, rtol=0)
    error = attrs["precision"]
    assert error["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[precision]
    assert error["sample_patches"] == 16 and 0 < error["relative_l2_error"] < max_relative_error
    assert attrs["device"].startswith("cuda") and attrs["cuda_graph"] is True
    assert {"batch_wait_s", "tile_wait_s", "read_wait_s"} <= attrs["timings"].keys()


@on_gpu
@pytest.mark.parametrize("graph", [True, False])
def test_graph_replay_and_eager_give_the_same_store(tmp_path, conv_encoder, graph):
    slide = write_tiff(tmp_path / "s.tif", tissue_image(5 * PATCH_PX, 6 * PATCH_PX, seed=2))
    options = dict(encoder=str(conv_encoder), device="cuda", tile_cells=2, batch_size=8)
    reference, _ = compress(slide, tmp_path / "eager", cuda_graph=False, **options)
    result, attrs = compress(slide, tmp_path / "run", cuda_graph=graph, **options)
    assert attrs["cuda_graph"] is graph
    np.testing.assert_allclose(result, reference, atol=1e-3, rtol=0)


@on_gpu
def test_gpu_decode_and_cpu_decode_agree(tmp_path, conv_encoder):
    """A JPEG slide decoded on the GPU (nvImageCodec, or cuCIM's nvJPEG) and on the CPU
    (libjpeg-turbo): the decoders may differ by a grey level, so the embeddings agree
    loosely; no region of this clean slide falls back to the CPU."""
    slide = write_tiff(tmp_path / "j.tif", tissue_image(4 * PATCH_PX, 5 * PATCH_PX, seed=3), compression="jpeg")
    options = dict(encoder=str(conv_encoder), device="cuda", tile_cells=2, batch_size=8)
    cpu, cpu_attrs = compress(slide, tmp_path / "cpu", decode="cpu", **options)
    gpu, gpu_attrs = compress(slide, tmp_path / "gpu", decode="gpu", **options)
    if gpu_attrs["decode"]["device"] == "cpu":
        pytest.skip(f"no GPU decoder here: {gpu_attrs['decode']['reason']}")
    assert cpu_attrs["decode"]["device"] == "cpu" and gpu_attrs["decode"]["device"] == "gpu"
    assert gpu_attrs["decode"]["regions_on_cpu_instead"] == {}, gpu_attrs["decode"]
    np.testing.assert_allclose(gpu, cpu, atol=5e-2, rtol=0)
    auto, auto_attrs = compress(slide, tmp_path / "auto", decode="auto", **options)
    decode = auto_attrs["decode"]
    assert decode["device"] == "cpu+gpu" and decode["reason"] == "measured", decode
    tissue = open_store(tmp_path / "auto" / "j.zarr").tissue[...]
    regions = sum(tissue[i : i + 2, j : j + 2].any() for i in range(0, 4, 2) for j in range(0, 5, 2))
    assert sum(decode["regions"].values()) == regions, decode  # one region per tile with tissue
    np.testing.assert_allclose(auto, cpu, atol=5e-2, rtol=0)


@on_gpu
def test_a_deflate_slide_never_reaches_a_gpu_decoder(tmp_path, conv_encoder):
    slide = write_tiff(tmp_path / "z.tif", tissue_image(4 * PATCH_PX, 4 * PATCH_PX, seed=6))
    for mode in ("auto", "gpu"):
        _, attrs = compress(slide, tmp_path / mode, encoder=str(conv_encoder), device="cuda", decode=mode, tile_cells=2)
        assert attrs["decode"]["device"] == "cpu" and "not JPEG" in attrs["decode"]["reason"], attrs["decode"]


@on_gpu
def test_unreadable_region_marks_cells_invalid_on_the_gpu(tmp_path, fail_region_reads_at_origin):
    slide = write_tiff(tmp_path / "s.tif", tissue_image(4 * PATCH_PX, 4 * PATCH_PX, seed=4))
    fail_region_reads_at_origin(4 * PATCH_PX)
    embeddings, attrs = compress(slide, tmp_path / "out", device="cuda", decode="cpu", tile_cells=2)
    store = open_store(tmp_path / "out" / "s.zarr")
    expected = np.ones((4, 4), bool)
    expected[:2, :2] = False
    np.testing.assert_array_equal(store.valid, expected)
    assert attrs["invalid_cells"] == 4
    np.testing.assert_array_equal(embeddings[0, :2, :2], 1.0)  # background: mean-rgb of white


@on_gpu
def test_many_small_tiles_do_not_starve_the_tile_pool(tmp_path):
    """One tissue cell per tile and a batch larger than the tile pool: the engine must
    encode partial batches to free tiles rather than wait for a full one."""
    image = np.full((20 * PATCH_PX, 20 * PATCH_PX, 3), 242, np.uint8)
    rng = np.random.default_rng(5)
    for i in range(0, 20, 2):
        for j in range(0, 20, 2):
            image[i * PATCH_PX : (i + 1) * PATCH_PX, j * PATCH_PX : (j + 1) * PATCH_PX] = rng.integers(
                60, 200, size=(PATCH_PX, PATCH_PX, 3))
    slide = write_tiff(tmp_path / "sparse.tif", image)
    cpu, _ = compress(slide, tmp_path / "cpu", tile_cells=2, batch_size=512, min_tissue=0.5)
    gpu, attrs = compress(slide, tmp_path / "gpu", device="cuda", tile_cells=2, batch_size=512, workers=1,
                          min_tissue=0.5)
    np.testing.assert_allclose(gpu, cpu, atol=2e-3, rtol=0)
    assert attrs["timings"]["tile_wait_s"] >= 0
