"""Non-uniform (codebook) weight-only quantization onto ``CodebookLinear``.

    {"method": "nf", "bits": 4, "group_size": 64}                 # NormalFloat table x group absmax
    {"method": "fp4", "group_size": 32}                           # FP4 E2M1 values x group absmax / 6
    {"method": "piecewise", "bits": 3, "group_size": -1, "segments": 4}
    {"method": "kmeans", "bits": 3}                               # per-row 1-D k-means table holding 0
    {"method": "kmeans", "bits": 3, "zero_level": false}          # ... without the exact zero level
    {"method": "squeezellm", "bits": 3}                           # k-means weighted by the dense Fisher
    {"method": "squeezellm", "bits": 3, "sensitivity": "diag_h"}  # ... by diag(X^T X) instead
    {"method": "squeezellm", "bits": 3, "gptq": true, "act_order": false, "damp": 0.01}

Every method picks a table (shared, or one per output row) and group scales
(``experiments/methods/algorithms/codebook.py``); the table and scales are rounded to float16 (what a
deployment stores), then the codes are either the nearest entries (``gptq: false``, the default) or
chosen by GPTQ's error feedback on that same grid (``gptq: true``; labels end in ``-gptq``). Each layer
becomes a ``CodebookLinear``; its size is the module's ``memory_bytes()`` (packed codes + tables +
scales at 16 bits), so a per-row table's ``2^bits x 16`` bits per row are counted.

``zero_level`` (piecewise, kmeans, squeezellm): every row's table holds an exact 0 (a level, not a
zero point: the format is unchanged, 0 is one table entry). Default true for ``piecewise`` and
``kmeans``, whose tables without it sent the tiny weights of the default model's massive-activation
input channels to ±(smallest level) and gave 3-bit g128 perplexities of 1,351 and 11,812 vs RTN's 92.7
(issue 23); default false for ``squeezellm`` (the paper's tables have none; its sensitivity weighting
already sees those channels). The canonical spec always carries it (rows fitted before the option
existed had no zero level, so their point ids differ); labels name the non-default
(``kmeans-w3-g128-nozero``, ``squeezellm-w3-pc-zero``).

``sensitivity`` (squeezellm): ``"fisher"`` (default), SqueezeLLM's per-weight Fisher, the sum over the
calibration windows of each weight's squared gradient of the *dense* model's loss
(:func:`experiments.lm.models.squared_gradients`, computed once before any layer is compressed). Its
cost on the default model at the quick calibration settings (4 windows of 256 tokens): one forward and
backward per window, about 3x the forward time of those windows (47 s vs 15.7 s for the forward alone,
one thread on the shared 2-core AMD EPYC under heavy load: a ratio, not a benchmark), and +1.0 GB
peak memory (the Fisher itself is 0.42 GB: float32 for the 106M block-linear weights; plus one
gradient copy and the backward's activations). Or ``"diag_h"``, the diagonal of ``X^T X`` of each
layer's inputs taken sequentially (after the blocks before it were quantized), as every other
calibrated method here does: no backward pass, but it is not the Fisher (it lacks each output's
gradient) and gives every weight of a column the same importance. Labels name ``-diagh``.

What SqueezeLLM here follows and does not (reference: SqueezeAILab/SqueezeLLM ``quantization/nuq.py``
and kssteven418/SqueezeLLM-gradients): per-row tables, sample weights ``grad^2 * (w != 0)``, weighted
k-means with k-means++ starts; the clusterer runs more starts (5 deterministic + 4 seeded k-means++)
to a fixed point instead of sklearn's one start and ``max_iter=50`` (on all 210 block linears of the
default model, 32 rows each, 3 bits, quick-settings Fisher: weighted SSE ours / sklearn 0.80-0.998
per layer, median 0.94; the former 5-start clusterer 0.85-1.53); gradients in fp32 on the sweep's
calibration windows (the reference: bf16, 100 C4 samples of 512 tokens); no dense-and-sparse outlier
split.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from experiments.methods.families.base import (check_group_fits, damp_suffix, fp16_exact, is_int, parse_damp,
                                               stored_bytes)
from experiments.methods.spec import Family, LayerResult, fail, register, register_format

# Per method: allowed bits, default group size (-1 = per-channel), default bits.
_BITS = {"nf": range(2, 9), "fp4": range(4, 5), "piecewise": range(1, 9), "kmeans": range(1, 9),
         "squeezellm": range(1, 9)}
DEFAULT_GROUP_SIZE = {"nf": 64, "fp4": 32, "piecewise": -1, "kmeans": -1, "squeezellm": -1}
DEFAULT_BITS = {"nf": 4, "fp4": 4}
DEFAULT_SEGMENTS = 4
#: Methods whose per-row table is fitted, with their default ``zero_level``.
DEFAULT_ZERO_LEVEL = {"piecewise": True, "kmeans": True, "squeezellm": False}
SENSITIVITIES = ("fisher", "diag_h")
DEFAULT_SENSITIVITY = "fisher"
_OPTS = frozenset({"bits", "group_size", "gptq", "act_order", "damp"})


def table_and_scales(spec, w: torch.Tensor, stats):
    """The spec's method run on ``w``: its :class:`~experiments.methods.algorithms.codebook.CodebookResult`."""
    from experiments.methods.algorithms import codebook as alg
    m, bits, g = spec.method, spec.bits, spec.group_size
    if m == "nf":
        return alg.nf(w, bits=bits, group_size=g)
    if m == "fp4":
        return alg.fp4(w, group_size=g)
    if m == "piecewise":
        return alg.piecewise(w, bits=bits, group_size=g, segments=spec.segments, zero_level=spec.zero_level)
    if m == "kmeans":
        return alg.kmeans(w, bits=bits, group_size=g, zero_level=spec.zero_level)
    sens = stats.fisher if spec.sensitivity == "fisher" else _hdiag(stats)
    return alg.squeezellm(w, sens, bits=bits, group_size=g, zero_level=spec.zero_level)


