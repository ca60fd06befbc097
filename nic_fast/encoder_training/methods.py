"""One training method per class: what a step does, how validation scores it, what gets exported.

The loop in :mod:`nic_fast.encoder_training.fit` is the same for all four; a method
owns its networks and optimisers, turns a batch of patch indices into a gradient step,
and scores the validation patches with one number that decides which epoch to keep.
Patches stay uint8 on the host until a batch is drawn, then become [0, 1] floats on the
device, are augmented there, and are normalised to [-1, 1] (the exported spec's
mean = std = 0.5) right before the network.
"""
from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nic_fast.encoder_training.augment import HeavyAugment, random_dihedral
from nic_fast.encoder_training.models import VAE, BiGAN, EncoderArch, Siamese, SupervisedNet, parameter_groups
from nic_fast.encoder_training.patches import PatchSet, contrastive_pairs

DEFAULT_LEARNING_RATE = {"vae": 1e-3, "contrastive": 1e-2, "supervised": 1e-2, "bigan": 2e-4}
BIGAN_BETAS = (0.5, 0.999)  # the usual GAN momentum; the paper fixes only the rate
VALIDATION_BATCH = 256
PREVIEW_PATCHES = 16

__all__ = ["DEFAULT_LEARNING_RATE", "METHODS", "Method", "MethodSetup", "Preview", "build_method"]


@dataclass(frozen=True)
class MethodSetup:
    """What every method is built from."""

    arch: EncoderArch
    train: PatchSet
    val: PatchSet
    learning_rate: float
    seed: int  # seeds the fixed validation noise and pairs
    device: torch.device
    kl_weight: float  # the VAE's γ
    upright: bool  # patches have an orientation (digits): no turns or mirrors in augmentation


@dataclass(frozen=True)
class Preview:
    """Rows of uint8 (n, P, P, C) patches to tile into a PNG, and what they show."""

    name: str
    rows: list[np.ndarray]


