"""The layers' kernels as torch custom operators, so ``torch.compile(model, fullgraph=True)`` traces
a model with QuantLinear / SparseLinear / LowRankLinear / CodebookLinear layers without graph breaks.

Why operators: Dynamo cannot trace into a Triton launcher that autotunes, checks its arguments in
Python and picks configs, nor build torch sparse (CSR/BSR) tensors inside a graph, nor follow a
data-dependent gather (``nonzero``). Registered with ``torch.library.custom_op`` and a fake
(meta) implementation that only says the output's shape and dtype, each becomes one opaque node of
the graph that runs the eager code at run time. What torch already provides as operators (the
weight-only CPU ops ``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm``, ``F.linear``) is
traced as it is, and so is building the prepacked CPU weights: a first compiled call that finds no
prepacked copy builds it inside the graph and stores it on the module; Dynamo's guard on that dict
then recompiles once, and the second graph reads the stored copy (two compilations, then steady).

The modules call these operators only while compiling (``torch.compiler.is_compiling()``); eager
calls go to the Python functions directly (no dispatcher overhead per layer). Namespace:
``torch.ops.triton_kernels.*``. Every operator takes 2-D activations ``(M, K)`` plus the layer's
tensors and static ints, returns a new ``(M, N)`` tensor in the activation dtype, and mutates
nothing. The fakes promise a contiguous ``(M, N)`` result; every operator returns one
(``torch.library.opcheck`` checks them in ``tests/test_compile.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from triton_kernels import codebook_matmul as cb
from triton_kernels import dequant_matmul as dq
from triton_kernels import lowrank_linear as lr
from triton_kernels import sparse_matmul as sm

_NS = "triton_kernels"


def _out(x: Tensor, n: int) -> Tensor:
    return x.new_empty(x.shape[0], n)


# -- dequant-matmul (QuantLinear, backend "triton") -------------------------------------------------

@torch.library.custom_op(f"{_NS}::dequant_linear", mutates_args=())
def dequant_linear(x: Tensor, packed: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor],
                   bits: int, group_size: int, symmetric: bool) -> Tensor:
    """``dequant_matmul.dequant_matmul`` (the Triton kernel)."""
    return dq.dequant_matmul(x, packed, scales, zeros, bits=bits, group_size=group_size, symmetric=symmetric,
                             bias=bias)


@dequant_linear.register_fake
def _(x, packed, scales, zeros, bias, bits, group_size, symmetric):
    return _out(x, packed.shape[0])


# -- codebook matmul (CodebookLinear, backend "triton") ---------------------------------------------

@torch.library.custom_op(f"{_NS}::codebook_linear", mutates_args=())
def codebook_linear(x: Tensor, packed: Tensor, codebook: Tensor, scales: Optional[Tensor], bias: Optional[Tensor],
                    bits: int, group_size: int) -> Tensor:
    """``codebook_matmul.codebook_matmul`` (the Triton kernel)."""
    return cb.codebook_matmul(x, packed, codebook, scales, bits=bits, group_size=group_size, bias=bias)


@codebook_linear.register_fake
def _(x, packed, codebook, scales, bias, bits, group_size):
    return _out(x, packed.shape[0])


# -- low rank (LowRankLinear, backend "triton") -----------------------------------------------------

@torch.library.custom_op(f"{_NS}::lowrank_linear", mutates_args=())
def lowrank_linear(x: Tensor, U: Tensor, V: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``lowrank_linear.lowrank_linear`` (fused kernel for small r, two GEMMs above)."""
    return lr.lowrank_linear(x, U, V, bias)


@lowrank_linear.register_fake
def _(x, U, V, bias):
    return _out(x, U.shape[0])


# -- sparse (SparseLinear) --------------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::block_sparse_linear", mutates_args=())
def block_sparse_linear(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, bias: Optional[Tensor],
                        N: int, K: int, bn: int, bk: int) -> Tensor:
    """``sparse_matmul.block_sparse_matmul`` (Triton)."""
    return sm.block_sparse_matmul(x, sm.BlockSparseWeight(values, row_ptr, col_idx, (N, K), (bn, bk)), bias)


@block_sparse_linear.register_fake
def _(x, values, row_ptr, col_idx, bias, N, K, bn, bk):
    return _out(x, N)


