"""`nic-fast encoders import`: fake checkpoints in each model's published layout, imported and used by `compress`.

No weights are downloaded: the architectures get random weights, saved in the key layout
and container the published files use (timm state dict as .pth; transformers' ViT names as
.safetensors; CTransPath's {"model": ...} with its buffers). Forward passes of ViT-S/B on
2 busy cores cost seconds, so they use few patches (``--min-tissue 0.99``: 19 cells of the
CMU slide at 224 px).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import nic_fast
from nic_fast.cli import main
from nic_fast.encoders import load_encoder
from nic_fast.encoders.checkpoints import Weights, read_weights
from nic_fast.encoders.importer import check_weights
from nic_fast.encoders.presets import PRESETS, build_on_meta
from nic_fast.encoders.spec import EncoderError
from nic_fast.slides import open_slide

TIMM_VIT_NAMES = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.0.norm1.weight",
                  "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias", "blocks.11.mlp.fc1.weight",
                  "blocks.11.mlp.fc2.bias", "norm.weight", "norm.bias"}  # as in UNI's / Kaiko's published files


def _random_module(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return PRESETS[name].build().eval()


def _patches(n: int, px: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(seed))


def _import(*args: str) -> object:
    return CliRunner().invoke(main, ["encoders", "import", *args])


def _one_line_error(result: object) -> str:
    assert result.exit_code == 1, result.output  # type: ignore[attr-defined]
    lines = result.output.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output  # type: ignore[attr-defined]
    return lines[0]


@pytest.fixture(scope="module")
def kaiko(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """Kaiko ViT-S/16 with random weights, saved as its published timm state dict (vits16.pth)."""
    module = _random_module("kaiko-vits16")
    state = module.state_dict()
    assert TIMM_VIT_NAMES <= set(state)
    path = tmp_path_factory.mktemp("kaiko") / "vits16.pth"
    torch.save(state, path)
    return module, path


def _hf_vit_layout(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm names → transformers' ViTModel names (owkin/phikon's model.safetensors), written out by hand."""
    hf = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": state["pos_embed"],
          "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
          "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"],
          "pooler.dense.weight": torch.zeros(768, 768), "pooler.dense.bias": torch.zeros(768)}
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[b + f"attn.qkv.{kind}"].chunk(3)
            hf.update({h + f"attention.attention.query.{kind}": q, h + f"attention.attention.key.{kind}": k,
                       h + f"attention.attention.value.{kind}": v,
                       h + f"attention.output.dense.{kind}": state[b + f"attn.proj.{kind}"],
                       h + f"layernorm_before.{kind}": state[b + f"norm1.{kind}"],
                       h + f"layernorm_after.{kind}": state[b + f"norm2.{kind}"],
                       h + f"intermediate.dense.{kind}": state[b + f"mlp.fc1.{kind}"],
                       h + f"output.dense.{kind}": state[b + f"mlp.fc2.{kind}"]})
    return {key: t.contiguous() for key, t in hf.items()}


def _tissue_cell_patch(slide: Path, store: object, spec: object) -> tuple[tuple[int, int], torch.Tensor]:
    """A tissue cell of the store and its pixels from the slide, normalised as the spec says."""
    cells = np.argwhere(store.tissue)  # type: ignore[attr-defined]
    i, j = (int(v) for v in cells[len(cells) // 2])
    px = spec.input_px  # type: ignore[attr-defined]
    with open_slide(slide) as reader:
        patch = reader.read_region(0, i * px, j * px, px, px)
    scale, offset = (torch.tensor(v)[:, None, None] for v in spec.scale_offset())  # type: ignore[attr-defined]
    return (i, j), (torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1))).float() * scale + offset)[None]


