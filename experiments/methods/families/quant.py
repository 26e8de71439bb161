"""Uniform weight-only quantization: ``rtn`` and ``gptq`` onto QuantLinear's grid.

    {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}
    {"method": "gptq", "bits": 3, "group_size": 64, "symmetric": False, "act_order": True, "damp": 0.01}

Each layer becomes a ``QuantLinear`` (packed codes + fp16 group scales/zeros); its size is the
module's ``memory_bytes()``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from experiments.methods.families.base import (check_group_fits, damp_suffix, is_int, parse_damp, random_linear,
                                               stored_bytes)
from experiments.methods.spec import Family, LayerResult, fail, register, register_format

# GPTQ's usual default; a partial last group is part of the kernel format, so 128 is fine for K=576.
DEFAULT_GROUP_SIZE = 128
_OPTS = frozenset({"bits", "group_size", "symmetric"})


def quantize(spec, w: torch.Tensor, stats, mask: torch.Tensor | None = None):
    """Run the spec's quantizer on ``w`` (``mask``: GPTQ keeps pruned weights at zero)."""
    from experiments.methods.algorithms import quant
    if spec.method == "rtn":
        return quant.rtn(w, bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric)
    return quant.gptq(w, stats.hessian(), bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
                      act_order=spec.act_order, damp=spec.damp, mask=mask)


def quant_module(res, bias):
    """``QuantLinear`` from a quantizer's result, with the scales and zeros a deployment stores."""
    from triton_kernels.nn.quant import QuantLinear
    # Scales are stored in fp16, as GGUF and GPTQ checkpoints store them: 16 bits per group is what
    # a deployment pays, and the algorithms' fp32 scales would overstate bits/weight by 16/group.
    # The reported error and the dense simulation use the module's own dequantized weight.
    # Zero-points are integers in [0, 2^bits), exact in fp16; QuantLinear takes them as floats, so
    # they cost 16 bits per group like the scales (as GGUF Q4_1 stores its fp16 min).
    zeros = None if res.zeros is None else res.zeros.to(torch.float16)
    return QuantLinear.from_codes(res.q, res.scales.to(torch.float16), zeros, bits=res.bits,
                                  group_size=res.group_size, symmetric=res.symmetric, bias=bias)


def parse_gptq_step(spec: Mapping[str, Any], where: str, what: str) -> dict[str, Any]:
    """``gptq`` (and with it ``act_order``, ``damp``) of a family that quantizes its result with RTN or GPTQ
    (AWQ, rotations, mixed precision); ``what`` names that result in the error message."""
    g = spec.get("gptq", False)
    if not isinstance(g, bool):
        fail(where, f"gptq={g!r} must be true or false (quantize {what} with GPTQ instead of RTN)")
    kw: dict[str, Any] = {"gptq": g}
    if g:
        act = spec.get("act_order", False)
        if not isinstance(act, bool):
            fail(where, f"act_order={act!r} must be true or false")
        kw.update(act_order=act, damp=parse_damp(spec, where))
    elif "act_order" in spec or "damp" in spec:
        fail(where, "act_order= and damp= apply only with gptq: true (the RTN step has neither)")
    return kw


def quantizer_spec(spec, bits: int | None = None, group_size: int | None = None) -> dict[str, Any]:
    """The driver's spec that quantizes a family's result (``spec`` carries ``gptq``, ``act_order``,
    ``damp``, ``symmetric``): RTN, or GPTQ with ``gptq: true``, at ``bits``/``group_size`` (default:
    the spec's own)."""
    q = {"method": "gptq" if spec.gptq else "rtn", "bits": spec.bits if bits is None else bits,
         "group_size": spec.group_size if group_size is None else group_size, "symmetric": bool(spec.symmetric)}
    if spec.gptq:
        q.update(act_order=bool(spec.act_order), damp=spec.damp)
    return q


def gptq_suffix(spec) -> str:
    """``+gptq[-act][-damp<d>]`` for a label when the spec quantizes with GPTQ, else ``""``."""
    return "+gptq" + ("-act" if spec.act_order else "") + damp_suffix(spec) if spec.gptq else ""


