"""Encoder training: the paper's architectures, falling losses, the protocol (plateau schedule,
kept epoch, seeds, resume), augmentations, logs and PNG grids, export to encoder files, and
the train-encoder CLI on generated slides and on MNIST digits."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from nic_fast.cli import main
from nic_fast.batch import compress_slides
from nic_fast.compress import CompressOptions
from nic_fast.encoder_training.augment import HeavyAugment, random_dihedral
from nic_fast.encoder_training.export import export_encoder
from nic_fast.encoder_training.fit import TrainConfig, TrainingError, fit, plateau_step
from nic_fast.encoder_training.methods import METHODS, MethodSetup, build_method
from nic_fast.encoder_training.models import VAE, BiGAN, EncoderArch, PatchEncoder, Siamese, SupervisedNet
from nic_fast.encoder_training.patches import PatchSet
from nic_fast.encoder_training.reporting import save_grid_png
from nic_fast.encoders import load_encoder
from nic_fast.grid import dihedral
from nic_fast.store import open_store
from nic_fast.synthetic import write_synthetic_slide


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bars(n: int, seed: int = 0, patch_px: int = 9) -> PatchSet:
    """Labelled grayscale patches: a horizontal (class 0) or vertical (class 1) bar at a random place."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, patch_px, patch_px, 1), np.uint8)
    labels = rng.integers(0, 2, n)
    where = rng.integers(1, patch_px - 1, n)
    for k in range(n):
        if labels[k]:
            images[k, :, where[k]] = 255
        else:
            images[k, where[k], :] = 255
    return PatchSet(images=images, source=np.zeros(n, np.int32), sources=["bars"], mpp=None, labels=labels,
                    class_names=["horizontal", "vertical"])


