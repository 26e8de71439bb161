"""Triton kernels for compressed linear layers.

Four families, each one self-contained file that imports only torch and triton:

- ``triton_kernels.dequant_matmul``: packed 1-8-bit weights with group-wise scales/zeros.
- ``triton_kernels.codebook_matmul``: packed 1-8-bit codes into a lookup table (NF4, FP4, k-means,
  SqueezeLLM; shared or per-row) with optional group scales, on dequant_matmul's packing layout.
- ``triton_kernels.sparse_matmul``: block, N:M, unstructured and activation sparsity.
- ``triton_kernels.lowrank_linear``: rank-r factored linear (fused for small r).

``triton_kernels.nn`` holds the ``nn.Module`` wrappers (QuantLinear, SparseLinear, LowRankLinear,
CodebookLinear) that pick the best backend for the device. Importing this package imports nothing heavy.
"""
