"""The method protocol (:class:`Method`) and the config base class of every method.

A method is one object with the static knowledge of one adapter kind:

* ``plan`` -- which modules of a model a config targets, and each one's :class:`Entry`;
* ``init_leaves`` -- fresh tensors for one entry (PEFT's initialisation);
* ``forward`` -- the adapted forward of one module given the base forward (and, for methods declaring
  the :data:`ROUTE` capability, a per-row ``route``);
* ``merge`` -- the module's tensors with the delta folded in;
* ``off`` -- leaves that contribute nothing (how a masked entry is written to a file);
* ``to_peft`` / ``from_peft`` -- PEFT's key names for one entry's delta leaves;
* ``check`` -- whether an entry fits a module of a model;
* ``pad`` / ``unpad`` -- rank padding for :func:`adaptfn.stack`.

Optional part: a method whose PEFT file holds tensors shared by every module (VeRA's ``base_model.vera_A`` /
``base_model.vera_B``, outside the ``base_model.model.`` keys of the modules) also satisfies :class:`SharedTensors`;
the file functions (:func:`adaptfn.state_dict`, :func:`adaptfn.load`, :func:`adaptfn.from_state_dict`) call it.

Optional capabilities are declared in ``capabilities``; :func:`require` refuses the rest with a typed
error that names the method. Adding a method is one file in ``methods/`` plus one ``register`` call.

* :data:`ROUTE` -- ``forward`` takes a per-row ``route`` into a stacked adapter;
* :data:`SCALE` -- ``forward``, ``merge`` and ``to_peft`` honour a ``coef`` leaf (:func:`adaptfn.scale`): the
  method documents what "``w`` times the entry" means for it and writes the weight into PEFT's tensors;
* :data:`COMBINE` -- the method has ``combine(adapters, weights, spec)``, PEFT's ``add_weighted_adapter`` for
  its kind (:func:`adaptfn.combine`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ..adapter import Entry
from ..errors import ConfigError

__all__ = ["PeftConfigBase", "Method", "SharedTensors", "CallBase", "ROUTE", "SCALE", "COMBINE", "CAPABILITIES",
           "CombineSpec", "require", "need", "is_int", "is_real", "check_bool", "check_optional_str", "check_int",
           "check_names", "check_regex", "INT64_MAX", "FLOAT32_MAX", "TASK_TYPES"]

_JSON_TYPES = (str, int, float, bool, type(None), list, dict)
# PEFT's TaskType values (peft.utils.peft_types.TaskType); PEFT refuses any other task_type
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


class _ConfigMeta(type):
    """Lets a config's constructor take every field name PEFT's config class has, as a PEFT user passes them.

    A PEFT field that is not one of the dataclass's fields goes to ``extra`` (so it is written back to
    ``adapter_config.json``): one adaptfn does not implement (``unsupported``) is then checked against its
    "off" value by ``__post_init__`` (a :class:`ConfigError` naming it otherwise), one without numerical effect
    (``peft_only``) is kept as it is. ``peft_type`` must be the class's own, ``runtime_config`` (never saved by
    PEFT) is accepted and dropped. Any other name raises :class:`ConfigError` naming it, instead of a bare
    ``TypeError``."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        moved: dict[str, Any] = {}
        for name in [k for k in kwargs if k not in fields]:
            value = kwargs.pop(name)
            if name == "peft_type":
                value = getattr(value, "value", value)  # PEFT's PeftType enum
                if value != cls.peft_type:  # type: ignore[attr-defined]
                    raise ConfigError(f"{cls.__name__}.peft_type={value!r}: this config is "
                                      f"{cls.peft_type!r}")  # type: ignore[attr-defined]
            elif name == "runtime_config":
                continue
            elif name in cls.unsupported or name in cls.peft_only:  # type: ignore[attr-defined]
                moved[name] = value
            else:
                known = sorted(n for n in fields if n != "extra")
                raise ConfigError(f"{cls.__name__}: {name!r} is a field neither of adaptfn's nor of PEFT's "
                                  f"{cls.__name__} (adaptfn's fields: {', '.join(known)})")
        if moved:
            extra = dict(kwargs.get("extra") or {})
            extra.update(moved)
            kwargs["extra"] = extra
        return super().__call__(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class PeftConfigBase(metaclass=_ConfigMeta):
    """Fields every PEFT config file carries. Subclasses add the method's fields with PEFT's names
    and defaults. Unknown keys from a file (newer PEFT versions) are kept in ``extra`` and written back.

    The constructor also takes the PEFT fields adaptfn keeps in ``extra`` (see ``unsupported`` and
    ``peft_only``), so ``af.LoraConfig(**peft_kwargs)`` works for whatever PEFT accepts at its default: a
    field whose value would change the numerics adaptfn does not implement raises :class:`ConfigError`
    naming it, as the same field in a file or a ``from_dict`` does."""

    peft_type: ClassVar[str] = ""
    # fields PEFT knows that adaptfn does not implement: name -> the value meaning "off"
    unsupported: ClassVar[dict[str, Any]] = {}
    # fields PEFT knows that change nothing adaptfn computes (kept in ``extra``, written back as they are)
    peft_only: ClassVar[frozenset[str]] = frozenset({"auto_mapping", "peft_version"})

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=True, repr=False)

    def __post_init__(self) -> None:
        cls = type(self)
        if not isinstance(self.extra, Mapping):
            raise ConfigError(f"{cls.__name__}.extra must be a mapping of unknown PEFT fields")
        for name in ("task_type", "base_model_name_or_path", "revision"):
            check_optional_str(cls, name, getattr(self, name))
        need(self.task_type is None or self.task_type in TASK_TYPES, cls, "task_type",
             f"must be one of PEFT's task types {list(TASK_TYPES)} or None, got {self.task_type!r}")
        check_bool(cls, "inference_mode", self.inference_mode)
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


