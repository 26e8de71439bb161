"""Low-rank factorization ``W ~= U @ V`` with ``U`` (N, r) and ``V`` (r, K): plain and whitened SVD.

Pure torch, no model knowledge; ``W`` is an ``(N, K)`` weight in ``nn.Linear`` layout, so the
factored layer computes ``x @ V.T @ U.T``.

- :func:`svd`: truncated SVD of ``W`` (optimal for ``||W - UV||_F``, blind to the inputs).
- :func:`whitened_svd`: SVD-LLM (Wang et al. 2024). With ``H = X^T X / n`` and its Cholesky factor
  ``S`` (``H = S S^T``), ``||(W - W') X^T||_F^2 = n ||(W - W') S||_F^2``, so the truncated SVD of
  ``W S`` mapped back by ``S^-1`` minimizes the layer's output error on the calibration data:
  ``W S = P Sigma Q^T``, ``U = P_r Sigma_r``, ``V = Q_r^T S^-1``.

Both return float32; the decompositions run in float64 because ``S`` can be badly conditioned.
"""
from __future__ import annotations

import math

import torch

from .hessian import check_hessian, check_weight

__all__ = ["rank_for_ratio", "rank_for_energy", "svd", "whitened_svd"]


def rank_for_ratio(N: int, K: int, ratio: float) -> int:
    """Largest rank whose factors keep at most ``ratio`` of the dense parameters:
    ``floor(ratio * N * K / (N + K))``, at least 1."""
    for name, v in (("N", N), ("K", K)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio (kept parameters / (N*K)) must be in (0, 1], got {ratio!r}")
    # The epsilon absorbs float error when ratio*N*K/(N+K) is an exact integer.
    return max(1, int(math.floor(ratio * N * K / (N + K) + 1e-9)))


def rank_for_energy(W_or_singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank ``r`` whose singular values hold at least ``energy`` of ``sum(sigma^2)``.

    Accepts a 2-D weight (its singular values are computed) or a 1-D tensor of singular values.
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"energy (fraction of sum of squared singular values kept) must be in (0, 1], got {energy!r}")
    x = W_or_singular_values
    if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2):
        raise ValueError("W_or_singular_values must be a 2-D weight or a 1-D tensor of singular values")
    sv = torch.linalg.svdvals(x.double()) if x.dim() == 2 else x.double().abs().sort(descending=True).values
    e = sv ** 2
    total = e.sum()
    if total == 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    # A relative 1e-12 slack so energy=1.0 is not missed by rounding in the cumulative sum.
    r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1
    return min(r, sv.numel())


def _check_rank(rank, N: int, K: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {rank!r}")
    if not 1 <= rank <= min(N, K):
        raise ValueError(f"rank={rank} does not fit a ({N}, {K}) weight; use 1 <= rank <= {min(N, K)}")


def svd(W: torch.Tensor, *, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD: ``U = P_r Sigma_r`` (N, r), ``V = Q_r^T`` (r, K)."""
    check_weight(W)
    N, K = W.shape
    _check_rank(rank, N, K)
    P, sig, Qt = torch.linalg.svd(W.double(), full_matrices=False)
    return (P[:, :rank] * sig[:rank]).float().contiguous(), Qt[:rank].float().contiguous()


def whitened_svd(W: torch.Tensor, H: torch.Tensor, *, rank: int, damp: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM truncation-aware whitening: SVD of ``W S`` with ``S = chol(H + damp * mean(diag H) * I)``.

    ``damp`` is relative to the mean diagonal (as for GPTQ) and keeps ``S`` invertible when some
    inputs are dead or collinear. SVD-LLM uses no damping; every bit of it moves the factorization
    away from the calibration optimum. 1e-3 (the default) measured as good as undamped on held-out
    data on the default model's layers, where GPTQ's 0.01 cost up to 25% (``experiments/measure/damping.py``).
    """
    check_weight(W)
    N, K = W.shape
    check_hessian(H, K)
    _check_rank(rank, N, K)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"damp must be a non-negative float (relative to mean(diag(H))), got {damp!r}")
    Hd = H.double().clone()
    mean_diag = Hd.diagonal().mean()
    if not mean_diag > 0:
        raise ValueError("H has no positive diagonal: the layer received no calibration input")
    Hd.diagonal().add_(damp * mean_diag)
    S, info = torch.linalg.cholesky_ex(Hd)
    if info != 0:
        raise ValueError(f"H + damp*mean(diag(H))*I is not positive definite with damp={damp}; raise damp")
    P, sig, Qt = torch.linalg.svd(W.double() @ S, full_matrices=False)
    U = P[:, :rank] * sig[:rank]
    # V = Q_r^T S^-1, i.e. the solution X of X S = Q_r^T (S lower triangular).
    V = torch.linalg.solve_triangular(S, Qt[:rank], upper=False, left=False)
    return U.float().contiguous(), V.float().contiguous()
