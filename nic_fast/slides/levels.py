"""Which pyramid level to read, and by how much to shrink it, to reach a target µm/px.

Encoders are trained at one physical resolution. A slide scanned at 0.25 µm/px with
levels at 4× steps has no 0.5 µm/px level, so the finest level is read and box-averaged
2×; upsampling is never done because it would invent detail the encoder never saw.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nic_fast.slides.base import SlideError

# Relative comparisons get this much slack so that a level exactly at the tolerance
# edge (0.55 vs 0.5 at 10 %) is not lost to floating-point rounding.
_EPS = 1e-9


@dataclass(frozen=True)
class LevelChoice:
    """Read ``level`` and box-downsample it by ``downsample`` to work at ``working_mpp``."""

    level: int
    downsample: int
    level_mpp: float
    working_mpp: float


def _relative_error(mpp: float, target_mpp: float) -> float:
    return abs(mpp - target_mpp) / target_mpp


def choose_level(
    level_mpps: Sequence[float], target_mpp: float, tolerance: float = 0.1, *, slide: str = ""
) -> LevelChoice:
    """Pick how to read a slide at ``target_mpp`` within relative ``tolerance``.

    A level within tolerance is used as is (the closest one). Otherwise the coarsest
    finer level whose µm/px times an integer factor >= 2 lands within tolerance is read
    and downsampled, which reads the fewest pixels. Raises SlideError when neither works.
    """
    if target_mpp <= 0 or tolerance < 0:
        raise ValueError(f"target µm/px must be positive and tolerance non-negative, got {target_mpp}, {tolerance}")
    if not level_mpps:
        raise SlideError(f"{slide or 'slide'}: has no levels")
    direct = [
        (_relative_error(mpp, target_mpp), level)
        for level, mpp in enumerate(level_mpps)
        if _relative_error(mpp, target_mpp) <= tolerance + _EPS
    ]
    if direct:
        _, level = min(direct)
        mpp = level_mpps[level]
        return LevelChoice(level=level, downsample=1, level_mpp=mpp, working_mpp=mpp)
    resampled = []
    for level, mpp in enumerate(level_mpps):
        factor = round(target_mpp / mpp)
        if factor >= 2 and _relative_error(mpp * factor, target_mpp) <= tolerance + _EPS:
            resampled.append((mpp, level, factor))
    if resampled:
        mpp, level, factor = max(resampled)
        return LevelChoice(level=level, downsample=factor, level_mpp=mpp, working_mpp=mpp * factor)
    available = ", ".join(f"{mpp:.4g}" for mpp in level_mpps)
    raise SlideError(
        f"{slide or 'slide'}: cannot read at {target_mpp:g} µm/px: its levels are at {available} µm/px, "
        f"and none is within {tolerance:.0%} of {target_mpp:g} or of an integer fraction of it "
        f"(nic-fast downsamples by an integer factor, never upsamples). "
        f"Choose --mpp near one of {available} or an integer multiple of one."
    )