def setup(patches: PatchSet, code_size: int = 8, **overrides: object) -> MethodSetup:
    arch = EncoderArch(patches.patch_px, patches.channels, code_size)
    fields = {"arch": arch, "train": patches, "val": patches, "learning_rate": 1e-3, "seed": 0,
              "device": torch.device("cpu"), "kl_weight": 5e-5, "upright": False, **overrides}
    return MethodSetup(**fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- architectures


def test_paper_architecture_at_128_px():
    arch = EncoderArch(128, 3, 128)
    assert arch.filters == (32, 64, 128, 256, 512) and arch.sizes[-1] == 4
    x = torch.randn(2, 3, 128, 128)
    vae = VAE(arch).eval()
    reconstruction, mu, log_var = vae(x)
    assert reconstruction.shape == x.shape and mu.shape == log_var.shape == (2, 128)
    assert vae.decoder.dense[0].out_features == 8192, "dense 8192 → 4×4×512"
    widths = [m.out_channels for m in vae.decoder.body if isinstance(m, torch.nn.Conv2d)]
    assert widths == [256, 128, 64, 32, 16, 3]
    bigan = BiGAN(arch).eval()
    assert bigan.downsample == 2 and bigan.encoder(x).shape == (2, 128)
    fake = bigan.generator(torch.randn(2, 128))
    assert fake.shape == (2, 3, 64, 64), "the BiGAN works on 2× downsampled patches"
    assert bigan.discriminator(bigan.pool(x), torch.randn(2, 128)).shape == (2,)
    assert bigan.generator.dense[0].out_features == 1024, "dense 1024 → 4×4×64"


@pytest.mark.parametrize("patch_px, channels, code_size", [(9, 1, 16), (32, 3, 12)])
def test_small_variants(patch_px, channels, code_size):
    arch = EncoderArch(patch_px, channels, code_size)
    x = torch.randn(4, channels, patch_px, patch_px)
    assert PatchEncoder(arch).eval()(x).shape == (4, code_size)
    assert VAE(arch).eval()(x)[0].shape == x.shape
    assert Siamese(arch).eval()(x, x).shape == (4,)
    assert SupervisedNet(arch, 2).eval()(x).shape == (4, 1)
    assert SupervisedNet(arch, 10).eval()(x).shape == (4, 10)
    bigan = BiGAN(arch).eval()
    inner = patch_px // bigan.downsample
    assert bigan.generator(torch.randn(4, code_size)).shape == (4, channels, inner, inner)
    assert bigan.encoder(x).shape == (4, code_size)


# --------------------------------------------------------------------------- losses fall


@pytest.mark.parametrize("method", METHODS)
def test_loss_falls_in_a_few_steps(method):
    """Fifteen steps on one batch (same pairs, same augmentations) lower the loss."""
    torch.manual_seed(0)
    patches = bars(32)
    trainer = build_method(method, setup(patches, learning_rate=3e-3 if method != "bigan" else 2e-4))
    trainer.set_train(True)
    key = "d_loss" if method == "bigan" else "loss"
    losses = []
    for _ in range(15):
        torch.manual_seed(1)
        losses.append(trainer.train_step(np.arange(32), np.random.default_rng(1))[key])
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


# --------------------------------------------------------------------------- protocol


def test_plateau_schedule():
    config = TrainConfig("vae", plateau_patience=2, min_learning_rate=1e-5)
    assert plateau_step(1e-3, 2, config) == (1e-3, False)
    rate, finished = plateau_step(1e-3, 3, config)
    assert rate == pytest.approx(1e-4) and not finished
    assert plateau_step(2e-5, 3, config) == (1e-5, False), "never below the floor"
    assert plateau_step(1e-5, 3, config) == (1e-5, True), "a plateau at the floor ends the run"


def test_rate_drops_and_run_ends_when_validation_stalls(tmp_path):
    """A rate too small to change anything: every epoch after the first is a plateau."""
    config = TrainConfig("supervised", code_size=4, epochs=10, steps_per_epoch=1, batch_size=8, learning_rate=1e-13,
                         min_learning_rate=1e-15, plateau_patience=0)
    result = fit(config, bars(40), tmp_path)
    rates = [row["lr"] for row in result.history]
    assert rates[:3] == pytest.approx([1e-13, 1e-14, 1e-15])
    assert len(result.history) < 10 and result.kept_epoch == 1


@pytest.mark.parametrize("method", ["vae", "contrastive", "bigan"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, method):
    patches = bars(48)
    config = TrainConfig(method, code_size=4, epochs=2, steps_per_epoch=3, batch_size=8)
    straight = fit(config, patches, tmp_path / "straight")
    fit(TrainConfig(method, code_size=4, epochs=1, steps_per_epoch=3, batch_size=8), patches, tmp_path / "split")
    resumed = fit(config, patches, tmp_path / "split", resume=True)
    for key, value in straight.encoder.state_dict().items():
        torch.testing.assert_close(resumed.encoder.state_dict()[key], value, rtol=0, atol=0)
    timing = {"seconds", "patches_per_s"}
    assert [{k: v for k, v in row.items() if k not in timing} for row in resumed.history] == \
           [{k: v for k, v in row.items() if k not in timing} for row in straight.history]
    rows = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_kept_epoch_is_the_best_for_vae_and_the_last_for_bigan(tmp_path):
    patches = bars(48)
    vae = fit(TrainConfig("vae", code_size=4, epochs=3, steps_per_epoch=2, batch_size=8), patches, tmp_path / "v")
    losses = [row["val_loss"] for row in vae.history]
    assert vae.kept_epoch == int(np.argmin(losses)) + 1
    bigan = fit(TrainConfig("bigan", code_size=4, epochs=2, steps_per_epoch=1, batch_size=8), patches, tmp_path / "b")
    assert bigan.kept_epoch == 2


def test_run_dir_is_never_overwritten_by_accident(tmp_path):
    patches = bars(24)
    config = TrainConfig("supervised", code_size=4, epochs=1, steps_per_epoch=1, batch_size=8)
    fit(config, patches, tmp_path)
    with pytest.raises(TrainingError, match="--resume.*--overwrite"):
        fit(config, patches, tmp_path)
    with pytest.raises(TrainingError, match=r"changed settings: seed \(0 → 1\)"):
        fit(TrainConfig("supervised", code_size=4, epochs=2, steps_per_epoch=1, batch_size=8, seed=1), patches,
            tmp_path, resume=True)
    with pytest.raises(TrainingError, match="other patches"):
        fit(config, bars(24, seed=5), tmp_path, resume=True)
    assert fit(config, bars(24, seed=5), tmp_path, overwrite=True).history[0]["epoch"] == 1


def test_same_seed_same_encoder_other_seed_other_encoder(tmp_path):
    patches = bars(24)

    def run(seed: int, name: str) -> dict:
        config = TrainConfig("contrastive", code_size=4, epochs=1, steps_per_epoch=2, batch_size=8, seed=seed)
        return fit(config, patches, tmp_path / name).encoder.state_dict()

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_logs_and_png_grids(tmp_path):
    result = fit(TrainConfig("vae", code_size=4, epochs=2, steps_per_epoch=2, batch_size=8), bars(24), tmp_path)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["kept_epoch"] == result.kept_epoch and len(summary["history"]) == 2
    assert summary["config"]["method"] == "vae" and summary["arch"]["patch_px"] == 9
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "lr", "train_loss", "train_kl", "val_loss", "patches_per_s"} <= set(header)
    grid = np.asarray(Image.open(tmp_path / "epoch_002_reconstructions.png"))
    assert grid.shape[0] == 2 * (54 + 2) + 2, "two rows (inputs, reconstructions) of 9-px patches shown at 54 px"


def test_grid_png_mixes_patch_sizes(tmp_path):
    rows = [np.zeros((3, 64, 64, 3), np.uint8), np.full((2, 32, 32, 1), 255, np.uint8)]
    image = np.asarray(Image.open(save_grid_png(tmp_path / "g.png", rows)))
    assert image.shape == (2 * 66 + 2, 3 * 66 + 2, 3)
    assert image[68:132, 2:66].min() == 255, "the 32-px row is enlarged to 64 px"


# --------------------------------------------------------------------------- augmentation


def test_random_dihedral_draws_all_eight_transforms_exactly():
    torch.manual_seed(0)
    x = torch.arange(9.0).view(1, 1, 3, 3).repeat(400, 2, 1, 1)
    out = random_dihedral(x)
    variants = [torch.from_numpy(np.ascontiguousarray(dihedral(x[0, 0].numpy(), k))) for k in range(8)]
    seen = [next(k for k, v in enumerate(variants) if torch.equal(o[0], v)) for o in out]
    assert sorted(set(seen)) == list(range(8)) and torch.equal(out[:, 0], out[:, 1])


@pytest.mark.parametrize("patch_px, channels, upright", [(9, 1, True), (9, 1, False), (32, 3, False)])
def test_heavy_augmentation_changes_patches_within_range(patch_px, channels, upright):
    torch.manual_seed(0)
    x = torch.rand(16, channels, patch_px, patch_px)
    out = HeavyAugment(patch_px, channels, upright=upright)(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 0.02


# --------------------------------------------------------------------------- export


def test_exported_vae_outputs_mu_and_bigan_pools_inside(tmp_path):
    patches = PatchSet(images=np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8),
                       source=np.zeros(24, np.int32), sources=["x"], mpp=0.5)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    vae = fit(TrainConfig("vae", code_size=6, epochs=1, steps_per_epoch=1, batch_size=8), patches, tmp_path / "v")
    spec = export_encoder(vae, tmp_path / "vae.pt", mpp=0.5)
    loaded = load_encoder(tmp_path / "vae.pt")
    assert (spec.input_px, spec.channels, spec.code_size, spec.mpp, spec.mean, spec.std) == \
           (32, 3, 6, 0.5, (0.5,) * 3, (0.5,) * 3)
    assert loaded.spec == spec and "μ" in spec.description
    with torch.no_grad():
        mu = vae.encoder.head(vae.encoder.features(x))
    torch.testing.assert_close(loaded(x), mu, rtol=1e-5, atol=1e-5)
    bigan = fit(TrainConfig("bigan", code_size=6, epochs=1, steps_per_epoch=1, batch_size=8), patches, tmp_path / "b")
    export_encoder(bigan, tmp_path / "bigan.pt2", mpp=0.5)
    loaded = load_encoder(tmp_path / "bigan.pt2")
    assert loaded.spec.input_px == 32, "the 2× pool is inside the module"
    with torch.no_grad():
        expected = bigan.encoder.head(bigan.encoder.features(torch.nn.functional.avg_pool2d(x, 2)))
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def slide_set(tmp_path_factory) -> dict[str, Path]:
    """Two small generated slides to train on, a third to compress, and labelled points."""
    folder = tmp_path_factory.mktemp("slides")
    paths = {name: write_synthetic_slide(folder / f"{name}.tif", height=1024, width=1024, seed=seed, lesion=True).path
             for name, seed in (("a", 1), ("b", 2), ("new", 3))}
    points = folder / "points.csv"
    with open(points, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "x", "y", "label"])
        for k in range(12):
            writer.writerow(["a" if k % 2 else "b", 200 + 60 * k, 300 + 40 * k, "lesion" if k % 3 else "normal"])
    return {**paths, "points": points}


