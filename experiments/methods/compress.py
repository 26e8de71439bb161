"""Method specs and sequential layer-wise compression of a causal language model (the driver).

A *method spec* is plain data (a dict from a sweep YAML, or a :class:`MethodSpec`; it, :func:`parse_spec`
and the report types live in :mod:`experiments.methods.spec`, and are imported here)::

    {"method": "dense"}                                                   # baseline
    {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}
    {"method": "gptq", "bits": 3, "group_size": 64, "symmetric": False, "act_order": True}
    {"method": "magnitude" | "wanda" | "sparsegpt", "sparsity": 0.5, "pattern": "unstructured"}
    {"method": "magnitude", "sparsity": 0.5, "scope": "layer"}            # one threshold per layer
    {"method": "sparsegpt", "pattern": "2:4"}                             # N:M implies the sparsity
    {"method": "wanda", "sparsity": 0.5, "pattern": "block:32x32"}
    {"method": "svd" | "whitened_svd", "ratio": 0.6}                      # or "rank": 64, "energy": 0.9
    {"method": "combo", "steps": [{"method": "sparsegpt", "pattern": "2:4"},
                                  {"method": "gptq", "bits": 4, "group_size": 64}]}

Every method belongs to a compression *family* (:mod:`experiments.methods.families`: one module per family
that parses and validates its specs, names them, says which calibration statistics it needs,
compresses a layer or the whole model, and counts the stored bytes). This module never names a
family: it looks the method up in the registry.

:func:`parse_spec` rejects unknown methods/options and out-of-range values, and
:func:`check_spec_fits` rejects settings that do not fit a layer of the model (group size larger
than K, N:M or block pattern that does not divide the layer, rank larger than min(N, K)), both
before any work is done, with a ``ValueError`` that names the option and says what would fit.
Options that changed meaning or default keep their canonical spec, point id and label stable
(``scope`` of magnitude/wanda: :mod:`experiments.methods.families.sparse`; ``damp``: GPTQ and SparseGPT
default to 0.01, whitened SVD to ``DEFAULT_WHITENING_DAMP`` (:mod:`experiments.methods.families.lowrank`),
and labels name it when it is not 0.01).

:func:`compress_model` runs a *model-level* family once on the whole model; for a *layer-level*
family it compresses every linear layer inside the transformer blocks in place, block by block as
GPTQ/SparseGPT do: the calibration inputs of block ``i`` are the outputs of the already
*compressed* blocks ``0..i-1``, so each layer's algorithm sees the errors made upstream. The one
statistic that is not sequential is the per-weight Fisher (``"fisher"``, SqueezeLLM's sensitivity):
squared gradients of the *dense* model's loss, computed once before any layer is compressed, as the
SqueezeLLM paper does.
Embeddings and ``lm_head`` are not compressed: SmolLM2 ties ``lm_head`` to the token embedding,
so compressing one would silently change the other, and the literature we compare with (GPTQ,
SparseGPT, Wanda, SVD-LLM) reports numbers with both kept dense.

Each layer is replaced by a real compressed module (``QuantLinear``, ``SparseLinear``,
``LowRankLinear`` ...), never by a dense copy, and the size columns come from each module's
``memory_bytes()``. The one exception is prune-then-quantize (``combo``), whose size is a model
(:mod:`experiments.methods.families.combo`); such reports carry ``size_is_modelled=True``.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import torch
from torch import nn

from experiments.lm import models  # transformers only inside its functions: spec parsing and `list` work without it
from experiments.methods import families  # noqa: F401  (registers the built-in families)
from experiments.methods.families.base import DEFAULT_DAMP  # noqa: F401  (re-exported)
from experiments.methods.families.lowrank import DEFAULT_WHITENING_DAMP  # noqa: F401  (re-exported)
from experiments.methods.families.quant import DEFAULT_GROUP_SIZE  # noqa: F401  (re-exported)
from experiments.methods.spec import (CompressionReport, LayerRecord, MethodSpec, family_of, fp16_bytes,
                                      parse_spec)


# ----------------------------------------------------------------------------- model structure

def check_spec_fits(spec: MethodSpec, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Raise ``ValueError`` if ``spec`` cannot be applied to a layer of shape (N, K) in ``shapes``."""
    if shapes:
        family_of(spec.method).check_fits(spec, shapes)


# ----------------------------------------------------------------------------- source grid

