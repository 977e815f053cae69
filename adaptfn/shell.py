"""``AdapterModel``: the stateful API of transformers' ``PeftAdapterMixin`` and PEFT's ``PeftModel``, on
the functional core.

It holds named adapters, the active names and an enabled flag; every call goes through
:func:`adaptfn.inject`. Each adapter's trainable leaves are registered ``nn.Parameter`` s, so torch
optimisers and the transformers ``Trainer`` train it as they would a ``PeftModel``; the base model's
parameters are frozen (``requires_grad=False``), as PEFT does.

``AdapterModel(model)`` returns an instance of a subclass made once per base class (e.g.
``AdapterModelForOPTForCausalLM``, still an :class:`AdapterModel`) whose ``forward`` carries the base
class's forward signature: the ``Trainer`` reads it, at the instance and at the class, to keep dataset
columns (``remove_unused_columns``), find label names (``eval_loss``) and decide whether to pass
``num_items_in_batch``. Attributes the shell does not have are read from the base model (as
``PeftModel`` does): ``model.device``, ``model.generation_config``, ...

The shell keeps a functional view of the base model's tensors (:func:`adaptfn.functional`). Change the
base through the shell's own ``nn.Module`` methods (``m.to(...)``, ``m.half()``, ``m.load_state_dict``),
which refresh that view, or before wrapping it: what replaces the base's modules or parameters behind
the shell's back (``model.to(...)`` on the base alone, ``resize_token_embeddings``) is not seen.

Trainability follows PEFT: an adapter loaded with ``is_trainable=False`` (the default of
:meth:`AdapterModel.load_adapter` and :func:`from_pretrained`) is frozen; ``set_adapter`` makes the
active adapters trainable unless ``inference_mode=True`` and the others frozen; ``set_requires_grad``
changes one adapter's; ``disable_adapters()`` freezes them all (as PEFT, a ``set_adapter`` or
``set_requires_grad`` while disabled makes parameters trainable again). One deliberate difference:
``enable_adapters()`` (and leaving ``disable_adapter()``) gives back the trainability the adapters had,
where PEFT 0.21 makes the active ones trainable, frozen ones included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .adapter import COEF, GATE, SCALING, Adapter, Entry
from .algebra import combine
from .errors import AdaptfnError, ConfigError, IncompatibleAdapterError
from .functional import functional
from .hub import check_push_args, upload_adapter_folder
from .initialize import init
from .io import config_from, from_state_dict, load, save, write_card
from .io import state_dict as adapter_state_dict
from .methods.common import TASK_AUTO_CLASS
from .methods.layers import merge_weight_names
from .transforms import inject, merge, select

_SEP = "::"
_NOT_LEAVES = (GATE, SCALING, COEF)  # per-entry switches and scale weights, not adapter weights
_HUB_KEYS = ("revision", "subfolder", "token", "cache_dir", "local_files_only", "allow_pickle")


def _enc(path: str, leaf: str) -> str:
    return (path + _SEP + leaf).replace(".", "·")


# -- argument checks (each raises a ConfigError that starts with the method name) ---------------------
def _bool(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def _opt_str(where: str, name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: {name} must be a str or None, got {value!r} ({type(value).__name__})")
    return value


def _path(where: str, name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ConfigError(f"{where}: {name} must be a non-empty str or os.PathLike, got {value!r}")
    return os.fspath(value)


def _device(where: str, device_map: Any) -> torch.device | None:
    """One device from ``device_map`` (a device, a str, an int, or ``{"": device}``), checked usable."""
    if device_map is None or (isinstance(device_map, str) and device_map == "auto"):
        return None  # "auto": each adapted module's tensors go where that module's weights are
    dm = device_map
    if isinstance(dm, Mapping):
        if list(dm) != [""]:
            raise ConfigError(
                f"{where}: device_map={dict(dm)!r} places modules on several devices; an adapter goes on one "
                "device here: pass one (e.g. 'cuda:0', 0, or {'': 'cuda:0'}), or None to put each adapted "
                "module's tensors where that module's weights are")
        dm = dm[""]
    if isinstance(dm, bool) or not isinstance(dm, (str, int, torch.device)):
        raise ConfigError(f"{where}: device_map must be a device (str, int, torch.device) or {{'': device}}, got "
                          f"{device_map!r}")
    try:
        dev = torch.device(dm)
        torch.empty(0, device=dev)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"{where}: device_map={device_map!r} is not a usable device ({e})") from None
    return dev


def _prefixed(where: str, e: AdaptfnError) -> AdaptfnError:
    """The same typed error, its message starting with the method name."""
    msg = str(e)
    out = type(e)(msg if msg.startswith(where + ":") else f"{where}: {msg}")
    return out


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static structure of one registered adapter; its tensors live in ``adapter_params[name]``."""

    method: str
    config: Any
    entries: tuple[tuple[str, Entry], ...]
    # (module path, leaf name, where: "param" | "buffer" (attributes of the holder) | "base" (a base tensor), key)
    keys: tuple[tuple[str, str, str, str], ...]


@dataclasses.dataclass
class TunerLayerStatus:
    """One adapted module, with the fields of PEFT's ``peft.peft_model.TunerLayerStatus``.

    Attributes:
        name: the module's path in the base model (PEFT's names are the same path after ``"model."``).
        module_type: PEFT's name of the tuner layer for a module with a delta (``"lora.Linear"``,
            ``"lora.Embedding"``, IA3 ``"Linear"``, ``"adalora.SVDLinear"``); ``"ModulesToSaveWrapper"`` for
            a module of ``modules_to_save``.
        enabled: whether adapters are enabled.
        active_adapters: the active adapters (a ``modules_to_save`` module lists those it holds, as PEFT).
        merged_adapters: the adapters folded into this module's tensors.
        requires_grad: adapter -> True / False / ``"irregular"`` over its parameters here.
        available_adapters: the adapters touching this module, sorted.
        devices: adapter -> sorted device types of its tensors here.
        quantization_backend: ``"bnb 8bit"`` / ``"bnb 4bit"`` for a bitsandbytes base layer, else None (as
            PEFT's docs describe it; PEFT 0.21's LoRA / IA3 / AdaLoRA layers do not record it and say None).
    """

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclasses.dataclass
class TunerModelStatus:
    """The whole model, with the fields of PEFT's ``peft.peft_model.TunerModelStatus`` (see
    :meth:`AdapterModel.get_model_status`)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Literal["irregular"]
    active_adapters: list[str] | Literal["irregular"]
    merged_adapters: list[str] | Literal["irregular"]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Literal["irregular"]


def _agree(values: Sequence[Any]) -> Any:
    """True / False when every value is that bool, else ``"irregular"``."""
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _quant_backend(module: nn.Module | None) -> str | None:
    names = {c.__name__ for c in type(module).__mro__} if module is not None else set()
    if "Linear8bitLt" in names:
        return "bnb 8bit"
    if "Linear4bit" in names:
        return "bnb 4bit"
    return None


class AdapterModel(nn.Module):
    """A model with named adapters, driven as a ``PeftModel`` / transformers model with adapters is.

    ``load_adapter``, ``add_adapter``, ``set_adapter``, ``enable_adapters`` / ``disable_adapters`` /
    ``disable_adapter()``, ``delete_adapter``, ``save_pretrained``, ``merge_adapter`` /
    ``unmerge_adapter`` / ``merge_and_unload`` / ``unload``, ``get_nb_trainable_parameters``,
    ``get_model_status`` ...: each is built on the functional core (:func:`adaptfn.inject`,
    :func:`adaptfn.merge`, ...).

    Arguments:
        model: the base model (e.g. a transformers ``PreTrainedModel``). Its parameters are frozen.

    Returns:
        An instance of ``AdapterModelFor<BaseClass>``, a subclass of :class:`AdapterModel` made once per
        base class, whose ``forward`` has the base forward's signature (for the transformers ``Trainer``).

    Example:
        >>> m = af.AdapterModel(model)
        >>> _ = af.save(adapter, "saved")                      # a PEFT-format folder (or a Hub repo id)
        >>> m.load_adapter("saved", adapter_name="a")          # frozen unless is_trainable=True
        >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]), adapter_name="b")   # active, trainable
        >>> m.set_adapter("a"); out = m(input_ids=ids)
        >>> type(m).__name__, isinstance(m, af.AdapterModel)
        ('AdapterModelForOPTForCausalLM', True)
    """

    _wrapped_class: ClassVar[type | None] = None

    def __new__(cls, model: Any = None, *args: Any, **kwargs: Any) -> AdapterModel:
        if cls is AdapterModel and isinstance(model, nn.Module) and not isinstance(model, AdapterModel):
            cls = _shell_class(type(model))
        return super().__new__(cls)

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"AdapterModel: model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, AdapterModel):
            raise ConfigError("AdapterModel: model is an AdapterModel already; add adapters to it instead")
        super().__init__()
        self.base_model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.adapter_params = nn.ModuleDict()
        self._specs: dict[str, _Spec] = {}
        self._trainable: dict[str, bool] = {}
        self._active: list[str] = []
        self._enabled = True
        self._merged: list[str] = []
        # merged state: name -> (module, attribute, original object); (original, clone of its data) for each
        # original written in place
        self._saved: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
        self._clones: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._fns: dict[bool, tuple[Any, dict[str, torch.Tensor]]] = {}
        self._trees: dict[str, Adapter] = {}
        self.training = model.training
        self._loading_ties: list[list[str]] | None = None
        self.register_load_state_dict_post_hook(_tied_not_missing)

    # -- pickling / copying: caches are rebuilt, the per-base-class subclass is found again ----------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fns"] = {}  # functional models hold per-thread state; rebuilt on first use
        state["_trees"] = {}
        return state

    def __reduce_ex__(self, protocol: Any) -> Any:
        base_cls = type(self).__dict__.get("_wrapped_class")
        if base_cls is None:
            return super().__reduce_ex__(protocol)
        return (_rebuild, (base_cls,), self.__getstate__())

    def __getattr__(self, name: str) -> Any:
        """Attributes the shell lacks are read from the base model (public names only), as ``PeftModel``."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "base_model":
                raise
            base = self.__dict__.get("_modules", {}).get("base_model")
            if base is None:
                raise
            return getattr(base, name)

    # -- state dict: tied base tensors once (so the Trainer's safetensors checkpoints work) ------------------
    def _tied_aliases(self) -> list[str]:
        """Names of base tensors that are the same tensor as an earlier name (OPT's lm_head / embed_tokens)."""
        seen: set[int] = set()
        out = []
        base = self.base_model
        for name, t in [*base.named_parameters(remove_duplicate=False), *base.named_buffers(remove_duplicate=False)]:
            if id(t) in seen:
                out.append(name)
            seen.add(id(t))
        return out

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """``nn.Module.state_dict``, with each tied base tensor under its first name only, as transformers'
        ``save_pretrained`` writes it (safetensors refuses tensors that share memory, and the ``Trainer``
        saves an ``AdapterModel`` 's checkpoints with safetensors); :meth:`load_state_dict` does not count
        the other names as missing, since loading the first fills them.

        Arguments:
            destination, prefix, keep_vars: as ``nn.Module.state_dict``.

        Returns:
            name -> tensor: the base model's (under ``base_model.``) and the adapters' parameters
            (``adapter_params.<adapter>.<encoded module path>::<leaf>``).

        Example:
            >>> import safetensors.torch
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]))
            >>> safetensors.torch.save_file(m.state_dict(), "ckpt.safetensors")   # lm_head, tied, written once
            >>> m.load_state_dict(safetensors.torch.load_file("ckpt.safetensors"))
            <All keys matched successfully>
        """
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for name in self._tied_aliases():
            out.pop(f"{prefix}base_model.{name}", None)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; afterwards the base model's tied tensors are tied again (with
        ``assign=True`` torch puts a new tensor under the one name the state dict holds) and the shell's
        functional view is rebuilt, so the next call uses the loaded tensors.

        Arguments:
            state_dict, strict, assign: as ``nn.Module.load_state_dict``.

        Returns:
            torch's ``(missing_keys, unexpected_keys)``; the tied names left out of :meth:`state_dict` are
            not missing.
        """
        self._loading_ties = self._tie_groups()
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self._loading_ties = None
            self._invalidate()

    def _tie_groups(self) -> list[list[str]]:
        """Base tensor names that share one tensor, each group in named order (first: the one saved)."""
        groups: dict[int, list[str]] = {}
        base = self.base_model
        for name, t in [*base.named_parameters(remove_duplicate=False), *base.named_buffers(remove_duplicate=False)]:
            groups.setdefault(id(t), []).append(name)
        return [g for g in groups.values() if len(g) > 1]

    def _retie(self, groups: list[list[str]]) -> None:
        """Point every alias of each group at its first name's tensor again (after ``assign=True``)."""
        base = self.base_model
        for first, *aliases in groups:
            mod_path, _, attr = first.rpartition(".")
            owner = base.get_submodule(mod_path)
            t = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
            for alias in aliases:
                a_path, _, a_attr = alias.rpartition(".")
                mod = base.get_submodule(a_path)
                table = mod._parameters if a_attr in mod._parameters else mod._buffers
                if table.get(a_attr) is not t:
                    table[a_attr] = t

    def _apply(self, fn: Any, recurse: bool = True) -> AdapterModel:
        out = super()._apply(fn, recurse)
        with torch.no_grad():  # what a merged state restores moves with the model
            self._clones = [(orig, fn(clone)) for orig, clone in self._clones]
            held = {id(t) for t in [*self.base_model.parameters(), *self.base_model.buffers()]}
            for _, _, orig in self._saved.values():
                if isinstance(orig, nn.Parameter) and id(orig) not in held:  # swapped out, so not converted above
                    held.add(id(orig))
                    orig.data = fn(orig.data)
        self._invalidate()
        return out

    # -- the functional core, one fn per train/eval mode -----------------------------------------------
    def _fn(self) -> tuple[Any, dict[str, torch.Tensor]]:
        mode = bool(self.training)
        hit = self._fns.get(mode)
        if hit is None:
            hit = self._fns[mode] = functional(self.base_model)
        return hit

    def _invalidate(self) -> None:
        self._fns = {}
        self._trees = {}

    def _tree(self, name: str) -> Adapter:
        hit = self._trees.get(name)
        if hit is not None:
            return hit
        spec = self._specs[name]
        holder = self.adapter_params[name]
        base = None
        tensors: dict[str, dict[str, torch.Tensor]] = {p: {} for p, _ in spec.entries}
        for path, leaf, kind, key in spec.keys:
            if kind == "base":
                base = self._fn()[1] if base is None else base
                tensors[path][leaf] = base[key]
            else:
                tensors[path][leaf] = getattr(holder, key)
        tree = self._trees[name] = Adapter(spec.method, spec.config, dict(spec.entries), tensors)
        return tree

    def _params_of(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """``(module path, parameter)`` for each trainable leaf of one adapter."""
        holder = self.adapter_params[name]
        return [(path, getattr(holder, key)) for path, _, kind, key in self._specs[name].keys if kind == "param"]

    def _update_requires_grad(self) -> None:
        """After set_adapter / enable: the active adapters train (unless made frozen: loaded with
        ``is_trainable=False`` and not activated since, ``inference_mode=True``, ``set_requires_grad``), the
        others not."""
        for name in self._specs:
            on = name in self._active and self._trainable[name]
            for _, p in self._params_of(name):
                p.requires_grad_(on)

    # -- properties --------------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The base model's config (``None`` when it has none)."""
        return getattr(self.base_model, "config", None)

    @property
    def peft_config(self) -> dict[str, Any]:
        """Adapter name -> its config (adaptfn's config classes, with PEFT's field names)."""
        return {n: s.config for n, s in self._specs.items()}

    @property
    def active_adapter(self) -> str | None:
        """The first active adapter's name (``PeftModel.active_adapter``); None when there is none."""
        return self._active[0] if self._active else None

    @property
    def accepts_loss_kwargs(self) -> bool:
        """What the ``Trainer`` would read from the base model: its own ``accepts_loss_kwargs``, else whether
        its forward takes ``**kwargs`` (then the Trainer passes ``num_items_in_batch``)."""
        base = self.base_model
        own = getattr(base, "accepts_loss_kwargs", None)
        if own is not None:
            return bool(own)
        try:
            params = inspect.signature(base.forward).parameters.values()
        except (TypeError, ValueError):
            return False
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

    @property
    def _hf_peft_config_loaded(self) -> bool:
        """transformers' flag for "adapters are attached": the ``Trainer`` refuses to fine-tune a quantized
        (e.g. 4-bit) model without it."""
        return bool(self._specs)

    # -- names -------------------------------------------------------------------------------------------
    @staticmethod
    def _check_name(where: str, name: Any, arg: str = "adapter_name") -> str:
        if not isinstance(name, str):
            raise ConfigError(f"{where}: {arg} must be a str, got {name!r} ({type(name).__name__})")
        if not name or any(c in name for c in "./\\\x00"):
            raise ConfigError(f"{where}: {arg}={name!r} cannot name an adapter: it must be a non-empty plain name "
                              "without '.', '/' or '\\' (it names a sub-folder and a module)")
        return name

    def _new_name(self, where: str, name: Any, arg: str = "adapter_name") -> str:
        self._check_name(where, name, arg)
        if name in self._specs:
            raise ConfigError(f"{where}: an adapter named {name!r} exists already; use another name, or "
                              "delete_adapter it first")
        return name

    def _existing(self, where: str, arg: str, value: Any, *, allow_str: bool = True) -> list[str]:
        """A list of existing adapter names from a str (when allowed) or a list/tuple of str."""
        if isinstance(value, str) and allow_str:
            names = [value]
        elif isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value):
            names = list(value)
        else:
            want = "an adapter name or a list of names" if allow_str else "a list of adapter names"
            raise ConfigError(f"{where}: {arg} must be {want}, got {value!r}")
        if not names:
            raise ConfigError(f"{where}: {arg} is empty")
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: {arg}={names!r} names an adapter twice")
        missing = [n for n in names if n not in self._specs]
        if missing:
            raise ConfigError(f"{where}: {arg}: no adapter named {', '.join(map(repr, missing))}; have "
                              f"{list(self._specs)}")
        return names

    def _need_adapters(self, where: str) -> None:
        if not self._specs:
            raise ConfigError(f"{where}: no adapter loaded; load_adapter or add_adapter first")

    # -- adding adapters ---------------------------------------------------------------------------------
    def _place(self, adapter: Adapter, device: torch.device | None) -> Adapter:
        """The adapter with each module's tensors on ``device``, or (None) where that module's weights are."""
        modules = dict(self.base_model.named_modules(remove_duplicate=False))
        fallback = next((t.device for t in self.base_model.parameters()), torch.device("cpu"))
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        moved = False
        for path in adapter.paths:
            dev = device
            if dev is None:
                mod = modules.get(path)
                own = next(iter(mod.parameters()), None) if mod is not None else None
                dev = own.device if own is not None else fallback
            leaves = {}
            for leaf, t in adapter.tensors[path].items():
                if t.device != dev:
                    t, moved = t.to(dev), True
                leaves[leaf] = t
            tensors[path] = leaves
        return Adapter(adapter.method, adapter.config, dict(adapter.entries), tensors) if moved else adapter

    def _register(self, name: str, adapter: Adapter, trainable: bool) -> None:
        """Hold ``adapter`` under ``name``: trainable leaves as parameters, the rest as buffers (or, for
        frozen leaves that are the base model's own tensors, a reference to them)."""
        _, params = self._fn()
        base_ids = {id(t): k for k, t in params.items()}
        holder = nn.Module()
        keys = []
        for path, e in adapter.entries.items():
            for leaf, t in adapter.tensors[path].items():
                key = _enc(path, leaf)
                if leaf in e.frozen and id(t) in base_ids:
                    keys.append((path, leaf, "base", base_ids[id(t)]))
                elif leaf in _NOT_LEAVES or leaf in e.frozen:
                    holder.register_buffer(key, t, persistent=False)
                    keys.append((path, leaf, "buffer", key))
                else:
                    holder.register_parameter(key, nn.Parameter(t.detach(), requires_grad=trainable))
                    keys.append((path, leaf, "param", key))
        self.adapter_params._modules[name] = holder  # (any name, even one of ModuleDict's methods: "half")
        self._specs[name] = _Spec(adapter.method, adapter.config, tuple(adapter.entries.items()), tuple(keys))
        self._trainable[name] = trainable
        self._trees.pop(name, None)

    def _hotswap(self, where: str, name: str, new: Adapter, trainable: bool) -> None:
        """Copy ``new``'s tensors into adapter ``name`` in place (same parameter objects)."""
        old = self._tree(name)
        if new.structure_key != old.structure_key:
            raise ConfigError(f"{where}: hotswap=True needs the new adapter to have the structure of {name!r}; "
                              + _structure_diff(old, new))
        spec = self._specs[name]
        holder = self.adapter_params[name]
        keys = []
        with torch.no_grad():
            for path, leaf, kind, key in spec.keys:
                t = new.tensors[path][leaf]
                if kind == "param":
                    p = getattr(holder, key)
                    p.copy_(t)
                    p.requires_grad_(trainable)  # as a fresh load: is_trainable decides
                    keys.append((path, leaf, kind, key))
                else:  # buffers (gates, frozen copies of base tensors) are replaced, never written through
                    key = _enc(path, leaf)
                    holder._buffers.pop(key, None)
                    holder.register_buffer(key, t, persistent=False)
                    keys.append((path, leaf, "buffer", key))
        self._specs[name] = dataclasses.replace(spec, config=new.config, keys=tuple(keys))
        self._trainable[name] = trainable
        self._trees.pop(name, None)

    def load_adapter(
        self,
        peft_model_id: str | os.PathLike[str] | None = None,
        adapter_name: str | None = None,
        peft_config: Any = None,
        adapter_state_dict: Mapping[str, torch.Tensor] | None = None,
        *,
        is_trainable: bool = False,
        low_cpu_mem_usage: bool = False,
        device_map: str | int | torch.device | Mapping[str, Any] | None = None,
        hotswap: bool | Literal["auto"] = False,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        allow_pickle: bool = False,
        adapter_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Load a PEFT-format adapter (a folder, a Hub repo, or a state dict and config held in memory).

        As transformers' ``load_adapter`` and ``PeftModel.load_adapter``: the adapter is **frozen** unless
        ``is_trainable=True`` (then the model is left in its mode; frozen, it is put in eval mode, as PEFT
        does); the first adapter becomes active, later ones wait for :meth:`set_adapter`. Every argument is
        checked, and the adapter read and checked against the model, before anything changes.

        Arguments:
            peft_model_id: a folder or a Hub repo id (its root: a sub-folder is ``subfolder=``).
                ``model_id=`` (PeftModel's name) is accepted too.
            adapter_name: the name to hold it under (default ``"default"``).
            peft_config, adapter_state_dict: load from memory instead: a config (adaptfn's, a dict of
                adapter_config.json fields, or a ``peft`` config) and PEFT's key names -> tensors (see
                :func:`adaptfn.from_state_dict`; the tensors are copied). Both or neither; not with
                ``peft_model_id``.
            is_trainable: make the adapter trainable (``requires_grad`` while active).
            low_cpu_mem_usage: accepted for compatibility. PEFT uses it to skip initialising weights that
                the file then overwrites; adaptfn never initialises a loaded adapter, so loading already
                uses that little memory and the flag changes nothing.
            device_map: one device for the adapter's tensors (``"cuda:0"``, ``0``, ``torch.device``, or
                ``{"": device}``). None (default) or ``"auto"``: each module's tensors go where that module's
                weights are (``torch_device=`` is accepted as PEFT's name). A per-module map raises.
            hotswap: replace the tensors of the existing adapter ``adapter_name`` in place instead of adding
                one. The new adapter must have the same structure (method, targets, ranks, scaling, leaves),
                so the parameter objects, and a ``torch.compile`` d forward, are kept without recompiling.
                ``"auto"`` (transformers' default) means False here (there is no ``enable_peft_hotswap``).
            revision, subfolder, token, local_files_only, cache_dir, allow_pickle: as :func:`adaptfn.load`
                (also accepted inside ``adapter_kwargs``).

        Returns:
            None. The adapter is ``self.peft_config[adapter_name]``; :meth:`adapter` gives its tree.

        Raises:
            ConfigError: a bad or inapplicable argument, a taken name (or a missing one with ``hotswap``),
            a different structure with ``hotswap``. AdapterFileError, IncompatibleAdapterError: as
            :func:`adaptfn.load` and :func:`adaptfn.inject`. Every message starts with ``load_adapter:``.

        Example:
            >>> m = af.AdapterModel(model)
            >>> _ = af.save(adapter, "saved")
            >>> m.load_adapter("saved", adapter_name="a")                          # frozen
            >>> m.load_adapter("saved", adapter_name="b", is_trainable=True)
            >>> m.load_adapter(peft_config=adapter.config, adapter_state_dict=af.state_dict(adapter), adapter_name="c")
            >>> m.load_adapter("saved", adapter_name="a", hotswap=True)            # same structure, in place
            >>> m.active_adapters(), list(m.peft_config)
            (['a'], ['a', 'b', 'c'])
        """
        where = "load_adapter"
        if "model_id" in kwargs:
            if peft_model_id is not None:
                raise ConfigError(f"{where}: pass peft_model_id or model_id, not both")
            peft_model_id = kwargs.pop("model_id")
        if "torch_device" in kwargs:
            if device_map is not None:
                raise ConfigError(f"{where}: pass device_map or torch_device, not both")
            device_map = kwargs.pop("torch_device")
        if kwargs:
            raise ConfigError(f"{where}: unsupported argument(s) {', '.join(sorted(kwargs))} (adaptfn cannot apply "
                              "them); see the docstring for what load_adapter takes")
        hub: dict[str, Any] = {"revision": revision, "subfolder": subfolder, "token": token,
                               "local_files_only": local_files_only, "cache_dir": cache_dir,
                               "allow_pickle": allow_pickle}
        defaults = {"revision": None, "subfolder": None, "token": None, "local_files_only": False,
                    "cache_dir": None, "allow_pickle": False}
        if adapter_kwargs is not None:
            if not isinstance(adapter_kwargs, Mapping):
                raise ConfigError(f"{where}: adapter_kwargs must be a dict, got {type(adapter_kwargs).__name__}")
            unknown = sorted(set(adapter_kwargs) - set(_HUB_KEYS))
            if unknown:
                raise ConfigError(f"{where}: adapter_kwargs: unsupported key(s) {', '.join(map(str, unknown))}; "
                                  f"adaptfn takes {', '.join(_HUB_KEYS)}")
            for k, v in adapter_kwargs.items():
                if hub[k] != defaults[k] and hub[k] != v:
                    raise ConfigError(f"{where}: {k} is given twice (argument {hub[k]!r}, adapter_kwargs {v!r})")
                hub[k] = v
        for k in ("revision", "subfolder"):
            _opt_str(where, k, hub[k])
        for k in ("local_files_only", "allow_pickle"):
            _bool(where, k, hub[k])
        if hub["token"] is not None and not isinstance(hub["token"], (str, bool)):
            raise ConfigError(f"{where}: token must be a str, a bool or None, got {type(hub['token']).__name__}")
        if hub["cache_dir"] is not None:
            _path(where, "cache_dir", hub["cache_dir"])
        _bool(where, "is_trainable", is_trainable)
        _bool(where, "low_cpu_mem_usage", low_cpu_mem_usage)
        if hotswap not in (True, False, "auto") or not isinstance(hotswap, (bool, str)):
            raise ConfigError(f"{where}: hotswap must be True, False or 'auto', got {hotswap!r}")
        swap = hotswap is True
        name = "default" if adapter_name is None else adapter_name
        if swap:
            if not isinstance(name, str) or name not in self._specs:
                raise ConfigError(f"{where}: hotswap=True replaces an existing adapter's tensors, and there is no "
                                  f"adapter named {name!r} (have {list(self._specs)})")
            if name in self._merged:
                raise ConfigError(f"{where}: adapter {name!r} is merged; unmerge_adapter() before hotswapping it")
        else:
            self._new_name(where, name)
        device = _device(where, device_map)
        in_memory = peft_config is not None or adapter_state_dict is not None
        if in_memory:
            if peft_config is None or adapter_state_dict is None:
                raise ConfigError(f"{where}: loading from memory needs both peft_config and adapter_state_dict "
                                  f"(got only {'peft_config' if adapter_state_dict is None else 'adapter_state_dict'})")
            if peft_model_id is not None:
                raise ConfigError(f"{where}: pass peft_model_id, or peft_config and adapter_state_dict, not both")
            given = [k for k in _HUB_KEYS if hub[k] != defaults[k]]
            if given:
                raise ConfigError(f"{where}: {', '.join(given)} only apply to loading from a folder or the Hub, "
                                  "not to peft_config + adapter_state_dict")
        elif peft_model_id is None:
            raise ConfigError(f"{where}: pass peft_model_id (a folder or Hub repo), or peft_config and "
                              "adapter_state_dict")
        else:
            peft_model_id = _path(where, "peft_model_id", peft_model_id)
        try:
            if in_memory:  # the caller's tensors are copied: training must not write into them
                adapter = from_state_dict(adapter_state_dict, peft_config,  # type: ignore[arg-type]
                                          model=self.base_model)
                adapter = Adapter(adapter.method, adapter.config, dict(adapter.entries), {
                    p: {n: t.detach().to(device, copy=True) for n, t in d.items()} for p, d in adapter.tensors.items()})
            else:
                adapter = load(peft_model_id, device=device, model=self.base_model, **hub)  # type: ignore[arg-type]
            inject(self._fn()[0], adapter)  # checks it against the model
        except AdaptfnError as e:
            raise _prefixed(where, e) from None
        self._add_loaded(where, name, adapter, is_trainable, device, swap)

    def _add_loaded(self, where: str, name: str, adapter: Adapter, trainable: bool, device: torch.device | None,
                    swap: bool = False) -> None:
        adapter = self._place(adapter, device)
        if swap:
            self._hotswap(where, name, adapter, trainable)
        else:
            self._register(name, adapter, trainable)
            if not self._active:
                self._active = [name]
        if not trainable:
            self.eval()

    def add_adapter(self, adapter_config: Any, adapter_name: str | None = None, *,
                    generator: torch.Generator | None = None) -> None:
        """Add a fresh, trainable adapter from a config and make it the active one.

        As transformers' ``add_adapter`` (which ends with ``set_adapter(adapter_name)``): the new adapter
        is active and trainable, the others inactive. Initialised as PEFT does (:func:`adaptfn.init`).

        Arguments:
            adapter_config: an adaptfn config (:class:`adaptfn.LoraConfig`, ...), a ``peft`` config, or a
                dict of adapter_config.json fields. (The order is transformers'; ``PeftModel.add_adapter``
                takes ``(adapter_name, peft_config)``, which is refused rather than guessed.)
            adapter_name: its name (default ``"default"``); an existing name raises.
            generator: drives the random initialisation (deterministic for a seeded generator).

        Returns:
            None.

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), "mine",
            ...               generator=torch.Generator().manual_seed(0))
            >>> m.active_adapters()
            ['mine']
        """
        where = "add_adapter"
        if isinstance(adapter_config, str):
            raise ConfigError(f"{where}: adapter_config is the str {adapter_config!r}; the order is "
                              "add_adapter(adapter_config, adapter_name) (PeftModel.add_adapter takes the name first)")
        name = self._new_name(where, "default" if adapter_name is None else adapter_name)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ConfigError(f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        try:
            if isinstance(adapter_config, Mapping) or not hasattr(type(adapter_config), "unsupported"):
                _, adapter_config = config_from(adapter_config, where)
            adapter = init(self._fn()[0], adapter_config, generator=generator)
        except AdaptfnError as e:
            raise _prefixed(where, e) from None
        self._register(name, self._place(adapter, None), True)
        self.set_adapter(name)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """Add an adapter made by combining weighted adapters (``PeftModel.add_weighted_adapter``).

        Built on :func:`adaptfn.combine` (same arguments, PEFT's names and defaults; the model's module order is
        passed, so the dare types drawing from torch's global generator give PEFT's result for the same seed).
        As in PEFT the new adapter is frozen and not activated (``set_adapter`` it). IA3 adapters combine as
        PEFT's ``IA3Model.add_weighted_adapter`` does (``l = sum_i w_i l_i``; ``combination_type`` is then
        "svd", the unused default, or "linear"); AdaLoRA ones are refused, as PEFT refuses them. Unlike PEFT,
        which returns silently, an existing ``adapter_name`` raises.

        Arguments:
            adapters: names of existing adapters of one method.
            weights: one number per adapter.
            adapter_name: the new adapter's name.
            combination_type: :func:`adaptfn.combine`'s ``how``.
            svd_rank, svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method: as
                :func:`adaptfn.combine`.

        Returns:
            None.

        Example:
            >>> m = af.AdapterModel(model)
            >>> for name in ("a", "b"):
            ...     m.add_adapter(af.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name)
            >>> m.add_weighted_adapter(["a", "b"], [0.6, 0.4], "mix", combination_type="cat")
            >>> m.set_adapter("mix"); m.peft_config["mix"].r
            8
        """
        where = "add_weighted_adapter"
        names = self._existing(where, "adapters", adapters, allow_str=False)
        name = self._new_name(where, adapter_name)
        trees = [self._tree(n) for n in names]
        how = combination_type
        if trees[0].method == "ia3":
            if combination_type not in ("svd", "linear"):
                raise ConfigError(f"{where}: combination_type={combination_type!r}: IA3 adapters combine linearly "
                                  "(PEFT's IA3Model.add_weighted_adapter has no combination_type)")
            how = "linear"
        try:
            combined = combine(trees, weights, how=how, density=density, majority_sign_method=majority_sign_method,
                               svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                               svd_driver=svd_driver, model=self.base_model)
        except AdaptfnError as e:
            raise _prefixed(where, e) from None
        self._register(name, self._place(combined, None), False)

    # -- active / enabled ------------------------------------------------------------------------------------
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make these adapters the active ones; a list activates several, whose deltas add.

        As ``PeftModel.set_adapter`` (and transformers' mixin): the active adapters get ``requires_grad``
        unless ``inference_mode=True`` (an adapter loaded with ``is_trainable=False`` becomes trainable here,
        as in PEFT), the others lose it; merged adapters are unmerged first (with a warning); whether
        adapters are enabled does not change.

        Arguments:
            adapter_name: a name, or a list of names.
            inference_mode: keep the active adapters frozen.

        Returns:
            None.

        Example:
            >>> m = af.AdapterModel(model)
            >>> for name in ("a", "b"):
            ...     m.add_adapter(af.LoraConfig(target_modules=["q_proj"]), name)
            >>> m.set_adapter("a"); m.set_adapter(["a", "b"])
            >>> m.active_adapters()
            ['a', 'b']
        """
        where = "set_adapter"
        names = self._existing(where, "adapter_name", adapter_name)
        _bool(where, "inference_mode", inference_mode)
        if self._merged:
            warnings.warn(f"set_adapter: adapters {self._merged} are merged; unmerging them first", stacklevel=2)
            self._unmerge()
        self._active = names
        for name in names:
            self._trainable[name] = not inference_mode
        self._update_requires_grad()

    def active_adapters(self) -> list[str]:
        """The active adapters' names (transformers' ``active_adapters()``).

        Returns:
            A new list of names, in activation order; ``[]`` when no adapter is loaded (where transformers
            raises).

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]))
            >>> m.active_adapters()
            ['default']
        """
        return list(self._active)

    def enable_adapters(self) -> None:
        """Turn the active adapters back on (after :meth:`disable_adapters`); they train again if they did
        before (PEFT's ``enable_adapter_layers`` would also unfreeze a frozen active adapter).

        Returns:
            None. Raises ConfigError when no adapter is loaded (as transformers).

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]))
            >>> m.disable_adapters(); base_out = m(input_ids=ids); m.enable_adapters()
        """
        self._need_adapters("enable_adapters")
        self._enabled = True
        self._update_requires_grad()

    def disable_adapters(self) -> None:
        """Run the base model alone until :meth:`enable_adapters`; no adapter trains meanwhile.

        Merged adapters stay merged, but the forward then uses the base model's original tensors.

        Returns:
            None. Raises ConfigError when no adapter is loaded (as transformers).

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.load_adapter(peft_config=adapter.config, adapter_state_dict=af.state_dict(adapter))
            >>> m.disable_adapters()
            >>> torch.equal(m(input_ids=ids).logits, model(input_ids=ids).logits)
            True
        """
        self._need_adapters("disable_adapters")
        self._enabled = False
        for name in self._specs:
            for _, p in self._params_of(name):
                p.requires_grad_(False)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager (``PeftModel.disable_adapter``): the base model alone inside; on exit, even on
        an exception, whether adapters were enabled and each adapter parameter's ``requires_grad`` are
        restored as they were.

        Returns:
            A context manager (yields None).

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]))
            >>> with m.disable_adapter():
            ...     base_logits = m(input_ids=ids).logits
        """
        self._need_adapters("disable_adapter")
        was = self._enabled
        grads = [(p, p.requires_grad) for n in self._specs for _, p in self._params_of(n)]
        self.disable_adapters()
        try:
            yield
        finally:
            self._enabled = was
            for p, g in grads:
                p.requires_grad_(g)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Make these adapters trainable or frozen (``PeftModel.set_requires_grad``), now and whenever they
        are active later (until the next :meth:`set_adapter` of them).

        Arguments:
            adapter_names: a name or a list of names.
            requires_grad: True (default) or False.

        Returns:
            None.

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.load_adapter(peft_config=adapter.config, adapter_state_dict=af.state_dict(adapter))
            >>> m.get_nb_trainable_parameters()[0]
            0
            >>> m.set_requires_grad("default")   # now it trains
            >>> m.get_nb_trainable_parameters()[0] == adapter.num_parameters()
            True
        """
        where = "set_requires_grad"
        names = self._existing(where, "adapter_names", adapter_names)
        _bool(where, "requires_grad", requires_grad)
        for name in names:
            self._trainable[name] = requires_grad
            for _, p in self._params_of(name):
                p.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        """Delete adapters (transformers' ``delete_adapter``: a name or a list).

        Every name must exist and none may be merged (PEFT refuses that too), checked before anything is
        deleted. When the active adapters are all deleted, the first remaining adapter in sorted order
        becomes active, with a warning, as PEFT does.

        Arguments:
            adapter_names: a name or a list of names.

        Returns:
            None.

        Example:
            >>> m = af.AdapterModel(model)
            >>> for name in ("a", "b", "c", "d"):
            ...     m.add_adapter(af.LoraConfig(target_modules=["q_proj"]), name)
            >>> m.delete_adapter("b"); m.delete_adapter(["c", "d"])
            >>> list(m.peft_config), m.active_adapters()
            (['a'], ['a'])
        """
        where = "delete_adapter"
        names = self._existing(where, "adapter_names", adapter_names)
        merged = [n for n in names if n in self._merged]
        if merged:
            raise ConfigError(f"{where}: cannot delete {merged} while merged; call unmerge_adapter() first")
        for name in names:
            del self.adapter_params[name]
            del self._specs[name]
            del self._trainable[name]
            self._trees.pop(name, None)
        was_active = [n for n in self._active if n in names]
        self._active = [n for n in self._active if n not in names]
        if was_active and not self._active and self._specs:
            new = sorted(self._specs)[0]
            warnings.warn(f"Adapter {', '.join(was_active)} was active which is now deleted. Setting active adapter "
                          f"to {new}.", stacklevel=2)
            self._active = [new]
            self._update_requires_grad()

    # -- reading ---------------------------------------------------------------------------------------------
    def adapter(self, adapter_name: str | None = None) -> Adapter:
        """The current tree of one adapter (the active one by default); its leaves are this module's
        parameters, so it reflects training.

        Arguments:
            adapter_name: the adapter; default: the first active one.

        Returns:
            An :class:`adaptfn.Adapter` (use it with :func:`adaptfn.inject`, :func:`adaptfn.save`, ...).

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]), "a")
            >>> _ = af.save(m.adapter("a"), "out/a")
        """
        where = "adapter"
        if adapter_name is None:
            self._need_adapters(where)
            adapter_name = self._active[0] if self._active else next(iter(self._specs))
        if not isinstance(adapter_name, str):
            raise ConfigError(f"{where}: adapter_name must be one adapter's name (a str), got {adapter_name!r}")
        return self._tree(self._existing(where, "adapter_name", adapter_name)[0])

    def get_adapter_state_dict(self, adapter_name: str | None = None,
                               state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """One adapter's tensors (detached) under PEFT's saved key names, ``base_model.model.<path>...``
        (what :func:`adaptfn.state_dict` and ``peft.get_peft_model_state_dict`` give; transformers' mixin
        drops the ``base_model.model.`` prefix; :meth:`load_adapter` takes either form).

        Arguments:
            adapter_name: default: the (first) active adapter.
            state_dict: transformers' argument to read from another state dict; not supported (must be None).

        Returns:
            ``dict[str, Tensor]``.

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]), "a")
            >>> sd = m.get_adapter_state_dict("a")
            >>> next(iter(sd))
            'base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight'
            >>> m2 = af.AdapterModel(model)
            >>> m2.load_adapter(peft_config=m.peft_config["a"], adapter_state_dict=sd, adapter_name="a")
        """
        where = "get_adapter_state_dict"
        if state_dict is not None:
            raise ConfigError(f"{where}: state_dict is not supported (the adapter's own tensors are returned)")
        if adapter_name is not None and not isinstance(adapter_name, str):
            raise ConfigError(f"{where}: adapter_name must be one adapter's name (a str), got {adapter_name!r}")
        if adapter_name is None:
            self._need_adapters(where)
            if not self._active:
                raise ConfigError(f"{where}: no active adapter; pass adapter_name")
            adapter_name = self._active[0]
        name = self._existing(where, "adapter_name", adapter_name)[0]
        return {k: v.detach() for k, v in adapter_state_dict(self._tree(name)).items()}

    def get_base_model(self) -> nn.Module:
        """The wrapped base model (``PeftModel.get_base_model``).

        Returns:
            The ``nn.Module`` given to :class:`AdapterModel` (its weights are the merged ones while merged).

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.get_base_model() is model
            True
        """
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts with PEFT's definitions: ``all`` counts the base model's
        parameters (shared ones once; bitsandbytes 4-bit ones as PEFT counts them) plus every adapter's
        (trainable or not); ``trainable`` those with ``requires_grad``. Gates and the frozen copies of base
        tensors PEFT saves (embedding matrices) are the base's, not counted again.

        Returns:
            ``(trainable, all)``.

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(r=2, target_modules=["q_proj"]))
            >>> trainable, total = m.get_nb_trainable_parameters()
            >>> trainable == 2 * (2 * 22 + 22 * 2)      # two layers' lora_A [2, 22] and lora_B [22, 2]
            True
        """
        trainable = total = 0
        seen: set[int] = set()
        for name, p in self.base_model.named_parameters(remove_duplicate=False):
            saved = self._saved.get(name)
            obj = saved[2] if saved is not None else p  # while merged: the original, not what a merge swapped in
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            n = _numel(obj)
            total += n
            trainable += n if obj.requires_grad else 0
        for name, spec in self._specs.items():
            in_place = _biases_trained_in_place(spec.config, spec.entries)
            for path, leaf, kind, key in spec.keys:
                if kind != "param":
                    continue
                p = getattr(self.adapter_params[name], key)
                n = _numel(p)
                # PEFT trains a bias="all"/"lora_only" bias in the base layer itself: counted once, as the base's
                total += 0 if (path, leaf) in in_place else n
                trainable += n if p.requires_grad else 0
            if spec.method == "adalora":  # PEFT's AdaLoRA layers also hold a frozen ``ranknum`` [1] parameter
                total += sum(1 for _, e in spec.entries if e.kind)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: ``trainable params: T || all params: A || trainable%: P``.

        Returns:
            None (prints the counts of :meth:`get_nb_trainable_parameters`).

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(r=2, target_modules=["q_proj"]))
            >>> m.print_trainable_parameters()
            trainable params: 176 || all params: ... || trainable%: ...
        """
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # -- status ----------------------------------------------------------------------------------------------
    def get_layer_status(self) -> list[TunerLayerStatus]:
        """The status of each adapted module, in the base model's module order (``PeftModel.get_layer_status``).

        A module is listed when an adapter has a delta there or replaces it as one of ``modules_to_save``
        (trained biases and the frozen embedding copies are not layers, as in PEFT). Values are PEFT's for
        the same state, except: ``name`` is the module's path in the base model (PEFT prefixes ``"model."``);
        ``quantization_backend`` names a bitsandbytes base layer (PEFT 0.21's LoRA
        layers say None); a merged adapter's ``modules_to_save`` module lists it as merged (adaptfn folds
        the replacement into the base; PEFT keeps its copy apart and lists ``[]`` there).

        Returns:
            A list of :class:`TunerLayerStatus`.

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]))
            >>> for s in m.get_layer_status():
            ...     print(s.name, s.module_type, s.active_adapters, s.requires_grad)
            model.decoder.layers.0.self_attn.q_proj lora.Linear ['default'] {'default': True}
            model.decoder.layers.1.self_attn.q_proj lora.Linear ['default'] {'default': True}
        """
        self._need_adapters("get_layer_status")
        found: dict[str, dict[str, Entry]] = {}
        for name, spec in self._specs.items():
            saved = list(getattr(spec.config, "modules_to_save", None) or [])
            for path, e in spec.entries:
                if e.kind or any(path.endswith(m) for m in saved):
                    found.setdefault(path, {})[name] = e
        modules = dict(self.base_model.named_modules(remove_duplicate=False))
        order = [p for p in modules if p in found] + [p for p in found if p not in modules]
        out = []
        for path in order:
            here = found[path]
            deltas = [n for n, e in here.items() if e.kind]
            if deltas:
                module_type = _peft_module_type(self._specs[deltas[0]].method, modules.get(path))
                active = list(self._active)
            else:
                module_type = "ModulesToSaveWrapper"
                active = [n for n in self._active if n in here]
            grads: dict[str, bool | Literal["irregular"]] = {}
            devices: dict[str, list[str]] = {}
            for n in here:
                flags = [p.requires_grad for q, p in self._params_of(n) if q == path]
                if flags:
                    grads[n] = _agree(flags)
                leaves = self._tree(n).tensors[path]
                devices[n] = sorted({t.device.type for leaf, t in leaves.items() if leaf not in _NOT_LEAVES})
            out.append(TunerLayerStatus(
                name=path, module_type=module_type, enabled=self._enabled, active_adapters=active,
                merged_adapters=[n for n in self._merged if n in here], requires_grad=grads,
                available_adapters=sorted(here), devices=devices,
                quantization_backend=_quant_backend(modules.get(path)) if deltas else None))
        return out

    def get_model_status(self) -> TunerModelStatus:
        """The status of the whole model (``PeftModel.get_model_status``), aggregated from
        :meth:`get_layer_status` by PEFT's rules: a field on which the layers disagree reads
        ``"irregular"``. ``adapter_model_type`` is ``"AdapterModel"`` (PEFT names its tuner, e.g.
        ``"LoraModel"``); the other fields have PEFT's values for the same state, but for the differences
        :meth:`get_layer_status` lists.

        Returns:
            A :class:`TunerModelStatus`.

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]))
            >>> m.merge_adapter()
            >>> s = m.get_model_status(); s.active_adapters, s.merged_adapters, s.enabled
            (['default'], ['default'], True)
        """
        self._need_adapters("get_model_status")
        layers = self.get_layer_status()
        trainable, total = self.get_nb_trainable_parameters()
        enabled_set = {s.enabled for s in layers}
        actives = {tuple(s.active_adapters) for s in layers}
        merged_any = sorted({n for s in layers for n in s.merged_adapters})
        merged: list[str] | Literal["irregular"] = merged_any
        if any(set(merged_any) & (set(s.available_adapters) - set(s.merged_adapters)) for s in layers):
            merged = "irregular"
        grads: dict[str, list[Any]] = {}
        devices: dict[str, set[str]] = {}
        for s in layers:
            for n, g in s.requires_grad.items():
                grads.setdefault(n, []).append(g)
            for n, d in s.devices.items():
                devices.setdefault(n, set()).update(d)
        backends = {s.quantization_backend for s in layers}
        return TunerModelStatus(
            base_model_type=type(self.base_model).__name__,
            adapter_model_type="AdapterModel",
            peft_types={n: str(s.config.peft_type) for n, s in self._specs.items()},
            trainable_params=trainable,
            total_params=total,
            num_adapter_layers=len(layers),
            enabled=enabled_set.pop() if len(enabled_set) == 1 else "irregular",
            active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
            merged_adapters=merged,
            requires_grad={n: _agree(v) for n, v in grads.items()},
            available_adapters=sorted({n for s in layers for n in s.available_adapters}),
            devices={n: sorted(d) for n, d in devices.items()},
            quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
        )

    # -- saving ----------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike[str], selected_adapters: list[str] | None = None,
                        safe_serialization: bool = True, is_main_process: bool = True, **kwargs: Any) -> None:
        """Save adapters in PEFT's layout, the **active** adapter at the root of ``save_directory``.

        As transformers' ``save_pretrained`` of a model with adapters, what was active is what
        ``PeftModel.from_pretrained(base, save_directory)`` and :func:`adaptfn.from_pretrained` load back;
        the other adapters go to sub-folders named after them (``save_directory/<name>``, loadable with
        ``subfolder=<name>``). Several active adapters raise unless ``selected_adapters`` says which goes
        to the root. Everything is checked before anything is written.

        Arguments:
            save_directory: the folder (created if missing; a file there raises).
            selected_adapters: the adapters to save, the first at the root, the others in sub-folders.
            safe_serialization: must be True: adaptfn writes safetensors only.
            is_main_process: False checks the arguments and writes nothing (for multi-process runs).

        Returns:
            None.

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]), "one")
            >>> m.add_adapter(af.LoraConfig(target_modules=["v_proj"]), "two")
            >>> m.set_adapter("two"); m.save_pretrained("out")    # out/ holds "two", out/one/ holds "one"
            >>> af.load("out").paths[0], af.load("out/one").paths[0]
            ('model.decoder.layers.0.self_attn.v_proj', 'model.decoder.layers.0.self_attn.q_proj')
            >>> m.save_pretrained("out2", selected_adapters=["one", "two"])   # out2/ holds "one"
        """
        where = "save_pretrained"
        if kwargs.get("save_embedding_layers", "auto") == "auto":  # PEFT's default: what adaptfn always does
            kwargs.pop("save_embedding_layers", None)
        if kwargs:
            raise ConfigError(f"{where}: unsupported argument(s) {', '.join(sorted(kwargs))} (adaptfn cannot apply "
                              "them)")
        folder = _path(where, "save_directory", save_directory)
        if os.path.isfile(folder):
            raise ConfigError(f"{where}: save_directory={folder!r} is a file; it must be a folder")
        if not _bool(where, "safe_serialization", safe_serialization):
            raise ConfigError(f"{where}: safe_serialization=False (a pickle adapter_model.bin) is not supported; "
                              "adaptfn writes safetensors only")
        _bool(where, "is_main_process", is_main_process)
        self._need_adapters(where)
        if selected_adapters is None:
            if len(self._active) > 1:
                raise ConfigError(f"{where}: several adapters are active ({self._active}) and only one can go to the "
                                  "root; pass selected_adapters=[...] (the first goes to the root) or set_adapter one")
            root = self._active[0] if self._active else next(iter(self._specs))
            names = [root] + [n for n in self._specs if n != root]
        else:
            names = self._existing(where, "selected_adapters", selected_adapters, allow_str=False)
        if not is_main_process:
            return
        try:
            save(self._tree(names[0]), folder, model_card=False)
            for n in names[1:]:
                save(self._tree(n), os.path.join(folder, n), model_card=False)
            write_card(folder, {n: self._tree(n) for n in names}, root=names[0])  # one card, at the root (PEFT)
        except AdaptfnError as e:
            raise _prefixed(where, e) from None

    # -- merging ---------------------------------------------------------------------------------------------
    def _merge_list(self, where: str, adapter_names: Any) -> list[str]:
        if adapter_names is None:
            return list(self._active)
        return self._existing(where, "adapter_names", adapter_names, allow_str=False)

    def _original_params(self) -> dict[str, torch.Tensor]:
        """name -> the tensor it held before any merge (for a forward with adapters disabled)."""
        out = {}
        for name, (_, _, orig) in self._saved.items():
            clone = next((c for o, c in self._clones if o is orig), None)
            out[name] = clone if clone is not None else orig.detach()
        return out

    def _replacements(self, name: str) -> Adapter | None:
        """The replacement entries of one adapter (``modules_to_save``, biases), without its deltas."""
        tree = self._tree(name)
        entries: dict[str, Entry] = {}
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for path, e in tree.entries.items():
            if e.replaced:
                entries[path] = Entry(replaced=e.replaced, tied=e.tied, frozen=e.frozen)
                leaves = tree.tensors[path]
                tensors[path] = {**{n: leaves[n] for n in e.replaced}, GATE: leaves[GATE]}
        return Adapter(tree.method, tree.config, entries, tensors) if entries else None

    def _owner(self, where: str, name: str) -> tuple[nn.Module, str, torch.Tensor]:
        """(module, attribute, tensor) of a base tensor that merging may write; plain tensors only."""
        mod_path, _, attr = name.rpartition(".")
        mod = self.base_model.get_submodule(mod_path)
        obj = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)
        if obj is None or type(obj) not in (nn.Parameter, torch.Tensor):
            raise ConfigError(f"{where}: {name} is a {type(obj).__name__} (e.g. a quantized weight); merging into the "
                              "base model works on plain tensors; use af.merge(params, adapter, dequantize=True)")
        return mod, attr, obj

    def _fold(self, where: str, names: list[str], keep: list[str], safe_merge: bool,
              progressbar: bool = False) -> None:
        """Write adapters ``names`` (deltas and replacements), then the replacements of ``keep``, into the
        base model's tensors. Checked (types, and finiteness with ``safe_merge``) before any write."""
        fn, params = self._fn()
        for n in names:  # quantized weights first: af.merge would requantize them, then the write is refused
            for path, e in self._tree(n).entries.items():
                deltas = [f"{path}.{w}" for w in merge_weight_names(e.kind)] if e.kind else []
                for k in deltas + [f"{path}.{r}" if path else r for r in e.replaced]:
                    self._owner(where, k)
        new: dict[str, torch.Tensor] = params
        if names:
            trees = {n: self._tree(n) for n in names}
            new = merge(new, select(trees, names[0] if len(names) == 1 else names))
        for n in keep:
            part = self._replacements(n)
            if part is not None:
                new = merge(new, part)
        changed = {k: v for k, v in new.items() if v is not params.get(k)}
        if safe_merge:
            bad = [k for k, v in changed.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise IncompatibleAdapterError(f"{where}: merging {names} gives NaN or Inf in {bad[:4]} (safe_merge="
                                               "True); nothing was written")
        groups: dict[int, list[str]] = {}
        for k, v in params.items():
            groups.setdefault(id(v), []).append(k)
        owner = {k: self._owner(where, k) for k in {a for c in changed for a in groups[id(params[c])]}}
        plan: list[tuple[str, list[str], torch.Tensor]] = []
        for group in {id(params[k]): groups[id(params[k])] for k in changed}.values():
            values = [new[a] for a in group]
            if all(v is values[0] for v in values):
                plan.append(("copy", group, values[0]))
            else:  # tied names that would no longer agree: the changed ones get their own tensor (untied)
                plan += [("swap", [a], new[a]) for a in group if new[a] is not params[a]]
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm comes with huggingface_hub
            def tqdm(x: Any, **_: Any) -> Any:
                return x
        swapped = False
        with torch.no_grad():
            for how, group, v in tqdm(plan, disable=not progressbar, desc="Merging adapters"):
                for a in group:
                    self._saved.setdefault(a, owner[a])
                mod, attr, obj = owner[group[0]]
                if how == "copy":
                    if not any(o is obj for o, _ in self._clones):
                        self._clones.append((obj, obj.detach().clone()))
                    obj.copy_(v)
                else:
                    swapped = True
                    t = v.detach().clone()
                    if attr in mod._parameters:
                        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
                    else:
                        mod._buffers[attr] = t
        if swapped:
            self._invalidate()

    def _unmerge(self) -> None:
        with torch.no_grad():
            for mod, attr, orig in self._saved.values():
                table = mod._parameters if attr in mod._parameters else mod._buffers
                if table.get(attr) is not orig:
                    table[attr] = orig
            for orig, clone in self._clones:
                orig.copy_(clone)
        self._saved, self._clones, self._merged = {}, [], []
        self._invalidate()

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base model's weights, in place (``PeftModel.merge_adapter``).

        The forward then uses the merged weights and does not add these adapters again; other active
        adapters still add. :meth:`unmerge_adapter` restores the exact original tensors (kept aside, not
        recomputed by subtraction). Tied tensors (OPT's lm_head / embed_tokens) that an adapter changes on
        one side only are untied for the time of the merge. Adapters already merged are skipped (warning).

        Arguments:
            adapter_names: a list of names; default: the active adapters.
            safe_merge: check every merged tensor for NaN / Inf first, and refuse (IncompatibleAdapterError)
                before writing anything.

        Returns:
            None.

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.load_adapter(peft_config=adapter.config, adapter_state_dict=af.state_dict(adapter))
            >>> before = m(input_ids=ids).logits
            >>> m.merge_adapter(); merged = m(input_ids=ids).logits; m.unmerge_adapter()
            >>> torch.allclose(merged, before, atol=1e-5)
            True
        """
        where = "merge_adapter"
        names = self._merge_list(where, adapter_names)
        _bool(where, "safe_merge", safe_merge)
        todo = [n for n in names if n not in self._merged]
        if self._merged and len(todo) < len(names):
            if todo:
                warnings.warn(f"Already following adapters were merged {','.join(self._merged)}. You are now "
                              f"additionally merging {','.join(todo)}.", stacklevel=2)
            else:
                warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
        if not todo:
            return
        self._fold(where, todo, [], safe_merge)
        self._merged += todo

    def unmerge_adapter(self) -> None:
        """Undo every merge (``PeftModel.unmerge_adapter``): the base model's tensors are the exact originals
        again (and tied ones tied again). With nothing merged it warns, as PEFT does.

        Returns:
            None.

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.load_adapter(peft_config=adapter.config, adapter_state_dict=af.state_dict(adapter))
            >>> w = model.model.decoder.layers[0].self_attn.q_proj.weight.clone()
            >>> m.merge_adapter(); m.unmerge_adapter()
            >>> torch.equal(model.model.decoder.layers[0].self_attn.q_proj.weight, w)
            True
        """
        if not self._merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._unmerge()

    def _drop_all(self) -> nn.Module:
        """Forget every adapter; the base model keeps what was written into it."""
        self._saved, self._clones, self._merged = {}, [], []
        self._specs, self._trainable, self._active, self._enabled = {}, {}, [], True
        self.adapter_params = nn.ModuleDict()
        self._invalidate()
        base = self.base_model
        cfg = getattr(base, "config", None)
        getters = (getattr(base, "get_input_embeddings", None), getattr(base, "get_output_embeddings", None))
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False) and all(callable(g) for g in getters):
            with contextlib.suppress(NotImplementedError, AttributeError):
                emb_in, emb_out = getters[0](), getters[1]()  # type: ignore[misc]
                w_in, w_out = getattr(emb_in, "weight", None), getattr(emb_out, "weight", None)
                if w_in is not None and w_out is not None and w_in.data_ptr() != w_out.data_ptr():
                    cfg.tie_word_embeddings = False
                    warnings.warn("Input and output embeddings are no longer tied after merging. Setting "
                                  "`tie_word_embeddings=False` in the model config.", stacklevel=3)
        return base

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Fold adapters into the base model (in place) and return it (``PeftModel.merge_and_unload``).

        The active adapters (or ``adapter_names``) are merged; as in PEFT, the replacements of the active
        adapters (``modules_to_save``, trained biases) become the base's too, and adapters merged earlier
        stay merged. Tied tensors an adapter changes on one side are untied (and the config's
        ``tie_word_embeddings`` set to False, with a warning, as PEFT does). The shell is left with no
        adapters around the merged base.

        Arguments:
            progressbar: show a progress bar over the written tensors.
            safe_merge: refuse NaN / Inf in a merged tensor (IncompatibleAdapterError) before writing.
            adapter_names: a list of names; default: the active adapters.

        Returns:
            The base model (the same object), merged.

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.load_adapter(peft_config=adapter.config, adapter_state_dict=af.state_dict(adapter))
            >>> merged = m.merge_and_unload()
            >>> merged is model, m.peft_config
            (True, {})
        """
        where = "merge_and_unload"
        _bool(where, "progressbar", progressbar)
        _bool(where, "safe_merge", safe_merge)
        names = self._merge_list(where, adapter_names)
        todo = [n for n in names if n not in self._merged]
        keep = [n for n in self._active if n not in todo and n not in self._merged]
        self._fold(where, todo, keep, safe_merge, progressbar)
        return self._drop_all()

    def unload(self) -> nn.Module:
        """Return the base model without merging the deltas (``PeftModel.unload``).

        As in PEFT, the active adapters' replacements (``modules_to_save`` copies, trained biases) stay in
        the returned model, and adapters merged with :meth:`merge_adapter` stay merged. The shell is left
        with no adapters.

        Returns:
            The base model (the same object).

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]))
            >>> base = m.unload()
            >>> base is model
            True
        """
        self._fold("unload", [], [n for n in self._active if n not in self._merged], False)
        return self._drop_all()

    # -- what the base model's own methods would get wrong ----------------------------------------------------
    def push_to_hub(self, repo_id: str, private: bool = False, revision: str | None = None,
                    commit_message: str | None = None, token: str | bool | None = None, *,
                    selected_adapters: list[str] | None = None) -> Any:
        """Upload the adapters to the Hugging Face Hub, laid out as :meth:`save_pretrained` writes them (the
        active adapter at the root, the others in sub-folders), with a model card; never the base model.

        The folder is written to a temporary directory first (so everything is checked before anything is
        sent); a ``README.md`` card (:func:`adaptfn.hub.model_card`) is added when the saved folder has
        none; then it is uploaded as :func:`adaptfn.push_to_hub` does.

        Arguments:
            repo_id: ``"namespace/name"``.
            private: make the repo private when it is created.
            revision: the branch to commit to (created if missing); default: main.
            commit_message: the commit's message.
            token: as in huggingface_hub.
            selected_adapters: as :meth:`save_pretrained` (the first goes to the root).

        Returns:
            huggingface_hub's ``CommitInfo``.

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]), "one")
            >>> info = m.push_to_hub("user/opt-shell", token=token)
            >>> af.load("user/opt-shell").paths[0]
            'model.decoder.layers.0.self_attn.q_proj'
        """
        where = "push_to_hub"
        check_push_args(where, repo_id, private, revision, commit_message, token)
        self._need_adapters(where)
        with tempfile.TemporaryDirectory(prefix="adaptfn-push-") as tmp:
            self.save_pretrained(tmp, selected_adapters=selected_adapters)
            if selected_adapters is not None:
                names = self._existing(where, "selected_adapters", selected_adapters, allow_str=False)
            else:
                root = self._active[0] if self._active else next(iter(self._specs))
                names = [root] + [n for n in self._specs if n != root]
            trees = {n: self._tree(n) for n in names}
            return upload_adapter_folder(tmp, repo_id, trees, root=names[0], private=private, revision=revision,
                                         commit_message=commit_message, token=token, where=where)

    def enable_peft_hotswap(self, *args: Any, **kwargs: Any) -> None:
        """transformers' preparation for hotswapping adapters of other ranks: not supported (refused, rather
        than reaching the base model's method).

        Arguments:
            args, kwargs: ignored.

        Returns:
            Never; raises ConfigError. ``load_adapter(..., hotswap=True)`` needs no preparation for an
            adapter of the same structure (ranks, targets, scaling).

        Example:
            >>> af.AdapterModel(model).enable_peft_hotswap(target_rank=16)
            Traceback (most recent call last):
            adaptfn.errors.ConfigError: enable_peft_hotswap: ...
        """
        raise ConfigError("enable_peft_hotswap: not supported (adaptfn does not pad ranks for hotswapping); "
                          "load_adapter(..., hotswap=True) swaps in an adapter of the same structure as is")

    # -- calls -----------------------------------------------------------------------------------------------
    def _call_target(self) -> tuple[Any, Mapping[str, torch.Tensor]]:
        fn, params = self._fn()
        if not self._enabled:
            return fn, ({**params, **self._original_params()} if self._saved else params)
        names = [n for n in self._active if n not in self._merged]
        if not names:
            return fn, params
        trees = {n: self._tree(n) for n in names}
        adapter = select(trees, names[0] if len(names) == 1 else names)
        return inject(fn, adapter, generator=torch.default_generator if self.training else None), params

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward with the active adapters (its signature is the base forward's).

        Arguments:
            args, kwargs: the base model's forward arguments.

        Returns:
            What the base model returns.

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]))
            >>> out = m(input_ids=ids, labels=ids); out.loss.backward()
            >>> m.adapter().tensors["model.decoder.layers.0.self_attn.q_proj"]["lora_B"].grad.shape
            torch.Size([22, 8])
        """
        g, params = self._call_target()
        return g(params, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate`` with the active adapters.

        Arguments:
            args, kwargs: ``generate`` 's arguments.

        Returns:
            What the base model's ``generate`` returns.

        Example:
            >>> m = af.AdapterModel(model)
            >>> m.load_adapter(peft_config=adapter.config, adapter_state_dict=af.state_dict(adapter))
            >>> m.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape
            torch.Size([2, 10])
        """
        g, params = self._call_target()
        return g.generate(params, *args, **kwargs)

    def __repr__(self) -> str:
        state = f"active={self._active}, enabled={self._enabled}" + (f", merged={self._merged}" if self._merged else "")
        lines = [f"{type(self).__name__}({type(self.base_model).__name__}, {state})"]
        for n in self._specs:
            frozen = "" if self._trainable[n] else " (frozen)"
            lines.append(f"  {n}{frozen}: {self._tree(n)!r}")
        return "\n".join(lines)



def _peft_module_type(method: str, module: nn.Module | None) -> str:
    """The ``module_type`` PEFT 0.21 reports for a layer of ``method`` wrapping ``module`` (its tuner layer's
    class name as its repr shows it: LoRA ``lora.Linear`` (GPT-2 ``Conv1D`` included) / ``lora.Embedding``,
    IA3 ``Linear``, AdaLoRA ``adalora.SVDLinear``; the others ``<method>.Linear`` / ``<method>.Embedding``, VeRA's
    on a ``Conv1D`` included)."""
    kind = "Embedding" if isinstance(module, nn.Embedding) else "Linear"
    return {"lora": f"lora.{kind}", "ia3": kind, "adalora": "adalora.SVDLinear"}.get(method, f"{method}.{kind}")


def _numel(p: torch.Tensor) -> int:
    """A parameter's count as PEFT counts it (DeepSpeed's ``ds_numel``; bitsandbytes 4-bit: 2 per byte)."""
    n = p.numel()
    if n == 0 and hasattr(p, "ds_numel"):
        n = p.ds_numel
    if type(p).__name__ == "Params4bit":
        nbytes = p.element_size() if hasattr(p, "element_size") else getattr(getattr(p, "quant_storage", None),
                                                                                "itemsize", 1)
        n = n * 2 * nbytes
    return int(n)


def _biases_trained_in_place(config: Any, entries: Sequence[tuple[str, Entry]]) -> set[tuple[str, str]]:
    """``(path, "bias")`` of the biases a ``bias="all"`` / ``"lora_only"`` config trains: PEFT trains them in
    the base layer, adaptfn in a replacement leaf (``modules_to_save`` copies are copies in PEFT too)."""
    if getattr(config, "bias", "none") == "none":
        return set()
    saved = list(getattr(config, "modules_to_save", None) or [])
    return {(path, "bias") for path, e in entries
            if "bias" in e.replaced and not any(path.endswith(m) for m in saved)}


def _tied_not_missing(module: AdapterModel, incompatible_keys: Any) -> None:
    """load_state_dict post-hook: re-ties the base model's tied tensors (as they were before the load) and
    does not count the tied names the state dict leaves out as missing."""
    groups = module.__dict__.get("_loading_ties") or module._tie_groups()
    module._retie(groups)
    aliases = [f"base_model.{n}" for g in groups for n in g[1:]]
    incompatible_keys.missing_keys[:] = [
        k for k in incompatible_keys.missing_keys if not any(k == a or k.endswith("." + a) for a in aliases)]


def _structure_diff(old: Adapter, new: Adapter) -> str:
    """Say how two adapters' structures differ (for hotswap's error)."""
    if old.method != new.method:
        return f"the method differs ({old.method} vs {new.method})"
    if set(old.paths) != set(new.paths):
        only_old = sorted(set(old.paths) - set(new.paths))
        only_new = sorted(set(new.paths) - set(old.paths))
        return f"the targets differ (only the existing one has {only_old[:4]}, only the new one {only_new[:4]})"
    for p in old.paths:
        a, b = old.entries[p], new.entries[p]
        if a.r != b.r:
            return f"the rank of {p} differs ({a.r} vs {b.r})"
        if a.scaling != b.scaling:
            return f"the scaling of {p} differs ({a.scaling:g} vs {b.scaling:g}: lora_alpha / r)"
        if a != b:
            return f"the entry of {p} differs ({a} vs {b})"
        if set(old.tensors[p]) != set(new.tensors[p]):
            return f"the tensors of {p} differ ({sorted(old.tensors[p])} vs {sorted(new.tensors[p])})"
    return "the structures differ"


