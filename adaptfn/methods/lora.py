"""LoRA: ``y = base(x) + scaling * B(A(dropout(x)))`` on Linear, GPT-2 Conv1D and Embedding modules, and
(:mod:`adaptfn.methods.lora_layers`) on ``nn.Conv1d/2d/3d`` and ``nn.MultiheadAttention``.

Shapes (PEFT's): ``lora_A`` [r, in], ``lora_B`` [out, r]; for embeddings ``lora_A`` [r, num_embeddings]
and ``lora_B`` [embedding_dim, r] (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``). Scaling is
``lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``) per module, from ``rank_pattern`` /
``alpha_pattern`` where a key matches.

A scale weight ``w`` (the ``coef`` leaf, :func:`adaptfn.scale`) multiplies the delta:
``y = base(x) + w * scaling * B(A(x))``. It is applied to the rank-r product ``A(x)`` (exact for ``w = 1``),
and written into ``lora_B`` when saved (``B * w``), so PEFT computes the same.

PEFT's LoRA variants live next to this file: DoRA (``use_dora=True``, entries with a ``lora_magnitude``
leaf, :mod:`adaptfn.methods.dora`) and ``lora_bias=True`` (a ``lora_bias`` leaf,
:mod:`adaptfn.methods.lora_bias`; both on convolutions: :mod:`adaptfn.methods.dora_conv`); neither can be
combined (:func:`adaptfn.combine`), as PEFT's
``add_weighted_adapter`` drops their magnitudes / biases.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import routing
from .._where import is_target
from ..adapter import COEF, GATE, SCALING, Entry
from ..errors import (
    AdapterFileError,
    ConfigError,
    IncompatibleAdapterError,
    shape_str,
    single_for_route,
    stacked_called_directly,
)
from . import dora, dora_conv, layers, lora_bias, lora_init, lora_layers, lora_params, trainable_tokens, weight_tying
from .base import COMBINE, ROUTE, SCALE, CallBase
from .common import (
    LoraFamilyConfig,
    adapter_dtype,
    dropout,
    dropout_options,
    expand_all_linear,
    is_conv1d,
    linear_dims,
    module_path,
    plan_embedding_saves,
    plan_replacements,
    weight_needs_transpose,
)
from .lora_combine import combine_lora


@functools.lru_cache(maxsize=4096, typed=True)
def _entry(kind: str, r: int, scaling: float, fan_in_fan_out: bool, options: tuple[tuple[str, Any], ...]) -> Entry:
    """A (frozen, shareable) LoRA :class:`Entry`, made once per distinct value: a load of many adapters builds
    the same few entries over and over."""
    return Entry(kind=kind, r=r, scaling=scaling, fan_in_fan_out=fan_in_fan_out, options=options)

__all__ = ["LoraConfig", "Lora"]


_OWN_FIELDS = ("target_parameters", "trainable_token_indices", "ensure_weight_tying")


@dataclasses.dataclass(frozen=True)
class LoraConfig(LoraFamilyConfig):
    """LoRA config with PEFT's field names and defaults (``peft.LoraConfig``); the fields and their checks
    are :class:`adaptfn.methods.common.LoraFamilyConfig`'s.

    Arguments:
        r: rank.
        lora_alpha: scale numerator (the scale is ``lora_alpha / r``).
        lora_dropout: dropout on the LoRA input (only with an explicit generator, see :func:`adaptfn.inject`).
        target_modules: list of names/suffixes, a regex (``re.fullmatch``) or ``"all-linear"``.
        exclude_modules: same rules, wins over targets.
        fan_in_fan_out: base weight stored [in, out] (GPT-2 Conv1D; set automatically there). Written for PEFT
            only: adaptfn reads each weight's layout from the model (:mod:`adaptfn._layout`).
        bias: "none", "all" (every ``*.bias`` is trained) or "lora_only" (biases of targeted modules).
        use_rslora: scale by ``lora_alpha / sqrt(r)``.
        modules_to_save: modules trained in full (replacements).
        layers_to_transform: restrict list targets to these block indices (with ``layers_pattern``).
        rank_pattern: per-module r, keys matched as ``(.*\\.)?(key)$``.
        alpha_pattern: per-module alpha, keys matched the same way.
        init_lora_weights: True (A kaiming-uniform, B zeros), "gaussian" (A ~ N(0, 1/r)), False (both
            random: for tests), or PEFT's "pissa", "pissa_niter_K", "olora", "orthogonal", "loftq" (with
            ``loftq_config``), "corda" (``corda_config``), "eva" (``eva_config``): see
            :mod:`adaptfn.methods.lora_init`.
        use_dora: DoRA, a trained magnitude per output channel (:mod:`adaptfn.methods.dora`).
        lora_bias: a trained bias on ``lora_B`` (:mod:`adaptfn.methods.lora_bias`).
        target_parameters: names of ``nn.Parameter``s to put LoRA on (``<module>.<parameter>``, matched by
            suffix), e.g. MoE expert weights (:mod:`adaptfn.methods.lora_params`).
        trainable_token_indices: rows of the input embedding to train (a list), or ``{module name: rows}``
            (:mod:`adaptfn.methods.trainable_tokens`).
        ensure_weight_tying: keep what the adapter does to a tied input embedding tied in the output layer
            (PEFT's rule; see :mod:`adaptfn.methods.trainable_tokens` and ``docs/methods/lora.md``).

    Every other field of PEFT's ``LoraConfig`` is accepted at its default and kept for the file (a value that
    would change the numerics raises :class:`adaptfn.ConfigError` naming it).

    Example:
        >>> cfg = af.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        >>> cfg.scaling(*cfg.rank_and_alpha("model.decoder.layers.0.self_attn.q_proj"))
        2.0
        >>> af.LoraConfig(r=8, use_dora=True, kasa_config=None).use_dora    # PEFT's fields, at their defaults
        True
        >>> try:
        ...     af.LoraConfig(kasa_config={"k": 2})
        ... except af.ConfigError as e:
        ...     print(str(e)[:40])
        LoraConfig.kasa_config={'k': 2} is not s
    """

    peft_type: ClassVar[str] = "LORA"
    # PEFT's init sub-configs are read here (adaptfn.methods.lora_init), kept in ``extra``; target_parameters,
    # trainable_token_indices and ensure_weight_tying are fields of this class
    unsupported: ClassVar[dict[str, Any]] = {k: v for k, v in lora_init.UNSUPPORTED.items() if k not in _OWN_FIELDS}
    peft_only: ClassVar[frozenset[str]] = LoraFamilyConfig.peft_only | lora_init.SUBCONFIGS

    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    ensure_weight_tying: bool = False

    def validate(self) -> None:
        """The shared checks, plus ``target_parameters`` / ``trainable_token_indices`` / ``ensure_weight_tying``."""
        super().validate()
        lora_params.validate_config(self)
        trainable_tokens.validate_config(self)

    def validate_init_mode(self) -> None:
        """PEFT's ``init_lora_weights`` values and their sub-configs (:mod:`adaptfn.methods.lora_init`)."""
        lora_init.validate_mode(self)


