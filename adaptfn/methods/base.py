"""The method protocol and the config base class shared by LoRA, IA3, AdaLoRA.

A method is one object with the static knowledge of one adapter kind:

* ``plan`` -- which modules of a model a config targets, and each one's :class:`Entry`;
* ``init_leaves`` -- fresh tensors for one entry (PEFT's initialisation);
* ``forward`` -- the adapted forward of one module given the base forward;
* ``merge`` -- the base weight with the delta folded in;
* ``off`` -- leaves that contribute nothing (how a masked entry is written to a file);
* ``to_peft`` / ``from_peft`` -- PEFT's key names for one entry's delta leaves;
* ``pad`` / ``unpad`` -- rank padding for :func:`adaptfn.stack`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import torch

from ..adapter import Entry
from ..errors import ConfigError

_JSON_TYPES = (str, int, float, bool, type(None), list, dict)


@dataclasses.dataclass(frozen=True)
class PeftConfigBase:
    """Fields every PEFT config file carries. Subclasses add the method's fields with PEFT's names
    and defaults. Unknown keys from a file (newer PEFT versions) are kept in ``extra`` and written back."""

    peft_type: ClassVar[str] = ""
    # fields PEFT knows that adaptfn does not implement: name -> the value meaning "off"
    unsupported: ClassVar[dict[str, Any]] = {}

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=True, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.extra, Mapping):
            raise ConfigError(f"{type(self).__name__}.extra must be a mapping of unknown PEFT fields")
        for name, off in self.unsupported.items():
            if name in self.extra and not _is_off(self.extra[name], off):
                raise ConfigError(
                    f"{type(self).__name__}.{name}={self.extra[name]!r} is not supported by adaptfn yet "
                    f"(it changes the adapter's numerics); only {off!r} is")
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        """Check field values; raise :class:`ConfigError` naming the field."""

    # -- PEFT's adapter_config.json ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content: PEFT's field names, unknown fields preserved."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            out[f.name] = _jsonable(v)
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "adapter_config.json") -> PeftConfigBase:
        """Build from a parsed adapter_config.json; unknown keys go to ``extra``."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "peft_type"}
        try:
            return cls(**known, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _is_off(value: Any, off: Any) -> bool:
    if value is None:
        return True
    if off is None:
        return False
    return value == off


def _jsonable(v: Any) -> Any:
    if isinstance(v, (set, frozenset, tuple)):
        return sorted(v) if isinstance(v, (set, frozenset)) else list(v)
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def need(cond: bool, cls: type, field: str, msg: str) -> None:
    """Raise :class:`ConfigError` naming ``cls.field`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{cls.__name__}.{field}: {msg}")


CallBase = Callable[[torch.Tensor], torch.Tensor]


class Method(Protocol):
    """What adaptfn needs from an adapter method (see module docstring)."""

    name: str
    peft_type: str
    config_cls: type

    def plan(self, config: Any, model: torch.nn.Module) -> tuple[Any, dict[str, Entry]]: ...

    def init_leaves(self, config: Any, path: str, entry: Entry, module: torch.nn.Module,
                    generator: torch.Generator | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Fresh delta leaves for one entry (PEFT's initialisation)."""

    def forward(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: CallBase, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor: ...

    def merge(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
              weight: torch.Tensor) -> torch.Tensor: ...

    def delta_suffixes(self) -> tuple[str, ...]: ...

    def off(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def to_peft(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def from_peft(self, config: Any, path: str, found: Mapping[str, torch.Tensor],
                  source: str) -> tuple[Entry, dict[str, torch.Tensor]]: ...

    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor],
              module: torch.nn.Module) -> None: ...

    def pad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]: ...

    def unpad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]: ...