def _hdiag(stats) -> torch.Tensor:
    # sum of x^2 per input is n * diag(H): the same k-means weights up to a constant factor.
    if stats.sq is not None:
        return stats.sq.float()
    return stats.hessian().diagonal().clone()


def quantize(spec, w: torch.Tensor, stats):
    """Codes on the float16-rounded table and scales: nearest entries, or GPTQ with ``gptq: true``."""
    from experiments.methods.algorithms import codebook as alg
    res = table_and_scales(spec, w, stats)
    table = fp16_exact(res.codebook)
    scales = None
    if res.scales is not None:
        # A group whose absmax is below float16's smallest subnormal would store scale 0; keep it
        # positive (its weights are below that too, so they round to ~0 either way).
        scales = fp16_exact(res.scales)
        scales = torch.where(scales > 0, scales, torch.full_like(scales, 2.0 ** -24))
    if spec.gptq:
        return alg.gptq_codebook(w, stats.hessian(), table, scales, group_size=spec.group_size,
                                 act_order=spec.act_order, damp=spec.damp)
    return alg.round_to_codebook(w, table, scales, group_size=spec.group_size)


def codebook_module(res, bias):
    from triton_kernels.nn.codebook import CodebookLinear
    scales = None if res.scales is None else res.scales.to(torch.float16)
    return CodebookLinear.from_codes(res.q, res.codebook.to(torch.float16), scales, bits=res.bits,
                                     group_size=res.group_size, bias=bias)


def variant_suffix(spec) -> str:
    """The label part naming a non-default zero level or sensitivity (``-nozero``, ``-zero``, ``-diagh``)."""
    out = ""
    if spec.method in DEFAULT_ZERO_LEVEL and spec.zero_level is not None \
            and spec.zero_level != DEFAULT_ZERO_LEVEL[spec.method]:
        out += "-zero" if spec.zero_level else "-nozero"
    if spec.method == "squeezellm" and spec.sensitivity not in (None, DEFAULT_SENSITIVITY):
        out += "-" + spec.sensitivity.replace("_", "")
    return out


def gptq_suffix(spec) -> str:
    return ("-gptq" + ("-act" if spec.act_order else "") + damp_suffix(spec)) if spec.gptq else ""


SHARED_TABLE = ("nf", "fp4")


