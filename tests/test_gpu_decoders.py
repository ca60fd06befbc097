"""The GPU engine's decoders without a GPU: the CPU/GPU split, the fallback to the CPU for
regions the GPU must not or cannot decode, the per-slide (per-level) decoder choice, and
decoding straight into the staging buffer. The GPU sides are fakes."""
from __future__ import annotations

import heapq
from collections import deque
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch

from nic_fast.engine import cuda as cuda_engine
from nic_fast.engine.base import RegionPlan, SlideJob, Timings
from nic_fast.engine.cuda import CpuDecoder, CudaEngine, GpuDecoder, SplitDecoder, StagingRing
from nic_fast.engine.decode_split import DecodeSplit, Side
from nic_fast.grid import GridGeometry
from nic_fast.slides import open_slide
from nic_fast.slides.base import BadRegion, RegionCheck
from nic_fast.synthetic import write_pyramid_tiff

PATCH = 64


# -- the split ------------------------------------------------------------------------------


def simulate(split: DecodeSplit, true_s: dict[str, float], regions: int) -> float:
    """Run ``regions`` through ``split`` on a simulated clock, each side taking its true
    time per region; returns the makespan."""
    now, running, started = 0.0, [], 0
    while started < regions or running:
        if started < regions and split.choose() is not None:
            name = split.acquire()
            heapq.heappush(running, (now + true_s[name], started, name, now))
            started += 1
            continue
        now, _, name, began = heapq.heappop(running)
        split.release(name, now - began)
    return now


def test_split_gives_each_side_regions_in_proportion_to_its_throughput():
    split = DecodeSplit([Side("gpu", 2, 0.02), Side("cpu", 4, 0.4)])  # 100 vs 10 regions/s
    makespan = simulate(split, {"gpu": 0.02, "cpu": 0.4}, 1100)
    shares = split.shares()
    assert sum(shares.values()) == 1100
    assert 0.85 < shares["gpu"] / 1100 < 0.95  # ideal 100 / 110
    assert makespan < 1.1 * 1100 / 110  # close to both sides' combined rate


def test_split_follows_observed_times_when_the_measurement_was_wrong():
    split = DecodeSplit([Side("gpu", 2, 1.0), Side("cpu", 4, 0.1)])  # measured: the GPU looked slow
    simulate(split, {"gpu": 0.01, "cpu": 0.1}, 2000)  # it is fast
    assert split.shares()["gpu"] > 0.7 * 2000
    assert split.sides["gpu"].region_s < 0.02


def test_split_prefers_the_faster_side_uses_the_other_when_it_is_full_and_waits_when_both_are():
    split = DecodeSplit([Side("cpu", 1, 1.0), Side("gpu", 1, 0.01)])
    assert split.acquire() == "gpu" and split.acquire() == "cpu"
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(split.acquire()))
    waiter.start()
    time.sleep(0.1)
    assert got == []  # every slot is taken
    split.release("cpu", 1.0)
    waiter.join(timeout=5)
    assert got == ["cpu"]


def test_split_refuses_sides_without_capacity_or_time():
    with pytest.raises(ValueError, match="capacity"):
        DecodeSplit([Side("cpu", 0, 0.1)])


# -- slides and decoders -----------------------------------------------------------------------


def write_slide(path: Path, compression: str) -> Path:
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(140, 50, (512, 640, 3)), 0, 255).astype(np.uint8)
    if compression == "jpeg":
        write_pyramid_tiff(path, image, mpp=0.5, tile_px=128)
    else:
        desc = "Aperio Image Library v12.0.0 \r\n640x512 (128x128) RAW|AppMag = 20|MPP = 0.5"
        tifffile.imwrite(path, image, tile=(128, 128), compression=compression, description=desc, photometric="rgb")
    return path


