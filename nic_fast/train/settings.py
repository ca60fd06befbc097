"""What a trained network assumes about its input stores, and the check that a store fits.

A NIC CNN learns the codes of one encoder on one grid: the encoder (its weights'
SHA-256, name and code size C), the working resolution in µm/px and the patch and
stride in px. A store compressed any other way still has the right array shape often
enough (same C, any grid) to be predicted without an error, and the prediction means
nothing. So a run records these settings from its training stores, which must agree,
and every store that is trained on, predicted or explained is checked against them.

µm/px is compared with a tolerance (:data:`MPP_TOLERANCE`): ``compress --mpp 0.5``
works at the pyramid level within 10 % of 0.5, so stores of one cohort from scanners
at 0.499 and 0.5025 µm/px differ by a little, while the mistake to catch, a store
compressed at another objective (0.25 or 1.0 µm/px), is off by 2×.
"""
from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["MPP_TOLERANCE", "StoreSettings", "consensus"]

MPP_TOLERANCE = 0.15  # relative: a store at µm/px m fits a run at r when |m / r - 1| <= this


@dataclass(frozen=True)
class StoreSettings:
    """The settings of one store (or of a run's stores) that a trained network depends on."""

    encoder_sha256: str | None  # None: a store written before encoders had one
    encoder_name: str | None
    code_size: int
    mpp: float | None  # working µm/px; None: a plain image compressed in pixel units (--mpp none)
    patch_px: int | None
    stride_px: int | None

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], code_size: int) -> StoreSettings:
        """From a store's ``nic_fast`` attributes; ``code_size`` is its embeddings' C."""
        encoder = attrs.get("encoder") or {}
        mpp = attrs.get("mpp")
        return cls(encoder_sha256=encoder.get("sha256") or None, encoder_name=encoder.get("name"),
                   code_size=int(code_size), mpp=float(mpp) if mpp is not None else None,
                   patch_px=attrs.get("patch_px"), stride_px=attrs.get("stride_px"))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoreSettings:
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})

    def differences(self, store: StoreSettings) -> list[str]:
        """How ``store`` differs from these settings, one phrase per setting; empty when it fits."""
        found = []
        if not _same_encoder(self, store):
            found.append(f"encoder {_encoder(store)} instead of {_encoder(self)}")
        elif store.code_size != self.code_size:
            found.append(f"C = {store.code_size} instead of {self.code_size}")
        if not _same_mpp(self.mpp, store.mpp):
            found.append(f"{_mpp(store.mpp)} instead of {_mpp(self.mpp)}")
        for name, label in (("patch_px", "patch"), ("stride_px", "stride")):
            ours, theirs = getattr(self, name), getattr(store, name)
            if ours != theirs:
                found.append(f"{label} {theirs} px instead of {ours} px")
        return found

    def describe(self) -> str:
        """One phrase: ``encoder bigan (sha256 1a2b…, C = 128), 0.5 µm/px, patch 128 px, stride 128 px``."""
        return (f"encoder {_encoder(self)}, {_mpp(self.mpp)}, patch {self.patch_px} px, "
                f"stride {self.stride_px} px")


def _same_encoder(a: StoreSettings, b: StoreSettings) -> bool:
    """Same weights (by hash); by name only where a store predates the hash."""
    if a.encoder_sha256 and b.encoder_sha256:
        return a.encoder_sha256 == b.encoder_sha256
    return a.encoder_name == b.encoder_name


def _same_mpp(run: float | None, store: float | None) -> bool:
    if run is None or store is None:
        return run is None and store is None
    return abs(store / run - 1) <= MPP_TOLERANCE


def _encoder(s: StoreSettings) -> str:
    digest = f"sha256 {s.encoder_sha256[:12]}…, " if s.encoder_sha256 else ""
    return f"{s.encoder_name or '(unnamed)'} ({digest}C = {s.code_size})"


def _mpp(mpp: float | None) -> str:
    return "pixel units (no µm/px)" if mpp is None else f"{mpp:.4g} µm/px"


def consensus(stores: Sequence[StoreSettings]) -> StoreSettings:
    """The settings most of ``stores`` share, so that a mismatch names the odd store out.

    Exact settings take their most common value; µm/px the median of the stores in µm/px,
    or pixel units where most stores are in pixel units.
    """
    if not stores:
        raise ValueError("consensus of no stores")

    def common(values: Iterable[Any]) -> Any:
        return Counter(values).most_common(1)[0][0]

    sha256, name, code_size = common((s.encoder_sha256, s.encoder_name, s.code_size) for s in stores)
    mpps = [s.mpp for s in stores if s.mpp is not None]
    mpp = statistics.median(mpps) if 2 * len(mpps) > len(stores) else None
    return StoreSettings(sha256, name, code_size, mpp, common(s.patch_px for s in stores),
                         common(s.stride_px for s in stores))
