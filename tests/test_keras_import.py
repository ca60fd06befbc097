"""The NIC paper's Keras encoders, converted with h5py only, against a float64 NumPy forward pass.

The reference below is written from the architecture as documented (README of the
reference data), not from the converter: its own conv via sliding windows, LeakyReLU,
BatchNorm inference formula, Keras HWC flatten and dense, with weights found by walking
the HDF5 file rather than by reading the model_config.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from nic_fast.encoders import EncoderError, load_encoder
from nic_fast.encoders.keras import convert_keras, import_keras

PAPER_CONV_ENCODERS = ("encoder_bigan.h5", "encoder_multitask-4.h5")
LEAKY_ALPHA = 0.2
BN_EPSILON = 1e-3


def _weights_by_layer(h5_path: Path) -> dict[str, dict[str, np.ndarray]]:
    """{layer: {param: float64 array}} for every dataset in the file, keyed by its last two path parts."""
    layers: dict[str, dict[str, np.ndarray]] = {}

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            layer, param = name.split("/")[-2:]
            layers.setdefault(layer, {})[param.split(":")[0]] = np.asarray(obj, dtype=np.float64)

    with h5py.File(h5_path, "r") as h5:
        h5.visititems(visit)
    return layers


def _numbered(layers: dict[str, dict[str, np.ndarray]], prefix: str) -> list[dict[str, np.ndarray]]:
    names = sorted((n for n in layers if n.startswith(prefix)), key=lambda n: int(re.findall(r"\d+$", n)[0]))
    return [layers[n] for n in names]


def keras_reference(h5_path: Path, patch_uint8: np.ndarray) -> np.ndarray:
    """The paper's forward pass on one 128×128×3 uint8 patch, in float64 HWC."""
    layers = _weights_by_layer(h5_path)
    convs, norms = _numbered(layers, "conv2d_"), _numbered(layers, "batch_normalization_")
    (dense,) = [w for w in layers.values() if w.get("kernel", np.empty(0)).ndim == 2]
    assert len(convs) == len(norms) == 4
    x = patch_uint8.astype(np.float64) / 255.0 * 2.0 - 1.0
    x = x.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))  # the paper's 2×2 average pool to 64 px
    for conv, norm in zip(convs, norms):
        windows = sliding_window_view(x, (3, 3), axis=(0, 1))[::2, ::2]  # (H', W', C, 3, 3), 'valid', stride 2
        x = np.einsum("hwcij,ijco->hwo", windows, conv["kernel"]) + conv["bias"]
        x = np.where(x > 0, x, LEAKY_ALPHA * x)
        x = norm["gamma"] * (x - norm["moving_mean"]) / np.sqrt(norm["moving_variance"] + BN_EPSILON) + norm["beta"]
    assert x.shape == (3, 3, 128)
    return x.reshape(-1) @ dense["kernel"] + dense["bias"]  # Keras flattens H, W, C


def _patch(paper_encoders: Path) -> np.ndarray:
    return np.asarray(Image.open(paper_encoders / "example_128.jpg").convert("RGB"))


def _normalised(patch_uint8: np.ndarray, scale_offset: tuple[tuple[float, ...], tuple[float, ...]]) -> torch.Tensor:
    """(1, C, H, W) float32 as the patchify kernel makes it: x * scale[c] + offset[c]."""
    scale, offset = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in scale_offset)
    x = torch.from_numpy(patch_uint8.copy()).permute(2, 0, 1).float()
    return (x * scale + offset)[None]


def _relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
@pytest.mark.parametrize("h5_name", PAPER_CONV_ENCODERS)
def test_converted_encoder_matches_numpy_keras_forward(
    paper_encoders: Path, tmp_path: Path, h5_name: str, suffix: str
) -> None:
    h5_path = paper_encoders / h5_name
    spec = import_keras(h5_path, tmp_path / f"enc{suffix}")
    encoder = load_encoder(tmp_path / f"enc{suffix}")
    assert encoder.spec == spec
    assert (spec.input_px, spec.mpp, spec.channels, spec.code_size) == (128, 0.5, 3, 128)
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    patch = _patch(paper_encoders)
    out = encoder(_normalised(patch, spec.scale_offset())).double().numpy()[0]
    ref = keras_reference(h5_path, patch)
    assert _relative_error(out, ref) <= 1e-4