def job_of(reader, tile_cells: int = 4) -> SlideJob:
    grid = GridGeometry.over_level(*reader.level_dims[0], patch_px=PATCH, stride_px=PATCH, downsample=1)
    tiles = []
    for tile in grid.tiles(tile_cells):
        cells = np.argwhere(np.ones(tile.shape, bool)) + (tile.i0, tile.j0)
        tiles.append((tile, cells))
    return SlideJob(reader, 0, 1, grid, store=None, tiles=tiles, timings=Timings(), progress=None)


def plans_of(job: SlideJob) -> list[RegionPlan]:
    return [RegionPlan.of(job.grid, tile, cells) for tile, cells in job.tiles]


def ring_for(job: SlideJob, count: int = 6) -> StagingRing:
    return StagingRing(count, 4 * PATCH * 4 * PATCH * 3, 16, pin=False)


class FakeReads:
    """A GPU decoder stand-in: host tensors, an event that is already done."""

    name = "fake"

    def __init__(self, reader, fail: bool = False) -> None:
        self.reader, self.fail, self.calls, self.closed = reader, fail, 0, False

    def read(self, plan: RegionPlan, absent):
        self.calls += 1
        if self.fail:
            raise RuntimeError("nvjpeg: unsupported stream")
        pixels = torch.from_numpy(self.reader.read_region(0, plan.y0, plan.x0, plan.height, plan.width))
        return pixels, None, SimpleNamespace(synchronize=lambda: None)

    def close(self) -> None:
        self.closed = True


