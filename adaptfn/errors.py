"""Typed errors. Everything adaptfn raises on bad input derives from :class:`AdaptfnError`."""

from __future__ import annotations

__all__ = ["AdaptfnError", "ConfigError", "IncompatibleAdapterError", "AdapterFileError", "stacked_called_directly",
           "single_for_route", "shape_str"]


class AdaptfnError(Exception):
    """Base class of every error adaptfn raises on bad input."""


class ConfigError(AdaptfnError, ValueError):
    """A config field has a bad or unsupported value. The message names the field."""


class IncompatibleAdapterError(AdaptfnError, ValueError):
    """An adapter does not fit a model (or another adapter): missing target modules, shape mismatch,
    unsupported module type. The message names the module path and both shapes."""


class AdapterFileError(AdaptfnError, OSError):
    """An adapter file is missing, corrupt, truncated or unsafe. The message names the file."""


def stacked_called_directly(where: str | None = None) -> IncompatibleAdapterError:
    """The error for a stacked adapter's leaves reaching a computation that needs one adapter's; ``where``
    names the module or tensor."""
    return IncompatibleAdapterError(
        (f"{where}: " if where else "") + "a stacked adapter was called directly; map it with torch.func.vmap or "
        "pass route=")


def single_for_route() -> IncompatibleAdapterError:
    """The error for ``route=`` with an adapter that is not stacked."""
    return IncompatibleAdapterError("route= needs a stacked adapter (af.stack); this one is single")


def shape_str(shape: object) -> str:
    """``torch.Size([3, 4])`` -> ``[3, 4]``."""
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"  # type: ignore[attr-defined]
