"""benchmarks/synthetic.py end to end on a tiny configuration: every stage runs, and what
it writes (stores in pixel units, per-encoder results, results.md, the four plots) is there
and consistent."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from nic_fast.synthetic_mnist import DEFAULT_DIGITS

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not DEFAULT_DIGITS.is_file(), reason="needs ../shared/data/mnist/mnist-10k.npz")


def load_benchmark():
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling module machine.py, as when run as a script
    spec = importlib.util.spec_from_file_location("synthetic_benchmark", ROOT / "benchmarks" / "synthetic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_tilted_cells_follow_the_mask(tmp_path):
    """The benchmark scores Grad-CAM against mask_to_grid(..., TILTED) on a plain-image store."""
    from PIL import Image
    from test_train_stores import write_store

    from nic_fast.store import open_store
    from nic_fast.synthetic_mnist import TILTED
    from nic_fast.train.gradcam import mask_to_grid

    mask = np.zeros((27, 36), np.uint8)
    mask[0:9, 9:18] = 1  # cell (0, 1) wholly tilted
    mask[9:14, 0:9] = 1  # cell (1, 0) 5/9 tilted: kept
    mask[18:22, 0:9] = 1  # cell (2, 0) 4/9 tilted: dropped
    mask[18:27, 27:36] = 2  # the other rectangle never counts
    Image.fromarray(mask).save(tmp_path / "m.png")
    slide = open_store(write_store(tmp_path / "s.zarr", np.zeros((1, 3, 4, 1), np.float16), np.ones((3, 4), bool),
                                   stride_px=9, mpp=None, scanned_mpp=None, thumbnail_downsample=9 / 8))
    cells = mask_to_grid(tmp_path / "m.png", slide, TILTED)
    np.testing.assert_array_equal(np.argwhere(cells), [[0, 1], [1, 0]])


def canvas(folder, pixels, cell_map=None):
    """A benchmark Canvas over an image (and cell map) written to ``folder``."""
    from PIL import Image

    bench = load_benchmark()
    Image.fromarray(pixels.astype(np.uint8)).save(folder / "c.png")
    if cell_map is not None:
        Image.fromarray(cell_map.astype(np.uint8)).save(folder / "c_cells.png")
    return bench.Canvas(folder / "c.png", folder / "c_mask.png", folder / "c_cells.png", 0, 0.0, -1)


def test_canvas_patches_are_inked_grid_cells_with_adjacent_partners(tmp_path):
    bench = load_benchmark()
    pixels = np.arange(36 * 45, dtype=np.uint32).reshape(36, 45) % 251
    pixels[:, 18:] = 0  # columns 2-4 of cells are empty: never an anchor, but a partner
    patches = bench.canvas_patches([canvas(tmp_path, pixels)], per_image=50, seed=0)
    assert patches.images.shape == (50, 9, 9, 1) and patches.mpp is None
    assert set(patches.cells[:, 1]) == {0, 1}
    for k in range(50):
        i, j = patches.cells[k]
        np.testing.assert_array_equal(patches.images[k, ..., 0], pixels[i * 9 : i * 9 + 9, j * 9 : j * 9 + 9])
        partner = patches.neighbours[k, ..., 0]
        offsets = [(di, dj) for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))
                   if 0 <= i + di < 4 and 0 <= j + dj < 5
                   and (partner == pixels[(i + di) * 9 : (i + di) * 9 + 9, (j + dj) * 9 : (j + dj) * 9 + 9]).all()]
        assert offsets, f"patch {k} at {(i, j)} has no adjacent partner"


def test_the_oracle_learns_digit_cells_labelled_by_the_cell_map(tmp_path):
    bench = load_benchmark()
    from nic_fast.synthetic_mnist import NO_DIGIT

    pixels = np.arange(27 * 36, dtype=np.uint32).reshape(27, 36) % 251
    cell_map = np.full((3, 4), NO_DIGIT)
    cell_map[0, 1], cell_map[2, 3], cell_map[1, 0] = 7, 0, 3
    patches = bench.digit_cells([canvas(tmp_path, pixels, cell_map)])
    assert patches.labels.tolist() == [7, 3, 0] and patches.class_names == [str(k) for k in range(10)]
    for k, (i, j) in enumerate([(0, 1), (1, 0), (2, 3)]):
        np.testing.assert_array_equal(patches.images[k, ..., 0], pixels[i * 9 : i * 9 + 9, j * 9 : j * 9 + 9])


def test_tiny_run_end_to_end(tmp_path):
    bench = load_benchmark()
    config = bench.Config("tiny", canvas_px=180, encoder_images=4, patches_per_image=40, train_images=30,
                          val_images=10, test_images=10, encoder_epochs=1, encoder_steps=2, cnn_epochs=1,
                          cnn_batch=8, cnn_learning_rate=3e-3, cnn_strides=(1, 2), cnn_filters=8, cnn_dropout=0.0,
                          tta_crops=1, sweep_methods=("supervised",), sweep_code_sizes=(8, 16), gradcam_images=2)
    report = bench.run_benchmark(config, tmp_path / "work", tmp_path / "out", "pytest")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = {f"{r['method']}-c{r['code_size']}": r for r in results["runs"]}
    assert set(runs) == {"contrastive-c16", "vae-c16", "bigan-c16", "supervised-c16", "supervised-c8"}
    for run in runs.values():
        assert 0.0 <= run["accuracy"] <= 1.0 and 0.0 <= run["gradcam_jaccard"] <= 1.0
        assert sum(run["images_by_size"]) == config.test_images
    store = tmp_path / "work" / "stores" / "supervised-c8" / "test_00000.zarr"
    from nic_fast.store import open_store

    slide = open_store(store)
    assert slide.grid_shape == (20, 20) and slide.code_size == 8 and slide.attrs["mpp"] is None
    from nic_fast.train.model import TrainedModel

    network = TrainedModel.load(tmp_path / "work" / "cnn" / "supervised-c8" / "best.pt").network
    assert [block.depthwise.stride[0] for block in network.features] == [1, 2] and network.config.filters == 8
    text = report.read_text()
    assert "| supervised (oracle) | 16 |" in text and "0.612" in text and "Reproduce: `pytest`" in text
    assert "device cpu" in text and json.loads((tmp_path / "out" / "results.json").read_text())["machine"]
    for plot in ("accuracy_per_encoder", "accuracy_vs_size", "code_size_sweep", "gradcam_jaccard"):
        assert (tmp_path / "out" / f"{plot}.png").stat().st_size > 1000
