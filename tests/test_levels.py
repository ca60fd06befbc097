"""Level choice: direct levels, integer downsampling from finer levels, tolerance edges, errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from nic_fast.slides import LevelChoice, SlideError, choose_level, open_slide
from nic_fast.synthetic import write_synthetic_slide


def test_finer_level_downsampled_by_two() -> None:
    assert choose_level([0.25, 1.0, 4.0], 0.5) == LevelChoice(level=0, downsample=2, level_mpp=0.25, working_mpp=0.5)


def test_level_within_tolerance_is_used_directly() -> None:
    assert choose_level([0.499], 0.5) == LevelChoice(level=0, downsample=1, level_mpp=0.499, working_mpp=0.499)


def test_cannot_upsample() -> None:
    with pytest.raises(SlideError) as info:
        choose_level([1.0], 0.5, slide="coarse.svs")
    message = str(info.value)
    assert "coarse.svs" in message and "0.5" in message and "1" in message
    assert "--mpp" in message and "never upsamples" in message


@pytest.mark.parametrize(
    ("level_mpps", "target", "expected_level", "expected_downsample"),
    [
        ([0.55], 0.5, 0, 1),  # exactly +10 %
        ([0.45], 0.5, 0, 1),  # exactly -10 %
        ([0.48, 0.51, 2.0], 0.5, 1, 1),  # the closest of two direct candidates
        ([0.25, 0.5, 2.0], 0.5, 1, 1),  # a direct level beats downsampling a finer one
        ([0.125, 0.25, 1.0], 0.5, 1, 2),  # coarsest finer level: 2x from 0.25, not 4x from 0.125
        ([0.25, 1.0, 4.0], 2.0, 1, 2),
        ([0.24, 0.96], 0.5, 0, 2),  # 0.48 is within 10 % of 0.5
        ([0.2527, 1.0108, 4.0432, 16.17], 1.0, 1, 1),
        ([0.2527, 1.0108, 4.0432, 16.17], 8.0, 2, 2),
        ([0.25, 1.0], 0.75, 0, 3),  # any integer factor, not only powers of two
    ],
)
def test_level_choice_cases(level_mpps: list[float], target: float, expected_level: int, expected_downsample: int) -> None:
    choice = choose_level(level_mpps, target)
    assert (choice.level, choice.downsample) == (expected_level, expected_downsample)
    assert choice.level_mpp == level_mpps[expected_level]
    assert choice.working_mpp == pytest.approx(level_mpps[expected_level] * expected_downsample)
    assert abs(choice.working_mpp - target) <= 0.1 * target + 1e-9


@pytest.mark.parametrize("level_mpps", [[0.5501], [0.4499], [0.3], [0.19, 0.7]])
def test_just_outside_tolerance_is_an_error(level_mpps: list[float]) -> None:
    with pytest.raises(SlideError, match="cannot read at 0.5"):
        choose_level(level_mpps, 0.5)


def test_tolerance_is_configurable() -> None:
    assert choose_level([0.3], 0.5, tolerance=0.5).downsample == 1
    assert choose_level([0.52], 0.5, tolerance=0.05).level == 0
    with pytest.raises(SlideError):
        choose_level([0.52], 0.5, tolerance=0.03)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        choose_level([0.5], 0.0)
    with pytest.raises(ValueError):
        choose_level([0.5], 0.5, tolerance=-0.1)
    with pytest.raises(SlideError, match="no levels"):
        choose_level([], 0.5)


def test_40x_synthetic_slide_reads_level_0_downsampled_twice(tmp_path: Path) -> None:
    path = tmp_path / "x40.tif"
    write_synthetic_slide(path, height=2048, width=2304, mpp=0.25, seed=5, lesion=False)
    with open_slide(path) as slide:
        mpps = [slide.level_mpp(level) for level in range(slide.level_count)]
        assert mpps == pytest.approx([0.25, 1.0])
        choice = choose_level(mpps, 0.5, slide=slide.path.name)
    assert choice == LevelChoice(level=0, downsample=2, level_mpp=0.25, working_mpp=0.5)
    assert choose_level(mpps, 1.0).downsample == 1