# -- one subclass per base class, whose forward has the base forward's signature ---------------------------
_SHELL_CLASSES: dict[type, type[AdapterModel]] = {}
_SHELL_LOCK = threading.Lock()


def _shell_class(base_cls: type) -> type[AdapterModel]:
    """``AdapterModelFor<Base>``: made once per base class, cached. Its ``forward`` carries
    ``__signature__`` of ``base_cls.forward``, so ``inspect.signature`` of the class's and the instance's
    forward reads the base's parameters (``labels``, ``attention_mask``, ``**kwargs`` ...)."""
    with _SHELL_LOCK:
        hit = _SHELL_CLASSES.get(base_cls)
        if hit is not None:
            return hit
        name = f"AdapterModelFor{base_cls.__name__}"

        def forward(self: AdapterModel, *args: Any, **kwargs: Any) -> Any:
            return AdapterModel.forward(self, *args, **kwargs)

        with contextlib.suppress(TypeError, ValueError):
            forward.__signature__ = inspect.signature(base_cls.forward)  # type: ignore[attr-defined]
        forward.__name__ = "forward"
        forward.__qualname__ = f"{name}.forward"
        forward.__doc__ = f"{base_cls.__name__}.forward with the active adapters: the same arguments and result."
        cls = type(name, (AdapterModel,), {
            "forward": forward, "_wrapped_class": base_cls, "__module__": __name__, "__qualname__": name,
            "__doc__": AdapterModel.__doc__})
        _SHELL_CLASSES[base_cls] = cls
        return cls


