"""Each kernel against a NumPy reference: random inputs, odd sizes, edge cells."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nic_fast import kernels
from nic_fast.grid import dihedral


def reference_patches(region, cells, patch_px, downsample, k, scale, offset):
    out = []
    span = patch_px * downsample
    for y, x in cells:
        block = region[y : y + span, x : x + span].astype(np.float64)
        pooled = block.reshape(patch_px, downsample, patch_px, downsample, -1).mean(axis=(1, 3))
        pooled = dihedral(pooled, k)
        out.append(np.transpose(pooled * np.asarray(scale) + np.asarray(offset), (2, 0, 1)))
    return np.stack(out)


@pytest.mark.parametrize("k", range(8))
@pytest.mark.parametrize("downsample", [1, 2, 3])
def test_patchify_matches_numpy(k, downsample):
    rng = np.random.default_rng(100 * k + downsample)
    patch_px = 7  # odd
    span = patch_px * downsample
    region = rng.integers(0, 256, size=(3 * span + 5, 2 * span + 3, 3), dtype=np.uint8)
    # edge cells: the last valid top-left positions, plus random interior ones
    cells = np.array([[0, 0], [region.shape[0] - span, region.shape[1] - span], [5, 3], [span, 1]], dtype=np.int32)
    scale, offset = [1 / 127.5, 1 / 100.0, 0.02], [-1.0, 0.5, -0.3]
    out = torch.full((len(cells), 3, patch_px, patch_px), float("nan"))
    kernels.patchify(region, cells, out, scale=scale, offset=offset, downsample=downsample, dihedral=k)
    expected = reference_patches(region, cells, patch_px, downsample, k, scale, offset)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_patchify_float16_channels_last_and_grayscale():
    rng = np.random.default_rng(1)
    region = rng.integers(0, 256, size=(41, 29, 1), dtype=np.uint8)
    cells = np.array([[0, 0], [30, 18], [13, 2]], dtype=np.int32)
    out = torch.empty((3, 1, 11, 11), dtype=torch.float16)
    kernels.patchify(region, cells, out, scale=[1 / 255], offset=[0.0], dihedral=5)
    expected = reference_patches(region, cells, 11, 1, 5, [1 / 255], [0.0])
    np.testing.assert_allclose(out.float().numpy(), expected, atol=1e-3)
    # float16 bits are numpy's round-to-nearest-even of the float32 value
    out32 = torch.empty((3, 1, 11, 11))
    kernels.patchify(region, cells, out32, scale=[1 / 255], offset=[0.0], dihedral=5)
    np.testing.assert_array_equal(out.numpy(), out32.numpy().astype(np.float16))

    rgb = rng.integers(0, 256, size=(33, 35, 3), dtype=np.uint8)
    last = torch.empty((2, 3, 16, 16)).to(memory_format=torch.channels_last)
    cells = np.array([[1, 2], [17, 19]], dtype=np.int32)
    kernels.patchify(rgb, cells, last, scale=[1.0] * 3, offset=[0.0] * 3, dihedral=3)
    np.testing.assert_array_equal(last.numpy(), reference_patches(rgb, cells, 16, 1, 3, [1.0] * 3, [0.0] * 3))


def test_patchify_writes_into_batch_slice():
    rng = np.random.default_rng(2)
    region = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    batch = torch.zeros((4, 3, 8, 8)).to(memory_format=torch.channels_last)
    kernels.patchify(region, np.array([[3, 4]], np.int32), batch[2:3], scale=[1.0] * 3, offset=[0.0] * 3)
    assert batch[[0, 1, 3]].abs().sum() == 0
    np.testing.assert_array_equal(batch[2].numpy(), region[3:11, 4:12].transpose(2, 0, 1))


def test_float16_rounding_is_round_to_nearest_even():
    values = np.array([0.0, -1e-9, 1.0, 65504.0, 65520.0, 1e-8, 6.1e-5, 5.96e-8, 2.98e-8, 3.0e-8, -2.5, np.inf,
                       1.0009765625, 1.00048828125, 1.00146484375, 3.14159], dtype=np.float32)
    region = np.ones((1, len(values), 1), dtype=np.uint8)
    cells = np.array([[0, x] for x in range(len(values))], dtype=np.int32)
    out = torch.empty((len(values), 1, 1, 1), dtype=torch.float16)
    for n, v in enumerate(values):  # value = 1 * scale + 0
        kernels.patchify(region, cells[n : n + 1], out[n : n + 1], scale=[float(v)], offset=[0.0])
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(out.numpy().ravel().view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("in_dtype,grid_dtype", [(np.float32, np.float16), (np.float16, np.float16),
                                                 (np.float32, np.float32), (np.float16, np.float32)])
def test_scatter_matches_numpy(in_dtype, grid_dtype):
    rng = np.random.default_rng(3)
    h, w, c = 13, 9, 5
    grid = np.full((h, w, c), -7, dtype=grid_dtype)
    flat = rng.choice(h * w, size=40, replace=False)
    cells = np.stack([flat // w, flat % w], axis=1).astype(np.int32)
    cells[0] = (h - 1, w - 1)
    cells[1] = (0, 0)
    emb = rng.normal(size=(len(cells), c)).astype(in_dtype)
    kernels.scatter(emb, cells, grid)
    expected = np.full((h, w, c), -7, dtype=grid_dtype)
    expected[cells[:, 0], cells[:, 1]] = emb.astype(grid_dtype)
    np.testing.assert_array_equal(grid, expected)


def test_scatter_torch_tensors_share_memory():
    grid = torch.zeros((3, 4, 2), dtype=torch.float16)
    kernels.scatter(torch.ones((1, 2)), np.array([[2, 3]], np.int32), grid)
    assert grid[2, 3].tolist() == [1.0, 1.0] and grid.sum() == 2


def test_errors_name_the_argument():
    region = np.zeros((16, 16, 3), np.uint8)
    out = torch.empty((1, 3, 8, 8))
    ok = dict(scale=[1.0] * 3, offset=[0.0] * 3)
    with pytest.raises(ValueError, match="cells: expected dtype int32, got int64"):
        kernels.patchify(region, np.zeros((1, 2), np.int64), out, **ok)
    with pytest.raises(ValueError, match="region: expected dtype uint8"):
        kernels.patchify(region.astype(np.float32), np.zeros((1, 2), np.int32), out, **ok)
    with pytest.raises(ValueError, match="region: must be C-contiguous"):
        kernels.patchify(np.zeros((16, 32, 3), np.uint8)[:, ::2], np.zeros((1, 2), np.int32), out, **ok)
    with pytest.raises(ValueError, match="out: must be contiguous NCHW or channels-last"):
        kernels.patchify(region, np.zeros((1, 2), np.int32), torch.empty((1, 8, 8, 3)).permute(0, 3, 2, 1), **ok)
    with pytest.raises(ValueError, match="out: dimension 1"):
        kernels.patchify(region, np.zeros((1, 2), np.int32), torch.empty((1, 1, 8, 8)), **ok)
    with pytest.raises(ValueError, match="dihedral"):
        kernels.patchify(region, np.zeros((1, 2), np.int32), out, dihedral=8, **ok)
    with pytest.raises(IndexError, match="outside"):
        kernels.patchify(region, np.array([[9, 0]], np.int32), out, **ok)
    with pytest.raises(IndexError, match="outside"):
        kernels.patchify(region, np.array([[0, 5]], np.int32), out, downsample=2, **ok)
    with pytest.raises(IndexError, match="scatter"):
        kernels.scatter(np.zeros((1, 2), np.float32), np.array([[3, 0]], np.int32), np.zeros((3, 3, 2), np.float16))
    with pytest.raises(ValueError, match="code size"):
        kernels.scatter(np.zeros((1, 3), np.float32), np.array([[0, 0]], np.int32), np.zeros((3, 3, 2), np.float16))
    with pytest.raises(TypeError, match="__dlpack__"):
        kernels.scatter([[0.0, 0.0]], np.array([[0, 0]], np.int32), np.zeros((3, 3, 2), np.float16))


def reference_saturation(rgb, black_level):
    hi = rgb.max(axis=2).astype(np.int64)
    lo = rgb.min(axis=2).astype(np.int64)
    sat = np.where(hi > 0, ((hi - lo) * 255 + hi // 2) // np.maximum(hi, 1), 0)
    return np.where(hi <= black_level, 0, sat)


def reference_otsu(values):
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256)
    best, best_var = 0, -1.0
    for t in range(256):
        low, high = hist[: t + 1], hist[t + 1 :]
        if low.sum() == 0 or high.sum() == 0:
            continue
        m0 = (levels[: t + 1] * low).sum() / low.sum()
        m1 = (levels[t + 1 :] * high).sum() / high.sum()
        var = low.sum() * high.sum() * (m0 - m1) ** 2
        if var > best_var:
            best, best_var = t, var
    return best


def test_tissue_mask_threshold_matches_numpy_otsu():
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    mask, threshold = kernels.tissue_mask(rgb, black_level=25, min_threshold=0, max_threshold=255)
    sat = reference_saturation(rgb, 25)
    assert threshold == reference_otsu(sat)
    np.testing.assert_array_equal(mask, sat > threshold)


def test_tissue_mask_cleans_specks_and_fills_holes():
    rgb = np.full((60, 80, 3), 240, np.uint8)
    rgb[10:40, 10:50] = (200, 80, 160)  # tissue blob
    rgb[20:23, 20:23] = 240  # 9-px hole inside it
    rgb[50:52, 70:72] = (200, 80, 160)  # 4-px speck
    rgb[0:5, 60:80] = (10, 10, 10)  # black pen at the edge: not tissue
    mask, _ = kernels.tissue_mask(rgb, min_object_px=10, max_hole_px=10)
    expected = np.zeros((60, 80), bool)
    expected[10:40, 10:50] = True
    np.testing.assert_array_equal(mask, expected)
    raw, _ = kernels.tissue_mask(rgb)
    assert raw[50, 70] and not raw[21, 21]


def test_tissue_mask_slide_all_tissue_stays_whole():
    rng = np.random.default_rng(7)
    pale_and_dark = np.where(rng.random((40, 40, 1)) < 0.5, (230, 170, 210), (150, 60, 140))
    mask, threshold = kernels.tissue_mask(pale_and_dark.astype(np.uint8))
    assert threshold == 60 and mask.all()


def test_tissue_mask_blank_slide_has_no_tissue():
    rng = np.random.default_rng(5)
    rgb = np.clip(235 + rng.normal(0, 3, size=(40, 40, 3)), 0, 255).astype(np.uint8)
    mask, threshold = kernels.tissue_mask(rgb)
    assert threshold >= 20 and not mask.any()


def reference_hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in whole degrees rounded down (0 for greys), in NumPy's floor division."""
    r, g, b = (rgb[..., c].astype(np.int64) for c in range(3))
    hi, lo = rgb.max(axis=-1).astype(np.int64), rgb.min(axis=-1).astype(np.int64)
    chroma = np.maximum(hi - lo, 1)
    hue = np.where(hi == r, (60 * (g - b)) // chroma,
                   np.where(hi == g, 120 + (60 * (b - r)) // chroma, 240 + (60 * (r - g)) // chroma))
    return np.where(hi == lo, 0, hue % 360)


def reference_ink_evidence(rgb: np.ndarray, k: kernels.InkRule) -> np.ndarray:
    r, g = rgb[..., 0].astype(np.int64), rgb[..., 1].astype(np.int64)
    hi, lo = rgb.max(axis=-1).astype(np.int64), rgb.min(axis=-1).astype(np.int64)
    chroma, hue, green = hi - lo, reference_hue(rgb), g - r
    strong = (((chroma >= k.strong_chroma) & (hue >= k.strong_hue_lo) & (hue <= k.strong_hue_hi))
              | ((chroma >= k.green_chroma) & (green >= k.strong_green_excess)) | (hi <= k.strong_dark)
              | ((hi <= k.neutral_max) & (k.neutral_ratio * chroma <= hi)))
    weak = (((chroma >= k.weak_chroma) & (hue >= k.weak_hue_lo) & (hue <= k.weak_hue_hi))
            | ((chroma >= k.green_chroma) & (green >= k.weak_green_excess)) | (hi <= k.weak_dark))
    return np.where(strong, 2, np.where(weak, 1, 0)).astype(np.uint8)


@pytest.mark.parametrize("rule", [kernels.InkRule(), kernels.InkRule(strong_hue_hi=200, weak_dark=0, neutral_ratio=2)],
                         ids=["default", "other"])
def test_ink_evidence_matches_numpy(rule):
    """Every colour on a 5-level lattice (hue boundaries, greys, ties) plus random ones."""
    levels = np.arange(0, 256, 5, dtype=np.uint8)
    lattice = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 1, 3)
    rng = np.random.default_rng(8)
    rgb = np.concatenate([lattice, rng.integers(0, 256, (300_000, 1, 3), dtype=np.uint8)])
    got = kernels.ink_evidence(rgb, rule)
    np.testing.assert_array_equal(got, reference_ink_evidence(rgb, rule))
    assert set(np.unique(got)) == {0, 1, 2}


def test_ink_evidence_tells_pen_from_stain():
    rgb = np.array([[
        (68, 99, 171),  # blue marker on glass
        (64, 62, 140),  # blue marker over eosin
        (77, 149, 110),  # green marker on glass
        (53, 53, 54),  # black marker on glass
        (230, 150, 200),  # eosin
        (88, 58, 140),  # hematoxylin-rich tissue
        (50, 30, 66),  # the darkest tissue: possible black ink, counted only beside certain ink
        (242, 240, 244),  # glass
    ]], dtype=np.uint8)
    np.testing.assert_array_equal(kernels.ink_evidence(rgb)[0], [2, 2, 2, 2, 0, 0, 1, 0])


def test_ink_mask_keeps_strokes_not_specks():
    rgb = np.full((60, 90, 3), (242, 240, 244), np.uint8)
    rgb[10:50, 20:70] = (230, 150, 200)  # tissue
    rgb[:, 40:46] = (68, 99, 171)  # a blue stroke from glass across the tissue
    rgb[14:44, 40:46] = (64, 62, 140)  # ... darker where it lies on tissue
    rgb[20:22, 62:64] = (61, 126, 144)  # a speck of margin dye on the tissue
    rgb[30:32, 25:27] = (40, 30, 60)  # a dark nucleus cluster
    ink = kernels.ink_mask(rgb, min_strong_px=20, dilate_px=0)
    expected = np.zeros((60, 90), bool)
    expected[:, 40:46] = True
    np.testing.assert_array_equal(ink, expected)
    grown = kernels.ink_mask(rgb, min_strong_px=20, dilate_px=2)
    expected[:, 38:48] = True
    np.testing.assert_array_equal(grown, expected)
    assert not kernels.ink_mask(rgb, min_strong_px=10_000).any()
    with pytest.raises(ValueError, match="min_strong_px"):
        kernels.ink_mask(rgb, min_strong_px=0)


def test_tissue_mask_exclude_is_never_tissue_nor_counted():
    rgb = np.full((40, 60, 3), 240, np.uint8)
    rgb[5:35, 5:55] = (200, 80, 160)
    exclude = np.zeros((40, 60), bool)
    exclude[18:22, 28:32] = True  # a 16-px hole the clean-up would fill
    mask, _ = kernels.tissue_mask(rgb, max_hole_px=100, exclude=exclude)
    assert mask[5:35, 5:55].sum() == 30 * 50 - 16 and not mask[exclude].any()
    # Excluded pixels are left out of Otsu: saturated ink would lift the threshold above pale tissue.
    rgb = np.full((40, 40, 3), 240, np.uint8)
    rgb[:10] = (240, 200, 230)  # pale tissue, saturation 43
    rgb[30:] = (60, 80, 200)  # blue ink, saturation 179
    ink = np.zeros((40, 40), bool)
    ink[30:] = True
    plain, threshold = kernels.tissue_mask(rgb, min_threshold=0, max_threshold=255)
    assert threshold == reference_saturation(rgb, 25)[0, 0] and not plain[:10].any()
    cleaned, threshold = kernels.tissue_mask(rgb, min_threshold=0, max_threshold=255, exclude=ink)
    assert threshold == 0 and cleaned[:10].all() and not cleaned[10:].any()
    with pytest.raises(ValueError, match="exclude"):
        kernels.tissue_mask(rgb, exclude=np.zeros((40, 61), bool))


@pytest.mark.parametrize("stride,size", [(4.0, 4.0), (2.5, 2.5), (3.0, 5.0), (1.0, 1.0)])
def test_cell_fraction_matches_numpy(stride, size):
    rng = np.random.default_rng(6)
    mask = rng.random((23, 17)) > 0.6
    gh, gw = int(23 // stride), int(17 // stride)
    out = kernels.cell_fraction(mask, (gh, gw), stride_px=stride, size_px=size)
    centres_y, centres_x = np.arange(23) + 0.5, np.arange(17) + 0.5
    expected = np.zeros((gh, gw), np.float32)
    for i in range(gh):
        for j in range(gw):
            rows = (centres_y >= i * stride) & (centres_y < i * stride + size)
            cols = (centres_x >= j * stride) & (centres_x < j * stride + size)
            expected[i, j] = mask[np.ix_(rows, cols)].sum() / (rows.sum() * cols.sum())
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_dihedral_group():
    a = np.arange(12).reshape(3, 4)
    variants = {dihedral(a, k).tobytes() + bytes(dihedral(a, k).shape) for k in range(8)}
    assert len(variants) == 8
    np.testing.assert_array_equal(dihedral(a, 1), np.rot90(a))
    np.testing.assert_array_equal(dihedral(a, 4), np.fliplr(a))


def test_cuda_module_absent_or_reports_no_device():
    try:
        module = kernels.cuda_module()
    except RuntimeError as exc:
        assert "--device cpu" in str(exc)
    else:
        assert module.device_count() >= 0


def test_bfloat16_patches_and_embeddings_round_to_nearest_even():
    rng = np.random.default_rng(8)
    region = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    cells = np.array([[0, 0], [8, 5]], dtype=np.int32)
    scale, offset = [1 / 63.0, 1 / 70.0, 1 / 255.0], [-2.0, 0.1, 0.0]
    out32 = torch.empty((2, 3, 16, 16))
    out16 = torch.empty((2, 3, 16, 16), dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    for out in (out32, out16):
        kernels.patchify(region, cells, out, scale=scale, offset=offset, dihedral=6)
    torch.testing.assert_close(out16, out32.to(torch.bfloat16), rtol=0, atol=0)  # torch rounds to nearest even

    emb = torch.randn((5, 16)).to(torch.bfloat16)
    grid = np.zeros((3, 4, 16), np.float32)
    cells = np.array([[0, 0], [2, 3], [1, 1], [0, 3], [2, 0]], np.int32)
    kernels.scatter(emb, cells, grid)
    np.testing.assert_array_equal(grid[cells[:, 0], cells[:, 1]], emb.float().numpy())
