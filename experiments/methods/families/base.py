"""Helpers the family modules share: spec checks (numbers, damping, group sizes), fp16 rounding, the
dense and random layers, the stored-byte count. The family interface and the registry are
:mod:`experiments.methods.spec`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from experiments.methods.spec import MethodSpec, fail

# GPTQ's and SparseGPT's damping (relative to mean(diag H)), as in their reference code; labels
# name a damping only when it differs from this value (the former default of every method).
DEFAULT_DAMP = 0.01


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_damp(spec: Mapping[str, Any], where: str, default: float = DEFAULT_DAMP) -> float:
    d = spec.get("damp", default)
    if not is_number(d) or not 0 <= d < 1:
        fail(where, f"damp={d!r} must be in [0, 1) (fraction of the mean diagonal of H added before inverting)")
    return float(d)


def damp_suffix(spec: "MethodSpec") -> str:
    """``-damp<d>`` for a label when the damping differs from :data:`DEFAULT_DAMP`, else ``""``."""
    return f"-damp{spec.damp:g}" if spec.damp is not None and spec.damp != DEFAULT_DAMP else ""


def check_group_fits(group_size: int, shapes: Mapping[str, tuple[int, int]]) -> None:
    """A group (of weights sharing a scale) must not be larger than the smallest K of the layers."""
    ks = sorted({k for _, k in shapes.values()})
    if group_size != -1 and group_size > ks[0]:
        fail("group_size", f"group_size={group_size} is larger than the layer's in_features K={ks[0]} "
                           f"(layers have K in {ks}); use a group size <= {ks[0]} (a partial last group is fine) "
                           f"or -1 for one group per output channel")


def fp16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back: the values a deployment stores, kept in fp32 for the fp32 evaluation."""
    return t.to(torch.float16).float()


def dense_linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def stored_bytes(mod: nn.Module) -> int:
    """``memory_bytes()`` of the module: its storage format, floats at 16 bits, bias excluded.

    The evaluation runs in fp32 (the model's dtype), but a compressed layer is deployed with fp16
    floats (scales, factors, kept values), and the ratio is taken against fp16 dense weights. The
    modules count their formats that way whatever dtype and backend they hold; the values were
    rounded to fp16 before the module was built (see :func:`fp16_exact`), so this is the size of
    exactly what was evaluated. The bias is not compressed and is counted on neither side.
    """
    return int(mod.memory_bytes())


def random_linear(N: int, K: int, dtype: torch.dtype, device, generator: torch.Generator) -> nn.Linear:
    """An ``nn.Linear(K, N)`` without bias, weights ~ N(0, 1/K) from ``generator`` (the format builders' input)."""
    lin = nn.Linear(K, N, bias=False)
    w = torch.randn(N, K, generator=generator) * (1.0 / math.sqrt(K))
    lin.weight.data = w.to(device=device, dtype=dtype)
    return lin

