"""The encoder fast path: exact rewrites, the precision rule and trial, compilation and its fallbacks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from nic_fast import kernels
from nic_fast.encoders import EncoderSpec, load_encoder, save_encoder
from nic_fast.encoders.keras import import_keras
from nic_fast.encoders.rewrite import rewrite_encoder
from nic_fast.engine import fastpath
from nic_fast.engine.fastpath import FastEncoder, choose_precision, should_compile
from nic_fast.slides import open_slide

PAPER = ("encoder_bigan.h5", "encoder_multitask-4.h5")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test its own compile ledger and inductor cache (never the user's)."""
    monkeypatch.setenv("NIC_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache" / "inductor"))


def _relative(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _randomise_batchnorms(module: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine weights far from the identity, so a wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator))
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) * 3 + 0.2)
            m.weight.data.copy_(torch.randn(m.num_features, generator=generator))
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator))
    return module.eval()


def _save(tmp_path: Path, module: nn.Module, suffix: str, input_px: int = 32, code_size: int = 6) -> Path:
    spec = EncoderSpec(name="net", input_px=input_px, mpp=0.5, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3,
                       code_size=code_size, sha256="")
    return save_encoder(module, spec, tmp_path / f"net{suffix}")


def paper_like() -> nn.Module:
    """The paper's shape: pool, then Conv('valid') → LeakyReLU → BatchNorm, flatten, dense."""
    torch.manual_seed(0)
    return _randomise_batchnorms(nn.Sequential(
        nn.AvgPool2d(2), nn.Conv2d(3, 8, 3, stride=2), nn.LeakyReLU(0.2), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, stride=2), nn.LeakyReLU(0.2), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 1 * 1, 6)))


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_paper_shaped_encoder_loses_its_pool_and_every_batchnorm(tmp_path, suffix):
    encoder = load_encoder(_save(tmp_path, paper_like(), suffix, input_px=16))
    rewritten = rewrite_encoder(encoder)
    assert rewritten.rewrites.pool_px == 2 and rewritten.input_px == 8
    assert (rewritten.rewrites.batchnorms_folded, rewritten.rewrites.batchnorms_left) == (2, 0)
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        expected = encoder.module(x)
        got = rewritten.module(nn.functional.avg_pool2d(x, 2))
    assert _relative(got, expected) <= 1e-5
    assert not any("batch_norm" in str(n.target) for n in rewritten.module.graph.nodes)


def test_batchnorm_after_a_conv_folds_backward_whatever_the_padding(tmp_path):
    torch.manual_seed(1)
    module = _randomise_batchnorms(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 6)))
    encoder = load_encoder(_save(tmp_path, module, ".pt"))
    rewritten = rewrite_encoder(encoder)
    assert rewritten.rewrites.batchnorms_folded == 1 and rewritten.rewrites.pool_px == 1
    x = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        assert _relative(rewritten.module(x), encoder.module(x)) <= 1e-5


def test_batchnorm_before_a_padded_conv_is_left_alone(tmp_path):
    """conv(a·x + b) with zero padding sees 0 where the original saw b at the border: no fold."""
    torch.manual_seed(2)
    module = _randomise_batchnorms(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6)))
    encoder = load_encoder(_save(tmp_path, module, ".pt"))
    rewritten = rewrite_encoder(encoder)
    assert (rewritten.rewrites.batchnorms_folded, rewritten.rewrites.batchnorms_left) == (0, 1)
    assert rewritten.module is encoder.module and "nothing to rewrite" in rewritten.rewrites.note


def test_pool_that_is_not_a_plain_box_stays(tmp_path):
    torch.manual_seed(3)
    module = nn.Sequential(nn.AvgPool2d(3, stride=2), nn.Flatten(), nn.Linear(3 * 15 * 15, 6)).eval()
    rewritten = rewrite_encoder(load_encoder(_save(tmp_path, module, ".pt")))
    assert rewritten.rewrites.pool_px == 1 and rewritten.input_px == 32


def test_module_without_anything_to_rewrite_runs_as_it_is(tmp_path):
    module = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    encoder = load_encoder(_save(tmp_path, module, ".pt"))
    rewritten = rewrite_encoder(encoder)
    assert rewritten.module is encoder.module and rewritten.rewrites.graph == "not captured"
    assert "no BatchNorm or average pool" in rewritten.rewrites.note


