"""Adapter methods, one file each, behind the small protocol in :mod:`adaptfn.methods.base`."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .adalora import AdaLora, AdaLoraConfig
from .ia3 import IA3, IA3Config
from .lora import Lora, LoraConfig

_METHODS: dict[str, Any] = {}


def register(method: Any) -> Any:
    """Register a method object (``name``, ``peft_type``, ``config_cls`` and the protocol functions)."""
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Any:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown adapter method {name!r}; known: {sorted(_METHODS)}") from None


def method_for_config(config: Any) -> Any:
    for m in _METHODS.values():
        if isinstance(config, m.config_cls):
            return m
    raise ConfigError(f"{type(config).__name__} is not an adapter config adaptfn knows ({known_configs()})")


def method_for_peft_type(peft_type: Any, source: str) -> Any:
    for m in _METHODS.values():
        if m.peft_type == peft_type:
            return m
    raise ConfigError(
        f"{source}: peft_type={peft_type!r} is not supported by adaptfn (supported: "
        f"{sorted(m.peft_type for m in _METHODS.values())})")


def known_configs() -> list[str]:
    return sorted(m.config_cls.__name__ for m in _METHODS.values())


register(Lora())
register(IA3())
register(AdaLora())

__all__ = ["LoraConfig", "IA3Config", "AdaLoraConfig", "register", "get_method", "method_for_config",
           "method_for_peft_type"]