def to_unit(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, P, P, C) → float (N, C, P, P) in [0, 1] on ``device``."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [-1, 1], the exported spec's normalisation (mean = std = 0.5)."""
    return x * 2.0 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (N, C, P, P) → uint8 (N, P, P, C), for previews."""
    unit = (x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5
    return unit.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class Method(abc.ABC):
    """A training method over fixed train and validation patch sets."""

    metric = "val_loss"  # the validation score that ranks epochs and drives the plateau schedule
    higher_is_better = False
    patches_per_item = 1  # patches read per batch item (a contrastive pair reads 2)
    keeps_best = True  # False: the last epoch is kept (BiGAN, whose losses do not rank epochs)
    uses_plateau = True  # learning rate ÷10 on a validation plateau

    def __init__(self, setup: MethodSetup) -> None:
        self.arch, self.train, self.val = setup.arch, setup.train, setup.val
        self.learning_rate, self.seed, self.device = setup.learning_rate, setup.seed, setup.device
        self.upright = setup.upright

    @property
    @abc.abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Every network with state to checkpoint."""

    @property
    @abc.abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimiser, by name; the first is the one the plateau schedule drives."""

    @abc.abstractmethod
    def train_step(self, index: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        """One gradient step on the training patches at ``index``; returns its losses."""

    @abc.abstractmethod
    def validate(self) -> dict[str, float]:
        """Scores on the validation patches, ``metric`` among them; deterministic for given weights."""

    @abc.abstractmethod
    def encoder(self) -> nn.Module:
        """The network that maps normalised patches to codes, as it will be exported."""

    @abc.abstractmethod
    def preview(self) -> Preview:
        """Patches for a person to look at after an epoch."""

    def set_train(self, training: bool) -> None:
        for module in self.modules.values():
            module.train(training)

    def _train_batch(self, index: np.ndarray) -> torch.Tensor:
        """Training patches, normalised; randomly turned and mirrored unless upright."""
        x = to_unit(self.train.images[index], self.device)
        return normalise(x if self.upright else random_dihedral(x))

    def _val_batches(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for part in _batches(len(self.val), VALIDATION_BATCH):
            yield part, normalise(to_unit(self.val.images[part], self.device))


def _adam(modules: list[nn.Module], learning_rate: float,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    return torch.optim.Adam(parameter_groups(modules), lr=learning_rate, betas=betas)


class VAEMethod(Method):
    """Reconstruction MSE + γ·KL; the kept epoch has the lowest validation loss."""

    def __init__(self, setup: MethodSetup) -> None:
        super().__init__(setup)
        self.kl_weight = setup.kl_weight
        self.model = VAE(self.arch).to(self.device)
        self.optimizer = _adam([self.model], self.learning_rate)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"vae": self.model}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"vae": self.optimizer}

    def train_step(self, index: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        x = self._train_batch(index)
        reconstruction, mu, log_var = self.model(x)
        loss, mse, kl = VAE.loss(x, reconstruction, mu, log_var, self.kl_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "mse": mse.item(), "kl": kl.item()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        totals = np.zeros(3)
        with torch.random.fork_rng(devices=[]):  # the same z noise every epoch: scores compare
            torch.manual_seed(self.seed)
            for part, x in self._val_batches():
                reconstruction, mu, log_var = self.model(x)
                losses = VAE.loss(x, reconstruction, mu, log_var, self.kl_weight)
                totals += np.array([v.item() for v in losses]) * (part.stop - part.start)
        loss, mse, kl = (float(v) for v in totals / len(self.val))
        return {"val_loss": loss, "val_mse": mse, "val_kl": kl}

    def encoder(self) -> nn.Module:
        return self.model.encoder

    @torch.no_grad()
    def preview(self) -> Preview:
        x = normalise(to_unit(self.val.images[:PREVIEW_PATCHES], self.device))
        reconstruction = self.model.decoder(self.model.encoder(x))  # from μ: what the code keeps
        return Preview("reconstructions", [to_uint8(x), to_uint8(reconstruction)])


class ContrastiveMethod(Method):
    """Siamese same/different-location classifier under heavy augmentation; kept by validation accuracy."""

    metric = "val_accuracy"
    higher_is_better = True
    patches_per_item = 2

    def __init__(self, setup: MethodSetup) -> None:
        super().__init__(setup)
        self.model = Siamese(self.arch).to(self.device)
        self.optimizer = _adam([self.model], self.learning_rate)
        self.augment = HeavyAugment(self.arch.patch_px, self.arch.channels, upright=self.upright).to(self.device)
        # Fixed validation pairs and views, so that epochs are scored on the same task.
        rng = np.random.default_rng([self.seed, len(self.val)])
        self.val_anchors = np.arange(len(self.val))
        self.val_partners, self.val_same = contrastive_pairs(self.val, self.val_anchors, rng)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"siamese": self.model}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"siamese": self.optimizer}

    def _views(self, anchors: np.ndarray, partners: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.augment(to_unit(anchors, self.device))
        b = self.augment(to_unit(partners, self.device))
        return normalise(a), normalise(b)

    def train_step(self, index: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        partners, same = contrastive_pairs(self.train, index, rng)
        a, b = self._views(self.train.images[index], partners)
        target = torch.from_numpy(same).to(self.device)
        logits = self.model(a, b)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        accuracy = ((logits > 0).float() == target).float().mean()
        return {"loss": loss.item(), "accuracy": accuracy.item()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        loss_sum, correct = 0.0, 0.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for part in _batches(len(self.val), VALIDATION_BATCH):
                a, b = self._views(self.val.images[self.val_anchors[part]], self.val_partners[part])
                target = torch.from_numpy(self.val_same[part]).to(self.device)
                logits = self.model(a, b)
                loss_sum += nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum").item()
                correct += ((logits > 0).float() == target).sum().item()
        n = len(self.val)
        return {"val_loss": loss_sum / n, "val_accuracy": correct / n}

    def encoder(self) -> nn.Module:
        return self.model.encoder

    @torch.no_grad()
    def preview(self) -> Preview:
        """Validation pairs as the network sees them: anchors' views over partners' views."""
        n = min(PREVIEW_PATCHES, len(self.val))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            a, b = self._views(self.val.images[:n], self.val_partners[:n])
        return Preview("pairs", [to_uint8(a), to_uint8(b)])


class SupervisedMethod(Method):
    """Encoder + classifier head on patch labels; kept by validation accuracy."""

    metric = "val_accuracy"
    higher_is_better = True
    def __init__(self, setup: MethodSetup) -> None:
        super().__init__(setup)
        if self.train.labels is None or self.train.class_names is None:
            raise ValueError("the supervised encoder needs labelled patches: a labelled .npz or class folders, "
                             "slides with --mask-suffix, or --labels-csv")
        self.model = SupervisedNet(self.arch, len(self.train.class_names)).to(self.device)
        self.optimizer = _adam([self.model], self.learning_rate)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"supervised": self.model}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"supervised": self.optimizer}

    def train_step(self, index: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        assert self.train.labels is not None  # checked in __init__
        labels = torch.from_numpy(self.train.labels[index]).to(self.device)
        logits = self.model(self._train_batch(index))
        loss = self.model.loss(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        accuracy = (self.model.predict(logits) == labels).float().mean()
        return {"loss": loss.item(), "accuracy": accuracy.item()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        assert self.val.labels is not None
        loss_sum, correct = 0.0, 0
        for part, x in self._val_batches():
            labels = torch.from_numpy(self.val.labels[part]).to(self.device)
            logits = self.model(x)
            loss_sum += self.model.loss(logits, labels).item() * (part.stop - part.start)
            correct += int((self.model.predict(logits) == labels).sum())
        n = len(self.val)
        return {"val_loss": loss_sum / n, "val_accuracy": correct / n}

    def encoder(self) -> nn.Module:
        return self.model.encoder

    def preview(self) -> Preview:
        return Preview("patches", [self.val.images[:PREVIEW_PATCHES]])


class BiGANMethod(Method):
    """Adversarial game between D and (G, E) at a fixed rate; the last epoch is kept."""

    metric = "val_reconstruction_mse"  # logged to watch the game; never selects an epoch
    keeps_best = False
    uses_plateau = False

    def __init__(self, setup: MethodSetup) -> None:
        super().__init__(setup)
        self.model = BiGAN(self.arch).to(self.device)
        self.d_optimizer = _adam([self.model.discriminator], self.learning_rate, BIGAN_BETAS)
        self.ge_optimizer = _adam([self.model.generator, self.model.encoder], self.learning_rate, BIGAN_BETAS)
        generator = torch.Generator().manual_seed(self.seed)
        self.preview_latent = torch.randn(PREVIEW_PATCHES, self.arch.code_size, generator=generator).to(self.device)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"bigan": self.model}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator_encoder": self.ge_optimizer, "discriminator": self.d_optimizer}

    def train_step(self, index: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        bce = nn.functional.binary_cross_entropy_with_logits
        x = self._train_batch(index)
        code = self.model.encoder(x)
        latent = self.model.sample_latent(len(x), x.device)
        fake = self.model.generator(latent)
        pooled = self.model.pool(x)
        real_logits = self.model.discriminator(pooled, code.detach())
        fake_logits = self.model.discriminator(fake.detach(), latent)
        d_loss = bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))
        self.d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_optimizer.step()
        # G and E fool the freshly updated D: the labels flip.
        real_logits = self.model.discriminator(pooled, code)
        fake_logits = self.model.discriminator(fake, latent)
        ge_loss = bce(real_logits, torch.zeros_like(real_logits)) + bce(fake_logits, torch.ones_like(fake_logits))
        self.ge_optimizer.zero_grad(set_to_none=True)
        ge_loss.backward()
        self.ge_optimizer.step()
        d_accuracy = ((real_logits > 0).float().mean() + (fake_logits <= 0).float().mean()) / 2
        return {"d_loss": d_loss.item(), "ge_loss": ge_loss.item(), "d_accuracy": d_accuracy.item()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """D's accuracy on held-out pairs and how well G(E(x)) reproduces x (diagnostics only)."""
        correct, mse_sum = 0.0, 0.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for part, x in self._val_batches():
                code = self.model.encoder(x)
                latent = self.model.sample_latent(len(x), x.device)
                real_logits = self.model.discriminator(self.model.pool(x), code)
                fake_logits = self.model.discriminator(self.model.generator(latent), latent)
                correct += ((real_logits > 0).float().sum() + (fake_logits <= 0).float().sum()).item() / 2
                error = (self.model.generator(code) - self.model.pool(x)) ** 2
                mse_sum += error.mean().item() * (part.stop - part.start)
        n = len(self.val)
        return {"val_d_accuracy": correct / n, "val_reconstruction_mse": mse_sum / n}

    def encoder(self) -> nn.Module:
        return self.model.encoder

    @torch.no_grad()
    def preview(self) -> Preview:
        """Samples G(z) of fixed z, then validation patches and their G(E(x)), at the pooled size."""
        x = normalise(to_unit(self.val.images[:PREVIEW_PATCHES], self.device))
        samples = self.model.generator(self.preview_latent)
        pooled = self.model.pool(x)
        reconstructions = self.model.generator(self.model.encoder(x))
        return Preview("samples", [to_uint8(samples), to_uint8(pooled), to_uint8(reconstructions)])


_CLASSES: dict[str, type[Method]] = {
    "vae": VAEMethod,
    "contrastive": ContrastiveMethod,
    "bigan": BiGANMethod,
    "supervised": SupervisedMethod,
}
METHODS = tuple(_CLASSES)


def build_method(name: str, setup: MethodSetup) -> Method:
    """The method ``name`` (one of :data:`METHODS`) with fresh networks; seed torch first for repeatable weights."""
    if name not in _CLASSES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return _CLASSES[name](setup)