def test_cpu_decoder_decodes_into_its_staging_slot_and_frees_it_when_no_cell_is_left(tmp_path, monkeypatch):
    with open_slide(write_slide(tmp_path / "s.tif", "jpeg"), backend="tifffile") as reader:
        job = job_of(reader)
        ring = ring_for(job)
        decoder = CpuDecoder(job, ring, threads=2)
        plan = plans_of(job)[0]
        staged = decoder(plan)
        np.testing.assert_array_equal(staged.slot.pixel_view(plan.height, plan.width),
                                      reader.read_region(0, plan.y0, plan.x0, plan.height, plan.width))
        assert ring.free == ring.count - 1
        ring.release(staged.slot)
        monkeypatch.setattr(type(reader), "read_region_checked",
                            lambda self, *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
        lost = decoder(plan)
        assert lost.plan.n_cells == 0 and lost.slot is None and ring.free == ring.count
        decoder.close()


def test_gpu_decoder_hands_failed_and_corrupt_regions_to_the_cpu_without_losing_cells(tmp_path, monkeypatch):
    with open_slide(write_slide(tmp_path / "s.tif", "jpeg"), backend="tifffile") as reader:
        job = job_of(reader)
        cpu = CpuDecoder(job, ring_for(job), threads=2)
        plan = plans_of(job)[0]
        failing = GpuDecoder(FakeReads(reader, fail=True), job, cpu)
        staged = failing(plan)
        assert staged.slot is not None and staged.plan.n_cells == plan.n_cells and len(staged.failed_cells) == 0
        assert failing.report()["regions_on_cpu_instead"] == {"gpu decode failed": 1}
        cpu.ring.release(staged.slot)

        reads = FakeReads(reader)
        gpu = GpuDecoder(reads, job, cpu)
        clean = gpu(plan)
        assert clean.device_pixels is not None and clean.slot is None and reads.calls == 1
        corrupt = RegionCheck(bad=[BadRegion(plan.y0, plan.x0, plan.y0 + 10, plan.x0 + 10, "corrupt JPEG tile")])
        monkeypatch.setattr(type(reader), "check_region", lambda self, *args: corrupt)
        rerouted = gpu(plan)
        assert reads.calls == 1 and rerouted.slot is not None  # the GPU never saw the corrupt tile
        assert gpu.report()["regions_on_cpu_instead"] == {"corrupt tiles": 1}
        cpu.ring.release(rerouted.slot)
        gpu.close()
        assert reads.closed


def test_split_decoder_runs_both_sides_at_once_and_returns_every_region(tmp_path):
    with open_slide(write_slide(tmp_path / "s.tif", "jpeg"), backend="tifffile") as reader:
        job = job_of(reader, tile_cells=2)
        ring = ring_for(job, count=8)
        cpu = CpuDecoder(job, ring, threads=3)
        gpu = GpuDecoder(FakeReads(reader), job, cpu)
        decoder = SplitDecoder(cpu, gpu, DecodeSplit([Side("gpu", gpu.threads, 0.001), Side("cpu", 3, 0.001)]))
        plans = plans_of(job)
        staged = []

        def consume(future) -> None:  # as the engine does: in order, freeing each slot after use
            staged.append(future.result())
            if staged[-1].slot is not None:
                ring.release(staged[-1].slot)

        with ThreadPoolExecutor(decoder.threads) as pool:
            in_flight: deque = deque()
            for plan in plans:
                in_flight.append(pool.submit(decoder, plan))
                if len(in_flight) >= decoder.lookahead:
                    consume(in_flight.popleft())
            while in_flight:
                consume(in_flight.popleft())
        assert [s.plan.tile for s in staged] == [p.tile for p in plans]
        shares = decoder.report()["regions"]
        assert sum(shares.values()) == len(plans) and shares["gpu"] > 0 and shares["cpu"] > 0
        decoder.close()


class FakeTileReads(FakeReads):
    made: list[str] = []

    def __init__(self, tiles, level, device) -> None:
        tiles.close()
        FakeTileReads.made.append(str(level.grid.compression))
        self.reader = open_slide(tiles_path[0], backend="tifffile")
        super().__init__(self.reader)

    def close(self) -> None:
        self.reader.close()


tiles_path: list[Path] = []


def bare_engine(decode: str) -> CudaEngine:
    """The engine's decoder choice without a GPU: no streams, slots or graphs."""
    engine = object.__new__(CudaEngine)
    engine.c = SimpleNamespace(decode=decode, workers=2)
    engine.device = torch.device("cuda", 0)
    engine._measured = {}
    return engine


def test_decoder_is_chosen_per_slide_from_its_levels_compression(tmp_path, monkeypatch):
    """A JPEG .tif gets the GPU; a Deflate .tif after it does not (the old choice was kept
    per file suffix); the measurement is kept per kind of level, not per slide."""
    monkeypatch.setattr(cuda_engine, "TileDeviceReads", FakeTileReads)
    monkeypatch.setattr(cuda_engine, "nvimgcodec_available", lambda: True)
    measured: list[str] = []
    real_measure = cuda_engine._measure_decoders
    monkeypatch.setattr(cuda_engine, "_measure_decoders",
                        lambda job, cpu, gpu: measured.append(job.reader.path.name) or real_measure(job, cpu, gpu))
    engine = bare_engine("auto")
    chosen = []
    for name, compression in [("a.tif", "jpeg"), ("b.tif", "zlib"), ("c.tif", "jpeg"), ("d.tif", "lzw")]:
        path = write_slide(tmp_path / name, compression)
        tiles_path[:] = [path]
        with open_slide(path, backend="tifffile") as reader:
            job = job_of(reader)
            decoder, attrs = engine._decoder(job, ring_for(job))
            chosen.append((attrs["device"], attrs.get("reason", "")))
            decoder.close()
    assert [device for device, _ in chosen] == ["cpu+gpu", "cpu", "cpu+gpu", "cpu"]
    assert "Deflate tiles, not JPEG" in chosen[1][1] and "LZW tiles, not JPEG" in chosen[3][1]
    assert measured == ["a.tif"]


def test_forced_gpu_decode_never_reaches_a_gpu_decoder_on_a_non_jpeg_level(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_engine, "TileDeviceReads", FakeTileReads)
    monkeypatch.setattr(cuda_engine, "nvimgcodec_available", lambda: True)
    FakeTileReads.made.clear()
    path = write_slide(tmp_path / "z.tif", "zlib")
    with open_slide(path, backend="tifffile") as reader:
        job = job_of(reader)
        decoder, attrs = bare_engine("gpu")._decoder(job, ring_for(job))
        decoder.close()
    assert isinstance(decoder, CpuDecoder) and attrs["device"] == "cpu" and FakeTileReads.made == []
