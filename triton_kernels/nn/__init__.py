"""``nn.Module`` wrappers around the kernel families; each picks the best backend for the device."""
from triton_kernels.nn._backend import autotune
from triton_kernels.nn.codebook import CodebookLinear
from triton_kernels.nn.lowrank import LowRankLinear
from triton_kernels.nn.quant import QuantLinear
from triton_kernels.nn.sparse import SparseLinear

__all__ = ["QuantLinear", "SparseLinear", "LowRankLinear", "CodebookLinear", "autotune"]
