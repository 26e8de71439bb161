"""QuaRot-style rotations, a model-level family: an exact orthogonal change of basis, then RTN or GPTQ.

    {"method": "quarot", "bits": 3, "group_size": 128}                      # Hadamard rotations, then RTN
    {"method": "quarot", "bits": 3, "group_size": 128, "gptq": true}        # ..., then GPTQ (QuaRot's W-only)
    {"method": "quarot", "bits": 4, "group_size": 128, "rotation": "random"}   # random orthogonal (rotation_seed)

The rotations, what they follow (QuaRot, ``spcl/QuaRot``) and what differs (widths that are not powers of
two, no online Hadamard before down_proj, tied embeddings untied): :mod:`experiments.methods.algorithms.rotate`.
The rotated model, still dense and computing the same function, is then quantized by the driver with
``rtn`` or ``gptq`` on the same grid: every block linear is a plain ``QuantLinear`` (integer zero-points),
so every kernel, export and CPU path runs it. The embedding, the norms (now 1) and an untied ``lm_head``
change too: a saved point carries them (``rewrites_base``).

Rows: sizes are the block linears' ``QuantLinear`` formats, as for every family; **the untied lm_head is
not in them** (for SmolLM2-135M one more 49,152 x 576 matrix, 56.6 MB in fp16, outside the blocks).
``weight_rel_error`` compares each quantized weight with the rotated dense weight it was quantized from
(the norms folded in): orthogonal rotations keep that error what it is in the original basis up to the
folded norm scales. ``uniform_grid`` is ``None``: rotated weights are not the source model's.
"""
from __future__ import annotations

from typing import Any, Mapping

from experiments.methods.algorithms import rotate as alg
from experiments.methods.families import quant
from experiments.methods.families.base import check_group_fits
from experiments.methods.spec import CompressionReport, Family, LayerRecord, fail, register

_OPTS = frozenset({"bits", "group_size", "symmetric", "gptq", "act_order", "damp", "rotation", "rotation_seed"})
ROTATIONS = ("hadamard", "random")


class RotateFamily(Family):
    name = "rotate"
    methods = {"quarot": _OPTS}
    columns = ("quant_method", "bits", "group_size", "symmetric", "gptq", "act_order", "damp", "rotation")
    level = "model"
    rewrites_base = True

    def parse(self, method: str, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
        kw = quant.FAMILY.parse("rtn", {"bits": spec.get("bits"),
                                        **{k: spec[k] for k in ("group_size", "symmetric") if k in spec}}, where)
        rotation = spec.get("rotation", "hadamard")
        if rotation not in ROTATIONS:
            fail(where, f"rotation={rotation!r} must be one of {', '.join(ROTATIONS)} (hadamard: Kronecker "
                        f"Hadamards where the width is 12^a 2^k, else random orthogonal; random: always)")
        seed = spec.get("rotation_seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            fail(where, f"rotation_seed={seed!r} must be a non-negative integer (the random orthogonal matrices' "
                        f"seed)")
        kw.update(rotation=rotation, **quant.parse_gptq_step(spec, where, "the rotated model"))
        if rotation == "random" or seed != 0:
            kw["rotation_seed"] = seed
        return kw

    def label(self, spec) -> str:
        g = "pc" if spec.group_size == -1 else f"g{spec.group_size}"
        s = f"quarot-w{spec.bits}-{g}-{'sym' if spec.symmetric else 'asym'}"
        if spec.rotation == "random":
            s += f"-random{spec.rotation_seed or 0}"
        elif spec.rotation_seed:
            s += f"-rseed{spec.rotation_seed}"
        return s + quant.gptq_suffix(spec)

    def needs(self, spec) -> set[str]:
        return {"H"} if spec.gptq else set()

    def check_fits(self, spec, shapes) -> None:
        names = {name.split(".", 1)[1] for name in shapes}
        need = {f"self_attn.{n}" for n in (*alg.ATTN_IN, "o_proj")} | {f"mlp.{n}" for n in (*alg.MLP_IN, "down_proj")}
        if not need <= names:
            fail("method='quarot'", f"rotations merge into Llama-family blocks ({', '.join(sorted(need))}); this "
                                    f"model's block linears are {sorted(names)}")
        check_group_fits(spec.group_size, shapes)

    def compress_model(self, model, spec, calib_ids, *, driver, progress=True):
        """Rotate ``model`` in place, then quantize it with ``driver`` (RTN or GPTQ)."""
        from experiments.lm.models import linear_layers, linear_weight
        alg.rotate_model(model, rotation=spec.rotation, seed=spec.rotation_seed or 0)
        rotated = {name: linear_weight(layer).detach().float().clone() for name, layer in linear_layers(model)}
        qreport = driver(model, quant.quantizer_spec(spec), calib_ids, progress=progress, keep_weights=True)
        report = CompressionReport(spec=spec)
        for rec in qreport.layers:
            w, w_hat = rotated[rec.name], qreport.weights[rec.name].float()
            report.layers.append(LayerRecord(rec.name, rec.shape, rec.module, rec.bytes, rec.fp16_bytes,
                                             float((w - w_hat).double().square().sum()),
                                             float(w.double().square().sum())))
        report.size_is_modelled = qreport.size_is_modelled
        report.weights = qreport.weights
        return report

    def method_columns(self, spec) -> dict[str, Any]:
        return {"quant_method": spec.method, "bits": spec.bits, "group_size": spec.group_size,
                "symmetric": bool(spec.symmetric), "gptq": bool(spec.gptq),
                "act_order": "" if spec.act_order is None else spec.act_order,
                "damp": "" if spec.damp is None else spec.damp, "rotation": spec.rotation}

    def storage_format(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``QuantLinear``'s format (the rotations live in the other weights: no extra cost in the blocks)."""
        g = spec.get("group_size", quant.DEFAULT_GROUP_SIZE)
        return {"kind": "quant", "bits": int(spec["bits"]), "group_size": -1 if g in (None, 0) else int(g),
                "symmetric": bool(spec.get("symmetric", False))}


FAMILY = register(RotateFamily())
