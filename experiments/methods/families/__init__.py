"""Compression families, one module per family (the interface and the registry: :mod:`experiments.methods.spec`).

One module per family; importing it registers it. The driver (:mod:`experiments.methods.compress`) and the
sweep tables consult the registry only:

- ``dense``: the uncompressed baseline (model level)
- ``quant``: uniform weight-only quantization, ``rtn`` / ``gptq`` -> ``QuantLinear``
- ``sparse``: ``magnitude`` / ``wanda`` / ``sparsegpt`` pruning -> ``SparseLinear``
- ``lowrank``: ``svd`` / ``whitened_svd`` -> ``LowRankLinear``
- ``combo``: a pruning step, then a quantization step of the kept weights
- ``codebook``: non-uniform quantization onto a table, ``nf`` / ``fp4`` / ``piecewise`` / ``kmeans`` /
  ``squeezellm`` (optionally with GPTQ over the table) -> ``CodebookLinear``
- ``hqq``: HQQ's calibration-free zero-points (half-quadratic lp solver) -> ``QuantLinear``
- ``awq``: AWQ's activation-aware scales folded into the model, clipping, then RTN or GPTQ (model level)
- ``rotate``: ``quarot``, QuaRot-style orthogonal rotations merged into the model, then RTN or GPTQ (model level)
- ``mixed``: mixed precision under a bit budget: a uniform grid per layer chosen by an exact knapsack over
  Fisher-weighted errors, then RTN or GPTQ (model level)
- ``structured``: ``channels`` / ``heads`` / ``channels_heads`` / ``layers`` structured pruning (model level):
  a physically smaller dense model

Adding a family: a module here with a :class:`Family` subclass that calls :func:`register`, and one
import line below (:mod:`.base` holds the helpers the family modules share). A family whose layers have
a storage format of their own also says it (``Family.storage_format``) and registers a builder of such a
layer from random weights (:func:`~experiments.methods.spec.register_format`): that is all
``experiments.measure`` needs to time it.
"""
from experiments.methods.spec import (FAMILIES, Family, LayerResult, all_columns, fail, family_of, methods,
                                      option_names, register)
from experiments.methods.families import (dense, quant, sparse, lowrank, combo, codebook, structured, hqq,  # noqa: E402,F401,I001
                                          awq, rotate, mixed)  # (importing registers them)

__all__ = ["FAMILIES", "Family", "LayerResult", "all_columns", "fail", "family_of", "methods", "option_names",
           "register"]