# -- field checks shared by the configs (each raises ConfigError naming ``cls.field``) -------------------
def is_int(v: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """A finite ``int``/``float`` that is not a ``bool`` (NaN, infinities and ints beyond a float are not)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38  # a scale beyond it overflows to inf in a float32 computation


def check_bool(cls: type, field: str, v: Any) -> None:
    """``True`` or ``False`` only (the strings ``"false"`` / ``"true"`` and 0 / 1 are refused)."""
    need(isinstance(v, bool), cls, field, f"must be True or False, got {v!r}")


def check_optional_str(cls: type, field: str, v: Any) -> None:
    need(v is None or isinstance(v, str), cls, field, f"must be a str or None, got {v!r}")


def check_int(cls: type, field: str, v: Any, low: int) -> None:
    """An int ``>= low`` (and one a tensor size can hold: below 2**63)."""
    need(is_int(v) and low <= v <= INT64_MAX, cls, field, f"must be an int >= {low} (and < 2**63), got {v!r}")


def check_names(cls: type, field: str, v: Any, *, regex: bool = True) -> None:
    """None, a list (tuple, set) of module names, or (``regex``) one str: a regular expression."""
    ok = v is None or (regex and isinstance(v, str)) or (
        isinstance(v, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in v))
    need(ok, cls, field, ("must be a list of str, a regex str or None" if regex else "must be a list of str or None")
         + f", got {v!r}")
    if regex and isinstance(v, str):
        check_regex(cls, field, v)


def check_regex(cls: type, field: str, v: str, template: str = "{}") -> None:
    """``v`` compiles as a regular expression, as used: inside ``template`` (PEFT embeds some names in a
    larger pattern, e.g. ``(.*\\.)?({})$`` for rank_pattern keys)."""
    try:
        re.compile(template.replace("{}", v))
    except (re.error, RecursionError, OverflowError) as e:
        need(False, cls, field, f"{v!r} is not a valid regular expression here ({e})")


CallBase = Callable[[torch.Tensor], torch.Tensor]
"""The base forward of a module (or of the methods composed under this one): ``x -> y``."""

# Capabilities a method may declare (``Method.capabilities``); code that needs one calls :func:`require`.
ROUTE = "route"
"""Per-row routing of a stack (``af.inject(fn, stacked, route=idx)`` and ``route="all"``)."""
SCALE = "scale"
"""A differentiable weight per entry (:func:`adaptfn.scale`, weighted :func:`adaptfn.select`): the method reads
the ``coef`` leaf in ``forward`` / ``merge`` and folds it into its PEFT tensors in ``to_peft``."""
COMBINE = "combine"
"""PEFT's ``add_weighted_adapter`` as a pure function (:func:`adaptfn.combine`): the method has a ``combine``."""
CAPABILITIES = frozenset({ROUTE, SCALE, COMBINE})


@dataclasses.dataclass(frozen=True)
class CombineSpec:
    """The checked arguments of :func:`adaptfn.combine` handed to a method's ``combine`` (PEFT's names).

    Attributes:
        how: the combination type ("cat", "linear", "svd", "ties", ...). density, majority_sign_method, svd_rank,
            svd_clamp, svd_full_matrices, svd_driver: as PEFT's ``add_weighted_adapter``.
        generator: where the random (dare) types draw from; None: torch's global generator, in PEFT's order.
        order: module paths in the model's order (PEFT visits modules in it), or None (natural path order).
    """

    how: str
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    generator: torch.Generator | None = None
    order: tuple[str, ...] | None = None


@runtime_checkable
class Method(Protocol):
    """What adaptfn needs from an adapter method: one object per method, holding only static knowledge.

    Attributes:
        name: adaptfn's name (``Adapter.method``), e.g. ``"lora"``.
        peft_type: PEFT's ``peft_type`` in ``adapter_config.json``, e.g. ``"LORA"``.
        config_cls: the config dataclass (a :class:`PeftConfigBase`).
        capabilities: the optional capabilities it has (a subset of :data:`CAPABILITIES`); what is not
            declared is refused by :func:`require` with an error naming the method.

    Shapes below: ``leaves`` are one module's tensors (a single adapter's, or a stack's with a leading
    ``N`` axis, see :mod:`adaptfn.stacking`); ``on`` is ``True`` or the bool tensor ``gate != 0``.
    """

    name: str
    peft_type: str
    config_cls: type[PeftConfigBase]
    capabilities: frozenset[str]

    def plan(self, config: Any, model: torch.nn.Module) -> tuple[Any, dict[str, Entry]]:
        """``(config, {module path: Entry})``: which modules ``config`` targets in ``model`` (the config
        comes back as PEFT saves it, e.g. ``all-linear`` expanded), replacements included."""
        ...

    def init_leaves(self, config: Any, path: str, entry: Entry, module: torch.nn.Module,
                    generator: torch.Generator | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Fresh delta leaves for one entry (PEFT's initialisation)."""
        ...

    def forward(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: CallBase, module: torch.nn.Module, x: torch.Tensor,
                route: torch.Tensor | None = None) -> torch.Tensor:
        """The adapted module output for input ``x`` [..., in], given the base forward ``call_base``.
        ``route`` (only when :data:`ROUTE` is declared): int64 [batch], row ``i`` uses adapter
        ``route[i]`` of a stacked ``leaves`` (-1: none)."""
        ...

    def merge(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
              tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The module's tensors with the delta folded in: ``tensors`` is the module's own tensors by name
        (``weight`` [out, in] or Conv1D [in, out], ``bias``, ...), as earlier adapters of the same merge left
        them, and under ``base_layer.<name>`` as they were before any delta of this merge (DoRA's weight norm
        reads the unmerged weight, as PEFT's does); returns the changed ones (new tensors)."""
        ...

    def delta_suffixes(self) -> tuple[str, ...]:
        """PEFT's key suffixes of this method's delta tensors (``lora_A.weight``, ...)."""
        ...

    def off(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Leaves of the same shapes that contribute nothing (how a masked entry is written to a file)."""
        ...

    def to_peft(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's key suffix -> tensor for one entry's delta leaves."""
        ...

    def from_peft(self, config: Any, path: str, found: Mapping[str, torch.Tensor],
                  source: str) -> tuple[Entry, dict[str, torch.Tensor]]:
        """``(Entry, leaves)`` from one module's PEFT tensors (suffix -> tensor); bad files raise
        :class:`adaptfn.AdapterFileError` naming ``source``."""
        ...

    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: torch.nn.Module) -> None:
        """Raise :class:`adaptfn.IncompatibleAdapterError` unless the entry fits ``module``."""
        ...

    def pad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        """The leaves zero-padded to rank ``r`` (contributing exactly what they did)."""
        ...

    def unpad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        """The leaves cut back to rank ``r`` (the inverse of :meth:`pad`)."""
        ...


@runtime_checkable
class SharedTensors(Protocol):
    """The optional part of the protocol for a method whose PEFT file holds tensors shared by all modules (VeRA's
    random projections), under keys outside ``base_model.model.``. In the adapter each entry carries them as
    leaves (the same tensor objects, listed in ``Entry.frozen``: not trained, not counted), so transforms, stacks
    and ``vmap`` see one self-contained tree per module; only the file holds them once.
    """

    def shared_keys(self) -> tuple[str, ...]:
        """The file's keys of the shared tensors (``"base_model.vera_A"``, ...): :func:`adaptfn.load` hands them
        to :meth:`shared_from_peft` instead of reading them as module keys."""
        ...

    def shared_to_peft(self, config: Any, entries: Mapping[str, Entry],
                       tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The shared tensors to write (full keys), from the delta entries' leaves; ``{}`` when the config says
        not to save them. Raises :class:`ConfigError` when the entries disagree on them."""
        ...

    def shared_init(self, config: Any, model: torch.nn.Module, entries: Mapping[str, Entry],
                    tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """Fresh leaves completed with the shared tensors PEFT makes for ``model`` (called by :func:`adaptfn.init`
        after :meth:`Method.init_leaves`)."""
        ...

    def shared_from_peft(self, config: Any, shared: Mapping[str, torch.Tensor], entries: Mapping[str, Entry],
                         tensors: Mapping[str, Mapping[str, torch.Tensor]], source: str,
                         model: torch.nn.Module | None) -> tuple[dict[str, Entry], dict[str, dict[str, torch.Tensor]]]:
        """The entries and leaves completed with the shared tensors read from the file (``shared``: its shared
        keys), or regenerated for ``model`` as PEFT does when the file has none; bad or missing ones raise
        :class:`adaptfn.AdapterFileError` naming ``source``."""
        ...


def require(method: Method, capability: str, what: str, config: Any = None) -> None:
    """Raise :class:`ConfigError` naming the method unless it declares ``capability``.

    A method whose config selects a variant with fewer capabilities (LoRA's ``use_dora=True``) has a
    ``variant(config) -> (name, capabilities) | None``; given the adapter's ``config``, the variant's
    declaration is the one checked, and its name is the one in the message.

    Arguments:
        method: a registered method. capability: one of :data:`CAPABILITIES`.
        what: the caller's name for the feature, e.g. ``"route="`` (starts the message).
        config: the adapter's config (None: the method's own declaration).
    """
    name, caps = method.name, method.capabilities
    variant = getattr(method, "variant", None)
    if config is not None and callable(variant):
        found = variant(config)
        if found is not None:
            name, caps = found
    if capability not in caps:
        have = ", ".join(sorted(caps)) or "none"
        raise ConfigError(f"{what} is not supported for {name} adapters (the {name} method declares "
                          f"the capabilities: {have})")
