"""The paper's MNIST-rectangles generator: label = tilted class, digit classes inside the
rectangles, counts, disjoint digit splits, determinism, the CLI."""
from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from nic_fast.cli.synth import synth
from nic_fast.encoder_training.mnist import binarised_mnist_patches
from nic_fast.synthetic_mnist import (
    DIGIT_FILL,
    GRID_PX,
    NO_DIGIT,
    STRAIGHT,
    TILTED,
    canvas_layout,
    digit_pool,
    load_digits,
    render_canvas,
    write_mnist_rectangles,
)


@pytest.fixture(scope="module")
def fake_digits():
    """Digits whose class is readable from the 9-px glyph: class c lights glyph row c // 2,
    in its left half when c is even, its right half when odd."""
    n_per_class = 20
    images = np.zeros((10 * n_per_class, 28, 28), np.uint8)
    labels = np.repeat(np.arange(10), n_per_class)  # sorted by class, like the reference file
    for index, c in enumerate(labels):
        row = 1 + 3 * (c // 2)  # glyph rows are digit rows 1, 4, 7, ...
        images[index, row, 1:12] = 255 if c % 2 == 0 else 0
        images[index, row, 16:27] = 255 if c % 2 == 1 else 0
    return images, labels


def glyph_class(glyph: np.ndarray) -> int:
    row = int(np.flatnonzero(glyph.max(axis=1))[0])
    return 2 * row + int(glyph[row, 5:].any())


def test_digit_splits_are_disjoint_and_cover_every_class(fake_digits):
    train_glyphs, train_labels = digit_pool(fake_digits, "train")
    test_glyphs, test_labels = digit_pool(fake_digits, "test")
    assert set(train_labels) == set(test_labels) == set(range(10))
    assert len(train_labels) + len(test_labels) == len(fake_digits[1])
    assert len(train_labels) == 160
    with pytest.raises(ValueError, match="split"):
        digit_pool(fake_digits, "validation")


def test_layout_has_one_tilted_and_one_straight_rectangle():
    for seed in range(20):
        mask = canvas_layout(np.random.default_rng(seed), 360)
        assert set(np.unique(mask)) <= {0, TILTED, STRAIGHT}
        assert (mask == TILTED).any() and (mask == STRAIGHT).any()
        # the tilted rectangle's edges are diagonal: its rows' extents shift with the row
        rows = np.flatnonzero((mask == TILTED).any(axis=1))
        if len(rows) > 8:
            starts = [np.flatnonzero(mask[r] == TILTED)[0] for r in rows[len(rows) // 4 : 3 * len(rows) // 4]]
            assert len(set(starts)) > 1
        # the straight one is an axis-aligned box
        ys, xs = np.nonzero(mask == STRAIGHT)
        box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert (box == STRAIGHT).mean() > 0.95


def test_canvas_invariants(fake_digits):
    glyphs, labels = digit_pool(fake_digits, "train")
    canvas_px = 450
    # the first seed whose tilted rectangle covers 3 % of the canvas, so that it holds digits
    image, mask, tilted_class, straight_class, cell_map = next(
        canvas for seed in range(100)
        if ((canvas := render_canvas(np.random.default_rng(seed), canvas_px, glyphs, labels)).mask == TILTED).mean() > 0.03)
    assert image.shape == mask.shape == (canvas_px, canvas_px) and tilted_class != straight_class
    assert set(np.unique(image)) <= {0, 255}
    # each glyph lights 4 px of one row; overlaps of jittered glyphs only lose some
    cells = canvas_px // GRID_PX
    expected_px = DIGIT_FILL * cells * cells * 4
    assert 0.7 * expected_px < (image > 0).sum() <= expected_px
    # the cell map has one entry per digit (no two digits share a cell); cells inside the
    # tilted rectangle hold its class, except near the border where a jittered digit's
    # centre may fall outside it
    assert cell_map.shape == (cells, cells)
    assert (cell_map != NO_DIGIT).sum() == round(DIGIT_FILL * cells * cells)
    centre = mask[GRID_PX // 2 :: GRID_PX, GRID_PX // 2 :: GRID_PX][:cells, :cells]
    inside = cell_map[(centre == TILTED) & (cell_map != NO_DIGIT)]
    assert len(inside) > 5 and np.bincount(inside, minlength=10).argmax() == tilted_class


def test_digits_inside_rectangles_have_their_class(fake_digits, monkeypatch):
    import nic_fast.synthetic_mnist as sm

    glyphs, labels = digit_pool(fake_digits, "train")
    # no jitter and a sparse fill so that glyphs never overlap and each can be read back
    monkeypatch.setattr(sm, "JITTER_PX", 0)
    monkeypatch.setattr(sm, "DIGIT_FILL", 0.3)
    canvas_px = 360
    image, mask, tilted_class, straight_class, cell_map = sm.render_canvas(np.random.default_rng(5), canvas_px, glyphs,
                                                                           labels)
    seen = {TILTED: set(), STRAIGHT: set(), 0: set()}
    for i in range(0, canvas_px, GRID_PX):
        for j in range(0, canvas_px, GRID_PX):
            glyph = image[i : i + GRID_PX, j : j + GRID_PX]
            in_map = int(cell_map[i // GRID_PX, j // GRID_PX])
            if glyph.any():
                seen[int(mask[i + GRID_PX // 2, j + GRID_PX // 2])].add(glyph_class(glyph))
                assert in_map == glyph_class(glyph)  # the cell map names the digit drawn there
            else:
                assert in_map == NO_DIGIT
    assert seen[TILTED] == {tilted_class}
    assert seen[STRAIGHT] == {straight_class}
    assert len(seen[0]) > 5  # outside: any class


def test_write_is_deterministic_and_labels_match(tmp_path, fake_digits):
    first = write_mnist_rectangles(tmp_path / "a", 3, digits=fake_digits, canvas_px=270, seed=7, workers=2)
    second = write_mnist_rectangles(tmp_path / "b", 3, digits=fake_digits, canvas_px=270, seed=7, workers=1)
    other = write_mnist_rectangles(tmp_path / "c", 3, digits=fake_digits, canvas_px=270, seed=8, workers=1)
    for a, b in zip(first, second):
        assert a.label == b.label
        assert np.array_equal(np.asarray(Image.open(a.image_path)), np.asarray(Image.open(b.image_path)))
    assert any(not np.array_equal(np.asarray(Image.open(a.image_path)), np.asarray(Image.open(c.image_path)))
               for a, c in zip(first, other))
    rows = list(csv.DictReader(open(tmp_path / "a" / "labels.csv")))
    assert [r["image"] for r in rows] == ["train_00000.png", "train_00001.png", "train_00002.png"]
    for row, canvas in zip(rows, first):
        assert int(row["label"]) == canvas.label
        mask = np.asarray(Image.open(tmp_path / "a" / row["mask"]))
        assert float(row["tilted_fraction"]) == pytest.approx((mask == TILTED).mean(), abs=1e-6)
        cell_map = np.asarray(Image.open(tmp_path / "a" / row["cells"]))
        assert cell_map.shape == (270 // GRID_PX,) * 2 and np.array_equal(
            cell_map, np.asarray(Image.open(canvas.cells_path)))


def test_real_mnist_and_idx_input(tmp_path, mnist_npz):
    images, labels = load_digits(mnist_npz)
    assert images.shape[1:] == (28, 28) and binarised_mnist_patches(images[:5]).shape == (5, 9, 9)
    idx_images = tmp_path / "images-idx3-ubyte.gz"
    idx_labels = tmp_path / "labels-idx1-ubyte"
    with gzip.open(idx_images, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in images[:50].shape) +
                images[:50].tobytes())
    idx_labels.write_bytes(bytes([0, 0, 8, 1]) + (50).to_bytes(4, "big") + labels[:50].astype(np.uint8).tobytes())
    idx = load_digits(idx_images, idx_labels)
    np.testing.assert_array_equal(idx[0], images[:50])
    np.testing.assert_array_equal(idx[1], labels[:50])
    with pytest.raises(ValueError, match="label file"):
        load_digits(idx_images)


def test_cli(tmp_path, mnist_npz):
    result = CliRunner().invoke(synth, ["mnist-rectangles", "-o", str(tmp_path), "--n", "2", "--canvas-px", "360",
                                        "--seed", "1", "--digits", str(mnist_npz), "--split", "test"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "test_00001.png").exists() and (tmp_path / "labels.csv").exists()
    missing = CliRunner().invoke(synth, ["mnist-rectangles", "-o", str(tmp_path), "--n", "1",
                                         "--digits", str(tmp_path / "nope.npz")])
    assert missing.exit_code != 0 and "--digits" in missing.output
