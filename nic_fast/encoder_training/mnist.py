"""The binarised 9-px MNIST digits of the paper's synthetic task (P = S = 9, C = 16).

The paper (Tellez et al., TPAMI 2019, and its released ``synthetic_data_generation.py``)
made every MNIST pixel above 63 ink and shrank the 28-px digit 3× to fit one 9-px grid
cell. This module is the single place that conversion lives: the encoder benchmark
probes on these glyphs and the synthetic canvases paste exactly them, so a probe
accuracy measured here is about the inputs the slide-level task sees.

The paper shrank by keeping every third pixel, which drops a thin stroke that falls
between the kept rows or columns (4 of the first 10,000 training digits, all 1s, lose
every pixel of ink that way). Here a glyph pixel is ink when any pixel of its 3×3 block
is, so every stroke survives; the blocks tile rows and columns 1-27, whose centre is
MNIST's centre of mass (14, 14), and drop only row and column 0, which are blank.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MNIST_DIGIT_PX = 28
MNIST_PATCH_PX = 9
INK_THRESHOLD = 63  # the paper's cut: a pixel above it is ink
BLOCK_PX = 3
BLOCK_OFFSET = 1  # blocks cover rows/columns 1..27
INK, PAPER = 255, 0

__all__ = ["MNIST_PATCH_PX", "binarised_mnist_patches", "load_mnist_npz"]


def binarised_mnist_patches(digits: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 MNIST digits → (N, 9, 9) uint8 glyphs holding only 0 and 255.

    Strictly binary (the paper kept the faint pixels ≤ 63 as they were): a glyph is
    either ink or paper, which is what a canvas of pasted digits shows.
    """
    digits = np.asarray(digits)
    if digits.ndim != 3 or digits.shape[1:] != (MNIST_DIGIT_PX, MNIST_DIGIT_PX) or digits.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 MNIST digits of shape (N, {MNIST_DIGIT_PX}, {MNIST_DIGIT_PX}), "
            f"got {digits.dtype} {digits.shape}"
        )
    end = BLOCK_OFFSET + BLOCK_PX * MNIST_PATCH_PX
    ink = digits[:, BLOCK_OFFSET:end, BLOCK_OFFSET:end] > INK_THRESHOLD
    blocks = ink.reshape(len(digits), MNIST_PATCH_PX, BLOCK_PX, MNIST_PATCH_PX, BLOCK_PX)
    return np.where(blocks.any(axis=(2, 4)), INK, PAPER).astype(np.uint8)


def load_mnist_npz(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``images`` (N, 28, 28) uint8 and ``labels`` (N,) int64 from an MNIST .npz file.

    The file is the one in ``../shared/data/mnist/`` (or any npz with those two arrays).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such MNIST file (expected an .npz with arrays 'images' and 'labels')")
    with np.load(path) as data:
        missing = sorted({"images", "labels"} - set(data.files))
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; "
                             "an MNIST .npz holds 'images' (N, 28, 28) and 'labels' (N,)")
        images, labels = data["images"], data["labels"].astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels
