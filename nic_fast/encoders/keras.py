"""Convert the NIC paper's Keras 2 HDF5 encoders to nic-fast encoder files, with h5py only.

The paper's encoders (github davidtellez/neural-image-compression) are Keras 2.0.9
models: 4 × [Conv2D 3×3 stride 2 'valid' → LeakyReLU → BatchNormalization], Flatten,
Dense; the 64-px ones were run on 128-px patches at 0.5 µm/px after a 2×2 average pool,
and every encoder saw patches scaled to [-1, 1]. The converter reads the layer order and
every hyper-parameter from the file's ``model_config`` (never from layer names) and
refuses anything outside this small layer vocabulary, so a converted file either
reproduces the Keras forward pass or is not written at all.

``encoder_mean-rgb.h5`` is a Keras model with a single GlobalAveragePooling2D on a
128-px input: it converts to the built-in mean-rgb module with the paper's [-1, 1]
input scaling, so its codes are ``2 · mean-rgb − 1``, exactly what the paper stored.
"""
from __future__ import annotations

import json
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from nic_fast.encoders.builtin import MeanRGB
from nic_fast.encoders.files import save_encoder
from nic_fast.encoders.spec import EncoderError, EncoderSpec, weights_sha256

PATCH_PX = 128  # the paper's patch side at 0.5 µm/px
PATCH_MPP = 0.5
SUPPORTED_LAYERS = ("Conv2D", "LeakyReLU", "BatchNormalization", "Flatten", "Dense", "GlobalAveragePooling2D")

_Shape = tuple[int, ...]  # activation shape: (C, H, W) while spatial, (features,) once flat
_Weights = dict[str, np.ndarray]
_Config = dict[str, Any]


@dataclass(frozen=True)
class KerasLayer:
    """One layer of the chain: its Keras class, config and weights by short name (kernel, bias, …)."""

    class_name: str
    name: str
    config: dict[str, Any]
    weights: dict[str, np.ndarray]


@dataclass(frozen=True)
class KerasModel:
    """A Keras encoder read from HDF5: input shape (H, W, C), the layer chain, the Keras version."""

    input_hwc: tuple[int, int, int]
    layers: list[KerasLayer]
    keras_version: str


def import_keras(
    h5_path: str | os.PathLike[str], out_path: str | os.PathLike[str], name: str | None = None
) -> EncoderSpec:
    """Convert a paper Keras encoder to ``out_path`` (.pt or .pt2); returns the spec written."""
    module, spec = convert_keras(h5_path, name)
    save_encoder(module, spec, out_path)
    return spec


