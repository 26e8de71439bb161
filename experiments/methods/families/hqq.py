"""HQQ (half-quadratic quantization): calibration-free zero-points onto QuantLinear's uniform grid.

    {"method": "hqq", "bits": 3, "group_size": 64}
    {"method": "hqq", "bits": 4, "group_size": 128, "lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20}

Follows Badri & Shaji 2023 and ``mobiusml/hqq`` 0.2.8.post1 (the algorithm, its defaults and what differs
from the reference: :mod:`experiments.methods.algorithms.hqq`): per group of ``group_size`` weights of a
row, min/max scales and zero-points fitted to the weights alone by the half-quadratic solver of an lp
error (p = 0.7), no calibration data. Defaults are the reference's (``BaseQuantizeConfig``: groups of 64;
its solver's ``lp_norm``, ``beta``, ``kappa``, ``iters``); the spec column of a row records them.

Each layer becomes a plain ``QuantLinear`` (asymmetric grid, packed codes + fp16 group scales/zeros), the
format RTN and GPTQ produce, with one difference: the zero-points are fractional. ``QuantLinear`` stores
zeros as floats (``w = (q - z) s``), so every backend computes the same weight; what it changes downstream:

- the scales and zeros are rounded to fp16 (what is stored) and the codes re-chosen on that grid, so the
  reported error and the evaluation are those of the stored model;
- GGUF export maps it exactly up to fp16 rounding (Q4_1 stores ``-z s``, for bits <= 4); the
  compressed-tensors export (integer zero-points) refuses it, naming the layer;
- the ``torch_int4``/``torch_int8`` CPU backends add their zero residual for zeros that are not integers
  (``triton_kernels/nn/quant.py``: ``ceil(4 G / op group)`` extra op groups, +3% of the work at g128):
  4-bit asymmetric grids pay it anyway, 2- and 3-bit HQQ layers pay it where RTN's do not. Latency rows
  time the format from RTN-built random weights (``storage_format``), so they leave that residual out.
- no grid with fractional zeros ``aliases_source_grid`` of the default model unless it contains the
  source's Q4_1 blocks: 4 (or 8) bits with groups dividing 32 (:meth:`HqqFamily.uniform_grid`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from experiments.methods.algorithms import hqq as alg
from experiments.methods.families import quant
from experiments.methods.families.base import check_group_fits, fp16_exact, is_int, is_number, stored_bytes
from experiments.methods.spec import Family, LayerResult, fail, register

# The reference's BaseQuantizeConfig default (GPTQ's and this toolkit's RTN default is 128).
DEFAULT_GROUP_SIZE = 64
# fp16's smallest positive (subnormal) value: a scale below it would be stored as 0.
_FP16_TINY = 2.0 ** -24


def quantize(spec, w: torch.Tensor):
    """HQQ's grid for ``w``, rounded to fp16 (scales and zeros) with the codes re-chosen on it."""
    res = alg.hqq(w, bits=spec.bits, group_size=spec.group_size, lp_norm=spec.lp_norm, beta=spec.beta,
                  kappa=spec.kappa, iters=spec.iters)
    scales = fp16_exact(res.scales.clamp_min(_FP16_TINY))
    zeros = fp16_exact(res.zeros)
    return alg.codes_for(w, scales, zeros, bits=spec.bits, group_size=spec.group_size)


class HqqFamily(Family):
    name = "hqq"
    methods = {"hqq": frozenset({"bits", "group_size", "lp_norm", "beta", "kappa", "iters"})}
    columns = ("quant_method", "bits", "group_size", "symmetric")

    def parse(self, method: str, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
        # bits and group_size as the quant family checks them (QuantLinear's code widths and groups).
        kw = quant.FAMILY.parse("rtn", {"bits": spec.get("bits"),
                                        "group_size": spec.get("group_size", DEFAULT_GROUP_SIZE)}, where)
        del kw["symmetric"]  # HQQ's grid is asymmetric: its zero-points are what it optimises
        p = spec.get("lp_norm", alg.DEFAULTS["lp_norm"])
        if not is_number(p) or not 0 < p <= 1:
            fail(where, f"lp_norm={p!r} must be in (0, 1] (the p of HQQ's lp weight error; the paper uses 0.7)")
        beta = spec.get("beta", alg.DEFAULTS["beta"])
        if not is_number(beta) or not beta > 0:
            fail(where, f"beta={beta!r} must be a positive number (the half-quadratic penalty; default 10)")
        kappa = spec.get("kappa", alg.DEFAULTS["kappa"])
        if not is_number(kappa) or not kappa > 1:
            fail(where, f"kappa={kappa!r} must be a number > 1 (beta's growth per step; default 1.01)")
        iters = spec.get("iters", alg.DEFAULTS["iters"])
        if not is_int(iters) or iters < 1:
            fail(where, f"iters={iters!r} must be a positive integer (solver steps; default 20)")
        kw.update(lp_norm=float(p), beta=float(beta), kappa=float(kappa), iters=iters)
        return kw

    def label(self, spec) -> str:
        g = "pc" if spec.group_size == -1 else f"g{spec.group_size}"
        extra = "".join(f"-{short}{getattr(spec, k):g}" for k, short in
                        (("lp_norm", "p"), ("beta", "beta"), ("kappa", "kappa"), ("iters", "it"))
                        if getattr(spec, k) != alg.DEFAULTS[k])
        return f"hqq-w{spec.bits}-{g}{extra}"

    def check_fits(self, spec, shapes) -> None:
        check_group_fits(spec.group_size, shapes)

    def compress_layer(self, spec, w, bias, stats) -> LayerResult:
        mod = quant.quant_module(quantize(spec, w), bias)
        return LayerResult(mod, mod.dequantize().float(), stored_bytes(mod))

    def method_columns(self, spec) -> dict[str, Any]:
        return {"quant_method": spec.method, "bits": spec.bits, "group_size": spec.group_size, "symmetric": False}

    def uniform_grid(self, spec) -> dict[str, Any]:
        return {"bits": spec.bits, "group_size": spec.group_size, "symmetric": False, "integer_zero": False}

    def storage_format(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``QuantLinear``'s asymmetric format (see the module docstring for the fractional zeros)."""
        g = spec.get("group_size", DEFAULT_GROUP_SIZE)
        return {"kind": "quant", "bits": int(spec["bits"]), "group_size": -1 if g in (None, 0) else int(g),
                "symmetric": False}


FAMILY = register(HqqFamily())