def aliases_source_grid(spec: MethodSpec, source_grid: Mapping[str, Any] | None) -> bool:
    """Whether a setting's uniform grid (alone or inside a combo) can reproduce the source grid.

    The rule is :func:`experiments.lm.models.aliases_source_grid` (grid containment), applied to the
    grid the spec's family reports (:meth:`~experiments.methods.spec.Family.uniform_grid`; ``None``:
    no uniform grid, never aliases). RTN and GPTQ have integer zero-points (the convention of our
    quantizers and kernels) and are treated alike: on weights that lie on the setting's grid GPTQ's
    error feedback is zero. Consequence on the default model: its Q4_1 grid has fractional
    zero-points (m/d), so no integer-zero setting contains it, not even 4-bit asymmetric groups of
    32, and the flag is False there (measured: RTN w4 g32 leaves about half a step of error, see
    models.py); HQQ's fractional zero-points at 4 bits with groups of 32 do contain it. The
    ``weight_rel_error`` column shows how close every setting came to the source weights.
    """
    if not source_grid:
        return False
    g = family_of(spec.method).uniform_grid(spec)
    if g is None:
        return False
    return bool(models.aliases_source_grid(dict(source_grid), bits=g["bits"], group_size=g["group_size"],
                                           symmetric=bool(g["symmetric"]), integer_zero=bool(g["integer_zero"])))



# ----------------------------------------------------------------------------- calibration

#: Calibration statistics a family may ask for (:meth:`Family.needs`): ``"H"`` and ``"sq"`` come from the
#: inputs each layer receives (sequentially: after the blocks before it were compressed), ``"fisher"``
#: from the gradients of the *dense* model, computed once before any layer is compressed.
STATISTICS = ("H", "sq", "fisher")


class _Stats:
    """Accumulates H = X^T X / n and/or the per-input-feature sum of squares over calibration tokens;
    ``fisher`` holds the layer's (N, K) per-weight Fisher (``models.squared_gradients``) when asked for."""

    def __init__(self, k: int, needs: set[str]):
        self.k, self.n = k, 0
        self.fisher: torch.Tensor | None = None
        # float64 sums: the sum runs over ~10^4-10^5 tokens and H is inverted/Cholesky-factored later.
        self.H = torch.zeros(k, k, dtype=torch.float64) if "H" in needs else None
        self.sq = torch.zeros(k, dtype=torch.float64) if "sq" in needs else None
        # Contribution of the latest batch, reused by layers that receive the same input tensor.
        self.last_n, self.last_H, self.last_sq = 0, None, None

    def hessian(self) -> torch.Tensor:
        return (self.H / max(self.n, 1)).float()