class Lora:
    """The LoRA method (see the module docstring)."""

    name = "lora"
    peft_type = "LORA"
    config_cls = LoraConfig
    capabilities = frozenset({ROUTE, SCALE, COMBINE})
    _SUFFIX = {"linear": ("lora_A.weight", "lora_B.weight"), "embedding": ("lora_embedding_A", "lora_embedding_B")}
    weight_kinds = frozenset({lora_params.KIND, trainable_tokens.KIND})
    """Entry kinds that change a module's tensors for the call instead of wrapping its forward: LoRA on
    parameters and trainable tokens. :func:`adaptfn.inject` swaps in what ``merge`` returns for them."""

    def variant(self, config: Any) -> tuple[str, frozenset[str]] | None:
        """The capabilities of PEFT's LoRA variants (see :func:`adaptfn.methods.require`): DoRA and
        ``lora_bias`` route and scale but do not combine."""
        found: list[tuple[str, frozenset[str]]] = []
        if getattr(config, "use_dora", False):
            found.append(("lora (DoRA, use_dora=True)", frozenset({ROUTE, SCALE})))
        if getattr(config, "lora_bias", False):
            found.append(("lora (lora_bias=True)", frozenset({ROUTE, SCALE})))
        # LoRA on parameters / trainable tokens change a weight for the whole call: not per-row separable
        if getattr(config, "target_parameters", None):
            found.append(("lora (target_parameters: a weight the module uses for every row)", frozenset({SCALE})))
        if getattr(config, "trainable_token_indices", None) is not None:
            found.append(("lora (trainable_token_indices: embedding rows every batch row shares)", frozenset({SCALE})))
        if not found:
            return None
        return " + ".join(n for n, _ in found), frozenset.intersection(*(c for _, c in found))

    # -- planning and init -------------------------------------------------------------------------
    def plan(self, config: LoraConfig, model: nn.Module) -> tuple[LoraConfig, dict[str, Entry]]:
        config = expand_all_linear(config, model)
        config, tie_case = weight_tying.rewrite(config, model)  # ensure_weight_tying: PEFT's rewrite of the names
        entries: dict[str, Entry] = {}
        modules = dict(model.named_modules())
        for path, mod in model.named_modules():
            if not path or not is_target(config, path):
                continue
            layer = lora_layers.kind_of(mod)  # convolutions, nn.MultiheadAttention
            if layer is not None:
                if layer not in dora_conv.SPECS:  # DoRA / lora_bias: convolutions yes, nn.MultiheadAttention no
                    dora_conv.refuse_on_mha(config, path)
                entries[path] = lora_layers.KINDS[layer].plan_entry(config, path, mod)
                continue
            owner = layers.mha_out_proj_of(path, modules)
            if owner is not None:
                raise IncompatibleAdapterError(
                    f"target module {path!r} is the out_proj of nn.MultiheadAttention {owner!r}, whose forward never "
                    f"calls it; target {owner!r} instead (LoRA on its in_proj and out_proj, as PEFT), or exclude "
                    f"{path!r} (exclude_modules)")
            if isinstance(mod, nn.Embedding):
                kind, fif = "embedding", False
                if config.lora_bias:
                    raise IncompatibleAdapterError(f"target module {path!r} is an nn.Embedding: lora_bias=True is "
                                                   "not supported for embeddings (PEFT refuses it too)")
            elif is_conv1d(mod):
                kind, fif = "linear", True
            elif isinstance(mod, nn.Linear):
                kind, fif = "linear", False
            else:
                raise IncompatibleAdapterError(
                    f"target module {path!r} is a {layers.layer_name(mod)}; LoRA supports nn.Linear, transformers "
                    "Conv1D, nn.Embedding, nn.Conv1d/2d/3d and nn.MultiheadAttention (check target_modules / "
                    "exclude_modules)")
            r, alpha = config.rank_and_alpha(path)
            entries[path] = Entry(kind=kind, r=r, scaling=config.scaling(r, alpha), fan_in_fan_out=fif,
                                  options=dropout_options(config))
        entries.update(lora_params.plan(config, model))  # target_parameters
        if not entries:
            raise IncompatibleAdapterError(
                f"LoraConfig.target_modules={config.target_modules!r} matches no module of "
                f"{type(model).__name__} (module names look like {_sample_paths(model)})")
        if not config.fan_in_fan_out and any(e.fan_in_fan_out for e in entries.values()):
            config = dataclasses.replace(config, fan_in_fan_out=True)  # as PEFT records it for Conv1D models
        entries = plan_embedding_saves(config, model, plan_replacements(config, model, entries))
        entries = weight_tying.plan(config, model, entries, tie_case)  # the tied modules follow the embedding
        entries.update(trainable_tokens.plan(config, model, entries))  # trainable_token_indices
        return config, entries

    def init_leaves(self, config: LoraConfig, path: str, entry: Entry, module: nn.Module,
                    generator: torch.Generator | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        if entry.kind in lora_layers.KINDS:
            out = lora_layers.KINDS[entry.kind].init_leaves(config, entry, module, generator, dtype)
            return dora_conv.init_variants(config, entry, module, out, generator)  # DoRA / lora_bias on convs
        if entry.kind == lora_params.KIND:
            return lora_params.init_leaves(config, entry, module, generator, dtype)
        if entry.kind == trainable_tokens.KIND:
            return trainable_tokens.init_leaves(config, path, entry, module, generator, dtype)
        w = module.weight
        dt = dtype or adapter_dtype(w)
        if entry.kind == "embedding":
            n_in, n_out = module.num_embeddings, module.embedding_dim
        else:
            n_in, n_out = linear_dims(module)
        r = entry.r
        A = torch.empty(r, n_in, dtype=torch.float32, device=w.device)
        B = torch.empty(n_out, r, dtype=torch.float32, device=w.device)
        mode = config.init_lora_weights
        if entry.kind == "embedding":
            if mode is False:
                A.normal_(generator=generator)
            else:
                A.zero_()
            B.normal_(generator=generator)
        else:
            layers.init_lora_pair(A, B, r, mode, generator)
        out = {"lora_A": A.to(dt), "lora_B": B.to(dt)}
        if config.lora_bias:
            out[lora_bias.LEAF] = lora_bias.init(n_out, r, mode is False, generator, w.device).to(dt)
        if config.use_dora:  # PEFT: the norm of the initialised weight, so the adapter starts as plain LoRA
            out[dora.MAGNITUDE] = dora.init_magnitude(entry, module, A, B).to(dt)
        return out

    # -- compute -----------------------------------------------------------------------------------
    @staticmethod
    def _scale(entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any) -> Any:
        s: Any = leaves[SCALING].detach() if SCALING in leaves else entry.scaling
        if on is not True:
            s = s * on
        return s

    def forward(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: CallBase, module: nn.Module, x: torch.Tensor,
                route: torch.Tensor | None = None) -> torch.Tensor:
        if entry.kind in self.weight_kinds:  # functional swaps the tensors in; never a module forward
            raise IncompatibleAdapterError(f"module {module_path(module)!r}: a {entry.kind!r} entry changes the "
                                           "module's tensors (af.inject / af.merge), it has no forward of its own")
        if dora.MAGNITUDE in leaves:
            return dora.forward(self, entry, leaves, on, generator, call_base, module, x, route)
        if entry.kind in lora_layers.KINDS:
            kind = lora_layers.KINDS[entry.kind]
            out = kind.forward(self, entry, leaves, on, generator, call_base, module, x, route)
            return out if lora_bias.LEAF not in leaves else dora_conv.add_bias(entry, leaves, on, out, route)
        out = self._forward_lora(entry, leaves, on, generator, call_base, module, x, route)
        if lora_bias.LEAF in leaves and route is None:
            out = lora_bias.add(out, leaves, self._scale(entry, leaves, on))
        return out

    def _forward_lora(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                      call_base: CallBase, module: nn.Module, x: torch.Tensor,
                      route: torch.Tensor | None = None) -> torch.Tensor:
        A, B = leaves["lora_A"], leaves["lora_B"]
        if route is not None:
            return self._routed(entry, leaves, on, generator, call_base, module, x, route)
        if A.dim() != 2:
            raise stacked_called_directly(module_path(module))
        s = self._scale(entry, leaves, on)
        c = leaves.get(COEF)  # a scale weight multiplies the rank-r product (exact for c == 1)
        if entry.kind == "linear":
            gemm = routing.base_gemm(call_base, module, x, A, B) if c is None else routing.base_gemm(
                call_base, module, x, A, B, c)
        else:
            gemm = None
        if gemm is not None:
            # inference on a plain Linear / Conv1D: bias + s * (x A^T) B^T first, then the base GEMM
            # accumulates into that buffer (one pass over [..., out] fewer than adding afterwards)
            h = x if generator is None else dropout(entry, generator, x)
            return routing.lowrank_then_base(h, x, A, B, s, gemm, c)
        out = call_base(x)
        if entry.kind == "embedding":
            m: Any = module
            h = F.embedding(x, A.T, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
            if c is not None:
                h = h * c.to(h.dtype)
            delta = h @ B.T
        else:
            h = dropout(entry, generator, x if x.dtype == A.dtype else x.to(A.dtype))
            h = F.linear(h, A)  # [..., r]
            if c is not None:
                h = h * c.to(h.dtype)
            if out.dtype == B.dtype and out.dim() >= 2 and out.shape[:-1] == h.shape[:-1]:
                # one fused GEMM: out + s * (h @ B^T), no separate scale and add passes over [..., out]
                h2, o2 = h.reshape(-1, h.shape[-1]), out.reshape(-1, out.shape[-1])
                if not isinstance(s, float):
                    h2, s = h2 * s, 1.0
                if routing.in_place_ok(out, h2, B):  # add into the base output: no new [..., out] buffer
                    o2.addmm_(h2, B.T, alpha=s)
                    return out
                return torch.addmm(o2, h2, B.T, alpha=s).view(out.shape)
            delta = F.linear(h, B)
        return (out + delta * s).to(out.dtype)

    def _routed(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: CallBase, module: nn.Module, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """Row i of the batch uses adapter ``route[i]`` of the stack (-1: the base alone)."""
        A, B = leaves["lora_A"], leaves["lora_B"]
        if A.dim() != 3:
            raise single_for_route()
        c = leaves.get(COEF)  # [N] scale weights: differentiable, unlike the detached scaling leaf

        def scale() -> torch.Tensor:  # [N]: per-adapter scale (times its weight), 0 where the gate is off
            s = leaves[SCALING].detach() if SCALING in leaves else torch.full(
                (A.shape[0],), entry.scaling, dtype=torch.float32, device=A.device)
            if c is not None:
                s = s * c
            return s if on is True else s * on

        if entry.kind == "embedding":
            out = call_base(x)
            return (out + routing.embedding_lowrank(x, A, B, scale(), route)).to(out.dtype)
        sources = ((leaves[SCALING], leaves[GATE]) + (() if c is None else (c,))) if SCALING in leaves else None
        # scaling / gate enter detached: not checked; a weight may need its gradient
        gemm = routing.base_gemm(call_base, module, x, A, B) if c is None else routing.base_gemm(
            call_base, module, x, A, B, c)
        out = None if gemm is not None else call_base(x)
        h = dropout(entry, generator, x if x.dtype == A.dtype else x.to(A.dtype))
        out = routing.lowrank_add(out, h, A, B, scale, route, sources=sources, gemm=gemm, base_input=x)
        return out if lora_bias.LEAF not in leaves else lora_bias.add_routed(out, leaves, scale(), route)

    def merge(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
              tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"weight": W + scaling * B @ A}`` (transposed for Conv1D's [in, out] and embeddings' [num, dim]; a
        convolution's delta as a conv weight; nn.MultiheadAttention: ``in_proj_weight`` and ``out_proj.weight``),
        added in the wider dtype and rounded once, as PEFT's in-place ``weight += delta`` does (DoRA:
        :func:`adaptfn.methods.dora.merge`; ``lora_bias``: the bias gets ``scaling * b`` too)."""
        if entry.kind == lora_params.KIND:
            return lora_params.updated(entry, leaves, on, tensors)
        if entry.kind == trainable_tokens.KIND:
            return trainable_tokens.updated(entry, leaves, on, tensors)
        if dora.MAGNITUDE in leaves:
            return dora.merge(entry, leaves, on, tensors)
        if entry.kind in lora_layers.KINDS:
            out = lora_layers.KINDS[entry.kind].merge(self, entry, leaves, on, tensors)
            if lora_bias.LEAF in leaves:
                out.update(lora_bias.merge_bias(leaves, on, lora_bias.scale_of(entry, leaves), tensors))
            return out
        weight = tensors["weight"]
        A, B = leaves["lora_A"], leaves["lora_B"]
        delta = B @ A  # [out, in]
        c = leaves.get(COEF)
        if c is not None:
            delta = delta * c.to(delta.dtype)
        delta = delta * self._scale(entry, leaves, on)
        if entry.kind == "embedding" or weight_needs_transpose(weight, delta.shape, entry.fan_in_fan_out):
            delta = delta.T
        out = {"weight": (weight + delta).to(weight.dtype)}
        if lora_bias.LEAF in leaves:
            out.update(lora_bias.merge_bias(leaves, on, lora_bias.scale_of(entry, leaves), tensors))
        return out

    def off(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if dora.MAGNITUDE in leaves:
            raise dora.off_error()
        if entry.kind == trainable_tokens.KIND:
            raise ConfigError("a masked-off trainable-tokens entry cannot be written in PEFT's format (the file holds "
                              "the rows' values, and the base rows are not part of the adapter); drop it with "
                              "af.select first")
        if entry.kind == lora_params.KIND:
            return {n: (torch.zeros_like(t) if n == "lora_B" or n.startswith("lora_B_") else t)
                    for n, t in leaves.items()}
        out = {**leaves, "lora_B": torch.zeros_like(leaves["lora_B"])}
        if "out_lora_B" in leaves:  # nn.MultiheadAttention's out_proj pair
            out["out_lora_B"] = torch.zeros_like(leaves["out_lora_B"])
        if lora_bias.LEAF in leaves:
            out[lora_bias.LEAF] = torch.zeros_like(leaves[lora_bias.LEAF])
        return out

    # -- checks against a model -------------------------------------------------------------------
    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
        if entry.kind == lora_params.KIND:
            return lora_params.check(path, entry, leaves, module)
        if entry.kind == trainable_tokens.KIND:
            return trainable_tokens.check(path, entry, leaves, module)
        if entry.kind in lora_layers.KINDS:
            lora_layers.KINDS[entry.kind].check(path, entry, leaves, module)
            return dora_conv.check_variants(path, entry, leaves, module)
        A, B = leaves["lora_A"], leaves["lora_B"]
        if entry.kind == "embedding":
            if not isinstance(module, nn.Embedding):
                raise IncompatibleAdapterError(
                    f"module {path!r}: the adapter has an embedding LoRA but the model has a "
                    f"{layers.layer_name(module)}")
            n_in, n_out = module.num_embeddings, module.embedding_dim
        else:
            if not (isinstance(module, nn.Linear) or is_conv1d(module)):
                raise IncompatibleAdapterError(
                    f"module {path!r}: the adapter has a linear LoRA but the model has a {layers.layer_name(module)}")
            n_in, n_out = linear_dims(module)
        if tuple(A.shape[-1:]) != (n_in,) or tuple(B.shape[-2:-1]) != (n_out,):
            raise IncompatibleAdapterError(
                f"module {path!r}: lora_A {shape_str(A.shape)} / lora_B {shape_str(B.shape)} do not fit "
                f"{type(module).__name__} with in={n_in}, out={n_out} (expected lora_A [r, {n_in}], "
                f"lora_B [{n_out}, r])")
        if dora.MAGNITUDE in leaves:
            dora.check(path, entry, leaves)
        if lora_bias.LEAF in leaves:
            lora_bias.check(path, leaves, n_out)

    # -- PEFT files ------------------------------------------------------------------------------
    def delta_suffixes(self) -> tuple[str, ...]:
        # nn.MultiheadAttention's out_proj keys first: they end like a Linear's
        # LoRA on parameters' nested keys (base_layer.lora_A.weight, ...) before the plain ones they end like
        return (*lora_params.file_suffixes(), trainable_tokens.PEFT_KEY, *lora_layers.MHA_SUFFIXES, "lora_A.weight",
                "lora_B.weight", "lora_embedding_A", "lora_embedding_B",
                dora.PEFT_KEY, lora_bias.PEFT_KEY)

    def to_peft(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's tensors; a scale weight is folded into ``lora_B`` (``B * w``) and ``lora_B.bias``; DoRA's
        magnitude is written as it is (a weight other than 1 raises, see :mod:`adaptfn.methods.dora`)."""
        if entry.kind == lora_params.KIND:
            return lora_params.to_peft(entry, leaves)
        if entry.kind == trainable_tokens.KIND:
            return trainable_tokens.to_peft(entry, leaves)
        if entry.kind in lora_layers.KINDS:
            return dora_conv.to_peft(entry, leaves, lora_layers.KINDS[entry.kind].to_peft(entry, leaves))
        a, b = self._SUFFIX[entry.kind]
        B = leaves["lora_B"]
        c = leaves.get(COEF)
        out = {a: leaves["lora_A"], b: B if c is None else B * c.to(B.dtype)}
        if dora.MAGNITUDE in leaves:
            out[dora.PEFT_KEY] = dora.to_peft(entry, leaves)
        if lora_bias.LEAF in leaves:
            bias = leaves[lora_bias.LEAF]
            out[lora_bias.PEFT_KEY] = bias if c is None else bias * c.to(bias.dtype)
        return out

    def from_peft(self, config: LoraConfig, path: str, found: Mapping[str, torch.Tensor],
                  source: str) -> tuple[Entry, dict[str, torch.Tensor]]:
        if trainable_tokens.PEFT_KEY in found:
            return trainable_tokens.from_peft(config, path, found, source)
        on_params = lora_params.from_peft(config, path, found, source)  # target_parameters
        if on_params is not None:
            return on_params
        layer = lora_layers.kind_from_file(found)  # convolutions, nn.MultiheadAttention
        if layer is not None:  # DoRA / lora_bias on convolutions included
            return dora_conv.from_peft(config, path, found, source, layer)
        kind = "embedding" if "lora_embedding_A" in found or "lora_embedding_B" in found else "linear"
        a_key, b_key = self._SUFFIX[kind]
        variants = (dora.PEFT_KEY, lora_bias.PEFT_KEY)
        need = [a_key, b_key]
        if config.use_dora:
            need.append(dora.PEFT_KEY)
        if config.lora_bias and kind != "embedding":
            need.append(lora_bias.PEFT_KEY)
        for k in need:
            if k not in found:
                raise AdapterFileError(f"{source}: module {path!r} has {sorted(found)} but no {k!r}"
                                       + (" (the config says use_dora / lora_bias)" if k in variants else ""))
        if len(found) != len(need):  # every needed key is there: any other is one too many
            extra = sorted(set(found) - set(need))
            if any(k in variants for k in extra):
                raise AdapterFileError(f"{source}: module {path!r} has {extra} but the config has use_dora="
                                       f"{config.use_dora}, lora_bias={config.lora_bias}")
            raise AdapterFileError(f"{source}: module {path!r} mixes LoRA kinds: {sorted(found)}")
        A, B = found[a_key], found[b_key]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterFileError(
                f"{source}: module {path!r}: {a_key} {shape_str(A.shape)} and {b_key} {shape_str(B.shape)} are not a "
                "LoRA pair of a layer kind adaptfn (and PEFT) supports: [r, in] and [out, r] (Linear / Conv1D / "
                "Embedding), [r, in, *kernel] and [out, r / groups, 1, ...] (nn.Conv1d/2d/3d)")
        if not is_target(config, path):
            tying = (" (nor is it the transposed copy of an embedding LoRA that ensure_weight_tying=True ties to it)"
                     if getattr(config, "ensure_weight_tying", False) else "")
            raise AdapterFileError(
                f"{source}: key {path}.{a_key} is for module {path!r}, which adapter_config.json's "
                f"target_modules={config.target_modules!r} does not target{tying}")
        r, alpha = config.rank_and_alpha(path)
        if A.shape[0] != r:
            raise AdapterFileError(
                f"{source}: module {path!r} has rank {A.shape[0]} ({a_key} {shape_str(A.shape)}) but the config "
                f"gives r={r} for it (r / rank_pattern)")
        entry = _entry(kind, r, config.scaling(r, alpha), False if kind == "embedding" else bool(config.fan_in_fan_out),
                       dropout_options(config))
        leaves = {"lora_A": A, "lora_B": B}
        try:
            if dora.PEFT_KEY in found:
                leaves[dora.MAGNITUDE] = found[dora.PEFT_KEY]
                dora.check(path, entry, leaves)
            if lora_bias.PEFT_KEY in found:
                leaves[lora_bias.LEAF] = found[lora_bias.PEFT_KEY]
                lora_bias.check(path, leaves, B.shape[0])
        except IncompatibleAdapterError as e:
            raise AdapterFileError(f"{source}: {e}") from None
        return entry, leaves

    def combine(self, adapters: Any, weights: Any, spec: Any) -> Any:
        """PEFT's ``LoraModel.add_weighted_adapter`` (see :func:`adaptfn.combine` and
        :mod:`adaptfn.methods.lora_combine`)."""
        return combine_lora(self, adapters, weights, spec)

    # -- stacking --------------------------------------------------------------------------------
    def pad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        if entry.kind == lora_params.KIND:
            return lora_params.pad(entry, leaves, r)
        if entry.kind == trainable_tokens.KIND:
            return dict(leaves)
        if entry.kind in lora_layers.KINDS:
            return lora_layers.KINDS[entry.kind].pad(entry, leaves, r)
        A, B = leaves["lora_A"], leaves["lora_B"]
        extra = r - A.shape[0]
        if extra == 0:
            return dict(leaves)
        return {**leaves, "lora_A": F.pad(A, (0, 0, 0, extra)), "lora_B": F.pad(B, (0, extra))}

    def unpad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        if entry.kind == lora_params.KIND:
            return lora_params.unpad(entry, leaves, r)
        if entry.kind == trainable_tokens.KIND:
            return dict(leaves)
        if entry.kind in lora_layers.KINDS:
            return lora_layers.KINDS[entry.kind].unpad(entry, leaves, r)
        return {**leaves, "lora_A": leaves["lora_A"][:r], "lora_B": leaves["lora_B"][:, :r]}


def _sample_paths(model: nn.Module, n: int = 4) -> list[str]:
    paths = [p for p, m in model.named_modules() if p and not list(m.children())]
    return paths[:n]

