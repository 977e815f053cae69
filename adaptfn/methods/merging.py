"""Task-arithmetic merges of same-shaped tensors, with PEFT's meaning (``peft.utils.merge_utils``).

Each merge takes a list of tensors ``ts`` (one per adapter, same shape) and a weight tensor ``w`` [n]:

* ``linear``: ``sum_i w_i t_i``;
* ``magnitude_prune``: each ``t_i`` keeps its ``int(density * numel)`` largest magnitudes, then ``linear``;
* ``ties``: magnitude-pruned as above; per element a sign is elected (``"total"``: the sign of the sum of
  the pruned tensors, ``"frequency"``: the sign held by more of them, ties to +); the weighted tensors that
  agree with it are averaged (sum over agreeing / their count, at least 1);
* ``dare_linear`` / ``dare_ties``: each ``t_i`` keeps each element with probability ``density`` (a
  Bernoulli draw per element) and is divided by ``density``, then ``linear`` / ``ties`` (without the
  magnitude pruning).

``density >= 1`` prunes nothing and draws nothing. The random draws are ``torch.bernoulli`` on a tensor
filled with ``density``, one call per tensor in list order, from ``generator`` or (None) torch's global
generator, as PEFT draws them; the arithmetic follows PEFT's order of operations, so equal inputs give
PEFT's result bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["MERGES", "merge_tensors", "svd_factors"]

MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _weighted(stacked: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``stacked`` [n, ...] times ``w`` [n] broadcast over the trailing axes."""
    return stacked * w.view(w.shape + (1,) * (stacked.dim() - w.dim()))


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``int(density * numel)`` largest magnitudes set to zero."""
    if density >= 1:
        return t
    flat = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    flat[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * flat.reshape(t.shape)


def _keep_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """``t`` with each element kept with probability ``density`` and the kept ones divided by it."""
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def _elect(stacked: torch.Tensor, how: str) -> torch.Tensor:
    """Bool [n, ...]: where each tensor's sign is the elected one."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if how == "total" else signs.sum(dim=0)
    return signs == torch.where(votes >= 0, 1, -1)


def merge_tensors(how: str, ts: Sequence[torch.Tensor], w: torch.Tensor, density: float | None = None,
                  majority_sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """One merged tensor from ``ts`` by ``how`` (one of :data:`MERGES`), weights ``w`` [len(ts)].

    Arguments:
        how: the merge (see the module docstring). ts: same-shaped tensors. w: their weights.
        density: the kept fraction in (0, 1] (pruning merges). majority_sign_method: "total" or "frequency".
        generator: for the dare merges' draws (None: torch's global generator).

    Returns:
        A tensor of the shape of ``ts[0]``.
    """
    if how in ("magnitude_prune", "ties"):
        ts = [_keep_largest(t, density) for t in ts]  # type: ignore[arg-type]
    elif how in ("dare_linear", "dare_ties"):
        ts = [_keep_random(t, density, generator) for t in ts]  # type: ignore[arg-type]
    stacked = torch.stack(list(ts), dim=0)
    if how in ("ties", "dare_ties"):
        agree = _elect(stacked, majority_sign_method)
        return (_weighted(stacked, w) * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)
    return _weighted(stacked, w).sum(dim=0)


def svd_factors(delta: torch.Tensor, rank: int, clamp: float | None, full_matrices: bool,
                driver: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [rank, in], B [out, rank])`` with ``B @ A`` the best rank-``rank`` approximation of ``delta`` [out, in]:
    ``B = U_r diag(S_r)``, ``A = Vh_r`` (``torch.linalg.svd`` with ``full_matrices`` and ``driver``). With
    ``clamp`` (a quantile in [0, 1]) both are clipped to ``[-q, q]``, ``q`` that quantile of their joined
    entries (PEFT's rule)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    B = U[:, :rank] @ torch.diag(S[:rank])
    A = Vh[:rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B