def test_a_graph_that_cannot_be_captured_runs_as_loaded(tmp_path, monkeypatch):
    encoder = load_encoder(_save(tmp_path, paper_like(), ".pt", input_px=16))

    def refuse(module, example):
        raise RuntimeError("unsupported op prim::Foo\nmore detail")

    monkeypatch.setattr("nic_fast.encoders.rewrite._capture", refuse)
    rewritten = rewrite_encoder(encoder)
    assert rewritten.module is encoder.module and rewritten.input_px == 16
    assert rewritten.rewrites.note == "graph not captured (RuntimeError: unsupported op prim::Foo)"


def test_a_rewrite_that_changes_the_output_is_rejected(tmp_path, monkeypatch):
    from nic_fast.encoders import rewrite

    encoder = load_encoder(_save(tmp_path, paper_like(), ".pt", input_px=16))
    real_fold = rewrite._fold_batchnorms

    def broken_fold(graph):
        folded = real_fold(graph)
        for name, buffer in graph.named_buffers():
            if name.startswith("_folded") and name.endswith("bias"):
                buffer.add_(1.0)
        return folded

    monkeypatch.setattr(rewrite, "_fold_batchnorms", broken_fold)
    rewritten = rewrite_encoder(encoder)
    assert rewritten.module is encoder.module and rewritten.rewrites.note.startswith("rewrite rejected")


def test_loaded_pt2_module_is_not_modified_by_rewriting(tmp_path):
    encoder = load_encoder(_save(tmp_path, paper_like(), ".pt2", input_px=16))
    before = {k: v.clone() for k, v in encoder.module.state_dict().items()}
    rewrite_encoder(encoder)
    after = encoder.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# -- the paper's encoders on real pixels ----------------------------------------------------------


def _example_patch(paper_encoders: Path) -> np.ndarray:
    return np.array(Image.open(paper_encoders / "example_128.jpg").convert("RGB"))


def _fast_codes(fast: FastEncoder, region: np.ndarray, cells: np.ndarray, scale_offset) -> torch.Tensor:
    """Patchify as the engine does (the absorbed pool as extra downsampling), then encode."""
    scale, offset = scale_offset
    batch = torch.empty((len(cells), 3, fast.input_px, fast.input_px))
    kernels.patchify(region, cells.astype(np.int32), batch, scale=list(scale), offset=list(offset),
                     downsample=fast.pool_px)
    return fast(batch).double()


@pytest.mark.parametrize("h5_name", PAPER)
def test_paper_encoder_fast_path_matches_keras_on_the_example_patch(paper_encoders, tmp_path, h5_name):
    from test_keras_import import keras_reference

    spec = import_keras(paper_encoders / h5_name, tmp_path / "enc.pt")
    encoder = load_encoder(tmp_path / "enc.pt")
    fast = FastEncoder(encoder, torch.device("cpu"), torch.float32, precision="fp32", compile="off")
    assert fast.attrs()["rewrites"]["pool_px"] == 2 and fast.attrs()["rewrites"]["batchnorms_folded"] == 4
    patch = _example_patch(paper_encoders)
    code = _fast_codes(fast, patch, np.zeros((1, 2)), spec.scale_offset())[0].numpy()
    assert _relative(code, keras_reference(paper_encoders / h5_name, patch)) <= 1e-4
    original = encoder(torch.from_numpy(_normalised(patch, spec.scale_offset()))).double()[0]
    assert _relative(code, original) <= 1e-5


def _normalised(patch: np.ndarray, scale_offset) -> np.ndarray:
    scale, offset = (np.asarray(v, np.float32)[:, None, None] for v in scale_offset)
    return (patch.transpose(2, 0, 1).astype(np.float32) * scale + offset)[None]


@pytest.mark.parametrize("h5_name", PAPER)
def test_paper_encoders_on_the_real_slide_fp32_and_bf16(paper_encoders, cmu_svs, tmp_path, h5_name):
    """fp32 fast path within 1e-4 of the float64 Keras forward pass; bf16 cosine ≥ 0.999 per patch."""
    from test_keras_import import keras_reference

    spec = import_keras(paper_encoders / h5_name, tmp_path / "enc.pt")
    with open_slide(cmu_svs) as reader:
        region = reader.read_region(0, 1024, 1024, 512, 512)
    cells = np.array([(y, x) for y in range(0, 384 + 1, 128) for x in range(0, 384 + 1, 128)])
    fp32 = FastEncoder(load_encoder(tmp_path / "enc.pt"), torch.device("cpu"), torch.float32, precision="fp32",
                       compile="off")
    bf16 = FastEncoder(load_encoder(tmp_path / "enc.pt"), torch.device("cpu"), torch.bfloat16, precision="bf16",
                       compile="off")
    codes32 = _fast_codes(fp32, region, cells, spec.scale_offset()).numpy()
    codes16 = _fast_codes(bf16, region, cells, spec.scale_offset()).numpy()
    for (y, x), c32, c16 in zip(cells, codes32, codes16):
        reference = keras_reference(paper_encoders / h5_name, np.ascontiguousarray(region[y : y + 128, x : x + 128]))
        assert _relative(c32, reference) <= 1e-4
        cosine = float(c16 @ reference / np.linalg.norm(c16) / np.linalg.norm(reference))
        assert cosine >= 0.999, f"cell {(y, x)}: bf16 cosine {cosine:.5f}"