class QuantFamily(Family):
    name = "quant"
    methods = {"rtn": _OPTS, "gptq": _OPTS | {"act_order", "damp"}}
    columns = ("quant_method", "bits", "group_size", "symmetric", "act_order", "damp")

    def parse(self, method: str, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
        bits = spec.get("bits")
        if not is_int(bits) or not 1 <= bits <= 8:
            fail(where, f"bits={bits!r} must be an integer in 1..8 (the kernels' code widths)")
        g = spec.get("group_size", DEFAULT_GROUP_SIZE)
        if not is_int(g) or not (g == -1 or g >= 1):
            fail(where, f"group_size={g!r} must be a positive integer or -1 (one group per output channel)")
        if g != -1 and g & (g - 1):
            # QuantLinear's storage format takes power-of-two groups only.
            p2 = 1 << (g.bit_length() - 1)
            fail(where, f"group_size={g} is not a power of two (QuantLinear stores power-of-two groups); "
                        f"use e.g. {p2} or {2 * p2}, or -1 for one group per output channel")
        sym = spec.get("symmetric", False)
        if not isinstance(sym, bool):
            fail(where, f"symmetric={sym!r} must be true or false")
        if sym and bits == 1:
            # The kernels' symmetric grid is w = (q - 2^(bits-1)) * s with s = 2 max|w| / (2^bits - 1):
            # at 1 bit its levels are {-2 max|w|, 0} and every |w| <= max|w| rounds to 0.
            fail(where, "bits=1 with symmetric=true cannot work: the symmetric 1-bit grid is {-s, 0} with "
                        "s = 2*max|w|, so every weight rounds to 0; use symmetric=false (levels {0, +-(max-min)} "
                        "per group) or bits >= 2")
        kw: dict[str, Any] = dict(bits=bits, group_size=g, symmetric=sym)
        if method == "gptq":
            act = spec.get("act_order", False)
            if not isinstance(act, bool):
                fail(where, f"act_order={act!r} must be true or false")
            kw.update(act_order=act, damp=parse_damp(spec, where))
        return kw

    def label(self, spec) -> str:
        g = "pc" if spec.group_size == -1 else f"g{spec.group_size}"
        s = "sym" if spec.symmetric else "asym"
        return f"{spec.method}-w{spec.bits}-{g}-{s}" + ("-act" if spec.act_order else "") + damp_suffix(spec)

    def needs(self, spec) -> set[str]:
        return {"H"} if spec.method == "gptq" else set()

    def check_fits(self, spec, shapes) -> None:
        check_group_fits(spec.group_size, shapes)

    def compress_layer(self, spec, w, bias, stats) -> LayerResult:
        mod = quant_module(quantize(spec, w, stats), bias)
        return LayerResult(mod, mod.dequantize().float(), stored_bytes(mod))

    def method_columns(self, spec) -> dict[str, Any]:
        return {"quant_method": spec.method, "bits": spec.bits, "group_size": spec.group_size,
                "symmetric": spec.symmetric, "act_order": "" if spec.act_order is None else spec.act_order,
                "damp": "" if spec.damp is None else spec.damp}

    def uniform_grid(self, spec) -> dict[str, Any]:
        """RTN's and GPTQ's grid: integer zero-points."""
        return {"bits": spec.bits, "group_size": spec.group_size, "symmetric": bool(spec.symmetric),
                "integer_zero": True}

    def storage_format(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``QuantLinear``'s storage: bits, group size (default 128 as in the driver), sym/asym; with
        ``cache_dequantized`` the same format held with an opt-in dense copy (CPU timing)."""
        g = spec.get("group_size", 128)
        fmt = {"kind": "quant", "bits": int(spec["bits"]), "group_size": -1 if g in (None, 0) else int(g),
               "symmetric": bool(spec.get("symmetric", False))}
        if spec.get("cache_dequantized"):
            fmt["cache_dequantized"] = True
        return fmt


FAMILY = register(QuantFamily())


def _build(N, K, *, dtype, device, backend, seed, tune_m, bits, group_size, symmetric, cache_dequantized=False):
    from triton_kernels.nn.quant import QuantLinear
    lin = random_linear(N, K, dtype, device, torch.Generator().manual_seed(seed))
    return QuantLinear.from_linear(lin, bits=bits, group_size=group_size, symmetric=symmetric, backend=backend,
                                   cache_dequantized=bool(cache_dequantized))


register_format("quant", _build)
