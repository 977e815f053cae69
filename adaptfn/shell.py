"""``AdapterModel``: the stateful API transformers users know (PeftAdapterMixin), on the functional core.

It holds a dict of adapters and the active names; every call goes through :func:`adaptfn.inject`. The
active adapter's trainable leaves are registered ``nn.Parameter`` s (and only those require grad), so
torch optimisers and the transformers ``Trainer`` train it as they would a ``PeftModel``; the base
model's parameters are frozen (``requires_grad=False``), as PEFT does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .adapter import GATE, SCALING, Adapter
from .errors import ConfigError
from .functional import functional
from .initialize import init
from .io import _check_name, load, read_config, save, state_dict
from .transforms import inject, merge, select

_SEP = "::"


def _enc(path: str, leaf: str) -> str:
    return (path + _SEP + leaf).replace(".", "·")


class AdapterModel(nn.Module):
    """A model with named adapters: ``load_adapter``, ``add_adapter``, ``set_adapter``, ...

    Arguments:
        model: the base model (e.g. a transformers ``PreTrainedModel``). Its parameters are frozen.

    Example:
        >>> m = af.AdapterModel(model)
        >>> m.load_adapter("user/repo", adapter_name="a")
        >>> m.add_adapter(af.LoraConfig(target_modules=["q_proj"]), adapter_name="b")
        >>> m.set_adapter("b"); out = m(input_ids=ids)
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self._adapters: dict[str, Adapter] = {}
        self.adapter_params = nn.ModuleDict()
        self._active: list[str] = []
        self._enabled = True
        self._fns: dict[bool, Any] = {}
        self.training = model.training

    # -- the functional core, one fn per train/eval mode ------------------------------------------
    def _fn(self) -> Any:
        mode = bool(self.training)
        if mode not in self._fns:
            self._fns[mode] = functional(self.base_model)
        return self._fns[mode]

    def train(self, mode: bool = True) -> AdapterModel:
        self.training = mode
        self.base_model.train(mode)
        return self

    @property
    def config(self) -> Any:
        return getattr(self.base_model, "config", None)

    @property
    def peft_config(self) -> dict[str, Any]:
        return {n: a.config for n, a in self._adapters.items()}

    # -- adapters --------------------------------------------------------------------------------
    def _register(self, name: str, adapter: Adapter) -> None:
        _check_name(name)
        if name in self._adapters:
            raise ConfigError(f"an adapter named {name!r} exists already; delete_adapter it first")
        holder = nn.Module()
        leaves = {}
        for path, e in adapter.entry_items:
            leaves[path] = {}
            for leaf, t in adapter.tensors[path].items():
                key = _enc(path, leaf)
                if leaf in (GATE, SCALING) or leaf in e.frozen:
                    holder.register_buffer(key, t, persistent=False)
                    leaves[path][leaf] = getattr(holder, key)
                else:
                    p = nn.Parameter(t.detach().clone(), requires_grad=False)
                    holder.register_parameter(key, p)
                    leaves[path][leaf] = p
        self.adapter_params[name] = holder
        self._adapters[name] = Adapter(adapter.method, adapter.config, adapter.entries, leaves, adapter.stack_info)
        if not self._active:
            self.set_adapter(name)

    def load_adapter(self, source: str | os.PathLike[str], adapter_name: str | None = None, **kwargs: Any) -> None:
        """Load a PEFT-format adapter (folder or Hub repo, see :func:`adaptfn.load`) under ``adapter_name``."""
        name = adapter_name or "default"
        a = load(source, adapter_name=adapter_name, **kwargs)
        self._fn()[0].check(a)
        self._register(name, a)

    def add_adapter(self, config: Any, adapter_name: str = "default",
                    generator: torch.Generator | None = None) -> None:
        """A fresh adapter from a config (:func:`adaptfn.init`)."""
        fn, _ = self._fn()
        self._register(adapter_name, init(fn, config, generator=generator))

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters active (and trainable); a list activates several whose deltas add."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self._adapters]
        if missing or not names:
            raise ConfigError(f"set_adapter: no adapter named {missing or names}; have {sorted(self._adapters)}")
        self._active = names
        self._enabled = True
        for n, holder in self.adapter_params.items():
            for p in holder.parameters():
                p.requires_grad_(n in names)

    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | None:
        return self._active[0] if self._active else None

    def enable_adapters(self) -> None:
        self._enabled = True

    def disable_adapters(self) -> None:
        self._enabled = False

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self._adapters:
            raise ConfigError(f"delete_adapter: no adapter named {adapter_name!r}; have {sorted(self._adapters)}")
        del self._adapters[adapter_name]
        del self.adapter_params[adapter_name]
        self._active = [n for n in self._active if n != adapter_name]

    def adapter(self, adapter_name: str | None = None) -> Adapter:
        """The current tree of one adapter (its leaves are this module's parameters)."""
        name = adapter_name or self.active_adapter
        if name not in self._adapters:
            raise ConfigError(f"no adapter named {name!r}; have {sorted(self._adapters)}")
        return self._adapters[name]

    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """PEFT's key names -> tensors for one adapter (the active one by default)."""
        return state_dict(self.adapter(adapter_name))

    def save_pretrained(self, save_directory: str | os.PathLike[str],
                        selected_adapters: list[str] | None = None) -> None:
        """PEFT's layout: ``default`` (or the only/first adapter) at the root, the others in sub-folders."""
        names = selected_adapters or list(self._adapters)
        if not names:
            raise ConfigError("save_pretrained: no adapters")
        root = "default" if "default" in names else names[0]
        for n in names:
            save(self.adapter(n), save_directory, adapter_name=None if n == root else n)

    # -- calls -----------------------------------------------------------------------------------
    def _current(self) -> tuple[Any, Mapping[str, torch.Tensor]]:
        fn, params = self._fn()
        if not self._enabled or not self._active:
            return fn, params
        active = select(self._adapters, self._active if len(self._active) > 1 else self._active[0])
        gen = torch.default_generator if self.training else None
        return inject(fn, active, generator=gen), params

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        g, params = self._current()
        return g(params, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        g, params = self._current()
        return g.generate(params, *args, **kwargs)

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapters into the base model's weights (in place, as PEFT does) and return it."""
        fn, params = self._fn()
        if self._active and self._enabled:
            merged = merge(params, select(self._adapters, self._active if len(self._active) > 1 else self._active[0]))
            with torch.no_grad():
                for name, module_tensor in _named_tensors(self.base_model).items():
                    new = merged.get(name)
                    if new is not None and new is not params.get(name):
                        module_tensor.copy_(new)
        return self.base_model

    def __repr__(self) -> str:
        lines = [f"AdapterModel({type(self.base_model).__name__}, active={self._active}, enabled={self._enabled})"]
        lines += [f"  {n}: {a!r}" for n, a in self._adapters.items()]
        return "\n".join(lines)


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(dict(model.named_buffers(remove_duplicate=False)))
    return out



_TASK_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def from_pretrained(adapter_source: str | os.PathLike[str], model_cls: Any = None, *,
                    adapter_name: str = "default", revision: str | None = None, token: Any = None,
                    **model_kwargs: Any) -> AdapterModel:
    """Load the base model named in the adapter's config (``base_model_name_or_path``) and the adapter.

    Arguments:
        adapter_source: an adapter folder or Hub repo id.
        model_cls: the transformers class to load the base with (default from the config's task_type,
            e.g. ``AutoModelForCausalLM``).
        model_kwargs: passed to ``model_cls.from_pretrained`` (e.g. ``torch_dtype``, ``quantization_config``).

    Returns:
        An :class:`AdapterModel` with that adapter active.
    """
    from .io import _resolve

    cfg_path, _ = _resolve(os.fspath(adapter_source), None, revision, None, token, None, False, True)
    _, config = read_config(cfg_path)
    base_name = config.base_model_name_or_path
    if not base_name:
        raise ConfigError(f"{cfg_path}: base_model_name_or_path is not set; load the base model yourself "
                          "and use AdapterModel(model).load_adapter(...)")
    if model_cls is None:
        import transformers

        model_cls = getattr(transformers, _TASK_AUTO.get(config.task_type or "", "AutoModelForCausalLM"))
    model = model_cls.from_pretrained(base_name, revision=config.revision, **model_kwargs)
    am = AdapterModel(model.eval())
    am.load_adapter(adapter_source, adapter_name=adapter_name, revision=revision, token=token)
    return am
