"""LoRA on convolutions (``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``) and ``nn.MultiheadAttention``: the
entry kinds ``"conv1d"``, ``"conv2d"``, ``"conv3d"`` and ``"mha"`` of :class:`adaptfn.methods.lora.Lora`, which
hands every entry of these kinds to the object in :data:`KINDS` (geometry and kernels:
:mod:`adaptfn.methods.layers`).

Shapes (PEFT's, per module; ``g`` is the convolution's ``groups``, ``k`` its kernel size):

* ``conv1d`` / ``conv2d`` / ``conv3d``: ``lora_A`` [r, in, *k] (a convolution with the base's geometry) and
  ``lora_B`` [out, r / g, 1, ...] (a 1x1 convolution with the base's groups); PEFT keys ``lora_A.weight``,
  ``lora_B.weight``.
* ``mha``: ``lora_A`` [r, E] and ``lora_B`` [3E, r] on ``in_proj_weight`` (PEFT keys ``lora_A.weight``,
  ``lora_B.weight``), ``out_lora_A`` [r, E] and ``out_lora_B`` [E, r] on ``out_proj.weight`` (PEFT keys
  ``base_layer.out_proj.lora_A.weight``, ``base_layer.out_proj.lora_B.weight``); one rank and scale for both.

* conv: ``y = base(x) + scaling * B(A(dropout(x)))``; merge adds ``scaling * B . A`` (a conv weight [out, in,
  *k], :func:`adaptfn.methods.layers.conv_delta`) to the weight; grouped convolutions (``g > 1``) do not merge
  (the delta spans all input channels; PEFT refuses too) and need ``r % g == 0``.
* mha: the layer runs with ``in_proj_weight + scaling * B A`` and ``out_proj.weight + 2 * scaling * B_o A_o``
  (PEFT merges them around its forward; no dropout, as in PEFT); merge writes both. The 2 is PEFT 0.21.2's:
  its ``MultiheadAttention.merge`` writes ``W_o + d`` into ``out_proj`` and then calls ``out_proj.merge()``, which
  adds ``d`` again, in its unmerged forward (merge, call, unmerge) and in ``merge_and_unload`` alike (reported
  upstream: peft#3774, open). An adapter trained with PEFT 0.21 learned with that factor, and PEFT 0.21 computes
  it for any file it loads, so adaptfn computes it too (:data:`PEFT_OUT_PROJ_FACTOR`): a file means the same in
  both libraries, both ways.

Example (shapes as PEFT saves them):

    >>> from torch import nn
    >>> net = nn.ModuleDict({"conv": nn.Conv2d(4, 6, 3, stride=2, groups=2), "attn": nn.MultiheadAttention(6, 2)})
    >>> a = af.init(af.functional(net)[0], af.LoraConfig(r=4, target_modules=["conv", "attn"]))
    >>> [(p, e.kind) for p, e in a.entry_items]
    [('attn', 'mha'), ('conv', 'conv2d')]
    >>> for k, v in af.state_dict(a).items():
    ...     print(k, list(v.shape))
    base_model.model.attn.lora_A.weight [4, 6]
    base_model.model.attn.lora_B.weight [18, 4]
    base_model.model.attn.base_layer.out_proj.lora_A.weight [4, 6]
    base_model.model.attn.base_layer.out_proj.lora_B.weight [6, 4]
    base_model.model.conv.lora_A.weight [4, 4, 3, 3]
    base_model.model.conv.lora_B.weight [6, 2, 1, 1]

    A convolution's delta merges as a conv weight (``groups=1``); a grouped one runs unmerged only:

    >>> seq = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.Conv2d(6, 5, 3, dilation=2, padding=2))
    >>> fn2, params2 = af.functional(seq)
    >>> b = af.init(fn2, af.LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False),
    ...             generator=torch.Generator().manual_seed(0))
    >>> x = torch.randn(3, 4, 9, 9)
    >>> af.inject(fn2, b)(params2, x).shape
    torch.Size([3, 5, 4, 4])
    >>> dense = af.select(b, ["1"])
    >>> torch.allclose(fn2(af.merge(params2, dense), x), af.inject(fn2, dense)(params2, x), atol=1e-5)
    True
    >>> af.merge(params2, b)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    adaptfn.errors.IncompatibleAdapterError: merge: module '0': the weight [6, 2, 3, 3] is a grouped convolution's ...

DoRA (``use_dora=True``) and ``lora_bias=True`` on convolutions: :mod:`adaptfn.methods.dora_conv` (the LoRA method
hands it the entries with a ``lora_magnitude`` / ``lora_bias`` leaf, and their files' extra keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import routing
from .._where import is_target
from ..adapter import COEF, SCALING, Entry
from ..errors import AdapterFileError, IncompatibleAdapterError, shape_str, single_for_route, stacked_called_directly
from . import layers
from .common import adapter_dtype, dropout, dropout_options, module_path

__all__ = ["ConvLora", "MhaLora", "KINDS", "kind_of", "kind_from_file", "MHA_SUFFIXES", "MHA_LEAVES",
           "PEFT_OUT_PROJ_FACTOR"]

MHA_SUFFIXES = ("base_layer.out_proj.lora_A.weight", "base_layer.out_proj.lora_B.weight")
MHA_LEAVES = ("out_lora_A", "out_lora_B")
_MHA = frozenset(MHA_SUFFIXES)
_A, _B = "lora_A.weight", "lora_B.weight"
PEFT_OUT_PROJ_FACTOR = 2
"""How many times PEFT 0.21.2 adds an nn.MultiheadAttention's out_proj delta (see the module docstring)."""


