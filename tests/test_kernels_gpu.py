"""The CUDA kernels against the CPU kernels: bit-exact for every dtype (both sides share
elements.h and round to nearest even), at every size, alignment and layout, on outputs
poisoned with NaN so that an unwritten element fails. Skipped without a CUDA device."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nic_fast import kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def misaligned(array: np.ndarray, offset_bytes: int) -> torch.Tensor:
    """uint8 ``array`` on the GPU, starting ``offset_bytes`` into its allocation (0: 16-byte aligned)."""
    flat = torch.empty(array.nbytes + offset_bytes, dtype=torch.uint8, device="cuda")
    view = flat[offset_bytes:].reshape(array.shape)
    view.copy_(torch.from_numpy(array))
    return view


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, device: str) -> torch.Tensor:
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def run_patchify(region: np.ndarray, cells: np.ndarray, patch_px: int, dtype: torch.dtype, channels_last: bool,
                 downsample: int, k: int, region_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    channels = region.shape[2]
    scale = [1 / 255.0, 1 / 70.0, 1 / 3.0, 0.5][:channels]
    offset = [-0.5, 0.25, -1.0, 3.0][:channels]
    shape = (len(cells), channels, patch_px, patch_px)
    cpu = poisoned(shape, dtype, channels_last, "cpu")
    gpu = poisoned(shape, dtype, channels_last, "cuda")
    kernels.patchify(region, cells, cpu, scale=scale, offset=offset, downsample=downsample, dihedral=k)
    kernels.patchify(misaligned(region, region_offset), torch.from_numpy(cells).cuda(), gpu, scale=scale,
                     offset=offset, downsample=downsample, dihedral=k, host_cells=cells)
    torch.cuda.synchronize()
    return cpu, gpu.cpu()


def random_case(rng: np.random.Generator, patch_px: int, downsample: int, channels: int, width_pad: int,
                n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    span = patch_px * downsample
    region = rng.integers(0, 256, size=(2 * span + 3, 2 * span + width_pad, channels), dtype=np.uint8)
    ys = rng.integers(0, region.shape[0] - span + 1, size=n_cells)
    xs = rng.integers(0, region.shape[1] - span + 1, size=n_cells)
    ys[0], xs[0] = region.shape[0] - span, region.shape[1] - span  # the last valid cell: the edges
    return region, np.stack([ys, xs], axis=1).astype(np.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("k", range(8))
def test_patchify_128px_vector_path_is_bit_exact(dtype, channels_last, k):
    """The production shape: 128-px patches, RGB, 16-byte aligned, widths a multiple of 16."""
    rng = np.random.default_rng(k)
    for downsample in (1, 2):
        region, cells = random_case(rng, 128, downsample, 3, width_pad=16, n_cells=5)
        cpu, gpu = run_patchify(region, cells, 128, dtype, channels_last, downsample, k, region_offset=0)
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=0, equal_nan=False)


@pytest.mark.parametrize("patch_px,downsample,channels", [(7, 1, 3), (7, 3, 1), (16, 2, 4), (33, 1, 3), (5, 4, 2),
                                                          (2, 120, 3)])
@pytest.mark.parametrize("region_offset", [0, 1, 3])
def test_patchify_every_size_alignment_and_channel_count_is_bit_exact(patch_px, downsample, channels, region_offset):
    """Odd sizes, unaligned regions and non-RGB images take the element-wise paths; a
    120x downsample cannot stage its source in shared memory and reads global memory."""
    rng = np.random.default_rng(patch_px * 1000 + downsample * 10 + channels)
    region, cells = random_case(rng, patch_px, downsample, channels, width_pad=5, n_cells=4)
    for dtype, channels_last, k in itertools.product(DTYPES, (True, False), (0, 3, 5)):
        cpu, gpu = run_patchify(region, cells, patch_px, dtype, channels_last, downsample, k, region_offset)
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=0, equal_nan=False,
                                   msg=f"{dtype} channels_last={channels_last} k={k}")


def test_patchify_into_a_batch_slice_leaves_the_rest_untouched():
    rng = np.random.default_rng(9)
    region = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    batch = torch.zeros((6, 3, 128, 128), dtype=torch.float16, device="cuda").contiguous(memory_format=torch.channels_last)
    cells = np.array([[0, 0], [128, 128]], np.int32)
    kernels.patchify(torch.from_numpy(region).cuda(), torch.from_numpy(cells).cuda(), batch[3:5], scale=[1.0] * 3,
                     offset=[0.0] * 3, host_cells=cells)
    assert batch[[0, 1, 2, 5]].abs().sum().item() == 0
    expected = torch.from_numpy(region[128:, 128:].transpose(2, 0, 1).astype(np.float16))
    torch.testing.assert_close(batch[4].cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("in_dtype,grid_dtype", list(itertools.product(DTYPES, (torch.float16, torch.float32))))
@pytest.mark.parametrize("code_size,offset_elements", [(128, 0), (8, 0), (5, 0), (128, 1)])
def test_scatter_is_bit_exact(in_dtype, grid_dtype, code_size, offset_elements):
    rng = np.random.default_rng(code_size + offset_elements)
    h, w = 17, 13
    flat = rng.choice(h * w, size=60, replace=False)
    cells = np.stack([flat // w, flat % w], axis=1).astype(np.int32)
    cells[0], cells[1] = (h - 1, w - 1), (0, 0)
    emb = torch.from_numpy(rng.normal(size=(len(cells), code_size)).astype(np.float32)).to(in_dtype)
    emb_gpu = torch.empty(len(cells) * code_size + offset_elements, dtype=in_dtype, device="cuda")[offset_elements:]
    emb_gpu = emb_gpu.view(len(cells), code_size)
    emb_gpu.copy_(emb)
    cpu = torch.full((h, w, code_size), float("nan"), dtype=grid_dtype)
    gpu = cpu.cuda()
    kernels.scatter(emb, cells, cpu)
    kernels.scatter(emb_gpu, torch.from_numpy(cells).cuda(), gpu, host_cells=cells)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0, equal_nan=True)
    assert not torch.isnan(gpu[cells[:, 0], cells[:, 1]]).any()


def test_cuda_errors_are_raised_before_launch():
    region = torch.zeros((16, 16, 3), dtype=torch.uint8, device="cuda")
    out = torch.empty((1, 3, 8, 8), device="cuda")
    cells = np.array([[9, 0]], np.int32)
    with pytest.raises(IndexError, match="outside"):
        kernels.patchify(region, torch.from_numpy(cells).cuda(), out, scale=[1.0] * 3, offset=[0.0] * 3,
                         host_cells=cells)
    with pytest.raises(ValueError, match="host_cells"):
        kernels.patchify(region, torch.from_numpy(cells).cuda(), out, scale=[1.0] * 3, offset=[0.0] * 3)
    with pytest.raises(ValueError, match="cells: must be on a CUDA device"):
        kernels.patchify(region, torch.zeros((1, 2), dtype=torch.int32), out, scale=[1.0] * 3, offset=[0.0] * 3,
                         host_cells=np.zeros((1, 2), np.int32))
    assert kernels.cuda_module().device_count() == torch.cuda.device_count()