def storage_format(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The ``CodebookLinear`` storage a spec produces, as ``experiments.measure`` times it:
    ``{"kind": "codebook", "bits", "group_size", "table": "shared" | "per_row", "scales": bool}``
    (a per-row table without groups has no scales)."""
    method = spec["method"]
    opts = FAMILY.parse(method, spec, "method spec")
    table = "shared" if method in SHARED_TABLE else "per_row"
    return {"kind": "codebook", "bits": opts["bits"], "group_size": opts["group_size"], "table": table,
            "scales": table == "shared" or opts["group_size"] != -1}


class CodebookFamily(Family):
    name = "codebook"
    methods = {"nf": _OPTS, "fp4": _OPTS, "piecewise": _OPTS | {"segments", "zero_level"},
               "kmeans": _OPTS | {"zero_level"}, "squeezellm": _OPTS | {"zero_level", "sensitivity"}}
    columns = ("bits", "group_size", "act_order", "damp", "gptq", "segments", "zero_level", "sensitivity")

    def parse(self, method: str, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
        allowed = _BITS[method]
        bits = spec.get("bits", DEFAULT_BITS.get(method))
        if not is_int(bits) or bits not in allowed:
            what = "4 (E2M1 elements)" if method == "fp4" else f"an integer in {allowed.start}..{allowed.stop - 1}"
            fail(where, f"bits={bits!r} must be {what} for method={method!r}")
        g = spec.get("group_size", DEFAULT_GROUP_SIZE[method])
        if not is_int(g) or not (g == -1 or g >= 1):
            fail(where, f"group_size={g!r} must be a positive power of two or -1 (one group per output channel)")
        if g != -1 and g & (g - 1):
            p2 = 1 << (g.bit_length() - 1)
            fail(where, f"group_size={g} is not a power of two (CodebookLinear stores power-of-two groups); "
                        f"use e.g. {p2} or {2 * p2}, or -1 for one group per output channel")
        gptq = spec.get("gptq", False)
        if not isinstance(gptq, bool):
            fail(where, f"gptq={gptq!r} must be true (GPTQ error feedback onto the table) or false (nearest entry)")
        kw: dict[str, Any] = dict(bits=bits, group_size=g, gptq=gptq)
        if gptq:
            act = spec.get("act_order", False)
            if not isinstance(act, bool):
                fail(where, f"act_order={act!r} must be true or false")
            kw.update(act_order=act, damp=parse_damp(spec, where))
        else:
            for k in ("act_order", "damp"):
                if k in spec:
                    fail(where, f"{k}= applies only with gptq: true (GPTQ over the table); "
                                f"drop it or set gptq: true")
        if method == "piecewise":
            seg = spec.get("segments", DEFAULT_SEGMENTS)
            if not is_int(seg) or seg < 1:
                fail(where, f"segments={seg!r} must be a positive integer (runs of levels with one step each)")
            kw["segments"] = seg
        if method in DEFAULT_ZERO_LEVEL:
            zero = spec.get("zero_level", DEFAULT_ZERO_LEVEL[method])
            if not isinstance(zero, bool):
                fail(where, f"zero_level={zero!r} must be true (every row's table holds an exact 0) or false")
            kw["zero_level"] = zero
        if method == "squeezellm":
            sens = spec.get("sensitivity", DEFAULT_SENSITIVITY)
            if sens not in SENSITIVITIES:
                fail(where, f"sensitivity={sens!r} must be 'fisher' (squared gradients of the dense model, "
                            f"SqueezeLLM's) or 'diag_h' (diag of X^T X of each layer's inputs, cheaper)")
            kw["sensitivity"] = sens
        return kw

    def label(self, spec) -> str:
        g = "pc" if spec.group_size == -1 else f"g{spec.group_size}"
        seg = f"-s{spec.segments}" if spec.method == "piecewise" and spec.segments != DEFAULT_SEGMENTS else ""
        return f"{spec.method}-w{spec.bits}-{g}{seg}{variant_suffix(spec)}{gptq_suffix(spec)}"

    def needs(self, spec) -> set[str]:
        out = {"H"} if spec.gptq else set()
        if spec.method == "squeezellm":
            out |= {"fisher"} if spec.sensitivity == "fisher" else ({"sq"} if not spec.gptq else set())
        return out

    def check_fits(self, spec, shapes) -> None:
        check_group_fits(spec.group_size, shapes)

    def compress_layer(self, spec, w, bias, stats) -> LayerResult:
        mod = codebook_module(quantize(spec, w, stats), bias)
        return LayerResult(mod, mod.dequantize().float(), stored_bytes(mod))

    def method_columns(self, spec) -> dict[str, Any]:
        return {"bits": spec.bits, "group_size": spec.group_size, "gptq": spec.gptq,
                "act_order": "" if spec.act_order is None else spec.act_order,
                "damp": "" if spec.damp is None else spec.damp,
                "segments": "" if spec.segments is None else spec.segments,
                "zero_level": "" if spec.zero_level is None else spec.zero_level,
                "sensitivity": spec.sensitivity or ""}

    def storage_format(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return storage_format(spec)


FAMILY = register(CodebookFamily())


def _build(N, K, *, dtype, device, backend, seed, tune_m, bits, group_size, table, scales):
    """Random codes, a sorted random table (shared or one per row), random positive group scales: the
    storage and lookups of the format (timing does not depend on the values)."""
    import math

    from triton_kernels.nn.codebook import CodebookLinear
    g = torch.Generator().manual_seed(seed)
    L = 2 ** bits
    q = torch.randint(0, L, (N, K), generator=g, dtype=torch.int64).to(torch.uint8)
    rows = 1 if table == "shared" else N
    tab = torch.randn(rows, L, generator=g).sort(dim=1).values
    G = 1 if group_size == -1 else -(-K // group_size)
    s = (torch.rand(N, G, generator=g) + 0.5) / math.sqrt(K) if scales else None
    return CodebookLinear.from_codes(q.to(device), tab.to(device=device, dtype=dtype),
                                     None if s is None else s.to(device=device, dtype=dtype),
                                     bits=bits, group_size=group_size, backend=backend)


register_format("codebook", _build)
