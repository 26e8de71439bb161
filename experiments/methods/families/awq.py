"""AWQ (activation-aware weight quantization), a model-level family: scales folded into the model, then RTN or GPTQ.

    {"method": "awq", "bits": 3, "group_size": 128}                       # AWQ scales + clipping, then RTN
    {"method": "awq", "bits": 4, "group_size": 128, "clip": false}        # scales only
    {"method": "awq", "bits": 3, "group_size": 128, "gptq": true}         # AWQ, then GPTQ (act_order, damp)

The algorithm, what it follows (Lin et al. 2024, ``mit-han-lab/llm-awq``) and what differs:
:mod:`experiments.methods.algorithms.awq`. Per block, on the calibration windows: per-input-channel scales
``s = mean|x|^alpha`` (``alpha`` from a 20-point grid, the one whose RTN-quantized weights give the smallest
output error of the inspected module), folded exactly into the preceding op (RMSNorm -> q/k/v and
gate/up; v_proj -> o_proj where the shapes allow, which grouped-query attention such as SmolLM2's does
not; up_proj -> down_proj), then the weights clipped per group (``auto_clip``, not q/k). The model,
still dense and computing the same function up to the clipping, is then quantized by the driver with
``rtn`` (the paper's setting) or ``gptq`` (``gptq: true``) on the same grid: every layer is a plain
``QuantLinear`` (integer zero-points), so every kernel, export and CPU path runs it unchanged; the
norms' weights are the only other tensors that change (a saved point carries them: ``rewrites_base``).

Rows: sizes are the ``QuantLinear`` formats; ``weight_rel_error`` compares each layer's effective weight
in the original basis (``diag(out_scale) W_hat diag(in_scale)^-1``) with the original weight, so clipping
and quantization both count. ``uniform_grid`` is ``None``: the scaled weights are not the source's, so
no setting reproduces the source grid.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from experiments.methods.algorithms import awq as alg
from experiments.methods.families import quant
from experiments.methods.families.base import check_group_fits
from experiments.methods.spec import CompressionReport, Family, LayerRecord, fail, register

_OPTS = frozenset({"bits", "group_size", "symmetric", "clip", "gptq", "act_order", "damp"})


def search_quantizer(spec):
    """``W -> dequantized RTN(W)`` on the spec's grid: what the scale and clip searches quantize with."""
    from experiments.methods.algorithms.quant import dequantize_result, rtn

    def quantize(w: torch.Tensor) -> torch.Tensor:
        return dequantize_result(rtn(w, bits=spec.bits, group_size=spec.group_size, symmetric=bool(spec.symmetric)))
    return quantize


class AwqFamily(Family):
    name = "awq"
    methods = {"awq": _OPTS}
    columns = ("quant_method", "bits", "group_size", "symmetric", "gptq", "act_order", "damp")
    level = "model"
    rewrites_base = True

    def parse(self, method: str, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
        # bits, group size and sym/asym as the quant family checks them (the grid of the RTN/GPTQ step).
        kw = quant.FAMILY.parse("rtn", {"bits": spec.get("bits"),
                                        **{k: spec[k] for k in ("group_size", "symmetric") if k in spec}}, where)
        clip = spec.get("clip", True)
        if not isinstance(clip, bool):
            fail(where, f"clip={clip!r} must be true or false (AWQ's per-group weight clipping search)")
        kw.update(clip=clip, **quant.parse_gptq_step(spec, where, "the scaled model"))
        return kw

    def label(self, spec) -> str:
        g = "pc" if spec.group_size == -1 else f"g{spec.group_size}"
        s = f"awq-w{spec.bits}-{g}-{'sym' if spec.symmetric else 'asym'}" + ("" if spec.clip else "-noclip")
        return s + quant.gptq_suffix(spec)

    def needs(self, spec) -> set[str]:
        # The family runs its own calibration pass; "sq" tells the sweep to hand it calibration windows.
        return {"sq"} | ({"H"} if spec.gptq else set())

    def check_fits(self, spec, shapes) -> None:
        names = {name.split(".", 1)[1] for name in shapes}
        need = {f"self_attn.{n}" for n in alg.ATTN} | {f"mlp.{n}" for n in alg.MLP}
        if not need <= names:
            fail("method='awq'", f"AWQ folds its scales into Llama-family blocks ({', '.join(sorted(need))}); this "
                                 f"model's block linears are {sorted(names)}")
        check_group_fits(spec.group_size, shapes)

    def compress_model(self, model, spec, calib_ids, *, driver, progress=True):
        """Scale and clip ``model`` in place (AWQ), then quantize it with ``driver`` (RTN or GPTQ)."""
        from experiments.lm.models import linear_layers, linear_weight
        if calib_ids is None:
            raise ValueError(f"method {spec.label()} needs calibration data: pass calib_ids")
        orig = {name: linear_weight(layer).detach().float().clone() for name, layer in linear_layers(model)}
        res = alg.awq_model(model, calib_ids, quantize=search_quantizer(spec), group_size=spec.group_size,
                            clip=spec.clip, progress=progress)
        qreport = driver(model, quant.quantizer_spec(spec), calib_ids, progress=progress, keep_weights=True)
        report = CompressionReport(spec=spec)
        for rec in qreport.layers:
            w, t = orig[rec.name], res.layers.get(rec.name, alg.AwqLayer())
            w_eff = qreport.weights[rec.name].float()
            if t.out_scale is not None:
                w_eff = w_eff * t.out_scale.view(-1, 1)
            if t.in_scale is not None:
                w_eff = w_eff / t.in_scale.view(1, -1)
            report.layers.append(LayerRecord(rec.name, rec.shape, rec.module, rec.bytes, rec.fp16_bytes,
                                             float((w - w_eff).double().square().sum()),
                                             float(w.double().square().sum())))
        report.size_is_modelled = qreport.size_is_modelled
        return report

    def method_columns(self, spec) -> dict[str, Any]:
        return {"quant_method": spec.method, "bits": spec.bits, "group_size": spec.group_size,
                "symmetric": bool(spec.symmetric), "gptq": bool(spec.gptq),
                "act_order": "" if spec.act_order is None else spec.act_order,
                "damp": "" if spec.damp is None else spec.damp}

    def storage_format(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``QuantLinear``'s format (the scales live in the norms and neighbouring linears: no extra cost)."""
        g = spec.get("group_size", quant.DEFAULT_GROUP_SIZE)
        return {"kind": "quant", "bits": int(spec["bits"]), "group_size": -1 if g in (None, 0) else int(g),
                "symmetric": bool(spec.get("symmetric", False))}


FAMILY = register(AwqFamily())
