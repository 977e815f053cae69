"""Adapter methods, one file each, behind the protocol in :mod:`adaptfn.methods.base`.

The registry maps a method's name to its :class:`~adaptfn.methods.base.Method` object. Adding a method is
one file in this folder plus one :func:`register` call below.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .adalora import AdaLora, AdaLoraConfig
from .base import CAPABILITIES, COMBINE, Method, PeftConfigBase, require
from .ia3 import IA3, IA3Config
from .loha import LoHa, LoHaConfig
from .lokr import LoKr, LoKrConfig
from .lora import Lora, LoraConfig
from .oft import OFT, OFTConfig
from .vera import Vera, VeraConfig

__all__ = ["LoraConfig", "IA3Config", "AdaLoraConfig", "LoHaConfig", "LoKrConfig", "OFTConfig", "VeraConfig", "Method",
           "register", "get_method", "method_for_config",
           "method_for_peft_type", "known_configs", "require"]

_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (by its ``name``); returns it.

    Arguments:
        method: an object satisfying :class:`~adaptfn.methods.base.Method`: ``name``, ``peft_type``,
            ``config_cls`` (a :class:`~adaptfn.methods.base.PeftConfigBase` subclass), ``capabilities`` and
            the protocol's functions (and ``combine`` when it declares ``"combine"``).

    Raises:
        ConfigError: the object lacks part of the protocol, declares an unknown capability (or ``"combine"``
            without a ``combine`` function), or its name or PEFT type is taken.
    """
    if not isinstance(method, Method):
        missing = [n for n in dir(Method) if not n.startswith("_") and not hasattr(method, n)]
        raise ConfigError(f"register: {type(method).__name__} is not an adaptfn Method (missing: {missing})")
    if not (isinstance(method.config_cls, type) and issubclass(method.config_cls, PeftConfigBase)):
        raise ConfigError(f"register: {method.name}.config_cls must be a PeftConfigBase subclass")
    unknown = set(method.capabilities) - CAPABILITIES
    if unknown:
        raise ConfigError(f"register: {method.name} declares unknown capabilities {sorted(unknown)}; known: "
                          f"{sorted(CAPABILITIES)}")
    if COMBINE in method.capabilities and not callable(getattr(method, "combine", None)):
        raise ConfigError(f"register: {method.name} declares {COMBINE!r} but has no combine(adapters, weights, spec)")
    for m in _METHODS.values():
        if m.name == method.name or m.peft_type == method.peft_type or m.config_cls is method.config_cls:
            raise ConfigError(f"register: {method.name!r} ({method.peft_type}) clashes with the registered "
                              f"{m.name!r} ({m.peft_type})")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name`` (``Adapter.method``)."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown adapter method {name!r}; known: {sorted(_METHODS)}") from None


def method_for_config(config: Any) -> Method:
    """The method of ``config``: the one whose ``config_cls`` comes first in ``type(config)``'s MRO (so a
    user's subclass of :class:`LoraConfig` is LoRA's, and a registered subclass gets its own method)."""
    by_cls = {m.config_cls: m for m in _METHODS.values()}
    for cls in type(config).__mro__:
        if cls in by_cls:
            return by_cls[cls]
    raise ConfigError(f"{type(config).__name__} is not an adapter config adaptfn knows ({known_configs()})")


def method_for_peft_type(peft_type: Any, source: str) -> Method:
    """The method of PEFT's ``peft_type`` (from an adapter_config.json at ``source``)."""
    for m in _METHODS.values():
        if m.peft_type == peft_type:
            return m
    raise ConfigError(
        f"{source}: peft_type={peft_type!r} is not supported by adaptfn (supported: "
        f"{sorted(m.peft_type for m in _METHODS.values())})")


def known_configs() -> list[str]:
    """The config class names of the registered methods."""
    return sorted(m.config_cls.__name__ for m in _METHODS.values())


register(Lora())
register(IA3())
register(AdaLora())
register(LoHa())
register(LoKr())
register(OFT())
register(Vera())
