"""Encoder specs, the built-in mean-rgb, .pt / .pt2 encoder files and the `encoders` command."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from nic_fast.encoders import EncoderError, EncoderSpec, builtin_encoders, load_encoder, save_encoder, weights_sha256
from nic_fast.encoders.builtin import build_builtin


class TinyConv(nn.Module):
    """A small conv encoder: exercises channels-last, BatchNorm and the flatten in a saved file."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.norm = nn.BatchNorm2d(4)
        self.dense = nn.Linear(4 * 7 * 7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(torch.flatten(torch.relu(self.norm(self.conv(x))), 1))


class VarargsMean(nn.Module):
    """Not scriptable (*args), so saving to .pt must fall back to tracing."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return inputs[0].mean(dim=(2, 3))


def _tiny() -> tuple[nn.Module, EncoderSpec]:
    torch.manual_seed(0)
    module = TinyConv()
    with torch.no_grad():
        module.norm.running_mean.uniform_(-0.5, 0.5)
        module.norm.running_var.uniform_(0.5, 2.0)
    spec = EncoderSpec(
        name="tiny", input_px=16, mpp=None, channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
        code_size=5, sha256="", description="test encoder",
    )
    return module, spec


def _uint8_patches(n: int, side_px: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, side_px, side_px), dtype=np.uint8)


def _normalised(patches: np.ndarray, spec: EncoderSpec) -> torch.Tensor:
    scale, offset = (torch.tensor(v)[:, None, None] for v in spec.scale_offset())
    return torch.from_numpy(patches).float() * scale + offset


# --- spec -------------------------------------------------------------------------------------


def test_scale_offset_is_the_normalisation() -> None:
    _, spec = _tiny()
    x = _uint8_patches(1, 4)
    expected = (x / 255.0 - np.array(spec.mean)[:, None, None]) / np.array(spec.std)[:, None, None]
    np.testing.assert_allclose(_normalised(x, spec).numpy()[0], expected[0], rtol=1e-5, atol=1e-6)


def test_spec_json_round_trip_and_validation() -> None:
    spec = builtin_encoders()["mean-rgb"]
    data = json.loads(json.dumps(spec.to_json()))
    assert EncoderSpec.from_json(data) == spec
    with pytest.raises(EncoderError, match=r"missing fields \['code_size'\]"):
        EncoderSpec.from_json({k: v for k, v in data.items() if k != "code_size"})
    with pytest.raises(EncoderError, match="std must hold 3"):
        EncoderSpec.from_json({**data, "std": [1.0, 1.0]})
    with pytest.raises(EncoderError, match="mpp must be a positive"):
        EncoderSpec.from_json({**data, "mpp": -0.5})
    with pytest.raises(EncoderError, match="format_version 2"):
        EncoderSpec.from_json({**data, "format_version": 2})
    with pytest.raises(EncoderError, match=r"unknown fields \['colour'\]"):
        EncoderSpec.from_json({**data, "colour": "pink"})


# --- built-ins --------------------------------------------------------------------------------


def test_builtin_listing() -> None:
    specs = builtin_encoders()
    assert list(specs) == ["mean-rgb"]
    spec = specs["mean-rgb"]
    assert (spec.channels, spec.code_size, spec.input_px, spec.mpp) == (3, 3, 128, 0.5)
    assert spec.mean == (0.0,) * 3 and spec.std == (1.0,) * 3
    assert spec.sha256 == weights_sha256(build_builtin("mean-rgb")[0].state_dict())


def test_mean_rgb_is_the_channel_mean() -> None:
    encoder = load_encoder("mean-rgb")
    assert encoder.source == "builtin:mean-rgb"
    patches = _uint8_patches(4, 128)
    out = encoder(_normalised(patches, encoder.spec))
    assert out.shape == (4, 3)
    np.testing.assert_allclose(out.numpy(), patches.mean(axis=(2, 3)) / 255.0, rtol=0, atol=1e-6)


# --- files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_round_trip_preserves_spec_and_outputs(tmp_path: Path, suffix: str) -> None:
    module, spec = _tiny()
    module.train()
    x = _normalised(_uint8_patches(3, 16), spec)
    expected = module.eval()(x).detach()
    module.train()
    save_encoder(module, spec, tmp_path / f"tiny{suffix}")
    assert module.training, "save_encoder must leave the caller's module as it was"
    encoder = load_encoder(tmp_path / f"tiny{suffix}")
    assert encoder.spec == EncoderSpec(**{**spec.__dict__, "sha256": weights_sha256(module.state_dict())})
    assert weights_sha256(encoder.module.state_dict()) == encoder.spec.sha256
    torch.testing.assert_close(encoder(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encoder(x[:1]), expected[:1], rtol=1e-5, atol=1e-5)  # batch size is free


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_builtin_round_trip(tmp_path: Path, suffix: str) -> None:
    module, spec = build_builtin("mean-rgb")
    encoder = load_encoder(save_encoder(module, spec, tmp_path / f"mean{suffix}"))
    assert encoder.spec == spec
    x = _normalised(_uint8_patches(2, 128), spec)
    torch.testing.assert_close(encoder(x), load_encoder("mean-rgb")(x))


def test_unscriptable_module_is_traced(tmp_path: Path) -> None:
    spec = EncoderSpec("varargs", 8, None, 3, (0.0,) * 3, (1.0,) * 3, 3, "")
    encoder = load_encoder(save_encoder(VarargsMean(), spec, tmp_path / "varargs.pt"))
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(encoder(x), x.mean(dim=(2, 3)))


def test_save_refuses_wrong_hash_output_or_suffix(tmp_path: Path) -> None:
    module, spec = _tiny()
    with pytest.raises(EncoderError, match="weights hash to"):
        save_encoder(module, EncoderSpec(**{**spec.__dict__, "sha256": "0" * 64}), tmp_path / "a.pt")
    with pytest.raises(EncoderError, match=r"maps \(2, 3, 16, 16\) to \(2, 5\), spec says \(2, 6\)"):
        save_encoder(module, EncoderSpec(**{**spec.__dict__, "code_size": 6}), tmp_path / "a.pt")
    with pytest.raises(EncoderError, match=r"\.pt \(TorchScript\) or \.pt2"):
        save_encoder(module, spec, tmp_path / "a.onnx")
    assert not list(tmp_path.iterdir())


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(EncoderError, match=r"unknown encoder 'bigan': not a built-in \(mean-rgb\)"):
        load_encoder("bigan")


def test_files_that_are_not_encoders(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(EncoderError, match="not a TorchScript file.*save_encoder"):
        load_encoder(junk)
    junk2 = tmp_path / "junk.pt2"
    junk2.write_bytes(b"\x00" * 64)
    with pytest.raises(EncoderError, match="not a torch.export file.*save_encoder"):
        load_encoder(junk2)
    keras = tmp_path / "model.h5"
    keras.write_bytes(b"")
    with pytest.raises(EncoderError, match="import-keras"):
        load_encoder(keras)
    other = tmp_path / "model.onnx"
    other.write_bytes(b"")
    with pytest.raises(EncoderError, match=r"end in \.pt"):
        load_encoder(other)


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_file_without_metadata_says_how_to_make_one(tmp_path: Path, suffix: str) -> None:
    module, spec = _tiny()
    module.eval()
    path = tmp_path / f"bare{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if suffix == ".pt":
            torch.jit.save(torch.jit.script(module), str(path))
        else:
            torch.export.save(torch.export.export(module, (torch.zeros(2, 3, 16, 16),)), path)
    with pytest.raises(EncoderError, match="no nic-fast metadata.*save_encoder.*import-keras"):
        load_encoder(path)


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_no_deprecation_warnings_escape(tmp_path: Path, suffix: str) -> None:
    module, spec = _tiny()
    x = _normalised(_uint8_patches(2, 16), spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = save_encoder(module, spec, tmp_path / f"tiny{suffix}")
        load_encoder(path)(x)
    deprecations = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations, [str(w.message) for w in deprecations]


# --- devices, dtypes, inputs ------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_channels_last_and_bfloat16_on_cpu(tmp_path: Path, suffix: str) -> None:
    module, spec = _tiny()
    encoder = load_encoder(save_encoder(module, spec, tmp_path / f"tiny{suffix}"))
    conv_weights = [p for p in encoder.module.parameters() if p.dim() == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    x = _normalised(_uint8_patches(4, 16), spec)
    reference = encoder(x)
    out = encoder.to("cpu", torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16 and encoder.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_half_on_cuda(tmp_path: Path) -> None:
    module, spec = _tiny()
    encoder = load_encoder(save_encoder(module, spec, tmp_path / "tiny.pt2"))
    x = _normalised(_uint8_patches(4, 16), spec)
    reference = encoder(x)
    out = encoder.to("cuda", torch.float16)(x.cuda())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float().cpu(), reference, rtol=0.02, atol=0.02)


def test_input_shape_and_device_are_checked() -> None:
    encoder = load_encoder("mean-rgb")
    with pytest.raises(EncoderError, match=r"takes \(N, 3, 128, 128\) patches, got \(2, 3, 64, 64\)"):
        encoder(torch.zeros(2, 3, 64, 64))
    with pytest.raises(EncoderError, match="is on cpu, input is on meta"):
        encoder(torch.zeros(2, 3, 128, 128, device="meta"))


# --- command line -----------------------------------------------------------------------------


@pytest.fixture
def cli() -> click.Group:
    """The `encoders` group, imported here so a broken sibling command fails only these tests."""
    from nic_fast.cli.encoders import encoders

    return encoders


def test_cli_list(cli: click.Group) -> None:
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 0, result.output
    assert "mean-rgb" in result.output and "µm/px" in result.output


def test_cli_import_and_show(cli: click.Group, paper_encoders: Path, tmp_path: Path) -> None:
    out = tmp_path / "bigan.pt2"
    h5_path = paper_encoders / "encoder_bigan.h5"
    result = CliRunner().invoke(cli, ["import-keras", str(h5_path), "-o", str(out), "--name", "bigan-paper"])
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(cli, ["show", str(out)])
    assert shown.exit_code == 0, shown.output
    spec = EncoderSpec.from_json(json.loads(shown.output))
    assert (spec.name, spec.code_size, spec.input_px) == ("bigan-paper", 128, 128)
    assert spec.sha256[:12] in result.output


def test_cli_errors(cli: click.Group, paper_encoders: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    unknown = runner.invoke(cli, ["show", "no-such-encoder"])
    assert unknown.exit_code == 1 and "not a built-in (mean-rgb)" in unknown.output
    h5_path = paper_encoders / "encoder_bigan.h5"
    wrong_suffix = runner.invoke(cli, ["import-keras", str(h5_path), "-o", str(tmp_path / "x.onnx")])
    assert wrong_suffix.exit_code == 2 and ".pt or .pt2" in wrong_suffix.output
    not_keras = tmp_path / "x.h5"
    not_keras.write_bytes(b"nope")
    refused = runner.invoke(cli, ["import-keras", str(not_keras), "-o", str(tmp_path / "x.pt")])
    assert refused.exit_code == 1 and "not an HDF5 file" in refused.output


class ClassTokenView(nn.Module):
    """Returns a strided view, as a ViT's ``tokens[:, 0]`` is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (N, P*P, C)
        return tokens[:, 0]


def test_outputs_are_row_major_whatever_the_module_returns() -> None:
    from nic_fast.encoders import Encoder

    spec = EncoderSpec("view", 4, None, 3, (0.0,) * 3, (1.0,) * 3, 3, "")
    x = torch.rand(5, 3, 4, 4)
    assert not ClassTokenView()(x).is_contiguous()
    out = Encoder(spec, ClassTokenView(), "test")(x)
    assert out.is_contiguous() and out.shape == (5, 3)
    torch.testing.assert_close(out, x[:, :, 0, 0])