# -- the rules ------------------------------------------------------------------------------------


def test_precision_rule_needs_both_speed_and_accuracy():
    assert choose_precision(1000, 1400, 5e-3)[0] == "bf16"
    assert choose_precision(1000, 1250, 5e-3)[0] == "fp32"  # 1.25× < 1.3×
    assert choose_precision(1000, 8000, 2e-2)[0] == "fp32"  # fast but too far from fp32
    assert choose_precision(1000, 8000, float("nan"))[0] == "fp32"
    assert "0.02" in choose_precision(1000, 20, 5e-3)[1]  # 50× slower, as on a CPU without bf16


def test_compile_rule_weighs_saved_time_against_compile_time():
    assert not should_compile(1_000, 1000.0, None)[0]  # 1 s of encoding cannot repay 30 s
    assert should_compile(1_000_000, 1000.0, None)[0]
    assert should_compile(20_000, 1000.0, {"compile_s": 2.0, "speedup": 1.3})[0]  # cached compile: cheap
    go, why = should_compile(10_000_000, 1000.0, {"compile_s": 2.0, "speedup": 0.9})
    assert not go and "0.90× eager" in why


# -- the trial and compilation --------------------------------------------------------------------


def _small_encoder(tmp_path: Path):
    return load_encoder(_save(tmp_path, paper_like(), ".pt", input_px=16))


def _fake_rates(monkeypatch, fp32_rate: float, bf16_rate: float) -> None:
    real = fastpath._timed

    def timed(module, x, give_up_s=float("inf")):
        out, _ = real(module, x)
        return out, bf16_rate if x.dtype == torch.bfloat16 else fp32_rate

    monkeypatch.setattr(fastpath, "_timed", timed)


def test_trial_keeps_bf16_when_it_is_faster_and_close(tmp_path, monkeypatch):
    _fake_rates(monkeypatch, 1000.0, 2000.0)
    fast = FastEncoder(_small_encoder(tmp_path), torch.device("cpu"), torch.float32, compile="off")
    assert fast.dtype == torch.float32 and fast.attrs()["precision"] == {"dtype": "float32"}
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    out = fast(x)
    precision = fast.attrs()["precision"]
    assert fast.dtype == torch.bfloat16 and precision["dtype"] == "bfloat16" and precision["chosen_by"] == "measured"
    assert precision["bf16_patches_per_s"] == 2000.0 and precision["bf16_relative_l2_error"] <= 1e-2
    assert out.dtype == torch.bfloat16 and fast.version == 1


def test_trial_keeps_fp32_where_bf16_is_slower(tmp_path, monkeypatch):
    _fake_rates(monkeypatch, 1000.0, 20.0)
    fast = FastEncoder(_small_encoder(tmp_path), torch.device("cpu"), torch.float32, compile="off")
    fast(torch.rand(64, 3, 8, 8))
    assert fast.dtype == torch.float32 and "only 0.02×" in fast.attrs()["precision"]["why"]


def test_fixed_precision_runs_no_trial(tmp_path, monkeypatch):
    monkeypatch.setattr(fastpath, "choose_precision", lambda *a: pytest.fail("no trial with --precision fp32"))
    fast = FastEncoder(_small_encoder(tmp_path), torch.device("cpu"), torch.float32, precision="fp32",
                       compile="off")
    fast(torch.rand(64, 3, 8, 8))
    assert fast.attrs()["precision"] == {"dtype": "float32", "chosen_by": "--precision fp32"}