def _routed_scale(entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, n: int, device: Any) -> torch.Tensor:
    """[N] per-adapter scale of a stacked entry: its scaling leaf (detached), times its weight, 0 where off."""
    s = leaves[SCALING].detach() if SCALING in leaves else torch.full((n,), entry.scaling, dtype=torch.float32,
                                                                      device=device)
    c = leaves.get(COEF)
    if c is not None:
        s = s * c
    return s if on is True else s * on


def _file_entry(config: Any, path: str, r: int, kind: str, a_key: str, A: torch.Tensor, source: str) -> Entry:
    """The entry of one module read from a file, after the checks every LoRA kind shares."""
    if not is_target(config, path):
        raise AdapterFileError(
            f"{source}: key {path}.{a_key} is for module {path!r}, which adapter_config.json's "
            f"target_modules={config.target_modules!r} does not target")
    r_cfg, alpha = config.rank_and_alpha(path)
    if r != r_cfg:
        raise AdapterFileError(
            f"{source}: module {path!r} has rank {r} ({a_key} {shape_str(A.shape)}) but the config gives r={r_cfg} "
            "for it (r / rank_pattern)")
    return Entry(kind=kind, r=r, scaling=config.scaling(r, alpha), fan_in_fan_out=False,
                 options=dropout_options(config))