@pytest.mark.parametrize("method", METHODS)
def test_cli_slide_encoder_compresses_a_new_slide(tmp_path, slide_set, method):
    """train-encoder on generated slides at 128 px; the file goes straight into compress."""
    encoder = tmp_path / f"{method}.pt"
    labels = ["--labels-csv", str(slide_set["points"])] if method == "supervised" else []
    args = ["train-encoder", method, str(slide_set["a"]), str(slide_set["b"]), "-o", str(encoder),
            "--code-size", "16", "--patches-per-slide", "6", "--epochs", "1", "--steps", "1", "--batch-size", "4",
            *labels]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / f"{method}.pt.run" / "checkpoint.pt").is_file()
    spec = load_encoder(encoder).spec
    assert (spec.input_px, spec.mpp, spec.channels, spec.code_size) == (128, 0.5, 3, 16)
    (outcome,) = compress_slides([slide_set["new"]], tmp_path / "out", CompressOptions(encoder=str(encoder))).results
    assert outcome.status == "ok", outcome.reason
    store = open_store(tmp_path / "out" / "new.zarr")
    assert store.code_size == 16 and store.attrs["encoder"]["sha256"] == spec.sha256
    grid = store.load().astype(np.float32)
    assert np.isfinite(grid).all() and grid[store.tissue].std() > 0


