"""Layer-wise compression algorithms on a single ``(N, K)`` weight and its calibration statistics.

Pure torch and model-agnostic: the sweep code (``experiments/methods/compress.py``) collects ``H = X^T X / n``
(or its diagonal) for each linear layer and calls these functions.

- :mod:`.quant`: :func:`rtn`, :func:`gptq` -> :class:`QuantResult` on the grid of
  ``triton_kernels/dequant_matmul.py``; :func:`dequantize_result`.
- :mod:`.prune`: :func:`magnitude`, :func:`wanda`, :func:`sparsegpt` with patterns parsed by
  :func:`parse_pattern` ("unstructured", "2:4", "block:32x32").
- :mod:`.codebook`: :func:`nf`, :func:`fp4`, :func:`piecewise`, :func:`kmeans`, :func:`squeezellm`,
  :func:`gptq_codebook` -> :class:`CodebookResult` on the grid of ``triton_kernels/codebook_matmul.py``
  (a per-row or shared table times group scales); :func:`dequantize_codebook_result`.
- :mod:`.lowrank`: :func:`svd`, :func:`whitened_svd`, :func:`rank_for_ratio`, :func:`rank_for_energy`.
- :mod:`.hessian`: the calibration Hessian ``H`` as GPTQ, SparseGPT, GPTQ-codebook and whitened SVD use
  it (checks, dead inputs, the damped inverse's Cholesky factor).
- :mod:`.structured`: model-level structured pruning (MLP channels, attention heads, whole blocks) on
  Llama-family transformers models: :func:`~.structured.prune_model` (imported on its own).
"""
from .codebook import (CodebookResult, dequantize_codebook_result, fp4, gptq_codebook, kmeans, nf, piecewise,
                       squeezellm)
from .lowrank import rank_for_energy, rank_for_ratio, svd, whitened_svd
from .prune import Pattern, magnitude, parse_pattern, sparsegpt, wanda
from .quant import QuantResult, dequantize_result, gptq, rtn

__all__ = [
    "QuantResult", "rtn", "gptq", "dequantize_result",
    "Pattern", "parse_pattern", "magnitude", "wanda", "sparsegpt",
    "CodebookResult", "nf", "fp4", "piecewise", "kmeans", "squeezellm", "gptq_codebook",
    "dequantize_codebook_result",
    "rank_for_ratio", "rank_for_energy", "svd", "whitened_svd",
]
