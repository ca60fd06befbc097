"""Which decoder takes the next region when the CPU threads and the GPU decode together.

The two sides differ in capacity (regions decoded at once: one per CPU reader thread, a
few batches on the GPU) and in the time a region takes. Each region goes to a side with
a free slot, the least loaded for its throughput (``(in_flight + 1) / rate``, rate =
capacity / region time) first, so both work at once and, while both are busy, each
takes regions in proportion to its rate. No region waits for a busy fast side while a
slow one is free: the pipeline consumes regions in order with a bounded lookahead, and
an idle side is lost throughput. The region times start from a short measurement and
follow what is observed (an exponential average), so a side that slows down (the
encoder taking the cores, a busy GPU) gets less. Pure Python: the engine's threads call
:meth:`DecodeSplit.acquire` and :meth:`DecodeSplit.release` around each region.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = ["DecodeSplit", "Side"]

SMOOTHING = 0.2  # weight of the newest region time in the running average


@dataclass
class Side:
    """One decoder's capacity and its running region time."""

    name: str
    capacity: int
    region_s: float
    in_flight: int = 0
    regions: int = 0  # regions handed to this side so far

    def load(self) -> float:
        """Seconds of work queued with one more region, at this side's rate."""
        return (self.in_flight + 1) * self.region_s / self.capacity

    @property
    def free(self) -> bool:
        return self.in_flight < self.capacity


class DecodeSplit:
    """Hands regions to whichever side is expected to finish them first (see the module doc)."""

    def __init__(self, sides: list[Side]) -> None:
        if not sides or any(side.capacity < 1 or side.region_s <= 0 for side in sides):
            raise ValueError(f"every side needs a capacity >= 1 and a positive region time, got {sides}")
        self.sides = {side.name: side for side in sides}
        self._changed = threading.Condition()

    @property
    def capacity(self) -> int:
        return sum(side.capacity for side in self.sides.values())

    def choose(self) -> Side | None:
        """The least loaded side with a free slot (ties: the first listed), or None."""
        free = [side for side in self.sides.values() if side.free]
        return min(free, key=Side.load) if free else None

    def acquire(self) -> str:
        """Take a slot on the best side with one free, waiting while every side is full."""
        with self._changed:
            while (side := self.choose()) is None:
                self._changed.wait()
            side.in_flight += 1
            side.regions += 1
            return side.name

    def release(self, name: str, seconds: float) -> None:
        """A region on ``name`` took ``seconds``: free its slot and update the side's time."""
        with self._changed:
            side = self.sides[name]
            side.in_flight -= 1
            side.region_s += SMOOTHING * (max(seconds, 1e-6) - side.region_s)
            self._changed.notify_all()

    def shares(self) -> dict[str, int]:
        """Regions handed to each side so far."""
        return {name: side.regions for name, side in self.sides.items()}