def _compress_and_check(cmu_svs: Path, encoder_file: Path, out: Path) -> None:
    """compress the CMU slide with an imported encoder: 224-px grid, the preset's C, the encoder's embeddings."""
    encoder = load_encoder(encoder_file)
    spec = encoder.spec
    result = CliRunner().invoke(main, ["compress", str(cmu_svs), "--encoder", str(encoder_file), "-o", str(out),
                                       "--mpp", f"{spec.mpp:g}", "--min-tissue", "0.99", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    store = nic_fast.open_store(out / "CMU-1-Small-Region.zarr")
    with open_slide(cmu_svs) as reader:
        height, width = reader.level_dims[0]
    assert store.grid_shape == (height // spec.input_px, width // spec.input_px) == (13, 9)
    assert store.code_size == spec.code_size
    assert store.attrs["encoder"]["sha256"] == spec.sha256 and store.attrs["patch_px"] == spec.input_px
    (i, j), patch = _tissue_cell_patch(cmu_svs, store, spec)
    expected = encoder(patch)[0].numpy()
    np.testing.assert_allclose(store.load()[i, j].astype(np.float32), expected, rtol=2e-2, atol=2e-2 * np.abs(
        expected).max())


@pytest.mark.slow
def test_vit_s_timm_checkpoint_imports_and_compresses(kaiko, cmu_svs: Path, tmp_path: Path) -> None:
    module, weights = kaiko
    out = tmp_path / "kaiko.pt"
    result = _import("kaiko-vits16", "--weights", str(weights), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "C = 384, 224 px at 0.5 µm/px" in result.output and "Kaiko non-commercial" in result.output
    encoder = load_encoder(out)
    x = _patches(2, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), module(x), rtol=1e-4, atol=1e-4)  # TorchScript file = the module
    assert encoder.spec.name == "kaiko-vits16" and "vits16.pth (sha256 " in encoder.spec.description
    _compress_and_check(cmu_svs, out, tmp_path / "stores")


@pytest.mark.slow
def test_vit_b_transformers_checkpoint_imports_and_compresses(cmu_svs: Path, tmp_path: Path) -> None:
    """Phikon's transformers layout (q, k, v apart, layernorm_before/after) as .safetensors."""
    from safetensors.torch import save_file

    module = _random_module("phikon", seed=1)
    weights = tmp_path / "model.safetensors"
    save_file(_hf_vit_layout(module.state_dict(), depth=12), str(weights))
    out = tmp_path / "phikon.pt"
    result = _import("phikon", "--weights", str(weights), "-o", str(out))
    assert result.exit_code == 0, result.output
    encoder = load_encoder(out)
    x = _patches(2, 224, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), module(x), rtol=1e-4, atol=1e-4)
    _compress_and_check(cmu_svs, out, tmp_path / "stores")


def test_ctranspath_checkpoint_in_its_container(tmp_path: Path) -> None:
    """CTransPath's file: {"model": state dict with relative_position_index and attn_mask buffers}."""
    module = _random_module("ctranspath", seed=2)
    published = dict(module.state_dict())
    for name, buffer in module.named_buffers():
        if name.endswith(("relative_position_index", "attn_mask")):
            published[name] = buffer
    weights = tmp_path / "ctranspath.pth"
    torch.save({"model": published, "epoch": torch.tensor(100)}, weights)
    out = tmp_path / "ctranspath.pt"
    result = _import("ctranspath", "--weights", str(weights), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "C = 768, 224 px at 1 µm/px" in result.output
    x = _patches(1, 224, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(out)(x), module(x), rtol=1e-4, atol=1e-4)


# -- refusals ------------------------------------------------------------------------------------


def _altered(kaiko: tuple[torch.nn.Module, Path], tmp_path: Path, change: str) -> Path:
    state = dict(torch.load(kaiko[1], weights_only=True))
    if change == "missing":
        del state["norm.bias"]
    elif change == "extra":
        state["head.weight"] = torch.zeros(1000, 384)
    elif change == "shape":
        state["pos_embed"] = torch.zeros(1, 50, 384)
    path = tmp_path / f"{change}.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(("change", "message"), [
    ("missing", r"1 missing keys \(norm\.bias\)"),
    ("extra", r"1 unexpected keys \(head\.weight\)"),
    ("shape", r"1 tensors of the wrong shape \(pos_embed is \(1, 50, 384\), kaiko-vits16 has \(1, 197, 384\)\)"),
])
def test_checkpoint_that_does_not_fit_is_refused_in_one_line(kaiko, tmp_path: Path, change: str,
                                                             message: str) -> None:
    out = tmp_path / "enc.pt"
    line = _one_line_error(_import("kaiko-vits16", "--weights", str(_altered(kaiko, tmp_path, change)), "-o", str(out)))
    assert re.search(message, line), line
    assert "does not fit preset 'kaiko-vits16'" in line and "vits16.pth from https://" in line
    assert not out.exists()


def test_wrong_file_types_are_refused_in_one_line(tmp_path: Path) -> None:
    text = tmp_path / "weights.bin"
    text.write_text("<html>Access to model MahmoodLab/UNI is restricted</html>")
    assert "is not a PyTorch weights file" in _one_line_error(_import("uni", "--weights", str(text), "-o",
                                                                       str(tmp_path / "a.pt")))
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\x00" * 64)
    assert "is not a safetensors file" in _one_line_error(_import("phikon", "--weights", str(junk), "-o",
                                                                   str(tmp_path / "a.pt")))
    keras = tmp_path / "encoder.h5"
    keras.write_bytes(b"\x89HDF\r\n\x1a\n")
    assert "not a weights file nic-fast reads (suffix '.h5')" in _one_line_error(
        _import("uni", "--weights", str(keras), "-o", str(tmp_path / "a.pt")))
    pickled = tmp_path / "full_model.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a pickled module, not a state dict
    assert "holds Python objects besides tensors" in _one_line_error(
        _import("uni", "--weights", str(pickled), "-o", str(tmp_path / "a.pt")))
    assert "no such weights file" in _one_line_error(_import("uni", "--weights", str(tmp_path / "none.bin"), "-o",
                                                             str(tmp_path / "a.pt")))
    assert "unknown preset 'unii'" in _one_line_error(_import("unii", "--weights", str(text), "-o",
                                                              str(tmp_path / "a.pt")))
    assert not list(tmp_path.glob("*.pt"))


def test_output_suffix_is_checked_first(kaiko, tmp_path: Path) -> None:
    result = _import("kaiko-vits16", "--weights", str(kaiko[1]), "-o", str(tmp_path / "enc.onnx"))
    assert result.exit_code == 2 and ".pt or .pt2" in result.output


# -- reading files -------------------------------------------------------------------------------


def test_ddp_prefix_and_wrappers_are_unwrapped(tmp_path: Path) -> None:
    state = {"module.a.weight": torch.ones(2, 3), "module.b": torch.zeros(4)}
    torch.save({"state_dict": state, "optimizer_step": torch.tensor(3)}, tmp_path / "ddp.pth")
    weights = read_weights(tmp_path / "ddp.pth")
    assert weights.shapes() == {"a.weight": (2, 3), "b": (4,)}
    torch.testing.assert_close(weights["a.weight"], torch.ones(2, 3))
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "ddp.safetensors"))
    weights = read_weights(tmp_path / "ddp.safetensors")
    assert weights.shapes() == {"a.weight": (2, 3), "b": (4,)}
    torch.testing.assert_close(weights["b"], torch.zeros(4))