def convert_keras(h5_path: str | os.PathLike[str], name: str | None = None) -> tuple[nn.Module, EncoderSpec]:
    """The torch module (eval mode) and spec of a paper Keras encoder, without writing a file.

    ``name`` defaults to the file stem without its ``encoder_`` prefix (``bigan``,
    ``multitask-4``, ``mean-rgb``).
    """
    h5_path = Path(h5_path)
    model = read_keras(h5_path)
    height, width, channels = model.input_hwc
    if height != width or height not in (PATCH_PX // 2, PATCH_PX):
        raise EncoderError(
            f"{h5_path.name}: Keras input {height}×{width} px; nic-fast converts encoders taking "
            f"{PATCH_PX // 2} px (run on {PATCH_PX}-px patches pooled 2×2, as in the paper) or {PATCH_PX} px"
        )
    pooled = height == PATCH_PX // 2
    stages: list[tuple[str, nn.Module]] = [("pool", nn.AvgPool2d(2))] if pooled else []
    layer_stages, code_size = _convert_layers(h5_path.name, model.layers, (channels, height, width))
    module = nn.Sequential(OrderedDict(stages + layer_stages)).eval()
    description = f"NIC paper encoder {h5_path.name} (Keras {model.keras_version}); input scaled to [-1, 1]"
    if pooled:
        description += f", 2×2 average pool to its {height}-px input"
    spec = EncoderSpec(
        name=name or h5_path.stem.removeprefix("encoder_"),
        input_px=PATCH_PX,
        mpp=PATCH_MPP,
        channels=channels,
        mean=(0.5,) * channels,  # the paper scaled every patch to [-1, 1]: x / 255 * 2 - 1
        std=(0.5,) * channels,
        code_size=code_size,
        sha256="",
        description=description,
    )
    return module, replace(spec, sha256=weights_sha256(module.state_dict()))


def read_keras(h5_path: Path) -> KerasModel:
    """Read a Keras 2 model file saved with ``model.save``: layer chain, configs and weights."""
    try:
        h5 = h5py.File(h5_path, "r")
    except OSError as exc:
        raise EncoderError(f"{h5_path} is not an HDF5 file ({exc})") from exc
    with h5:
        if "model_config" not in h5.attrs:
            raise EncoderError(
                f"{h5_path.name} has no Keras model_config (weights only?); nic-fast needs a full model "
                "saved with Keras model.save()"
            )
        config = json.loads(_text(h5.attrs["model_config"]))
        root = h5["model_weights"] if "model_weights" in h5 else h5
        try:
            layers, input_hwc = _layer_chain(h5_path.name, config, root)
        except KeyError as exc:
            raise EncoderError(f"{h5_path.name}: unexpected Keras file layout (missing {exc})") from exc
        return KerasModel(input_hwc, layers, _text(h5.attrs.get("keras_version", "unknown")))


def _layer_chain(
    file_name: str, config: dict[str, Any], root: h5py.Group
) -> tuple[list[KerasLayer], tuple[int, int, int]]:
    """Flatten the model into one chain; a nested Sequential (as in the BiGAN file) is expanded in place.

    Top-level layers keep their weights in their own group; a nested Sequential keeps all
    of its layers' weights in the one group named after it.
    """
    if config.get("class_name") == "Sequential":
        top = _sequential_layers(config["config"])
    elif config.get("class_name") == "Model":
        top = config["config"]["layers"]
        _check_single_chain(file_name, config["config"])
    else:
        raise EncoderError(f"{file_name}: Keras model class {config.get('class_name')!r} is not supported")
    input_shape: list[Any] | None = None
    chain: list[KerasLayer] = []
    for entry in top:
        name = _entry_name(entry)
        if entry["class_name"] == "InputLayer":
            input_shape = entry["config"]["batch_input_shape"]
        elif entry["class_name"] == "Sequential":
            inner = _sequential_layers(entry["config"])
            weights = _group_weights(root[name])
            chain += [_layer(layer, weights) for layer in inner]
            input_shape = input_shape or inner[0]["config"].get("batch_input_shape")
        else:
            chain.append(_layer(entry, _group_weights(root[name])))
            input_shape = input_shape or entry["config"].get("batch_input_shape")
    if input_shape is None or len(input_shape) != 4 or None in input_shape[1:]:
        raise EncoderError(f"{file_name}: the model has no fixed (batch, H, W, C) input shape, got {input_shape}")
    return chain, (int(input_shape[1]), int(input_shape[2]), int(input_shape[3]))


def _sequential_layers(config: list[dict[str, Any]] | dict[str, Any]) -> list[dict[str, Any]]:
    """Keras 2.0 stores a Sequential's config as the layer list; later versions wrap it in a dict."""
    return config if isinstance(config, list) else config["layers"]


def _entry_name(entry: dict[str, Any]) -> str:
    return entry.get("name") or entry["config"]["name"]


def _check_single_chain(file_name: str, model_config: dict[str, Any]) -> None:
    """Each layer must read only the previous one: branches and merges are not this family."""
    layers = model_config["layers"]
    for previous, layer in zip(layers, layers[1:]):
        inbound = layer.get("inbound_nodes") or []
        sources = [node[0] for call in inbound for node in call]
        if sources != [previous["name"]]:
            raise EncoderError(
                f"{file_name}: layer {layer['name']!r} reads {sources}, not just {previous['name']!r}; "
                "nic-fast converts single-chain encoders only"
            )
    outputs = [out[0] for out in model_config.get("output_layers", [])]
    if outputs != [layers[-1]["name"]]:
        raise EncoderError(f"{file_name}: model outputs {outputs}, expected the last layer only")


def _group_weights(group: h5py.Group) -> dict[str, dict[str, np.ndarray]]:
    """Weights under one saved layer group, as {layer name: {short name: array}}.

    Keras lists them in the group's ``weight_names`` attribute as ``<layer>/<param>:0``,
    whether the group is one layer (flat models) or a whole nested Sequential.
    """
    weights: dict[str, dict[str, np.ndarray]] = {}
    for weight_name in (_text(n) for n in group.attrs.get("weight_names", [])):
        owner, _, param = weight_name.rpartition("/")
        layer_name = owner.rpartition("/")[2]
        weights.setdefault(layer_name, {})[param.partition(":")[0]] = np.asarray(group[weight_name], dtype=np.float32)
    return weights


def _layer(entry: dict[str, Any], weights: dict[str, dict[str, np.ndarray]]) -> KerasLayer:
    name = _entry_name(entry)
    return KerasLayer(entry["class_name"], name, entry["config"], dict(weights.get(name, {})))


def _convert_layers(
    file_name: str, layers: list[KerasLayer], chw: tuple[int, int, int]
) -> tuple[list[tuple[str, nn.Module]], int]:
    """Torch stages for the chain and the code size; tracks the activation shape to place weights."""
    stages: list[tuple[str, nn.Module]] = []
    counts: Counter[str] = Counter()
    shape: _Shape = chw
    flattened_from: tuple[int, int, int] | None = None
    for layer in layers:
        converter = _CONVERTERS.get(layer.class_name)
        if converter is None:
            raise EncoderError(
                f"{file_name}: layer {layer.name!r} is a {layer.class_name}; nic-fast converts the NIC "
                f"paper's encoder family ({', '.join(SUPPORTED_LAYERS)})"
            )
        weights = dict(layer.weights)
        try:
            stage, new_shape = converter(layer.config, weights, shape, flattened_from)
        except _Mismatch as exc:
            raise EncoderError(f"{file_name}: layer {layer.name!r} ({layer.class_name}): {exc}") from None
        if weights:
            raise EncoderError(f"{file_name}: layer {layer.name!r} has unexpected weights {sorted(weights)}")
        flattened_from = _spatial(shape) if layer.class_name == "Flatten" else None
        shape = new_shape
        counts[layer.class_name] += 1
        stages.append((f"{_STAGE_NAMES[layer.class_name]}{counts[layer.class_name]}", stage))
    if len(shape) != 1:
        raise EncoderError(f"{file_name}: the model ends in a {shape} map, not a code vector")
    return stages, shape[0]


class _Mismatch(Exception):
    """A layer config outside what the converter reproduces exactly."""


def _require(config: _Config, key: str, allowed: tuple[Any, ...]) -> None:
    value = config.get(key)
    if isinstance(value, list):
        value = tuple(value)
    if value not in allowed:
        raise _Mismatch(f"{key} = {value!r}, supported: {', '.join(map(repr, allowed))}")


def _take(weights: _Weights, param: str, shape: tuple[int, ...]) -> torch.Tensor:
    if param not in weights:
        raise _Mismatch(f"missing weight {param!r}")
    array = weights.pop(param)
    if array.shape != shape:
        raise _Mismatch(f"weight {param!r} has shape {array.shape}, expected {shape}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _spatial(shape: _Shape) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise _Mismatch(f"needs a spatial (C, H, W) input, got {shape}")
    return shape  # type: ignore[return-value]


def _conv2d(
    config: _Config, weights: _Weights, shape: _Shape, _flattened_from: tuple[int, int, int] | None
) -> tuple[nn.Module, _Shape]:
    channels, height, width = _spatial(shape)
    _require(config, "data_format", ("channels_last",))
    _require(config, "padding", ("valid",))
    _require(config, "dilation_rate", ((1, 1),))
    _require(config, "activation", ("linear",))
    _require(config, "use_bias", (True,))
    kh, kw = config["kernel_size"]
    sh, sw = config["strides"]
    filters = config["filters"]
    conv = nn.Conv2d(channels, filters, (kh, kw), stride=(sh, sw), padding=0)
    with torch.no_grad():
        # Keras kernels are (kh, kw, in, out); torch wants (out, in, kh, kw).
        conv.weight.copy_(_take(weights, "kernel", (kh, kw, channels, filters)).permute(3, 2, 0, 1))
        conv.bias.copy_(_take(weights, "bias", (filters,)))
    return conv, (filters, (height - kh) // sh + 1, (width - kw) // sw + 1)


def _leaky_relu(
    config: _Config, weights: _Weights, shape: _Shape, _flattened_from: tuple[int, int, int] | None
) -> tuple[nn.Module, _Shape]:
    return nn.LeakyReLU(float(config["alpha"])), shape


def _batch_norm(
    config: _Config, weights: _Weights, shape: _Shape, _flattened_from: tuple[int, int, int] | None
) -> tuple[nn.Module, _Shape]:
    channels, _, _ = _spatial(shape)
    _require(config, "axis", (-1, 3))
    _require(config, "center", (True,))
    _require(config, "scale", (True,))
    norm = nn.BatchNorm2d(channels, eps=float(config["epsilon"]))
    with torch.no_grad():
        norm.weight.copy_(_take(weights, "gamma", (channels,)))
        norm.bias.copy_(_take(weights, "beta", (channels,)))
        norm.running_mean.copy_(_take(weights, "moving_mean", (channels,)))
        norm.running_var.copy_(_take(weights, "moving_variance", (channels,)))
    return norm.eval(), shape


def _flatten(
    config: _Config, weights: _Weights, shape: _Shape, _flattened_from: tuple[int, int, int] | None
) -> tuple[nn.Module, _Shape]:
    channels, height, width = _spatial(shape)
    return nn.Flatten(), (channels * height * width,)


def _dense(
    config: _Config, weights: _Weights, shape: _Shape, flattened_from: tuple[int, int, int] | None
) -> tuple[nn.Module, _Shape]:
    if len(shape) != 1:
        raise _Mismatch(f"needs a flat input, got {shape}")
    _require(config, "activation", ("linear",))
    _require(config, "use_bias", (True,))
    units, features = config["units"], shape[0]
    kernel = _take(weights, "kernel", (features, units))
    if flattened_from is not None:
        # Keras flattened (H, W, C); torch flattens (C, H, W): reorder the input rows to match.
        channels, height, width = flattened_from
        kernel = kernel.reshape(height, width, channels, units).permute(2, 0, 1, 3).reshape(features, units)
    dense = nn.Linear(features, units)
    with torch.no_grad():
        dense.weight.copy_(kernel.T)
        dense.bias.copy_(_take(weights, "bias", (units,)))
    return dense, (units,)


def _global_average(
    config: _Config, weights: _Weights, shape: _Shape, _flattened_from: tuple[int, int, int] | None
) -> tuple[nn.Module, _Shape]:
    channels, _, _ = _spatial(shape)
    _require(config, "data_format", ("channels_last",))
    return MeanRGB(), (channels,)


_CONVERTERS = {
    "Conv2D": _conv2d,
    "LeakyReLU": _leaky_relu,
    "BatchNormalization": _batch_norm,
    "Flatten": _flatten,
    "Dense": _dense,
    "GlobalAveragePooling2D": _global_average,
}
_STAGE_NAMES = {
    "Conv2D": "conv",
    "LeakyReLU": "act",
    "BatchNormalization": "bn",
    "Flatten": "flatten",
    "Dense": "dense",
    "GlobalAveragePooling2D": "mean",
}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