def _capture(model: nn.Module, calib_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Hidden states entering block 0 and the kwargs each block is called with (one dict per block)."""
    got = models.block_prefix_forward(model, calib_ids)
    return got.hidden, got.kwargs


# ----------------------------------------------------------------------------- per-layer compression

def _bias(layer: nn.Module) -> torch.Tensor | None:
    b = getattr(layer, "bias", None)
    return None if b is None else b.detach().float().clone()


def compress_layer(layer: nn.Module, spec: MethodSpec, stats: _Stats | None, *, name: str = ""):
    """Compress one linear layer; returns ``(new_module, LayerRecord, W_hat, size_is_modelled)``."""
    w = models.linear_weight(layer).detach().float().clone()
    n, k = w.shape
    fam = family_of(spec.method)
    if fam.level != "layer":
        raise ValueError(f"method={spec.method!r} (family {fam.name!r}) does not compress single layers; "
                         f"it works on the whole model: use compress_model")
    res = fam.compress_layer(spec, w, _bias(layer), stats)
    rec = LayerRecord(name=name, shape=(n, k), module=type(res.module).__name__, bytes=int(res.bytes),
                      fp16_bytes=fp16_bytes(n, k),
                      weight_sq_error=float((w - res.w_hat).double().square().sum()),
                      weight_sq_norm=float(w.double().square().sum()), rank=res.rank, nnz=res.nnz)
    return res.module, rec, res.w_hat, res.modelled


def module_backends(model: nn.Module) -> str:
    """The backends the compressed modules ran (or will run) with, e.g. "QuantLinear:dequant"."""
    seen = set()
    for mod in model.modules():
        name = type(mod).__name__
        if name in ("QuantLinear", "CodebookLinear", "SparseLinear", "LowRankLinear"):
            b = getattr(mod, "last_backend", None) or getattr(mod, "backend", "?")
            if b == "auto" and hasattr(mod, "resolved_backend"):
                b = mod.resolved_backend(next(mod.buffers()).device)
            seen.add(f"{name}:{b}")
    return ",".join(sorted(seen))


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# ----------------------------------------------------------------------------- the model

@torch.no_grad()
def compress_model(model: nn.Module, spec: Mapping[str, Any] | MethodSpec, calib_ids: torch.Tensor | None,
                   *, progress: bool = True, chunk: int = 8, keep_weights: bool = False,
                   layer_specs: Mapping[str, MethodSpec] | None = None) -> CompressionReport:
    """Compress every linear of every transformer block of ``model`` in place; see module docstring.

    ``layer_specs`` (layer-level families only): a spec per layer name (``block<i>.<name>``, as
    :func:`experiments.lm.models.linear_layers` names them) that replaces ``spec`` for that layer; what a
    family that allocates formats per layer (``mixed``) hands back to the driver. The calibration
    statistics collected are those every spec in use needs.

    ``calib_ids`` (LongTensor (n_samples, seqlen)) is only used by methods that need calibration
    statistics (gptq, wanda, sparsegpt, whitened_svd, squeezellm, and combos containing them); rtn,
    magnitude and svd skip the capture entirely. Blocks run on ``chunk`` calibration samples at a time.
    """
    spec = parse_spec(spec)
    blocks = models.find_blocks(model)
    per_block = [models.find_linears(b) for b in blocks]
    shapes = {f"block{i}.{n}": tuple(models.linear_weight(l).shape)
              for i, ls in enumerate(per_block) for n, l in ls.items()}
    check_spec_fits(spec, shapes)
    fam = family_of(spec.method)
    layer_specs = {k: parse_spec(v) for k, v in (layer_specs or {}).items()}
    unknown_layers = sorted(set(layer_specs) - set(shapes))
    if unknown_layers:
        raise ValueError(f"layer_specs names layers the model does not have: {unknown_layers[:5]}; "
                         f"its layers are {list(shapes)[:3]} ... {list(shapes)[-1:]}")
    for name, s in layer_specs.items():
        if family_of(s.method).level != "layer":
            raise ValueError(f"layer_specs[{name!r}]: method={s.method!r} does not compress single layers")
        check_spec_fits(s, {name: shapes[name]})
    if layer_specs and fam.level != "layer":
        raise ValueError(f"layer_specs needs a layer-level method, not {spec.method!r}")
    t0 = time.perf_counter()
    if fam.level == "model":
        report = fam.compress_model(model, spec, calib_ids, driver=compress_model, progress=progress)
        report.seconds = time.perf_counter() - t0
        if keep_weights and report.weights is None:
            report.weights = {}
        return report
    report = CompressionReport(spec=spec, weights={} if keep_weights else None)
    needs = set(spec.needs()).union(*(s.needs() for s in layer_specs.values()))
    unknown = needs - set(STATISTICS)
    if unknown:
        raise ValueError(f"method {spec.label()} asks for unknown calibration statistics {sorted(unknown)}; "
                         f"the driver collects {list(STATISTICS)}")
    if needs and calib_ids is None:
        raise ValueError(f"method {spec.label()} needs calibration data: pass calib_ids")
    # Gradients of the dense model, before any layer changes (SqueezeLLM's Fisher comes from the
    # uncompressed model); the layer-input statistics below are sequential.
    fisher = models.squared_gradients(model, calib_ids) if "fisher" in needs else {}
    needs = needs - {"fisher"}
    hidden = kwargs = None
    if needs:
        hidden, kwargs = _capture(model, calib_ids)
    from experiments.core.progress import progress_bar
    for i, block in enumerate(progress_bar(blocks, desc=f"compress {spec.label()}", unit="block", leave=False,
                                           enabled=progress)):
        linears = per_block[i]
        stats: dict[str, _Stats] = {}
        for name, layer in linears.items():
            if fisher or needs:
                stats[name] = _Stats(models.linear_weight(layer).shape[1], needs)
            if fisher:
                stats[name].fisher = fisher.pop(f"block{i}.{name}")
        if needs:
            handles = []
            shared: dict[str, Any] = {"x": None, "owner": None}
            for name, layer in linears.items():
                handles.append(layer.register_forward_pre_hook(_make_hook(stats[name], shared)))
            try:
                models.run_block(block, hidden, kwargs[i], batch_size=chunk)
            finally:
                for h in handles:
                    h.remove()
        for name, layer in linears.items():
            lname = f"block{i}.{name}"
            new, rec, w_hat, modelled = compress_layer(layer, layer_specs.get(lname, spec), stats.get(name),
                                                       name=lname)
            _set_submodule(block, name, new)
            report.layers.append(rec)
            report.size_is_modelled |= modelled
            if keep_weights:
                report.weights[rec.name] = w_hat
        stats.clear()
        if needs:
            hidden = models.run_block(block, hidden, kwargs[i], batch_size=chunk)
    report.seconds = time.perf_counter() - t0
    return report


def _make_hook(st: _Stats, shared: dict[str, Any]):
    # q/k/v (and gate/up) receive the very same input tensor: compute its statistics once and
    # copy them, which saves ~half of the calibration matmuls on a Llama block.
    def hook(_module, args):
        x = args[0]
        if shared["x"] is x and shared["owner"] is not None and shared["owner"].k == st.k:
            src = shared["owner"]
            st.n += src.last_n
            if st.H is not None and src.last_H is not None:
                st.H += src.last_H
            if st.sq is not None and src.last_sq is not None:
                st.sq += src.last_sq
            st.last_n, st.last_H, st.last_sq = src.last_n, src.last_H, src.last_sq
            return None
        xf = x.reshape(-1, st.k).float()
        st.last_n = xf.shape[0]
        st.last_H = (xf.T @ xf).double() if st.H is not None else None
        st.last_sq = xf.square().sum(0).double() if st.sq is not None else None
        st.n += st.last_n
        if st.H is not None:
            st.H += st.last_H
        if st.sq is not None:
            st.sq += st.last_sq
        shared["x"], shared["owner"] = x, st
        return None
    return hook
