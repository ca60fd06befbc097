"""Where a trained network finds its evidence: Grad-CAM on the first conv layer over the whole grid.

Grad-CAM (the paper's Eq. 7): with A^k the activations of filter k in a layer and y the
output, the map is ReLU(Σ_k α_k A^k) with α_k = the spatial mean of ∂y/∂A^k. On the
first conv block it has the grid's resolution divided by that block's stride (half of it
in the paper's network), so it can outline a lesion, which the deeper layers' coarse
maps cannot. The network takes a grid of any size, so the whole slide is one forward
pass; the map is averaged over the 8 dihedral transforms as the predictions are.

For scoring against a ground-truth mask the map is post-processed: optionally smoothed
(a Gaussian of ``smooth_cells``), kept on tissue, scaled to its maximum and thresholded at
half of it, then compared cell by cell with the mask resampled to the grid (Jaccard
index). Smoothing matters where the evidence is sparse inside the region: a first-layer
map lights the cells of single digits on the synthetic canvases (16 % of a rectangle's
cells), and a Gaussian of about the digits' spacing turns them into the rectangle.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from nic_fast.grid import DIHEDRAL, dihedral
from nic_fast.store import CompressedSlide
from nic_fast.train.model import TrainedModel

__all__ = ["HEATMAP_THRESHOLD", "grad_cam", "inverse_dihedral", "jaccard", "lesion_cells", "level0_px_per_cell",
           "mask_to_grid", "slide_heatmap"]

HEATMAP_THRESHOLD = 0.5  # of the heatmap's maximum on tissue


def inverse_dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """T_k⁻¹ on the first two axes: undo :func:`nic_fast.grid.dihedral`.

    Rotations invert by rotating back; a mirror composed with a rotation is its own inverse.
    """
    return dihedral(array, (4 - k) % 4) if k < 4 else dihedral(array, k)


def grad_cam(model: TrainedModel, grid: np.ndarray, *, target: int = 0,
             device: str | torch.device = "cpu") -> np.ndarray:
    """Grad-CAM (H', W') float32 of one (H', W', C) grid, upsampled from the first conv layer.

    ``target`` is the output explained: the class for multi-class networks, 0 otherwise
    (the logit of a binary network, the value of a regression one).
    """
    network = model.network.eval()
    captured: list[torch.Tensor] = []
    hook = network.features[0].activation.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        x = torch.from_numpy(np.ascontiguousarray(grid)).to(device).permute(2, 0, 1)[None].float()
        score = network(x)[0, target]
        (gradients,) = torch.autograd.grad(score, captured[0])
    finally:
        hook.remove()
    activations = captured[0].detach()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activations).sum(dim=1, keepdim=True))
    upsampled = torch.nn.functional.interpolate(cam, size=grid.shape[:2], mode="bilinear", align_corners=False)
    return upsampled[0, 0].cpu().numpy().astype(np.float32)


def slide_heatmap(models: list[TrainedModel], slide: CompressedSlide, *, target: int = 0,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Grad-CAM of a whole store, averaged over ``models`` and the 8 dihedral transforms.

    Variant k of an augmented store (A = 8) is read as the transformed slide; a store
    without variants is transformed on the fly, as the loaders do.
    """
    total = np.zeros(slide.grid_shape, np.float32)
    for k in DIHEDRAL:
        grid = dihedral(slide.load(k if slide.variants == len(DIHEDRAL) else 0), k)
        for model in models:
            total += inverse_dihedral(grad_cam(model, grid, target=target, device=device), k)
    return total / (len(DIHEDRAL) * len(models))


def lesion_cells(heatmap: np.ndarray, tissue: np.ndarray, threshold: float = HEATMAP_THRESHOLD, *,
                 smooth_cells: float = 0.0) -> np.ndarray:
    """Post-processed heatmap: tissue cells at or above ``threshold`` × the maximum on tissue,
    after a Gaussian blur of standard deviation ``smooth_cells`` grid cells (0: none)."""
    if smooth_cells < 0:
        raise ValueError(f"smooth_cells must be >= 0, got {smooth_cells}")
    if smooth_cells > 0:
        heatmap = gaussian_filter(np.asarray(heatmap, np.float32), smooth_cells, mode="constant")
    on_tissue = np.where(tissue, heatmap, 0.0)
    peak = float(on_tissue.max(initial=0.0))
    if peak <= 0:
        return np.zeros_like(tissue, dtype=bool)
    return on_tissue >= threshold * peak


def jaccard(predicted: np.ndarray, truth: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B|; two empty masks agree perfectly (1.0)."""
    union = np.logical_or(predicted, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, truth).sum() / union)


def level0_px_per_cell(slide: CompressedSlide) -> float:
    """Level-0 pixels per grid stride: the stride at the working µm/px, scaled to the scan's.

    Stores of plain images (``compress --mpp none``) have no µm/px: they are read at
    level 0, so only the box downsample scales the stride.
    """
    attrs = slide.attrs
    if attrs.get("mpp") and attrs.get("scanned_mpp"):
        return attrs["stride_px"] * attrs["mpp"] / attrs["scanned_mpp"]
    return attrs["stride_px"] * attrs.get("downsample", 1)


def mask_to_grid(mask_path: str | Path, slide: CompressedSlide, lesion_value: int | None = None) -> np.ndarray:
    """A ground-truth mask image as a bool (H', W') grid: cells at least half lesion.

    Lesion is every non-zero mask value, or only ``lesion_value`` when given (the MNIST
    canvases' masks hold 1 for the tilted rectangle and 2 for the distractor).

    The mask's scale is its PNG ``downsample`` text (level-0 px per mask px, as
    ``nic-fast synth`` writes it) or else that of a mask covering the slide's thumbnail.
    """
    with Image.open(mask_path) as image:
        mask = image.convert("L")
        text = getattr(image, "text", {})
    if "downsample" in text:
        downsample = float(text["downsample"])
    else:
        thumb_h, thumb_w = slide.thumbnail.shape[:2]
        downsample = slide.attrs["thumbnail_downsample"] * max(thumb_h / mask.height, thumb_w / mask.width)
    height, width = slide.grid_shape
    cell_px = level0_px_per_cell(slide) / downsample  # mask px per cell
    if height * cell_px > mask.height + cell_px or width * cell_px > mask.width + cell_px:
        raise ValueError(f"{mask_path} ({mask.width}x{mask.height} px at downsample {downsample:g}) does not cover "
                         f"{slide.path}'s grid ({width}x{height} cells of {cell_px:g} mask px): give the mask of this "
                         "slide, or add its level-0 downsample as PNG text 'downsample'")
    binary = mask.point(lambda v: 255 if (v if lesion_value is None else v == lesion_value) else 0)
    fraction = binary.resize((width, height), resample=Image.Resampling.BOX,
                             box=(0.0, 0.0, width * cell_px, height * cell_px))
    return np.asarray(fraction) >= 128
