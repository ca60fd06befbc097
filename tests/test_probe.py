"""The patch-level probe: frozen codes → dense-256 softmax head → test accuracy, per class;
and the issue's acceptance check that a short VAE run on MNIST beats the mean-pixel baseline."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nic_fast.cli import main
from nic_fast.encoder_training.export import export_encoder, mean_pixel_encoder
from nic_fast.encoder_training.fit import TrainConfig, fit
from nic_fast.encoder_training.models import VAE, EncoderArch
from nic_fast.encoder_training.patch_files import load_patch_set
from nic_fast.encoder_training.patches import PatchSet
from nic_fast.encoder_training.probe import ProbeConfig, embed_patches, probe
from nic_fast.encoders import Encoder, EncoderError, EncoderSpec, load_encoder, save_encoder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mean_pixel(patch_px: int, channels: int = 1) -> Encoder:
    module, spec = mean_pixel_encoder(patch_px, channels, None)
    return Encoder(spec, module, "test")


def brightness_classes(n: int, seed: int = 0) -> PatchSet:
    """Three classes told apart only by brightness (around 40, 128 and 215), with pixel noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    levels = np.array([40, 128, 215])[labels]
    images = np.clip(levels[:, None, None, None] + rng.integers(-30, 31, (n, 6, 6, 1)), 0, 255).astype(np.uint8)
    return PatchSet(images=images, source=np.zeros(n, np.int32), sources=["generated"], mpp=None, labels=labels,
                    class_names=["dark", "mid", "bright"])


def test_probe_reports_accuracy_per_class_and_confusion():
    patches = brightness_classes(300)
    report = probe(mean_pixel(6), patches, ProbeConfig(epochs=20))
    assert report.accuracy == 1.0 and set(report.per_class.values()) == {1.0}
    assert report.n_train + report.n_val + report.n_test == 300 and report.n_test == 90
    assert np.trace(report.confusion) == report.n_test and list(report.per_class) == ["dark", "mid", "bright"]
    assert json.loads(json.dumps(report.to_json()))["encoder"]["name"] == "mean-pixel-6px"


def test_probe_is_chance_on_codes_without_label_information():
    """Same brightness for all classes: the mean-pixel code carries nothing, and the probe must not invent it."""
    patches = brightness_classes(600)
    patches.labels = np.random.default_rng(9).integers(0, 3, 600)
    assert probe(mean_pixel(6), patches, ProbeConfig(epochs=10)).accuracy < 0.45


def test_embed_patches_normalises_per_spec_and_refuses_the_wrong_size():
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 1), dtype=np.uint8)
    codes = embed_patches(mean_pixel(6), images)
    np.testing.assert_allclose(codes[:, 0], images.mean(axis=(1, 2, 3)) / 255, rtol=1e-5)
    with pytest.raises(EncoderError, match=r"takes 9×9 patches with 1 channel.*6×6 with 1.*--mnist-9px"):
        embed_patches(mean_pixel(9), images)
    with pytest.raises(ValueError, match="needs labelled patches"):
        probe(mean_pixel(6), PatchSet(images=images, source=np.zeros(5, np.int32), sources=["x"], mpp=None))


def _untrained_vae_encoder(seed: int) -> Encoder:
    torch.manual_seed(seed)
    module = VAE(EncoderArch(9, 1, 16)).encoder.eval()
    spec = EncoderSpec(name="untrained", input_px=9, mpp=None, channels=1, mean=(0.5,), std=(0.5,), code_size=16,
                       sha256="")
    return Encoder(spec, module, "untrained")


def test_short_vae_run_on_mnist_beats_the_mean_pixel_baseline(tmp_path, mnist_npz):
    """The acceptance check of the issue: seeded, disjoint digits for training and probing.

    Measured with seeds 0-2: mean-pixel 0.26-0.29, untrained VAE encoder 0.65-0.69, VAE
    after 120 steps 0.83-0.86; the asserted margins are a third of the measured ones.
    """
    digits = load_patch_set(mnist_npz, mnist_9px=True)
    order = np.random.default_rng(0).permutation(len(digits))  # the file is sorted by class
    train, held_out = digits.subset(order[:5000]), digits.subset(order[5000:8000])
    config = TrainConfig("vae", code_size=16, epochs=3, steps_per_epoch=40, upright=True)
    export_encoder(fit(config, train, tmp_path / "run"), tmp_path / "vae.pt", mpp=None)
    settings = ProbeConfig(epochs=25)
    vae = probe(load_encoder(tmp_path / "vae.pt"), held_out, settings).accuracy
    baseline = probe(mean_pixel(9), held_out, settings).accuracy
    untrained = probe(_untrained_vae_encoder(0), held_out, settings).accuracy
    assert vae > baseline + 0.3, (vae, baseline)
    assert vae > untrained + 0.05, (vae, untrained)


def test_cli_probe_writes_the_report(tmp_path):
    patches = brightness_classes(200)
    np.savez(tmp_path / "labelled.npz", images=patches.images, labels=patches.labels,
             class_names=np.array(patches.class_names))
    module, spec = mean_pixel_encoder(6, 1, None)
    save_encoder(module, spec, tmp_path / "mean.pt")
    result = CliRunner().invoke(main, ["probe", str(tmp_path / "mean.pt"), str(tmp_path / "labelled.npz"),
                                       "-o", str(tmp_path / "report.json"), "--epochs", "10"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["accuracy"] == 1.0 and report["class_names"] == ["dark", "mid", "bright"]
    assert report["encoder"]["sha256"] == spec.sha256
    wrong = CliRunner().invoke(main, ["probe", "mean-rgb", str(tmp_path / "labelled.npz"), "-o",
                                      str(tmp_path / "r.json")])
    assert wrong.exit_code == 1 and "takes 128×128 patches with 3 channel(s)" in wrong.output


def test_cli_probe_on_mnist_digits(tmp_path, mnist_npz):
    module, spec = mean_pixel_encoder(9, 1, None)
    save_encoder(module, spec, tmp_path / "mean9.pt")
    result = CliRunner().invoke(main, ["probe", str(tmp_path / "mean9.pt"), str(mnist_npz), "--mnist-9px",
                                       "-o", str(tmp_path / "report.json"), "--epochs", "5"])
    assert result.exit_code == 0, result.output
    report = json.loads(Path(tmp_path / "report.json").read_text())
    assert report["n_test"] == 3000
    assert 0.12 < report["accuracy"] < 0.4, "ink amount alone: well above chance, far from digits"
