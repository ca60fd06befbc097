"""Options shared by the commands, so the same thing has the same flag everywhere.

* ``-o/--output``: where a command writes (:func:`output_option`);
* ``--device cpu|cuda|cuda:N``: checked the same way by every command (:class:`DeviceType`);
* a renamed flag keeps its old spelling as a hidden alias (:class:`AliasedOption`), so
  scripts written against the old name keep working while help shows only the new one;
* ``--mpp``: a working resolution in µm/px, or ``none`` (:class:`MppParam`).

Nothing heavy is imported here: this module loads with every command.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from nic_fast.devices import DEVICE_CHOICES, DeviceError, check_device

__all__ = ["AliasedOption", "DeviceType", "MppParam", "device_option", "output_option"]

F = TypeVar("F", bound=Callable[..., Any])


class AliasedOption(click.Option):
    """An option with extra, undocumented spellings (old names of a renamed flag).

    The aliases parse like the option's own names; help and error messages show only
    the documented ones.
    """

    def __init__(self, param_decls: Sequence[str], *, hidden_aliases: Sequence[str] = (), **attrs: Any) -> None:
        super().__init__([*param_decls, *hidden_aliases], **attrs)
        self.hidden_aliases = tuple(hidden_aliases)

    def _documented(self, method: Callable[[click.Context | None], Any], ctx: click.Context | None) -> Any:
        opts = self.opts
        self.opts = [name for name in opts if name not in self.hidden_aliases]
        try:
            return method(ctx)
        finally:
            self.opts = opts

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        return self._documented(super().get_help_record, ctx)

    def get_error_hint(self, ctx: click.Context | None) -> str:
        return self._documented(super().get_error_hint, ctx)


def output_option(dest: str, *, help: str, file_okay: bool = True, dir_okay: bool = True,  # noqa: A002 - click's name
                  old_names: Sequence[str] = ()) -> Callable[[F], F]:
    """``-o/--output PATH`` (required), stored as ``dest``; ``old_names`` stay as hidden aliases."""
    return click.option("-o", "--output", dest, cls=AliasedOption, hidden_aliases=old_names, required=True,
                        type=click.Path(file_okay=file_okay, dir_okay=dir_okay, path_type=Path), help=help)


class DeviceType(click.ParamType):
    """``cpu``, ``cuda`` or ``cuda:N``, refused at once when this machine has no such device."""

    name = DEVICE_CHOICES

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_device(value)
        except DeviceError as exc:
            self.fail(str(exc), param, ctx)


def device_option(help: str = "Where PyTorch runs.") -> Callable[[F], F]:  # noqa: A002 - click's name
    """``--device cpu|cuda|cuda:N``, default cpu."""
    return click.option("--device", type=DeviceType(), metavar=DEVICE_CHOICES, default="cpu", show_default=True,
                        help=help)


class MppParam(click.ParamType):
    """``--mpp``: a working resolution in µm/px, ``encoder`` for the encoder's own, or ``none``
    for plain images in pixel units."""

    name = "µm/px|encoder|none"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float | str | None:
        if value is None or isinstance(value, float):
            return value
        text = str(value).strip().lower()
        if text == "none":
            return None
        if text == "encoder":
            return "encoder"
        try:
            mpp = float(text)
        except ValueError:
            self.fail(f"{value!r} is neither a µm/px value nor 'none'", param, ctx)
        if not mpp > 0:
            self.fail(f"µm/px must be positive, got {value!r}", param, ctx)
        return mpp


class BatchSizeParam(click.ParamType):
    """``--batch-size``: patches per encoder batch, or ``auto`` for what fits memory."""

    name = "N|auto"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) or value == "auto":
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if not text.isdigit() or int(text) < 1:
            self.fail(f"{value!r} is neither a positive number of patches nor 'auto'", param, ctx)
        return int(text)
