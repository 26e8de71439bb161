"""The calibration second moment ``H = X^T X / n`` as the Hessian-based algorithms use it, and the input
checks they share: GPTQ (:mod:`.quant`), SparseGPT (:mod:`.prune`), GPTQ over a codebook
(:mod:`.codebook`) and whitened SVD (:mod:`.lowrank`).

- :func:`check_weight`, :func:`check_hessian`: a 2-D finite float weight ``(N, K)``, a finite ``(K, K)`` H.
- :func:`prepare_hessian`: float64 H with dead inputs (``H_jj == 0``) made harmless, the weight's
  columns of those inputs zeroed.
- :func:`damped_hinv_chol`: the upper Cholesky factor of the damped inverse, ``(H + damp*mean(diag H)*I)^-1``.

Pure torch, no model knowledge.
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["check_weight", "check_hessian", "prepare_hessian", "damped_hinv_chol"]


def check_weight(W: torch.Tensor, name: str = "W") -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (out_features, in_features), got "
                         f"{getattr(W, 'shape', type(W))}")
    if not W.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {W.dtype}")
    if not torch.isfinite(W).all():
        raise ValueError(f"{name} contains NaN or Inf")


def check_hessian(H: torch.Tensor, K: int) -> None:
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (K, K):
        raise ValueError(f"H must be a ({K}, {K}) tensor (X^T X / n over the layer inputs), got "
                         f"{getattr(H, 'shape', type(H))}")
    if not torch.isfinite(H).all():
        raise ValueError("H contains NaN or Inf")


def damped_hinv_chol(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, float64.

    If the damped matrix is still not positive definite (rank-deficient calibration data in float
    arithmetic), the damping is raised tenfold up to three times, with a warning, rather than failing.
    """
    K = H.shape[0]
    mean_diag = H.diagonal().mean()
    for attempt in range(4):
        Hd = H.clone()
        Hd.diagonal().add_(damp * 10 ** attempt * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                if attempt:
                    warnings.warn(f"H was not positive definite with damp={damp}; used damp={damp * 10 ** attempt}")
                return U
    raise ValueError(f"H is not positive definite even with damp={damp * 1000} (K={K}); "
                     "check the calibration statistics or raise damp")


def prepare_hessian(W: torch.Tensor, H: torch.Tensor, damp: float):
    """Float64 H with dead inputs (diag 0) made harmless, and the weight with those columns zeroed.

    A dead input never reaches the output, so its weights are free: zeroing them costs nothing and
    keeps them out of the grid ranges; setting ``H_jj = 1`` keeps H invertible.
    """
    if not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"damp must be a non-negative float (relative to mean(diag(H))), got {damp!r}")
    H = H.to(torch.float64).clone()
    dead = H.diagonal() == 0
    if bool(dead.all()):
        raise ValueError("H is all zero on its diagonal: the layer received no calibration input")
    H[dead, dead] = 1.0
    W = W.float().clone()
    W[:, dead] = 0.0
    return W, H, dead
