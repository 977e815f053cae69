"""Typed errors. Everything adaptfn raises on bad input derives from :class:`AdaptfnError`."""

from __future__ import annotations


class AdaptfnError(Exception):
    """Base class of every error adaptfn raises on bad input."""


class ConfigError(AdaptfnError, ValueError):
    """A config field has a bad or unsupported value. The message names the field."""


class IncompatibleAdapterError(AdaptfnError, ValueError):
    """An adapter does not fit a model (or another adapter): missing target modules, shape mismatch,
    unsupported module type. The message names the module path and both shapes."""


class AdapterFileError(AdaptfnError, OSError):
    """An adapter file is missing, corrupt, truncated or unsafe. The message names the file."""


def shape_str(shape: object) -> str:
    """``torch.Size([3, 4])`` -> ``[3, 4]``."""
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"  # type: ignore[attr-defined]
