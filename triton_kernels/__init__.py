"""Triton kernels for compressed linear layers.

Three families, each one self-contained file that imports only torch and triton:

- ``triton_kernels.dequant_matmul``: packed 1-8-bit weights with group-wise scales/zeros.
- ``triton_kernels.sparse_matmul``: block, N:M, unstructured and activation sparsity.
- ``triton_kernels.lowrank_linear``: rank-r factored linear (fused for small r).

``triton_kernels.nn`` holds the ``nn.Module`` wrappers (QuantLinear, SparseLinear, LowRankLinear)
that pick the best backend for the device. Importing this package imports nothing heavy.
"""
