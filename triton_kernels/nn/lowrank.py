"""``LowRankLinear``: a linear layer stored as rank-r factors, ``y = (x @ V^T) @ U^T + bias``.

Backends (``backend=``):
    "auto"        Triton (``triton_kernels.lowrank_linear``) where it can run (CUDA, or CPU under
                  TRITON_INTERPRET=1), else "two_matmul". On CPU that is the only backend that keeps
                  the factored footprint (the product ``U @ V`` would be the dense weight), so there
                  is nothing to time there; QuantLinear and SparseLinear, which have several CPU
                  candidates, choose by measurement (``triton_kernels.nn._backend.measured_choice``).
    "triton"      the Triton kernels (fused for r <= 128, two GEMMs above); ValueError where they
                  cannot run.
    "two_matmul"  ``F.linear(F.linear(x, V), U, bias)``: two dense torch matmuls, the fast choice on
                  CPU. It rounds t to the activation dtype just as the kernels do, so all backends
                  agree with ``lowrank_linear_reference``.

U, V and bias are buffers (inference layer: the Triton kernels have no backward), so ``.to()``,
``state_dict()`` and ``load_state_dict()`` carry them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from triton_kernels.lowrank_linear import lowrank_linear, svd_factors
from triton_kernels.nn import _ops
from triton_kernels.nn._backend import (check_backend, check_input, cpu_dense_rows, format_nbytes, tensor_nbytes,
                                         triton_usable)

BACKENDS = ("auto", "triton", "two_matmul")


class LowRankLinear(nn.Module):
    """Rank-r factored linear layer. ``U``: (out_features, r), ``V``: (r, in_features)."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None,
                 *, backend: str = "auto"):
        super().__init__()
        for name, t in (("U", U), ("V", V)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name} must be a 2-D tensor; got {getattr(t, 'shape', type(t).__name__)}")
        if U.shape[1] != V.shape[0]:
            raise ValueError(f"U {tuple(U.shape)} and V {tuple(V.shape)} disagree on the rank: "
                             f"U must be (N, r) and V (r, K)")
        n, r = U.shape
        k = V.shape[1]
        if r < 1:
            raise ValueError(f"rank must be >= 1; U has shape {tuple(U.shape)}")
        if r > min(n, k):
            raise ValueError(f"rank {r} exceeds min(out_features, in_features) = {min(n, k)}: "
                             f"a rank that high stores more than the dense weight")
        if U.dtype != V.dtype or not U.dtype.is_floating_point:
            raise TypeError(f"U.dtype ({U.dtype}) and V.dtype ({V.dtype}) must be one floating dtype")
        if U.device != V.device:
            raise ValueError(f"U is on {U.device} but V is on {V.device}; put them on one device")
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (n,):
                raise ValueError(f"bias must have shape ({n},) = (out_features,); "
                                 f"got {getattr(bias, 'shape', type(bias).__name__)}")
            if bias.dtype != U.dtype:
                raise TypeError(f"bias.dtype ({bias.dtype}) must equal U.dtype ({U.dtype})")
            if bias.device != U.device:
                raise ValueError(f"bias is on {bias.device} but U is on {U.device}")
        self.backend = check_backend(backend, BACKENDS)
        self.in_features = k
        self.out_features = n
        self.register_buffer("U", U.detach().contiguous())
        self.register_buffer("V", V.detach().contiguous())
        self.register_buffer("bias", bias.detach().contiguous() if bias is not None else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, energy: float | None = None,
                    *, backend: str = "auto") -> "LowRankLinear":
        """Truncated SVD of ``linear.weight`` (sqrt(S) split into U and V, see ``svd_factors``).

        rank: keep this many singular values, 1 <= rank <= min(out_features, in_features).
        energy: keep the smallest rank whose squared singular values sum to this fraction, in (0, 1].
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear; got {type(linear).__name__}")
        w = linear.weight
        if rank is not None and not (isinstance(rank, int) and 1 <= rank <= min(w.shape)):
            raise ValueError(f"rank must be an int in [1, min(out_features, in_features)] = "
                             f"[1, {min(w.shape)}]; got {rank!r}")
        if energy is not None and not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1]; got {energy}")
        if (rank is None) == (energy is None):
            raise ValueError("give exactly one of rank= or energy=")
        U, V = svd_factors(w, rank=rank, energy=energy)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(U, V, bias, backend=backend)

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def memory_bytes(self, include_bias: bool = False) -> int:
        """Bytes of the factored format: U and V at 16 bits (fp16/bf16), whatever dtype they are held in.

        The bias (16-bit) only with ``include_bias=True``: it is the same for the dense layer and not
        part of the compressed weight. ``resident_bytes()`` counts the actual tensors.
        """
        return format_nbytes(self.U, self.V, self.bias if include_bias else None)

    def bits_per_weight(self) -> float:
        """Bits of U + V (no bias, 16-bit floats) per entry of the dense (out_features x in_features) weight."""
        return 8.0 * self.memory_bytes() / (self.out_features * self.in_features)

    def resident_bytes(self) -> int:
        """Bytes of U, V and bias as this module holds them now (actual dtype)."""
        return tensor_nbytes(self.U, self.V, self.bias)

    def resolved_backend(self, device: torch.device) -> str:
        """The backend forward uses on ``device`` ("triton" or "two_matmul")."""
        if self.backend == "auto":
            return "triton" if triton_usable(device) else "two_matmul"
        if self.backend == "triton" and not triton_usable(device):
            raise ValueError(f"backend='triton' cannot run on {device}: it needs a CUDA device or "
                             f"TRITON_INTERPRET=1 for CPU tensors; use backend='two_matmul' or 'auto'")
        return self.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, in_features=self.in_features, device=self.U.device, dtype=self.U.dtype)
        if self.resolved_backend(x.device) == "triton":
            if _ops.compiling():  # one opaque operator under torch.compile (triton_kernels.nn._ops)
                y = _ops.lowrank_linear(x.reshape(-1, self.in_features), self.U, self.V, self.bias)
                return y.reshape(*x.shape[:-1], self.out_features)
            return lowrank_linear(x, self.U, self.V, self.bias)
        x = cpu_dense_rows(x)  # torch's CPU kernels can misread column slices (see the helper)
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, dtype={self.U.dtype}, backend={self.backend!r}, "
                f"bits_per_weight={self.bits_per_weight():.3f}")
