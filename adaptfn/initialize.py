"""``init(fn, config, generator=...)``: a fresh adapter for a model, initialised as PEFT does."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .adapter import GATE, Adapter
from .errors import ConfigError
from .functional import FunctionalModel
from .methods import method_for_config
from .methods.base import SharedTensors
from .methods.common import with_task_defaults

__all__ = ["init"]


def init(
    fn: FunctionalModel,
    config: Any,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Adapter:
    """Make a fresh adapter for the model behind ``fn``.

    Arguments:
        fn: from :func:`adaptfn.functional`.
        config: an adapter config (e.g. :class:`adaptfn.LoraConfig`); ``"all-linear"`` targets are
            expanded to module names, as PEFT saves them, and PEFT's task defaults apply: ``task_type``
            ``"SEQ_CLS"`` / ``"TOKEN_CLS"`` add ``"classifier"`` and ``"score"`` to ``modules_to_save``,
            ``"QUESTION_ANS"`` adds ``"qa_outputs"`` (names the model lacks are skipped), as PEFT's task models do.
        generator: drives every random draw (deterministic for a seeded generator).
        dtype: leaf dtype; default as PEFT: the base weight's, float32 for fp16/bf16/quantized bases.

    Returns:
        An :class:`Adapter`: LoRA ``lora_A`` [r, in] kaiming-uniform (or N(0, 1/r) for "gaussian")
        and ``lora_B`` [out, r] zeros, so the adapted model starts equal to the base (``lora_bias``: zeros;
        DoRA: the magnitude is the norm of each output channel of ``W + scaling * B @ A``, PEFT's init);
        ``modules_to_save`` and trained biases start as copies of the base tensors.

    Example:
        >>> a = af.init(fn, af.LoraConfig(r=8, target_modules=["q_proj"]), generator=torch.Generator().manual_seed(0))
    """
    if not isinstance(fn, FunctionalModel):
        raise ConfigError(f"init: expected the fn from af.functional(model), got {type(fn).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"init: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
                              or "float8" in str(dtype)):
        raise ConfigError(f"init: dtype must be a floating torch.dtype or None, got {dtype!r}")
    method = method_for_config(config)
    model = fn.model
    config = with_task_defaults(config)  # PEFT's task models add their heads to modules_to_save
    config, entries = method.plan(config, model)
    if config.base_model_name_or_path is None:
        name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        if name:
            config = dataclasses.replace(config, base_model_name_or_path=str(name))
    modules = dict(model.named_modules(remove_duplicate=False))
    params = fn.params
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for path, e in entries.items():
        leaves: dict[str, torch.Tensor] = {}
        module = modules[path]
        if e.kind:
            leaves.update(method.init_leaves(config, path, e, module, generator, dtype))
        for name in e.replaced:
            base = params[f"{path}.{name}" if path else name]
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
    return Adapter(method.name, config, entries, tensors)