def test_large_presets_are_checked_on_meta(tmp_path: Path) -> None:
    """A ViT-g's 1.1 B parameters are checked by shape alone: nothing is allocated, nothing read."""
    for name in ("h-optimus-0", "prov-gigapath", "virchow2", "uni2-h", "phikon-v2", "conch", "resnet50-trunc"):
        preset = PRESETS[name]
        shapes = {k: tuple(v.shape) for k, v in build_on_meta(preset).state_dict().items()}
        shapes = _published_names(name, shapes)

        def unread(key: str) -> torch.Tensor:
            raise AssertionError(f"{key} was read")

        check_weights(preset, Weights(tmp_path / preset.weights_file, shapes, unread))
    shapes = {k: tuple(v.shape) for k, v in build_on_meta(PRESETS["uni"]).state_dict().items()}
    shapes["blocks.23.ls2.gamma"] = (1280,)
    with pytest.raises(EncoderError, match=r"blocks\.23\.ls2\.gamma is \(1280,\), uni has \(1024,\)"):
        check_weights(PRESETS["uni"], Weights(tmp_path / "pytorch_model.bin", shapes, lambda key: torch.empty(0)))


def _published_names(name: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The module's shapes under the names and with the extras of the model's published file."""
    if name == "conch":  # the whole CoCa model: text tower, caption pooler, projection
        out = {f"visual.{k}": s for k, s in shapes.items()}
        out.update({"text.token_embedding.weight": (32007, 768), "logit_scale": (), "visual.proj_contrast": (512, 512),
                    "visual.attn_pool_caption.query": (256, 768), "visual.ln_caption.weight": (768,)})
        return out
    if name == "resnet50-trunc":  # a full ImageNet ResNet-50
        return {**shapes, "layer4.0.conv1.weight": (512, 1024, 1, 1), "fc.weight": (1000, 2048), "fc.bias": (1000,)}
    if name == "phikon-v2":  # transformers' Dinov2Model
        out = {"embeddings.mask_token": (1, 1024)}
        for key, shape in shapes.items():
            key = (key.replace("blocks.", "encoder.layer.").replace(".ls1.gamma", ".layer_scale1.lambda1")
                   .replace(".ls2.gamma", ".layer_scale2.lambda1").replace(".attn.proj.", ".attention.output.dense.")
                   .replace("patch_embed.proj.", "embeddings.patch_embeddings.projection.")
                   .replace("cls_token", "embeddings.cls_token").replace("pos_embed", "embeddings.position_embeddings"))
            key = "layernorm." + key[len("norm."):] if key.startswith("norm.") else key
            if ".attn.qkv." in key:
                for part in ("query", "key", "value"):
                    out[key.replace("attn.qkv", f"attention.attention.{part}")] = (shape[0] // 3, *shape[1:])
            else:
                out[key] = shape
        return out
    return shapes


def test_presets_table_lists_every_preset() -> None:
    result = CliRunner().invoke(main, ["encoders", "presets"])
    assert result.exit_code == 0, result.output
    for name in PRESETS:
        assert name in result.output
    row = next(line for line in result.output.splitlines() if "virchow2" in line)
    assert "2560" in row and "224" in row and "631.2 M" in row and "CC-BY-NC-ND-4.0" in row


def test_safetensors_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"{}")
    with pytest.raises(EncoderError, match=r"needs the safetensors package; install it with "
                                           r"`pip install 'nic-fast\[foundation\]'`"):
        read_weights(weights)
