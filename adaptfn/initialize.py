"""``init(fn, config, generator=...)``: a fresh adapter for a model, initialised as PEFT does; the pair form
``params2, a = init(fn, config, params=params)`` also returns the base weights an init changes (PiSSA, OLoRA,
LoftQ, CorDA: :mod:`adaptfn.methods.lora_init`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, overload

import torch

from .adapter import GATE, Adapter
from .errors import ConfigError
from .functional import FunctionalModel
from .methods import lora_init, method_for_config
from .methods.base import SharedTensors
from .methods.common import with_task_defaults

__all__ = ["init"]


@overload
def init(fn: FunctionalModel, config: Any, *, params: None = None, generator: torch.Generator | None = None,
         dtype: torch.dtype | None = None, data: Iterable[Any] | None = None) -> Adapter: ...


@overload
def init(fn: FunctionalModel, config: Any, *, params: Mapping[str, torch.Tensor],
         generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
         data: Iterable[Any] | None = None) -> tuple[dict[str, torch.Tensor], Adapter]: ...


def init(
    fn: FunctionalModel,
    config: Any,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    data: Iterable[Any] | None = None,
) -> Adapter | tuple[dict[str, torch.Tensor], Adapter]:
    """Make a fresh adapter for the model behind ``fn``.

    Arguments:
        fn: from :func:`adaptfn.functional`.
        config: an adapter config (e.g. :class:`adaptfn.LoraConfig`); ``"all-linear"`` targets are
            expanded to module names, as PEFT saves them, and PEFT's task defaults apply: ``task_type``
            ``"SEQ_CLS"`` / ``"TOKEN_CLS"`` add ``"classifier"`` and ``"score"`` to ``modules_to_save``,
            ``"QUESTION_ANS"`` adds ``"qa_outputs"`` (names the model lacks are skipped), as PEFT's task models do.
        params: the base parameters to initialise from (e.g. the dict :func:`adaptfn.functional` returned). Given,
            ``init`` returns the pair ``(params2, adapter)``: ``params2`` a new dict, equal to ``params`` except
            for the weights the init changes (new tensors; PiSSA / OLoRA / LoftQ / CorDA: see
            :mod:`adaptfn.methods.lora_init`). Required for those inits; ``params`` is never modified.
        generator: drives every random draw (deterministic for a seeded generator).
        dtype: leaf dtype; default as PEFT: the base weight's, float32 for fp16/bf16/quantized bases.
        data: calibration batches for ``init_lora_weights="corda"`` (dicts of keyword arguments of ``fn``, tuples
            of positional ones, or tensors), run through the base model once.

    Returns:
        An :class:`Adapter`: LoRA ``lora_A`` [r, in] kaiming-uniform (or N(0, 1/r) for "gaussian")
        and ``lora_B`` [out, r] zeros, so the adapted model starts equal to the base (``lora_bias``: zeros;
        DoRA: the magnitude is the norm of each output channel of ``W + scaling * B @ A``, PEFT's init);
        ``modules_to_save`` and trained biases start as copies of the base tensors. With ``params=``: the pair
        ``(params2, adapter)``.

    Raises:
        ConfigError: a bad argument; an init that changes base weights without ``params=``; ``data`` for an init
            that takes none (or none for CorDA).

    Example:
        >>> a = af.init(fn, af.LoraConfig(r=8, target_modules=["q_proj"]), generator=torch.Generator().manual_seed(0))
        >>> params2, a = af.init(fn, af.LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights="pissa"),
        ...                      params=params)   # q_proj.weight [out, in] -> the residual W - s B A in params2
    """
    if not isinstance(fn, FunctionalModel):
        raise ConfigError(f"init: expected the fn from af.functional(model), got {type(fn).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"init: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
                              or "float8" in str(dtype)):
        raise ConfigError(f"init: dtype must be a floating torch.dtype or None, got {dtype!r}")
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError(f"init: params must be a mapping of parameter names to tensors (the dict af.functional "
                          f"returned), got {type(params).__name__}")
    method = method_for_config(config)
    mode = lora_init.mode_of(config) if method.name == "lora" else None
    if mode in lora_init.BASE_CHANGING and params is None:
        raise ConfigError(
            f"init: init_lora_weights={config.init_lora_weights!r} changes the base weights; use the pair form "
            "params2, adapter = af.init(fn, cfg, params=params), and run the adapter with params2")
    if data is not None and mode != "corda":
        raise ConfigError(f"init: data= is only used by init_lora_weights='corda', not "
                          f"{getattr(config, 'init_lora_weights', None)!r}")
    model = fn.model
    config = with_task_defaults(config)  # PEFT's task models add their heads to modules_to_save
    config, entries = method.plan(config, model)
    if config.base_model_name_or_path is None:
        name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        if name:
            config = dataclasses.replace(config, base_model_name_or_path=str(name))
    modules = dict(model.named_modules(remove_duplicate=False))
    base_params = fn.params if params is None else params
    init_leaves, new_base = method.init_leaves, {}
    if mode is not None:  # PEFT's other inits (PiSSA, OLoRA, ...): computed up front, in module order
        init_leaves, new_base = lora_init.prepare(fn, config, entries, base_params, generator, dtype, data)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for path, e in entries.items():
        leaves: dict[str, torch.Tensor] = {}
        module = modules[path]
        if e.kind:
            leaves.update(init_leaves(config, path, e, module, generator, dtype))
        for name in e.replaced:
            key = f"{path}.{name}" if path else name
            if key not in base_params:
                raise ConfigError(f"init: params has no {key!r} (module {path!r} is in modules_to_save / trained)")
            base = base_params[key]
            if name in e.frozen:  # carried for PEFT's file format only: share, never copy
                leaves[name] = base
            elif dtype is None or not base.is_floating_point():
                leaves[name] = base.detach().clone()
            else:
                leaves[name] = base.to(dtype, copy=True)
        ref = next(iter(leaves.values()))
        leaves[GATE] = torch.ones((), dtype=torch.float32, device=ref.device)
        tensors[path] = leaves
    if isinstance(method, SharedTensors):  # tensors every module shares (VeRA's projections)
        tensors = method.shared_init(config, model, entries, tensors)
    adapter = Adapter(method.name, config, entries, tensors)
    if params is None:
        return adapter
    return {**params, **new_base}, adapter
