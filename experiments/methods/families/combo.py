"""Prune, then quantize the kept weights: ``combo`` of a pruning step and a quantization step.

    {"method": "combo", "steps": [{"method": "sparsegpt", "pattern": "2:4"},
                                  {"method": "gptq", "bits": 4, "group_size": 64}]}

No module stores sparse *and* quantized weights yet, so the layer becomes a ``SparseLinear`` over
the dequantized kept weights (values exactly on the quantization grid, real sparse forward) and its
size is a *model*: the sparse format's indices/metadata + ``bits`` per stored value + the
quantizer's scales/zeros. Such reports carry ``size_is_modelled=True``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from torch import nn

from experiments.methods.families import quant, sparse
from experiments.methods.families.base import stored_bytes
from experiments.methods.spec import Family, LayerResult, fail, family_of, parse_spec, register


def modelled_sparse_quant_bytes(sparse_mod: nn.Module, qmod: nn.Module) -> int:
    """Size model for prune-then-quantize: sparse metadata + ``bits`` per stored value + scales/zeros.

    The sparse format stores its values as 16-bit floats (``format_values()`` of them: N:M and block
    formats the kept values, the unstructured masked-tile format the whole weight plus a bit mask);
    exactly those value bytes are replaced by ``bits`` per stored value, and the quantizer's
    scales/zeros are added as QuantLinear's format stores them.
    """
    values = sparse_mod.format_values()
    meta_bytes = stored_bytes(sparse_mod) - values * 2
    scale_zero_bytes = stored_bytes(qmod) - qmod.packed.numel() * qmod.packed.element_size()
    return meta_bytes + math.ceil(values * qmod.bits / 8) + scale_zero_bytes


def _damps(steps) -> str | float:
    """The damping of the damped step(s): one value, or ``method=value`` pairs if they differ."""
    damped = [s for s in steps if s.damp is not None]
    if not damped:
        return ""
    if len({s.damp for s in damped}) == 1:
        return damped[0].damp
    return "; ".join(f"{s.method}={s.damp:g}" for s in damped)


class ComboFamily(Family):
    name = "combo"
    methods = {"combo": frozenset({"steps"})}
    columns = ("prune_method", "quant_method", "damp")

    def parse(self, method: str, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
        steps = spec.get("steps")
        if not isinstance(steps, (list, tuple)) or len(steps) != 2:
            fail(where, "combo needs steps=[<pruning step>, <quantization step>] (prune, then quantize the kept weights)")
        parsed = tuple(parse_spec(s, where=f"{where} step {i + 1}") for i, s in enumerate(steps))
        if parsed[0].family != sparse.FAMILY.name or parsed[1].family != quant.FAMILY.name:
            fail(where, f"combo steps are {[s.method for s in parsed]}; the supported combination is a "
                        f"pruning step ({'/'.join(sparse.FAMILY.methods)}) followed by a quantization step "
                        f"({'/'.join(quant.FAMILY.methods)})")
        return {"steps": parsed}

    def label(self, spec) -> str:
        return "+".join(s.label() for s in spec.steps)

    def needs(self, spec) -> set[str]:
        return set().union(*(s.needs() for s in spec.steps))

    def check_fits(self, spec, shapes) -> None:
        for s in spec.steps:
            family_of(s.method).check_fits(s, shapes)

    def compress_layer(self, spec, w, bias, stats) -> LayerResult:
        p, q = spec.steps
        w_p, mask = sparse.prune(p, w, stats)
        mask = mask.bool()
        qmod = quant.quant_module(quant.quantize(q, w_p.float() * mask, stats, mask=mask), None)
        # Pruned positions are structural zeros of the sparse format, not stored values; the kept
        # values are exactly the quantized ones (fp16 scales included).
        w_hat = qmod.dequantize().float() * mask
        mod = sparse.sparse_module(w_hat, mask, bias, p.pattern)
        return LayerResult(mod, w_hat, modelled_sparse_quant_bytes(mod, qmod), nnz=int(mask.sum()), modelled=True)

    def method_columns(self, spec) -> dict[str, Any]:
        """The pruning columns from the first step, the quantization columns from the second."""
        cols: dict[str, Any] = {}
        for s in spec.steps:
            cols.update(family_of(s.method).method_columns(s))
        cols["damp"] = _damps(spec.steps)
        return cols

    def uniform_grid(self, spec) -> dict[str, Any] | None:
        """The quantization step's grid."""
        q = spec.steps[1]
        return family_of(q.method).uniform_grid(q)

    def storage_format(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """A prune-then-quantize layer runs through a ``SparseLinear`` over the dequantized kept values,
        so it is timed as its pruning step's sparse format."""
        prune = [s for s in spec.get("steps") or [] if "sparsity" in s or "pattern" in s]
        if not prune:
            raise ValueError(f"combo spec={dict(spec)} has no pruning step to take the format from")
        return family_of(prune[0]["method"]).storage_format(prune[0])


FAMILY = register(ComboFamily())