def test_too_few_patches_are_not_compiled(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled for a tiny slide"))
    fast = FastEncoder(_small_encoder(tmp_path), torch.device("cpu"), torch.float32, precision="fp32")
    fast.begin_slide(200)
    fast(torch.rand(64, 3, 8, 8))
    attrs = fast.attrs()["compile"]
    assert attrs["compiled"] is False and "compiling costs" in attrs["why"]


def test_a_failing_compile_falls_back_to_eager_with_a_note(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    fast = FastEncoder(_small_encoder(tmp_path), torch.device("cpu"), torch.float32, precision="fp32",
                       compile="on")
    fast.begin_slide(10_000)
    x = torch.rand(64, 3, 8, 8)
    out = fast(x)
    assert fast.attrs()["compile"]["note"] == "not compiled (RuntimeError: inductor: no C++ compiler found)"
    assert fast.module is fast.eager and fast.version == 0
    assert torch.allclose(out, fast.eager(x), atol=1e-6)
    assert "running it eagerly" in caplog.text


def test_compile_on_compiles_records_and_fills_the_ledger(tmp_path):
    fast = FastEncoder(_small_encoder(tmp_path), torch.device("cpu"), torch.float32, precision="fp32",
                       compile="on")
    fast.begin_slide(64)
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    out = fast(x)
    attrs = fast.attrs()["compile"]
    if attrs.get("note", "").startswith("not compiled"):
        pytest.skip(f"inductor cannot compile here: {attrs['note']}")
    assert attrs["compiled"] is True and attrs["compile_s"] > 0 and attrs["relative_error"] <= 1e-4
    assert fast.version == 1 and torch.allclose(out, fast.eager(x), rtol=1e-4, atol=1e-5)
    partial = fast(x[:10])  # a partial batch runs eagerly: no recompile for another size
    assert torch.allclose(partial, fast.eager(x[:10]), atol=1e-6)
    entry = fastpath.CompileLedger(fastpath.cache_dir() / "compile-ledger.json").get(fast._ledger_key(64))
    assert entry is not None and entry["compile_s"] == attrs["compile_s"]


def test_the_first_precision_verdict_on_a_machine_stands_for_later_runs(tmp_path, monkeypatch):
    """Two runs of one cohort on one machine never mix precisions, however noisy the timing."""
    _fake_rates(monkeypatch, 1000.0, 2000.0)
    first = FastEncoder(_small_encoder(tmp_path), torch.device("cpu"), torch.float32, compile="off")
    first(torch.rand(64, 3, 8, 8))
    _fake_rates(monkeypatch, 1000.0, 20.0)  # the machine got busy: a new trial would say fp32
    second = FastEncoder(_small_encoder(tmp_path), torch.device("cpu"), torch.float32, compile="off")
    second(torch.rand(64, 3, 8, 8))
    assert first.dtype == second.dtype == torch.bfloat16
    assert "earlier run" in second.attrs()["precision"]["chosen_by"]


def test_compile_rule_counts_the_slides_still_to_come(tmp_path, monkeypatch):
    """A 2,000-patch slide cannot repay a compile; 1,000 such slides in the run can."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    monkeypatch.setattr(fastpath, "_timed", lambda module, x, give_up_s=None: (module(x).detach().float(), 1000.0))
    one = FastEncoder(_small_encoder(tmp_path), torch.device("cpu"), torch.float32, precision="fp32")
    one.begin_slide(2000)
    one(torch.rand(64, 3, 8, 8))
    assert not compiled and "2000 patches" in one.attrs()["compile"]["why"]
    many = FastEncoder(_small_encoder(tmp_path), torch.device("cpu"), torch.float32, precision="fp32",
                       expected_slides=1000)
    many.begin_slide(2000)
    many(torch.rand(64, 3, 8, 8))
    assert len(compiled) == 1
    # the stand-in "compiled" module is no faster: auto keeps the eager one and says so
    assert many.attrs()["compile"]["note"] == "compiled 1.00× eager; running eagerly" and many.module is many.eager


# -- on a GPU: the same fast path inside the CUDA engine --------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile_mode", ["off", "on"])
def test_cuda_engine_runs_the_rewritten_and_compiled_encoder(tmp_path, compile_mode):
    """Pool absorbed into the CUDA patchify, BatchNorms folded, fp16, the CUDA graph replaying the
    (compiled) module: the store agrees with the CPU engine's fp32 one."""
    from test_compress_gpu import compress, tissue_image, write_tiff

    encoder = _save(tmp_path, paper_like(), ".pt", input_px=16)
    slide = write_tiff(tmp_path / "s.tif", tissue_image(4 * 128, 5 * 128, seed=3))
    options = dict(encoder=str(encoder), mpp=0.5, patch_px=16, tile_cells=4, batch_size=64)
    cpu, _ = compress(slide, tmp_path / "cpu", precision="fp32", **options)
    gpu, attrs = compress(slide, tmp_path / "gpu", device="cuda", precision="fp16", compile=compile_mode, **options)
    np.testing.assert_allclose(gpu, cpu, atol=3e-2, rtol=0)
    fast = attrs["fast_path"]
    assert fast["rewrites"]["pool_px"] == 2 and fast["rewrites"]["batchnorms_folded"] == 2
    assert attrs["precision"]["dtype"] == "float16" and attrs["precision"]["relative_l2_error"] < 1e-2
    assert attrs["cuda_graph"] is True
    if compile_mode == "on":
        assert fast["compile"]["compiled"] is True or fast["compile"]["note"].startswith("not compiled")


def test_a_torchscript_encoder_without_rewrites_still_compiles(tmp_path):
    """Dynamo cannot trace TorchScript: the file's graph goes through torch's converter first."""
    torch.manual_seed(4)
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6)).eval()
    fast = FastEncoder(load_encoder(_save(tmp_path, module, ".pt", input_px=16)), torch.device("cpu"), torch.float32,
                       precision="fp32", compile="on")
    assert isinstance(fast.eager, torch.jit.ScriptModule) and fast.attrs()["rewrites"]["graph"] == "not captured"
    fast.begin_slide(64)
    x = torch.rand(64, 3, 16, 16)
    out = fast(x)
    attrs = fast.attrs()["compile"]
    if attrs.get("note", "").startswith("not compiled"):
        pytest.skip(f"inductor cannot compile here: {attrs['note']}")
    assert attrs["compiled"] is True and torch.allclose(out, fast.eager(x), rtol=1e-4, atol=1e-5)