def _rebuild(base_cls: type) -> AdapterModel:
    """Unpickling / deepcopy: an empty instance of the subclass for ``base_cls`` (state is set after)."""
    cls = _shell_class(base_cls)
    return AdapterModel.__new__(cls)


_TASK_AUTO = TASK_AUTO_CLASS


def from_pretrained(adapter_source: str | os.PathLike[str], model_cls: Any = None, *,
                    adapter_name: str = "default", is_trainable: bool = False, revision: str | None = None,
                    subfolder: str | None = None, token: str | bool | None = None, local_files_only: bool = False,
                    cache_dir: str | os.PathLike[str] | None = None, allow_pickle: bool = False,
                    **model_kwargs: Any) -> AdapterModel:
    """Load the base model named in the adapter's config (``base_model_name_or_path``) and the adapter.

    As ``PeftModel.from_pretrained``: the adapter is **frozen** unless ``is_trainable=True``.

    Arguments:
        adapter_source: an adapter folder or Hub repo id (its root; a sub-folder is ``subfolder=``).
        model_cls: the transformers class to load the base with (default from the config's task_type,
            e.g. ``AutoModelForCausalLM``).
        adapter_name: the name to hold the adapter under.
        is_trainable: make the adapter trainable.
        revision, subfolder, token, local_files_only, cache_dir, allow_pickle: for the adapter, as
            :func:`adaptfn.load` (the base model is loaded at the config's ``revision``).
        model_kwargs: passed to ``model_cls.from_pretrained`` (e.g. ``dtype``, ``quantization_config``,
            ``device_map``; the adapter's tensors go where each adapted module's weights are).

    Returns:
        An :class:`AdapterModel` with that adapter active.

    Example:
        >>> model.save_pretrained("base")
        >>> fn, params = af.functional(model)
        >>> cfg = af.LoraConfig(target_modules=["q_proj"], base_model_name_or_path="base", task_type="CAUSAL_LM")
        >>> _ = af.save(af.init(fn, cfg), "my-lora")
        >>> m = af.from_pretrained("my-lora")                  # loads ./base, then the adapter (frozen)
        >>> m.active_adapters(), m.get_nb_trainable_parameters()[0]
        (['default'], 0)
    """
    where = "from_pretrained"
    source = _path(where, "adapter_source", adapter_source)
    AdapterModel._check_name(where, adapter_name)
    _bool(where, "is_trainable", is_trainable)
    if token is not None and not isinstance(token, (str, bool)):
        raise ConfigError(f"{where}: token must be a str, a bool or None, got {type(token).__name__}")
    if cache_dir is not None:
        _path(where, "cache_dir", cache_dir)
    if model_cls is not None and not callable(getattr(model_cls, "from_pretrained", None)):
        raise ConfigError(f"{where}: model_cls must be a transformers model class (with from_pretrained), got "
                          f"{model_cls!r}")
    try:
        adapter = load(source, revision=_opt_str(where, "revision", revision),
                       subfolder=_opt_str(where, "subfolder", subfolder), token=token,
                       local_files_only=_bool(where, "local_files_only", local_files_only), cache_dir=cache_dir,
                       allow_pickle=_bool(where, "allow_pickle", allow_pickle))
    except AdaptfnError as e:
        raise _prefixed(where, e) from None
    config = adapter.config
    base_name = config.base_model_name_or_path
    if not base_name:
        raise ConfigError(f"{where}: {source}: base_model_name_or_path is not set; load the base model yourself "
                          "and use AdapterModel(model).load_adapter(...)")
    if model_cls is None:
        import transformers

        model_cls = getattr(transformers, _TASK_AUTO.get(config.task_type or "", "AutoModelForCausalLM"))
    model = model_cls.from_pretrained(base_name, revision=config.revision, **model_kwargs)
    am = AdapterModel(model.eval())
    am._new_name(where, adapter_name)
    try:
        inject(am._fn()[0], adapter)
    except AdaptfnError as e:
        raise _prefixed(where, e) from None
    am._add_loaded(where, adapter_name, adapter, is_trainable, None)
    return am


__all__ = ["AdapterModel", "from_pretrained", "TunerLayerStatus", "TunerModelStatus"]