class ConvLora:
    """LoRA on ``nn.Conv{nd}d`` (see the module docstring)."""

    def __init__(self, nd: int) -> None:
        self.nd = nd
        self.kind = f"conv{nd}d"

    # -- planning and init -----------------------------------------------------------------------------
    def plan_entry(self, config: Any, path: str, module: nn.Module) -> Entry:
        r, alpha = config.rank_and_alpha(path)
        _, _, g, _ = layers.conv_dims(module)
        if r % g:
            raise IncompatibleAdapterError(
                f"target module {path!r} is a {layers.layer_name(module)} and its LoRA rank is r={r}: LoRA on a "
                f"grouped convolution needs r % groups == 0 (PEFT's rule; give it another rank with rank_pattern, "
                "or exclude it)")
        return Entry(kind=self.kind, r=r, scaling=config.scaling(r, alpha), fan_in_fan_out=False,
                     options=dropout_options(config))

    def init_leaves(self, config: Any, entry: Entry, module: nn.Module, generator: torch.Generator | None,
                    dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        w: Any = module.weight
        n_in, n_out, g, k = layers.conv_dims(module)
        r = entry.r
        A = torch.empty(r, n_in, *k, dtype=torch.float32, device=w.device)
        B = torch.empty(n_out, r // g, *([1] * self.nd), dtype=torch.float32, device=w.device)
        layers.init_lora_pair(A, B, r, config.init_lora_weights, generator)
        dt = dtype or adapter_dtype(w)
        return {"lora_A": A.to(dt), "lora_B": B.to(dt)}

    # -- compute -----------------------------------------------------------------------------------------
    def lowrank(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, module: nn.Module,
                coef: torch.Tensor | None = None) -> torch.Tensor:
        """``B(A(x))`` unscaled [batch, out, *spatial_out] (times ``coef`` on the rank-r product)."""
        return layers.conv_lowrank(x, A, B, module, self.nd, coef)

    def delta_weight(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """The unscaled delta as a conv weight [out, in, *k] (``groups=1``)."""
        return layers.conv_delta(A, B, self.nd)

    def forward(self, lora: Any, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: Any, module: nn.Module, x: torch.Tensor, route: torch.Tensor | None) -> torch.Tensor:
        A, B = leaves["lora_A"], leaves["lora_B"]
        if route is not None:
            return self._routed(entry, leaves, on, generator, call_base, module, x, route)
        if A.dim() != self.nd + 2:
            raise stacked_called_directly(module_path(module))
        if x.dim() == self.nd + 1:  # an unbatched input: a batch of one
            return self.forward(lora, entry, leaves, on, generator, call_base, module, x.unsqueeze(0), None)[0]
        s = lora._scale(entry, leaves, on)
        c = leaves.get(COEF)
        if (type(s) is float and (generator is None or not entry.option("dropout", 0.0))
                and layers.weight_kernel_ok(call_base, module, x, A, B, *(() if c is None else (c,)))):
            # inference: one convolution with W + s * B . A (the merged model's computation; cheaper than the
            # low-rank pair whenever the batch has more output pixels than the layer has output channels)
            return layers.conv_with_delta(module, x, A if c is None else A * c.to(A.dtype), B, s)
        out = call_base(x)
        h = dropout(entry, generator, x if x.dtype == A.dtype else x.to(A.dtype))
        h = layers.conv_a(h, A, module, self.nd)  # [n, r, *sp], fresh
        if c is not None:
            h = h * c.to(h.dtype)
        g = layers.conv_groups(A, B, self.nd)
        if (g == 1 and type(s) is float and out.dtype == B.dtype and out.shape[2:] == h.shape[2:]
                and routing.in_place_ok(out, x, A, B, h) and (c is None or not c.requires_grad)):
            # inference: out += (s * h) through B, accumulated into the base output (no [n, out, *sp] temporary)
            n, r = h.shape[0], h.shape[1]
            if s != 1.0:
                h.mul_(s)
            Bm = B.reshape(B.shape[0], r)
            out.view(n, B.shape[0], -1).baddbmm_(Bm.expand(n, *Bm.shape), h.view(n, r, -1))
            return out
        delta = layers.conv_b(h, B, g)
        return (out + delta * s).to(out.dtype)

    def _routed(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any, call_base: Any,
                module: nn.Module, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        A, B = leaves["lora_A"], leaves["lora_B"]
        if A.dim() != self.nd + 3:
            raise single_for_route()
        s = _routed_scale(entry, leaves, on, A.shape[0], A.device)
        if ((generator is None or not entry.option("dropout", 0.0)) and layers.conv_groups(A, B, self.nd) == 1
                and layers.weight_kernel_ok(call_base, module, x, A, B, s, merges=int(torch.unique(route).numel()))):
            return layers.conv_routed_merged(module, x, A, B, s, route)  # inference: one conv per adapter's rows
        out = call_base(x)
        h = dropout(entry, generator, x if x.dtype == A.dtype else x.to(A.dtype))
        delta = layers.conv_lowrank_routed(h, A, B, s, route, module, self.nd)
        if out.dtype == delta.dtype and routing.in_place_ok(out, x, A, B, delta):
            return out.add_(delta)
        return (out + delta).to(out.dtype)

    def merge(self, lora: Any, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
              tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = tensors["weight"]
        A, B = leaves["lora_A"], leaves["lora_B"]
        g = layers.conv_groups(A, B, self.nd)
        if g != 1 or tuple(weight.shape[1:2]) != tuple(A.shape[1:2]):
            raise IncompatibleAdapterError(
                f"the weight {shape_str(weight.shape)} is a grouped convolution's (groups={g}); its LoRA delta "
                f"(lora_A {shape_str(A.shape)} reads every input channel) is not a grouped weight, so it cannot be "
                "merged (PEFT refuses too); run it unmerged with af.inject")
        delta = self.delta_weight(A, B)
        c = leaves.get(COEF)
        if c is not None:
            delta = delta * c.to(delta.dtype)
        delta = delta * lora._scale(entry, leaves, on)
        if tuple(delta.shape) != tuple(weight.shape):
            raise IncompatibleAdapterError(f"delta {shape_str(delta.shape)} does not fit weight "
                                           f"{shape_str(weight.shape)}")
        return {"weight": weight + delta.to(weight.dtype)}

    # -- checks and files --------------------------------------------------------------------------------
    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
        if layers.conv_kind(module) != self.kind:
            raise IncompatibleAdapterError(
                f"module {path!r}: the adapter has a {self.kind} LoRA but the model has a {layers.layer_name(module)}")
        A, B = leaves["lora_A"], leaves["lora_B"]
        n_in, n_out, g, k = layers.conv_dims(module)
        nd = self.nd
        r = int(A.shape[-(nd + 2)])
        want_b = (n_out, r // g, *([1] * nd))
        if (tuple(A.shape[-(nd + 1):]) != (n_in, *k) or tuple(B.shape[-(nd + 2):]) != want_b or r % g):
            ks = ", ".join(map(str, k))
            rb = "r" if g == 1 else f"r/{g}"
            raise IncompatibleAdapterError(
                f"module {path!r}: lora_A {shape_str(A.shape)} / lora_B {shape_str(B.shape)} do not fit "
                f"{layers.layer_name(module)} with in={n_in}, out={n_out}, kernel={list(k)} (expected lora_A "
                f"[r, {n_in}, {ks}], lora_B [{n_out}, {rb}{', 1' * nd}])")

    def to_peft(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        B = leaves["lora_B"]
        c = leaves.get(COEF)
        return {_A: leaves["lora_A"], _B: B if c is None else B * c.to(B.dtype)}

    def from_peft(self, config: Any, path: str, found: Mapping[str, torch.Tensor],
                  source: str) -> tuple[Entry, dict[str, torch.Tensor]]:
        A, B = found[_A], found[_B]
        nd = self.nd
        ok = (B.dim() == A.dim() and all(int(d) == 1 for d in B.shape[2:]) and B.shape[1] > 0
              and A.shape[0] % B.shape[1] == 0)
        if not ok:
            raise AdapterFileError(
                f"{source}: module {path!r}: lora_A {shape_str(A.shape)} is an nn.Conv{nd}d LoRA's but lora_B "
                f"{shape_str(B.shape)} is not its 1x1 convolution ([out, r / groups{', 1' * nd}])")
        entry = _file_entry(config, path, int(A.shape[0]), self.kind, _A, A, source)
        return entry, {"lora_A": A, "lora_B": B}

    def pad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        A, B = leaves["lora_A"], leaves["lora_B"]
        if A.shape[0] == r:
            return dict(leaves)
        g = layers.conv_groups(A, B, self.nd)
        if r % g:
            raise IncompatibleAdapterError(f"stack: a grouped convolution (groups={g}) cannot pad its LoRA rank "
                                           f"{A.shape[0]} to {r} (not a multiple of {g})")
        return {**leaves, "lora_A": layers.pad_grouped(A, r, g, 0), "lora_B": layers.pad_grouped(B, r, g, 1)}

    def unpad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        A, B = leaves["lora_A"], leaves["lora_B"]
        g = A.shape[0] // B.shape[1] if B.shape[1] else 1
        return {**leaves, "lora_A": layers.unpad_grouped(A, r, g, 0), "lora_B": layers.unpad_grouped(B, r, g, 1)}


class MhaLora:
    """LoRA on ``nn.MultiheadAttention`` (see the module docstring). Leaves: ``lora_A`` [r, E], ``lora_B``
    [3E, r] (in_proj), ``out_lora_A`` [r, E], ``out_lora_B`` [E, r] (out_proj)."""

    kind = layers.MHA

    def plan_entry(self, config: Any, path: str, module: nn.Module) -> Entry:
        layers.check_mha(path, module, "LoRA")
        r, alpha = config.rank_and_alpha(path)
        return Entry(kind=self.kind, r=r, scaling=config.scaling(r, alpha), fan_in_fan_out=False,
                     options=dropout_options(config))

    def init_leaves(self, config: Any, entry: Entry, module: nn.Module, generator: torch.Generator | None,
                    dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        m: Any = module
        w = m.in_proj_weight
        e, r = int(m.embed_dim), entry.r
        kw: dict[str, Any] = dict(dtype=torch.float32, device=w.device)
        A, B = torch.empty(r, e, **kw), torch.empty(3 * e, r, **kw)
        oA, oB = torch.empty(r, e, **kw), torch.empty(e, r, **kw)
        layers.init_lora_pair(A, B, r, config.init_lora_weights, generator)
        layers.init_lora_pair(oA, oB, r, config.init_lora_weights, generator)
        dt = dtype or adapter_dtype(w)
        return {"lora_A": A.to(dt), "lora_B": B.to(dt), "out_lora_A": oA.to(dt), "out_lora_B": oB.to(dt)}

    @staticmethod
    def _merged(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: Any, c: torch.Tensor | None,
                times: int = 1) -> torch.Tensor:
        """``w + (B @ A) * s``, added ``times`` times, in PEFT's order (times the weight ``c`` when given), in
        ``w``'s dtype."""
        d = B @ A
        if c is not None:
            d = d * c.to(d.dtype)
        d = (d * s).to(w.dtype)
        for _ in range(times):
            w = w + d
        return w

    def weights(self, lora: Any, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, w_in: torch.Tensor,
                w_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged ``in_proj_weight`` and ``out_proj.weight`` of a single adapter."""
        s = lora._scale(entry, leaves, on)
        c = leaves.get(COEF)
        return (self._merged(w_in, leaves["lora_A"], leaves["lora_B"], s, c),
                self._merged(w_out, leaves["out_lora_A"], leaves["out_lora_B"], s, c, PEFT_OUT_PROJ_FACTOR))

    def forward(self, lora: Any, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: Any, module: nn.Module, x: torch.Tensor, route: torch.Tensor | None) -> Any:
        m: Any = module
        A = leaves["lora_A"]
        if route is not None:
            if A.dim() != 3:
                raise single_for_route()
            s = _routed_scale(entry, leaves, on, A.shape[0], A.device)
            w_in, w_out = m.in_proj_weight, m.out_proj.weight

            def weights(j: int) -> tuple[torch.Tensor, torch.Tensor]:
                return (self._merged(w_in, A[j], leaves["lora_B"][j], s[j], None),
                        self._merged(w_out, leaves["out_lora_A"][j], leaves["out_lora_B"][j], s[j], None,
                                     PEFT_OUT_PROJ_FACTOR))

            return layers.mha_routed(module, call_base, x, route, weights)
        if A.dim() != 2:
            raise stacked_called_directly(module_path(module))
        return layers.mha_call(module, call_base, x, *self.weights(lora, entry, leaves, on, m.in_proj_weight,
                                                                    m.out_proj.weight))

    def merge(self, lora: Any, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
              tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w_in, w_out = self.weights(lora, entry, leaves, on, tensors["in_proj_weight"], tensors["out_proj.weight"])
        return {"in_proj_weight": w_in, "out_proj.weight": w_out}

    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
        if not layers.is_mha(module):
            raise IncompatibleAdapterError(
                f"module {path!r}: the adapter has an nn.MultiheadAttention LoRA but the model has a "
                f"{layers.layer_name(module)}")
        layers.check_mha(path, module, "LoRA")
        e = int(module.embed_dim)  # type: ignore[arg-type]
        want = {"lora_A": (e,), "lora_B": (3 * e,), "out_lora_A": (e,), "out_lora_B": (e,)}
        for name, dims in want.items():
            t = leaves[name]
            got = tuple(t.shape[-1:]) if name.endswith("A") else tuple(t.shape[-2:-1])
            if got != dims:
                raise IncompatibleAdapterError(
                    f"module {path!r}: {name} {shape_str(t.shape)} does not fit nn.MultiheadAttention with embed_dim="
                    f"{e} (expected lora_A / out_lora_A [r, {e}], lora_B [{3 * e}, r], out_lora_B [{e}, r])")

    def to_peft(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = leaves.get(COEF)

        def b(t: torch.Tensor) -> torch.Tensor:
            return t if c is None else t * c.to(t.dtype)

        return {_A: leaves["lora_A"], _B: b(leaves["lora_B"]),
                MHA_SUFFIXES[0]: leaves["out_lora_A"], MHA_SUFFIXES[1]: b(leaves["out_lora_B"])}

    def from_peft(self, config: Any, path: str, found: Mapping[str, torch.Tensor],
                  source: str) -> tuple[Entry, dict[str, torch.Tensor]]:
        keys = (_A, _B, *MHA_SUFFIXES)
        missing = [k for k in keys if k not in found]
        if missing:
            raise AdapterFileError(f"{source}: module {path!r} has {sorted(found)} (an nn.MultiheadAttention LoRA) "
                                   f"but no {missing[0]!r}")
        A, B, oA, oB = (found[k] for k in keys)
        r = int(A.shape[0]) if A.dim() == 2 else -1
        if not (all(t.dim() == 2 for t in (A, B, oA, oB)) and B.shape[1] == r and oA.shape[0] == r
                and oB.shape[1] == r and B.shape[0] == 3 * A.shape[1] and oB.shape[0] == oA.shape[1] == A.shape[1]):
            raise AdapterFileError(
                f"{source}: module {path!r}: lora_A {shape_str(A.shape)}, lora_B {shape_str(B.shape)}, "
                f"base_layer.out_proj.lora_A {shape_str(oA.shape)}, base_layer.out_proj.lora_B {shape_str(oB.shape)} "
                "are not an nn.MultiheadAttention LoRA ([r, E], [3E, r], [r, E], [E, r])")
        entry = _file_entry(config, path, r, self.kind, _A, A, source)
        return entry, {"lora_A": A, "lora_B": B, "out_lora_A": oA, "out_lora_B": oB}

    def pad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        extra = r - leaves["lora_A"].shape[0]
        if extra == 0:
            return dict(leaves)
        pad = torch.nn.functional.pad
        return {**leaves, "lora_A": pad(leaves["lora_A"], (0, 0, 0, extra)),
                "lora_B": pad(leaves["lora_B"], (0, extra)), "out_lora_A": pad(leaves["out_lora_A"], (0, 0, 0, extra)),
                "out_lora_B": pad(leaves["out_lora_B"], (0, extra))}

    def unpad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        return {**leaves, "lora_A": leaves["lora_A"][:r], "lora_B": leaves["lora_B"][:, :r],
                "out_lora_A": leaves["out_lora_A"][:r], "out_lora_B": leaves["out_lora_B"][:, :r]}


KINDS: dict[str, Any] = {"conv1d": ConvLora(1), "conv2d": ConvLora(2), "conv3d": ConvLora(3), layers.MHA: MhaLora()}
"""Entry kind -> its handler."""


def kind_of(module: nn.Module) -> str | None:
    """The LoRA entry kind of a module this file handles (a convolution or nn.MultiheadAttention), else None."""
    if layers.is_mha(module):
        return layers.MHA
    return layers.conv_kind(module)


def kind_from_file(found: Mapping[str, torch.Tensor]) -> str | None:
    """The entry kind of one module's PEFT tensors when it is one handled here (out_proj keys: nn.MultiheadAttention;
    a 3-, 4- or 5-d ``lora_A``: a 1-, 2- or 3-d convolution), else None."""
    if not _MHA.isdisjoint(found):
        return layers.MHA
    A = found.get(_A)
    if A is not None and A.dim() in (3, 4, 5):
        return f"conv{A.dim() - 2}d"
    return None
