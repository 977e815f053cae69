"""PEFT's ``init_lora_weights`` variants for LoRA, as pure functions of the base weights.

``LoraConfig.init_lora_weights`` takes PEFT's values: ``True`` (Kaiming-uniform ``A``, zero ``B``), ``False``,
``"gaussian"`` (see :mod:`adaptfn.methods.lora`) and the ones this module computes:

* ``"pissa"``: ``W = U S V^T`` (full SVD, in float32); ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``
  and the base weight becomes the residual ``W - s B A`` (``s`` the module's scaling).
  ``"pissa_niter_K"``: the same from a randomised SVD (Halko et al.) with ``K`` subspace iterations.
* ``"olora"``: ``W = Q R`` (QR, float32); ``B = Q[:, :r]``, ``A = R[:r]``; the base becomes ``W - s B A``.
* ``"orthogonal"``: ``A`` and ``B`` from the two halves of a random orthogonal ``r x r`` matrix, so that
  ``B @ A == 0`` (the base is unchanged; ``r`` must be even).
* ``"loftq"``: ``loftq_config={"loftq_bits": 4 | 8, "loftq_iter": n}``. Alternates ``n`` times: quantise the
  residual (4 bits: bitsandbytes' NF4 blockwise with 64-value blocks; 8 bits: LLM.int8's row-wise absmax)
  and take the rank-``r`` SVD ``B A`` of ``W - dequant``; the base becomes the dequantised weight, so that
  ``base' + B A ~= W`` (as PEFT: without the scaling; use ``lora_alpha = r``).
* ``"corda"``: ``corda_config={"corda_method": "ipm" | "kpm", ...}``; needs calibration ``data``. The
  covariance ``C`` of each target's inputs (each call's input divided by its largest value, ``x^T x``
  averaged over calls), damped until invertible, gives the SVD ``W C = U S V^T``; ``B = U sqrt(S/s)``,
  ``A = sqrt(S/s) (V^T C^-1)`` over the first (``"ipm"``) or last (``"kpm"``) ``r`` components; the base
  becomes ``W - s B A``.
* ``"eva"``: files load and run (a plain LoRA pair plus ``eva_config``, possibly with a ``rank_pattern``);
  :func:`adaptfn.init` refuses it (EVA's incremental SVD of activations is not computed by adaptfn yet).

PiSSA, OLoRA, LoftQ and CorDA change the base weights: :func:`adaptfn.init` then needs the pair form,
``params2, a = af.init(fn, cfg, params=params)``, and returns new weight tensors in ``params2`` (the user's
``params`` and model are never modified). These inits apply to ``nn.Linear`` and GPT-2 ``Conv1D`` targets,
as PEFT's do (OLoRA and LoftQ on ``nn.Linear`` only: PEFT's ignore ``Conv1D``'s [in, out] layout).

Randomness: ``"orthogonal"`` and ``"pissa_niter_K"`` draw from the ``generator``; adaptfn replays the draws PEFT
takes from torch's global RNG (the default init of the two ``nn.Linear`` layers PEFT creates for each target,
then the init's own), so ``generator=torch.Generator().manual_seed(s)`` gives exactly what PEFT gives after
``torch.manual_seed(s)`` on the CPU.

Conversion to a plain LoRA (PEFT's ``path_initial_model_for_weight_conversion``): :func:`convert` (and
``af.save(a, d, convert_from=a0)``) turns a trained adapter ``a`` and the adapter ``a0`` it started from into
a LoRA of rank ``2 r`` that applies to the original base: ``A' = [A; A0]``, ``B' = [B, -B0]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .. import _layout
from ..adapter import COEF, Adapter, Entry
from ..errors import ConfigError, IncompatibleAdapterError, shape_str
from .base import is_int, is_real, need
from .common import PEFT_UNSUPPORTED, adapter_dtype

__all__ = ["mode_of", "BASE_CHANGING", "SUBCONFIGS", "UNSUPPORTED", "validate_mode", "prepare", "pissa", "olora",
           "orthogonal", "loftq", "corda", "nf4_roundtrip", "int8_roundtrip", "covariances", "convert"]

BASE_CHANGING = frozenset({"pissa", "pissa_niter", "olora", "loftq", "corda"})
"""The modes whose init changes the base weights (af.init's pair form is required)."""
SUBCONFIGS = frozenset({"loftq_config", "eva_config", "corda_config"})
"""PEFT sub-configs LoRA now reads (kept in ``config.extra``, written back as they are)."""
UNSUPPORTED = {k: v for k, v in PEFT_UNSUPPORTED.items() if k not in SUBCONFIGS}
_SIMPLE = ("orthogonal", "loftq", "corda", "eva")
_EVA_KEYS = {"rho": float, "tau": float, "use_label_mask": bool, "label_mask_value": int, "whiten": bool,
             "adjust_scaling_factors": bool}
_CORDA_KEYS = {"cache_file", "covariance_file", "corda_method", "verbose", "use_float16_for_covariance",
               "prune_temporary_fields"}
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
"""bitsandbytes' NF4 code book (the 16 normal-quantile levels of QLoRA)."""


def mode_of(config: Any) -> str | None:
    """The init this module computes for ``config`` ("pissa", "pissa_niter", "olora", "orthogonal", "loftq",
    "corda", "eva"), or None for ``True`` / ``False`` / ``"gaussian"``."""
    mode = getattr(config, "init_lora_weights", True)
    if not isinstance(mode, str) or mode.lower() == "gaussian":
        return None
    if mode.lower() == "olora":
        return "olora"
    if mode == "pissa":
        return "pissa"
    if mode.startswith("pissa_niter_"):
        return "pissa_niter"
    return mode if mode in _SIMPLE else None


def _niter(mode: str) -> int | None:
    tail = mode[len("pissa_niter_"):]
    return int(tail) if tail.isdigit() else None


def validate_mode(config: Any) -> None:
    """``LoraConfig.init_lora_weights`` and the sub-config it reads, with PEFT's rules; raises
    :class:`ConfigError` naming the field."""
    cls = type(config)
    mode = config.init_lora_weights
    extra = config.extra
    ok = ("True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K an int >= 0), 'olora', 'orthogonal', 'loftq', "
          "'corda' or 'eva'")
    if isinstance(mode, str):
        m = mode_of(config)
        need(mode.lower() == "gaussian" or (m is not None and (m != "pissa_niter" or _niter(mode) is not None)),
             cls, "init_lora_weights", f"must be {ok}, got {mode!r}"
             + (" ('mica' and 'lora_ga' are not supported by adaptfn yet)" if mode.lower() in ("mica", "lora_ga")
                else ""))
    else:
        need(isinstance(mode, bool), cls, "init_lora_weights", f"must be {ok}, got {mode!r}")
    m = mode_of(config)
    lq = extra.get("loftq_config") or {}
    need(isinstance(lq, Mapping), cls, "loftq_config", f"must be a dict, got {type(lq).__name__}")
    if m == "loftq":
        need(bool(lq), cls, "loftq_config", "must be given when init_lora_weights is 'loftq' (PEFT requires it), "
             "e.g. {'loftq_bits': 4, 'loftq_iter': 1}")
        unknown = sorted(set(lq) - {"loftq_bits", "loftq_iter"})
        need(not unknown, cls, "loftq_config", f"unknown keys {unknown} (PEFT's are loftq_bits, loftq_iter)")
        bits, iters = lq.get("loftq_bits", 4), lq.get("loftq_iter", 1)
        need(is_int(bits) and bits in (4, 8), cls, "loftq_config", f"loftq_bits must be 4 or 8, got {bits!r}")
        need(is_int(iters) and iters >= 1, cls, "loftq_config", f"loftq_iter must be an int >= 1, got {iters!r}")
    else:
        need(not lq, cls, "loftq_config", f"{dict(lq)!r} is only used with init_lora_weights='loftq' "
             f"(got {mode!r}); leave it empty")
    ev = extra.get("eva_config")
    if ev is not None:
        need(isinstance(ev, Mapping), cls, "eva_config", f"must be a dict or None, got {type(ev).__name__}")
        for k, v in ev.items():
            need(k in _EVA_KEYS, cls, "eva_config", f"unknown key {k!r} (PEFT's are {sorted(_EVA_KEYS)})")
            t = _EVA_KEYS[k]
            good = isinstance(v, bool) if t is bool else (is_int(v) if t is int else is_real(v))
            need(good, cls, "eva_config", f"{k} must be a {t.__name__}, got {v!r}")
        need(ev.get("rho", 2.0) >= 1, cls, "eva_config", f"rho must be >= 1, got {ev.get('rho')!r}")
        need(0 <= ev.get("tau", 0.99) <= 1, cls, "eva_config", f"tau must be in [0, 1], got {ev.get('tau')!r}")
    cd = extra.get("corda_config")
    if cd is not None:
        need(isinstance(cd, Mapping), cls, "corda_config", f"must be a dict or None, got {type(cd).__name__}")
        unknown = sorted(set(cd) - _CORDA_KEYS)
        need(not unknown, cls, "corda_config", f"unknown keys {unknown} (PEFT's are {sorted(_CORDA_KEYS)})")
        need(cd.get("corda_method", "ipm") in ("ipm", "kpm"), cls, "corda_config",
             f"corda_method must be 'ipm' or 'kpm', got {cd.get('corda_method')!r}")
        for k in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
            need(isinstance(cd.get(k, False), bool), cls, "corda_config", f"{k} must be a bool, got {cd.get(k)!r}")
        for k in ("cache_file", "covariance_file"):
            need(cd.get(k) is None or isinstance(cd.get(k), str), cls, "corda_config",
                 f"{k} must be a str or None, got {cd.get(k)!r}")


# -- the inits, one weight at a time ([out, in] float32 in, tensors out) --------------------------------------
def _check_rank(path: str, W: torch.Tensor, r: int, mode: str) -> None:
    if r > min(W.shape):
        raise IncompatibleAdapterError(
            f"module {path!r}: init_lora_weights={mode!r} needs r <= min(out, in) = {min(W.shape)} for its weight "
            f"{shape_str(W.shape)}, got r={r} (lower r or rank_pattern for it)")


def pissa(W: torch.Tensor, r: int, scaling: float, niter: int | None = None,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: the rank-``r`` principal part of ``W`` as the adapter, the rest as the base.

    Arguments:
        W: the weight [out, in] (computed in float32).
        r: rank (<= min(out, in)).
        scaling: the module's LoRA scaling ``s``.
        niter: None: full SVD; an int: randomised SVD with that many subspace iterations (``"pissa_niter_K"``).
        generator: the randomised SVD's draws (None: torch's global RNG).

    Returns:
        ``(A [r, in], B [out, r], W_res [out, in])`` in float32, with ``W_res + s B A == W`` up to rounding.

    Example:
        >>> from adaptfn.methods import lora_init
        >>> W = torch.randn(7, 11)
        >>> A, B, res = lora_init.pissa(W, 3, 2.0)
        >>> A.shape, B.shape, bool(torch.allclose(res + 2.0 * B @ A, W, atol=1e-5))
        (torch.Size([3, 11]), torch.Size([7, 3]), True)
    """
    W = W.to(torch.float32)
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = _svd_lowrank(W, r, niter, generator)
        Vh = V.t()
    S = S / scaling
    root = torch.sqrt(S)
    A = torch.diag(root) @ Vh
    B = U @ torch.diag(root)
    return A, B, W - scaling * B @ A


def _svd_lowrank(M: torch.Tensor, q: int, niter: int,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomised SVD (Halko, Martinsson and Tropp, algorithms 4.4 and 5.1) with one Gaussian test matrix
    drawn from ``generator``, in the order torch's ``svd_lowrank`` draws and computes it."""
    m, n = M.shape
    X = M.mT if m < n else M
    omega = torch.randn(X.shape[-1], q, dtype=X.dtype, device=X.device, generator=generator)
    Q = torch.linalg.qr(X @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(X.mT @ Q).Q
        Q = torch.linalg.qr(X @ Q).Q
    U, S, Vh = torch.linalg.svd(Q.mT @ X, full_matrices=False)
    U, V = Q @ U, Vh.mT
    return (V, S, U) if m < n else (U, S, V)


def olora(W: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA: ``W = Q R``; ``B = Q[:, :r]``, ``A = R[:r]``; the base becomes ``W - s B A``.

    Arguments:
        W: the weight [out, in] (computed in float32).
        r: rank (<= min(out, in)).
        scaling: the module's LoRA scaling ``s``.

    Returns:
        ``(A [r, in], B [out, r], W_res [out, in])`` in float32.

    Example:
        >>> from adaptfn.methods import lora_init
        >>> A, B, res = lora_init.olora(torch.randn(7, 11), 3, 0.5)
        >>> bool(torch.allclose(B.T @ B, torch.eye(3), atol=1e-5))   # orthonormal columns
        True
    """
    W = W.to(torch.float32)
    Q, R = torch.linalg.qr(W)
    B, A = Q[:, :r].contiguous(), R[:r].contiguous()
    return A, B, W - scaling * B @ A


def _peft_layer_draws(n_in: int, n_out: int, r: int, generator: torch.Generator | None) -> None:
    """The draws PEFT's two ``nn.Linear`` layers take at construction (their default init), replayed."""
    for shape in ((r, n_in), (n_out, r)):
        nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)


def orthogonal(n_in: int, n_out: int, r: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's orthogonal init: ``Q`` from the QR of an ``r x r`` Gaussian; ``A = (G_A Q[0::2])^T / 10``,
    ``B = G_B^T Q[1::2] / 10`` with Gaussian ``G_A`` [in, r/2], ``G_B`` [r/2, out], so ``B @ A == 0``.

    Arguments:
        n_in: in features. n_out: out features. r: an even rank.
        generator: the draws (None: torch's global RNG); PEFT's layer-construction draws are replayed first.

    Returns:
        ``(A [r, in], B [out, r])`` in float32.

    Example:
        >>> from adaptfn.methods import lora_init
        >>> A, B = lora_init.orthogonal(11, 7, 4, torch.Generator().manual_seed(0))
        >>> A.shape, B.shape, float((B @ A).abs().max()) < 1e-6
        (torch.Size([4, 11]), torch.Size([7, 4]), True)
    """
    _peft_layer_draws(n_in, n_out, r, generator)
    Q, _ = torch.linalg.qr(torch.randn(r, r, generator=generator))
    A = torch.randn(n_in, r // 2, generator=generator).mm(Q[0::2, :]).T / 10.0
    B = torch.randn(r // 2, n_out, generator=generator).T.mm(Q[1::2, :]) / 10.0
    return A.contiguous(), B.contiguous()


def nf4_roundtrip(W: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """``W`` quantised to bitsandbytes' NF4 (blocks of ``blocksize`` values of the flattened tensor, each
    scaled by its absmax, rounded to the nearest of :data:`NF4_CODE`) and dequantised, in float32.

    Example:
        >>> from adaptfn.methods import lora_init
        >>> w = torch.randn(7, 11)
        >>> float((lora_init.nf4_roundtrip(w) - w).abs().max()) < 0.3 * float(w.abs().max())
        True
    """
    flat = W.reshape(-1).float()
    n = flat.numel()
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=flat.device)
    bounds = (code[:-1] + code[1:]) / 2
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    if pad:  # the last, partial block: its own values only
        absmax[-1] = flat[n - (blocksize - pad):].abs().max()
    absmax = absmax.clamp(min=1e-38)
    scaled = torch.clamp(blocks * (1.0 / absmax.view(-1, 1)), -1, 1)
    q = torch.bucketize(scaled, bounds)
    return (code[q] * absmax.view(-1, 1)).reshape(-1)[:n].reshape(W.shape)


def int8_roundtrip(W: torch.Tensor) -> torch.Tensor:
    """``W`` [out, in] quantised row-wise to int8 by absmax (LLM.int8's vector-wise quantisation, without
    outliers; as bitsandbytes' ``Int8Params``, from ``W`` rounded to float16) and dequantised, in float32.

    Example:
        >>> from adaptfn.methods import lora_init
        >>> w = torch.randn(7, 11)
        >>> float((lora_init.int8_roundtrip(w) - w).abs().max()) <= float(w.abs().max()) / 100
        True
    """
    W = W.to(torch.float16)
    stats = W.abs().amax(dim=1).float()
    q = torch.round(W * (127.0 / stats.unsqueeze(-1))).to(torch.int8)
    return q * stats.view(-1, 1) * 7.874015718698502e-3


def loftq(W: torch.Tensor, r: int, bits: int = 4, iters: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ: alternately quantise ``W - B A`` and fit ``B A`` (rank-``r`` SVD) to ``W - dequant``.

    Arguments:
        W: the weight [out, in] (computed in float32).
        r: rank. bits: 4 (NF4) or 8 (int8). iters: alternations, >= 1.

    Returns:
        ``(A [r, in], B [out, r], W_q [out, in])``: ``W_q`` the dequantised base, ``W_q + B A ~= W``.

    Example:
        >>> from adaptfn.methods import lora_init
        >>> w = torch.randn(7, 11)
        >>> A, B, wq = lora_init.loftq(w, 3, bits=4, iters=2)
        >>> bool((wq + B @ A - w).norm() < (lora_init.nf4_roundtrip(w) - w).norm())
        True
    """
    W = W.float()
    quant = nf4_roundtrip if bits == 4 else int8_roundtrip
    res = W.clone()
    for i in range(iters):
        deq = quant(res)
        U, S, Vh = torch.linalg.svd(W - deq, full_matrices=False)
        root = torch.sqrt(S[:r])
        B, A = U[:, :r] * root, root.unsqueeze(1) * Vh[:r]
        if i + 1 < iters:
            res = W - B @ A
    return A, B, deq


def corda(W: torch.Tensor, cov: torch.Tensor, r: int, scaling: float,
          method: str = "ipm") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CorDA: the SVD of ``W C`` (``C`` the input covariance, damped until it inverts well), projected back by
    ``C^-1``; the first (``"ipm"``) or last (``"kpm"``) ``r`` components are the adapter.

    Arguments:
        W: the weight [out, in]. cov: the covariance [in, in] (see :func:`covariances`).
        r: rank. scaling: the module's ``s``. method: "ipm" or "kpm".

    Returns:
        ``(A [r, in], B [out, r], W_res [out, in])`` in float32, ``W_res + s B A == W`` up to rounding.

    Example:
        >>> from adaptfn.methods import lora_init
        >>> x = torch.randn(50, 11)
        >>> A, B, res = lora_init.corda(torch.randn(7, 11), x.T @ x / 50, 3, 2.0)
        >>> A.shape, B.shape
        (torch.Size([3, 11]), torch.Size([7, 3]))
    """
    w = W.float()
    cov = cov.float()
    n = cov.shape[0]
    eye = torch.eye(n, device=cov.device)
    damp = 0.01
    while True:
        fixed = cov + torch.diag(torch.ones(n, device=cov.device) * torch.mean(torch.diag(cov)) * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    V = (Vh @ inv).transpose(0, 1)
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    U, S, V = U[:, keep], S[keep], V[:, keep]
    S = S / scaling
    A = V.t().mul(S.sqrt().view(-1, 1)).contiguous()
    B = U.mul(S.sqrt()).contiguous()
    return A, B, w - scaling * B @ A


def _call(fn: Any, params: Mapping[str, torch.Tensor], batch: Any) -> None:
    if isinstance(batch, Mapping):
        fn(params, **batch)
    elif isinstance(batch, (tuple, list)):
        fn(params, *batch)
    else:
        fn(params, batch)


def covariances(fn: Any, params: Mapping[str, torch.Tensor], paths: Iterable[str], data: Iterable[Any],
                half: bool = False) -> dict[str, torch.Tensor]:
    """CorDA's input covariance of each module in ``paths``, from running the base model on ``data``.

    Each call's input ``x`` to a module (flattened to [tokens, in]) is divided by ``|max(x)|`` and ``x^T x``
    summed; the result is the mean over calls (PEFT's ``preprocess_corda``, which runs one sequence per call).

    Arguments:
        fn: from :func:`adaptfn.functional` (its adapters, if any, are not applied).
        params: the parameters to run with.
        paths: module paths (``nn.Linear`` / ``Conv1D``).
        data: batches: a dict (keyword arguments of ``fn``), a tuple (positional ones) or a tensor.
        half: keep the inputs' dtype (``use_float16_for_covariance``) instead of float32.

    Returns:
        ``{path: covariance [in, in]}``.

    Raises:
        ConfigError: no batch in ``data``, or non-finite inputs at a module.
    """
    paths = list(paths)
    base = fn.with_adapters((), None)  # the base model alone
    sums: dict[str, Any] = {p: 0 for p in paths}
    counts = dict.fromkeys(paths, 0)

    def hook_for(path: str) -> Callable[[torch.Tensor], None]:
        def hook(x: torch.Tensor) -> None:
            x = x.detach().reshape(-1, x.shape[-1])
            if not half:
                x = x.float()
            x = x / torch.max(x).abs()
            if not bool(torch.isfinite(x).all()):
                raise ConfigError(f"init (corda): non-finite input at module {path!r} (an all-zero or bad batch)")
            sums[path] = sums[path] + x.t() @ x
            counts[path] += 1
        return hook

    with fn.input_hooks({p: hook_for(p) for p in paths}), torch.no_grad():
        for batch in data:
            _call(base, params, batch)
    missing = [p for p in paths if counts[p] == 0]
    if missing:
        raise ConfigError(f"init (corda): data reached no call of {missing} (an empty data iterable, or modules the "
                          "forward never runs)")
    return {p: sums[p] / counts[p] for p in paths}


# -- af.init's hook -------------------------------------------------------------------------------------------
LeavesFn = Callable[[Any, str, Entry, nn.Module, Any, Any], dict[str, torch.Tensor]]


def prepare(fn: Any, config: Any, entries: Mapping[str, Entry], params: Mapping[str, torch.Tensor],
            generator: torch.Generator | None, dtype: torch.dtype | None,
            data: Iterable[Any] | None) -> tuple[LeavesFn, dict[str, torch.Tensor]]:
    """Compute every target's ``lora_A`` / ``lora_B`` (and new base weight) for ``config``'s init, in the
    model's module order. Returns the ``init_leaves`` function :func:`adaptfn.init` calls per entry and the
    new base tensors by parameter name (every alias of a changed weight)."""
    mode = mode_of(config)
    name = config.init_lora_weights
    if mode == "eva":
        raise ConfigError(
            "init: init_lora_weights='eva' is not computed by af.init in this version of adaptfn (EVA's incremental "
            "SVD of activations); make the adapter with PEFT (get_peft_model + initialize_lora_eva_weights) and "
            "af.load it: EVA adapters load and run as plain LoRA")
    if config.use_dora:
        raise ConfigError(f"init: LoraConfig.use_dora=True with init_lora_weights={name!r} is not supported by "
                          "af.init in this version of adaptfn (files with both load)")
    if mode == "corda" and data is None:
        raise ConfigError("init: init_lora_weights='corda' needs calibration data: af.init(fn, cfg, params=params, "
                          "data=batches), batches being dicts / tuples / tensors fn accepts")
    modules = dict(fn.model.named_modules(remove_duplicate=False))
    for path, e in entries.items():
        if not e.kind:
            continue
        mod = modules[path]
        if e.kind != "linear":
            raise IncompatibleAdapterError(
                f"target module {path!r} is a {type(mod).__name__}: init_lora_weights={name!r} applies to nn.Linear "
                "and Conv1D targets only (PEFT refuses it too); exclude it (exclude_modules)")
        if e.fan_in_fan_out and mode in ("olora", "loftq"):
            raise IncompatibleAdapterError(
                f"target module {path!r} is a GPT-2 Conv1D: PEFT's {name!r} init ignores Conv1D's [in, out] layout "
                "(the adapter would not start from the base model); adaptfn refuses it; exclude it (exclude_modules)")
        if mode == "orthogonal" and e.r % 2:
            raise ConfigError(f"init: init_lora_weights='orthogonal' needs an even rank, got r={e.r} for {path!r}")
        key = f"{path}.weight"
        if key not in params:
            raise ConfigError(f"init: params has no {key!r} (the weight of target module {path!r})")
    cov: dict[str, torch.Tensor] = {}
    if mode == "corda":
        cd = config.extra.get("corda_config") or {}
        targets = [p for p, e in entries.items() if e.kind]
        cov = covariances(fn, params, targets, data, bool(cd.get("use_float16_for_covariance", False)))
    leaves: dict[str, dict[str, torch.Tensor]] = {}
    new_base: dict[str, torch.Tensor] = {}
    for path, e in entries.items():
        if not e.kind:
            continue
        key = f"{path}.weight"
        stored = params[key]
        if stored.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise IncompatibleAdapterError(
                f"module {path!r}: init_lora_weights={name!r} needs a float32 / float16 / bfloat16 weight, got "
                f"{stored.dtype} (initialise before quantising, as PEFT requires)")
        W = stored.T if e.fan_in_fan_out else stored  # [out, in]
        n_out, n_in = W.shape
        s, r = e.scaling, e.r
        res: torch.Tensor | None = None
        if mode == "orthogonal":
            A, B = orthogonal(n_in, n_out, r, generator)
        else:
            _check_rank(path, W, r, name)
            if mode in ("pissa", "pissa_niter"):
                niter = _niter(name) if mode == "pissa_niter" else None
                if niter is not None:
                    _peft_layer_draws(n_in, n_out, r, generator)
                A, B, res = pissa(W, r, s, niter, generator)
            elif mode == "olora":
                A, B, res = olora(W, r, s)
            elif mode == "loftq":
                lq = config.extra["loftq_config"]
                A, B, res = loftq(W, r, lq.get("loftq_bits", 4), lq.get("loftq_iter", 1))
            else:  # corda
                method = (config.extra.get("corda_config") or {}).get("corda_method", "ipm")
                A, B, res = corda(W, cov[path], r, s, method)
        dt = dtype or adapter_dtype(stored)
        # PEFT casts the new layers to the base weight's dtype, then (fp16 / bf16 bases) back up to float32
        leaves[path] = {"lora_A": A.to(stored.dtype).to(dt), "lora_B": B.to(stored.dtype).to(dt)}
        if res is not None:
            new = (res.T if e.fan_in_fan_out else res).to(stored.dtype).contiguous()
            _layout.carry(stored, new)  # a square Conv1D weight keeps its known layout
            for k in fn.aliases(key):
                new_base[k] = new

    def init_leaves(config: Any, path: str, entry: Entry, module: nn.Module, generator: Any,
                    dtype: Any) -> dict[str, torch.Tensor]:
        return dict(leaves[path])

    return init_leaves, new_base


# -- conversion to a plain LoRA -------------------------------------------------------------------------------
_A_KEYS = ("lora_A.weight", "lora_embedding_A")
_B_KEYS = ("lora_B.weight", "lora_embedding_B")


def convert(adapter: Adapter, initial: Adapter) -> Adapter:
    """A trained LoRA ``adapter`` and the ``initial`` one it was made from (e.g. by PiSSA / OLoRA / CorDA, whose
    base weights were changed) -> a plain LoRA for the ORIGINAL base: ``A' = [A; A0]`` (rows), ``B' = [B, -B0]``
    (columns), ``r``, ``lora_alpha`` and the patterns doubled (rsLoRA: ``lora_alpha * sqrt(2)``) so the scale
    stays, ``init_lora_weights=True``: the delta is ``s (B A - B0 A0)``. PEFT's
    ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``; other tensors of ``adapter``
    (``modules_to_save``, trained biases) are kept (PEFT's conversion drops them).

    Arguments:
        adapter: the trained LoRA. initial: the same adapter before training (its config and shapes match).

    Returns:
        The converted :class:`Adapter` (same modules, rank ``2 r``).

    Raises:
        ConfigError: not LoRA adapters, stacked ones, DoRA / lora_bias, rsLoRA with rank / alpha patterns (PEFT
            refuses it too), or the two adapters' modules, ranks or shapes differ.

    Example:
        >>> from adaptfn.methods import lora_init
        >>> pp, a0 = af.init(fn, af.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"),
        ...                  params=params)
        >>> plain = lora_init.convert(a0, a0)     # untrained: a delta of exactly 0 on the original base
        >>> plain.config.r, plain.config.init_lora_weights
        (4, True)
    """
    for a, what in ((adapter, "adapter"), (initial, "convert_from")):
        if not isinstance(a, Adapter) or a.method != "lora":
            raise ConfigError(f"convert: {what} must be a LoRA Adapter, got "
                              f"{getattr(a, 'method', type(a).__name__)!r}")
        if a.stack_info is not None:
            raise ConfigError(f"convert: {what} is a stacked adapter; convert each one (af.unstack)")
        if a.config.use_dora or a.config.lora_bias:
            raise ConfigError(f"convert: {what} has use_dora / lora_bias: its conversion to a plain LoRA is not "
                              "linear in the pair (PEFT's conversion does not handle them either)")
    cfg = adapter.config
    if cfg.use_rslora and (cfg.rank_pattern or cfg.alpha_pattern):
        raise ConfigError("convert: use_rslora=True with rank_pattern / alpha_pattern cannot be converted (the "
                          "doubled rank changes the scale; PEFT refuses it too)")
    if set(adapter.entries) != set(initial.entries):
        raise ConfigError(f"convert: the adapters target different modules: "
                          f"{sorted(set(adapter.entries) ^ set(initial.entries))}")
    entries: dict[str, Entry] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for path, e in adapter.entry_items:
        leaves = dict(adapter.leaves(path))
        if not e.kind:
            entries[path], tensors[path] = e, leaves
            continue
        e0, leaves0 = initial.entries[path], initial.leaves(path)
        c, c0 = leaves.pop(COEF, None), leaves0.get(COEF)
        for name, v in list(leaves.items()):
            dim = 0 if name.endswith("lora_A") else 1 if name.endswith("lora_B") else None
            if dim is None:
                continue
            v0 = leaves0.get(name)
            if v0 is None or v0.shape != v.shape or e0.kind != e.kind:
                raise ConfigError(f"convert: module {path!r}: {name} is {shape_str(v.shape)} in adapter but "
                                  f"{'absent' if v0 is None else shape_str(v0.shape)} in convert_from")
            if dim == 1:  # a scale weight is folded into B, as the file has it
                v = v if c is None else v * c.to(v.dtype)
                v0 = -(v0 if c0 is None else v0 * c0.to(v0.dtype))
            leaves[name] = torch.cat([v, v0.to(v.dtype)], dim=dim)
        entries[path] = dataclasses.replace(e, r=2 * e.r)
        tensors[path] = leaves
    alpha = cfg.lora_alpha * (2 ** 0.5 if cfg.use_rslora else 2)
    new_cfg = dataclasses.replace(
        cfg, r=cfg.r * 2, lora_alpha=alpha, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in cfg.alpha_pattern.items()})
    return Adapter(adapter.method, new_cfg, entries, tensors)
