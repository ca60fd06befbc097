"""Parameter types shared by several commands."""
from __future__ import annotations

import click


class MppParam(click.ParamType):
    """``--mpp``: a working resolution in µm/px, or ``none`` for plain images in pixel units."""

    name = "µm/px|none"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float | None:
        if value is None or isinstance(value, float):
            return value
        text = str(value).strip().lower()
        if text == "none":
            return None
        try:
            mpp = float(text)
        except ValueError:
            self.fail(f"{value!r} is neither a µm/px value nor 'none'", param, ctx)
        if not mpp > 0:
            self.fail(f"µm/px must be positive, got {value!r}", param, ctx)
        return mpp