# -- through compress ---------------------------------------------------------------------------


def test_compress_with_the_fast_path_matches_the_file_as_it_is_and_says_so(tmp_path):
    """The CPU engine cuts 16-px cells and box-averages them 2× for the rewritten 8-px encoder:
    the store equals the one from the encoder file run as it is, within float16 rounding."""
    from click.testing import CliRunner
    from test_compress_gpu import compress, tissue_image, write_tiff

    from nic_fast.cli import main
    from nic_fast.cli.info import _fast_path

    encoder = _save(tmp_path, paper_like(), ".pt", input_px=16)
    slide = write_tiff(tmp_path / "s.tif", tissue_image(3 * 128, 4 * 128, seed=5))
    options = dict(encoder=str(encoder), mpp=0.5, tile_cells=4, precision="fp32", augment=True)
    fast, attrs = compress(slide, tmp_path / "fast", **options)
    plain, plain_attrs = compress(slide, tmp_path / "plain", fast_path=False, **options)
    assert fast.shape == plain.shape == (8, 24, 32, 6)
    np.testing.assert_allclose(fast, plain, atol=2e-3, rtol=2e-3)
    rewrites = attrs["fast_path"]["rewrites"]
    assert (rewrites["pool_px"], rewrites["batchnorms_folded"]) == (2, 2) and attrs["fast_path"]["input_px"] == 8
    plain_rewrites = plain_attrs["fast_path"]["rewrites"]
    assert plain_rewrites["graph"] == "off" and plain_rewrites["note"] == "--no-fast-path"
    assert plain_rewrites["pool_px"] == 1 and plain_attrs["fast_path"]["input_px"] == 16
    assert attrs["precision"]["dtype"] == "float32"
    assert _fast_path(attrs) == "float32, pool 2×2 into patchify, 2 BatchNorms folded, eager"
    assert _fast_path(plain_attrs) == "float32, eager"
    info = CliRunner().invoke(main, ["info", str(tmp_path / "fast" / "s.zarr")])
    assert info.exit_code == 0 and "encoder ran as" in info.output


def test_a_rewritten_encoder_is_kept_for_the_next_process_and_vetted_again(tmp_path):
    from nic_fast.engine.fastpath import RewriteCache

    encoder_path = _save(tmp_path, paper_like(), ".pt", input_px=16)
    cache = RewriteCache(tmp_path / "rewritten")
    first = cache.rewrite(load_encoder(encoder_path))
    (kept_file,) = (tmp_path / "rewritten").glob("*.pt")
    second = cache.rewrite(load_encoder(encoder_path))
    assert not first.rewrites.kept and second.rewrites.kept and isinstance(second.module, torch.jit.ScriptModule)
    assert (second.rewrites.pool_px, second.rewrites.batchnorms_folded, second.input_px) == (2, 2, 8)
    x = torch.rand(7, 3, 8, 8)
    with torch.inference_mode():
        assert _relative(second.module(x), first.module(x)) <= 1e-6
    kept_file.write_bytes(b"not a TorchScript file")  # damaged: rewritten afresh, never trusted
    third = cache.rewrite(load_encoder(encoder_path))
    assert not third.rewrites.kept and third.rewrites.batchnorms_folded == 2