@torch.library.custom_op(f"{_NS}::nm_linear", mutates_args=())
def nm_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor], N: int, K: int, n: int,
              m: int) -> Tensor:
    """``sparse_matmul.nm_matmul`` (Triton)."""
    return sm.nm_matmul(x, sm.NMWeight(values, meta, (N, K), n, m), bias)


@nm_linear.register_fake
def _(x, values, meta, bias, N, K, n, m):
    return _out(x, N)


@torch.library.custom_op(f"{_NS}::masked_linear", mutates_args=())
def masked_linear(x: Tensor, weight: Tensor, bits: Tensor, tile_ptr: Tensor, tile_k: Tensor, bias: Optional[Tensor],
                  tn: int, tk: int) -> Tensor:
    """``sparse_matmul.packed_masked_matmul`` (Triton)."""
    return sm.packed_masked_matmul(x, sm.MaskedWeight(weight, bits, tile_ptr, tile_k, tuple(weight.shape), (tn, tk)),
                                   bias)


@masked_linear.register_fake
def _(x, weight, bits, tile_ptr, tile_k, bias, tn, tk):
    return _out(x, weight.shape[0])


@torch.library.custom_op(f"{_NS}::activation_sparse_linear", mutates_args=())
def activation_sparse_linear(x: Tensor, weight_t: Tensor, mask: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``sparse_matmul.activation_sparse_matmul`` (Triton) with the keep-mask of x."""
    return sm.activation_sparse_matmul(x, weight_t.t(), mask=mask, bias=bias)


@activation_sparse_linear.register_fake
def _(x, weight_t, mask, bias):
    return _out(x, weight_t.shape[1])


def csr_linear_impl(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Optional[Tensor], N: int,
                    K: int) -> Tensor:
    """torch's CSR x dense matmul (``y = W x^T``, transposed back), bias added."""
    w = torch.sparse_csr_tensor(crow, col, values, (N, K), check_invariants=False)
    y = (w @ x.t()).t()
    return y if bias is None else y + bias


def bsr_linear_impl(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor], N: int,
                    K: int, bn: int, bk: int) -> Tensor:
    """torch's BSR x dense matmul; torch needs whole blocks, so x is zero-padded and y sliced."""
    Np, Kp = -(-N // bn) * bn, -(-K // bk) * bk
    w = torch.sparse_bsr_tensor(row_ptr, col_idx, values, (Np, Kp), check_invariants=False)
    y = (w @ torch.nn.functional.pad(x, (0, Kp - K)).t()).t()[:, :N]
    return y if bias is None else y + bias


def gather_linear_impl(xs: Tensor, mask: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``xs[:, kept] @ W^T[kept]`` over the input features any row keeps (``xs`` already masked)."""
    kept = mask.any(0).nonzero().squeeze(1)
    y = xs[:, kept] @ weight_t[kept]
    return y if bias is None else y + bias


@torch.library.custom_op(f"{_NS}::csr_linear", mutates_args=())
def csr_linear(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Optional[Tensor], N: int,
               K: int) -> Tensor:
    return csr_linear_impl(x, crow, col, values, bias, N, K).contiguous()  # the fake's layout


@csr_linear.register_fake
def _(x, crow, col, values, bias, N, K):
    return _out(x, N)


@torch.library.custom_op(f"{_NS}::bsr_linear", mutates_args=())
def bsr_linear(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor], N: int, K: int,
               bn: int, bk: int) -> Tensor:
    return bsr_linear_impl(x, row_ptr, col_idx, values, bias, N, K, bn, bk).contiguous()  # the fake's layout


@bsr_linear.register_fake
def _(x, row_ptr, col_idx, values, bias, N, K, bn, bk):
    return _out(x, N)


@torch.library.custom_op(f"{_NS}::gather_linear", mutates_args=())
def gather_linear(xs: Tensor, mask: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    return gather_linear_impl(xs, mask, weight_t, bias).contiguous()


@gather_linear.register_fake
def _(xs, mask, weight_t, bias):
    return _out(xs, weight_t.shape[1])


def compiling() -> bool:
    """True while Dynamo traces (the modules then route through the operators above)."""
    return torch.compiler.is_compiling()