@pytest.mark.parametrize("method", METHODS)
def test_cli_mnist_encoder_maps_9px_digits_to_16_numbers(tmp_path, mnist_npz, method):
    encoder = tmp_path / "digits.pt"
    args = ["train-encoder", method, str(mnist_npz), "--mnist-9px", "-o", str(encoder), "--epochs", "1",
            "--steps", "2", "--batch-size", "16"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    loaded = load_encoder(encoder)
    assert (loaded.spec.input_px, loaded.spec.channels, loaded.spec.code_size, loaded.spec.mpp) == (9, 1, 16, None)
    assert loaded(torch.zeros(5, 1, 9, 9)).shape == (5, 16)


def test_cli_cache_resume_and_errors(tmp_path, slide_set):
    runner = CliRunner()
    cache, encoder = tmp_path / "patches.zarr", tmp_path / "enc.pt"
    base = ["--code-size", "4", "--patches-per-slide", "4", "--steps", "1", "--batch-size", "4", "--patch-px", "64"]
    first = runner.invoke(main, ["train-encoder", "contrastive", str(slide_set["a"]), "-o", str(encoder),
                                 "--cache", str(cache), "--epochs", "1", *base])
    assert first.exit_code == 0, first.output
    again = runner.invoke(main, ["train-encoder", "contrastive", str(cache), "-o", str(encoder), "--epochs", "2",
                                 *base])
    assert again.exit_code == 1 and "--resume" in again.output
    resumed = runner.invoke(main, ["train-encoder", "contrastive", str(cache), "-o", str(encoder), "--epochs", "2",
                                   "--resume", *base])
    assert resumed.exit_code == 0, resumed.output
    assert len(json.loads((tmp_path / "enc.pt.run" / "metrics.json").read_text())["history"]) == 2
    unlabelled = runner.invoke(main, ["train-encoder", "supervised", str(cache), "-o", str(tmp_path / "s.pt"), *base])
    assert unlabelled.exit_code == 1 and "labelled patches" in unlabelled.output
    mixed = runner.invoke(main, ["train-encoder", "vae", str(cache), str(slide_set["a"]), "-o", str(encoder), *base])
    assert mixed.exit_code == 2 and "one patch set" in mixed.output