def test_batch_of_dihedral_patches_matches_reference(paper_encoders: Path) -> None:
    """Batched, channels-last inference gives each patch its own code (no mixing across the batch)."""
    h5_path = paper_encoders / "encoder_bigan.h5"
    module, spec = convert_keras(h5_path)
    patch = _patch(paper_encoders)
    patches = [patch, np.rot90(patch), np.fliplr(patch)]
    batch = torch.cat([_normalised(np.ascontiguousarray(p), spec.scale_offset()) for p in patches])
    with torch.inference_mode():
        out = module.to(memory_format=torch.channels_last)(batch.contiguous(memory_format=torch.channels_last))
    for code, p in zip(out.double().numpy(), patches):
        assert _relative_error(code, keras_reference(h5_path, np.ascontiguousarray(p))) <= 1e-4


def test_hash_is_stable_across_imports(paper_encoders: Path, tmp_path: Path) -> None:
    h5_path = paper_encoders / "encoder_multitask-4.h5"
    first = import_keras(h5_path, tmp_path / "a.pt")
    second = import_keras(h5_path, tmp_path / "b.pt2", name="multitask")
    assert first.sha256 == second.sha256 and len(first.sha256) == 64
    assert (first.name, second.name) == ("multitask-4", "multitask")
    assert load_encoder(tmp_path / "b.pt2").spec.sha256 == first.sha256
    assert convert_keras(paper_encoders / "encoder_bigan.h5")[1].sha256 != first.sha256


def test_mean_rgb_h5_is_the_paper_mean_rgb_on_minus_one_to_one(paper_encoders: Path, tmp_path: Path) -> None:
    """encoder_mean-rgb.h5 is a GlobalAveragePooling2D on a 128-px input fed [-1, 1] patches."""
    spec = import_keras(paper_encoders / "encoder_mean-rgb.h5", tmp_path / "mean.pt")
    assert (spec.name, spec.code_size, spec.input_px) == ("mean-rgb", 3, 128)
    patch = _patch(paper_encoders)
    out = load_encoder(tmp_path / "mean.pt")(_normalised(patch, spec.scale_offset())).double().numpy()[0]
    np.testing.assert_allclose(out, patch.reshape(-1, 3).mean(axis=0) / 255.0 * 2.0 - 1.0, rtol=0, atol=1e-6)


LayersEdit = Callable[[list[dict[str, Any]]], object]


def _edited_copy(paper_encoders: Path, tmp_path: Path, edit: LayersEdit) -> Path:
    """A copy of the multitask file with its model_config edited."""
    path = tmp_path / "edited.h5"
    shutil.copy(paper_encoders / "encoder_multitask-4.h5", path)
    with h5py.File(path, "r+") as h5:
        config = json.loads(h5.attrs["model_config"])
        edit(config["config"]["layers"])
        h5.attrs["model_config"] = json.dumps(config)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda layers: layers[1]["config"].update(padding="same"), r"conv2d_1.*padding = 'same'"),
        (lambda layers: layers[2].update(class_name="PReLU"), r"leaky_re_lu_1.*PReLU.*Conv2D"),
        (lambda layers: layers[3]["config"].update(axis=1), r"batch_normalization_1.*axis = 1"),
        (lambda layers: layers[0]["config"].update(batch_input_shape=[None, 96, 96, 3]), r"96×96"),
    ],
)
def test_wrong_architecture_is_refused(
    paper_encoders: Path, tmp_path: Path, edit: LayersEdit, message: str
) -> None:
    path = _edited_copy(paper_encoders, tmp_path, edit)
    with pytest.raises(EncoderError, match=message):
        import_keras(path, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_non_keras_files_are_refused(tmp_path: Path) -> None:
    weights_only = tmp_path / "weights.h5"
    with h5py.File(weights_only, "w") as h5:
        h5["conv/kernel:0"] = np.zeros((3, 3, 3, 8), np.float32)
    with pytest.raises(EncoderError, match="model_config"):
        import_keras(weights_only, tmp_path / "out.pt")
    not_hdf5 = tmp_path / "model.h5"
    not_hdf5.write_bytes(b"not an hdf5 file")
    with pytest.raises(EncoderError, match="not an HDF5 file"):
        import_keras(not_hdf5, tmp_path / "out.pt")
