"""Method specs and sequential layer-wise compression of a causal language model.

A *method spec* is plain data (a dict from a sweep YAML, or a :class:`MethodSpec`)::

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

:func:`parse_spec` rejects unknown methods/options and out-of-range values, and
:func:`check_spec_fits` rejects settings that do not fit a layer of the model (group size larger
than K, N:M or block pattern that does not divide the layer, rank larger than min(N, K)), both
before any work is done, with a ``ValueError`` that names the option and says what would fit.

Options that changed meaning or default (the canonical spec, its point id and its label are stable):

- ``scope`` (magnitude, wanda; unstructured only): ``"row"`` compares weights within each output
  row (Wanda's per-output comparison), ``"layer"`` uses one threshold for the whole layer (the
  magnitude baseline of the Wanda and SparseGPT papers). A spec without the key means ``"row"``,
  which is what every magnitude row computed before the key existed used; ``"row"`` is therefore
  left out of the canonical form and the label, ``"layer"`` appears in both
  (``magnitude-unstructured-0.5-layer``). The sweeps ask for ``scope: layer`` explicitly.
- ``damp`` (gptq, sparsegpt, whitened_svd): added to H as ``damp * mean(diag H)``. GPTQ and
  SparseGPT default to 0.01 (their papers); whitened SVD defaults to ``DEFAULT_WHITENING_DAMP``,
  chosen from measurements (see there). The canonical form always carries the value; labels name
  it when it is not 0.01 (``whitened_svd-ratio0.8-damp0.001``), so the labels of rows computed
  with the former whitened-SVD default 0.01 keep their meaning.

:func:`compress_model` compresses every linear layer inside the transformer blocks in place,
block by block as GPTQ/SparseGPT do: the calibration inputs of block ``i`` are the outputs of the
already *compressed* blocks ``0..i-1``, so each layer's algorithm sees the errors made upstream.
Embeddings and ``lm_head`` are not compressed: SmolLM2 ties ``lm_head`` to the token embedding,
so compressing one would silently change the other, and the literature we compare with (GPTQ,
SparseGPT, Wanda, SVD-LLM) reports numbers with both kept dense.

Each layer is replaced by a real compressed module (``QuantLinear``, ``SparseLinear`` or
``LowRankLinear``), never by a dense copy, and the size columns come from each module's
``memory_bytes()``. The one exception is prune-then-quantize (``combo``): no module stores sparse
*and* quantized weights yet, so the layer becomes a ``SparseLinear`` over the dequantized kept
weights (values exactly on the quantization grid, real sparse forward) and its size is a *model*:
the sparse format's indices/metadata + ``bits`` per stored value + the quantizer's scales/zeros.
Such reports carry ``size_is_modelled=True``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

QUANT_METHODS = ("rtn", "gptq")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
LOWRANK_METHODS = ("svd", "whitened_svd")
METHODS = ("dense",) + QUANT_METHODS + PRUNE_METHODS + LOWRANK_METHODS + ("combo",)

# Options each method accepts ("method" itself is always accepted).
_QUANT_OPTS = {"bits", "group_size", "symmetric"}
_OPTIONS: dict[str, set[str]] = {
    "dense": set(),
    "rtn": _QUANT_OPTS,
    "gptq": _QUANT_OPTS | {"act_order", "damp"},
    "magnitude": {"sparsity", "pattern", "scope"},
    "wanda": {"sparsity", "pattern", "scope"},
    "sparsegpt": {"sparsity", "pattern", "damp"},
    "svd": {"ratio", "rank", "energy"},
    "whitened_svd": {"ratio", "rank", "energy", "damp"},
    "combo": {"steps"},
}

# GPTQ's usual default; a partial last group is part of the kernel format, so 128 is fine for K=576.
DEFAULT_GROUP_SIZE = 128
# GPTQ's and SparseGPT's damping (relative to mean(diag H)), as in their reference code.
DEFAULT_DAMP = 0.01
# Whitened SVD: SVD-LLM whitens without damping; a little keeps S invertible (dead or collinear
# inputs). Chosen from `python -m experiments.damping` (results/damping_whitened_svd.csv): 49 real
# layers of the default model (blocks 0, 5, ..., 29), ratios 0.9/0.7/0.5, errors relative to undamped
# whitening on held-out text (Emma): damp 1e-3 was never worse (147/147 cases, geometric mean 0.999)
# and cost at most +4.9% on the calibration statistics; the former default 0.01 was worse in 12/147
# held-out cases, up to +25% (+75% on calibration; worst: block 0 o_proj). Undamped (0) fails where H
# is singular. tests/test_alg_lowrank.py checks the ordering on a synthetic anisotropic layer.
DEFAULT_WHITENING_DAMP = 1e-3
# Labels name damp when it differs from this value (the former default of every method).
_LABEL_DAMP = 0.01
PRUNE_SCOPES = ("row", "layer")


@dataclass(frozen=True)
class MethodSpec:
    """One compression setting. Unused fields stay ``None``; build it with :func:`parse_spec`."""

    method: str
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    act_order: bool | None = None
    damp: float | None = None
    sparsity: float | None = None
    pattern: str | None = None
    scope: str | None = None  # None = "row" (see the module docstring)
    ratio: float | None = None
    rank: int | None = None
    energy: float | None = None
    steps: tuple["MethodSpec", ...] = ()

    @property
    def family(self) -> str:
        if self.method in QUANT_METHODS:
            return "quant"
        if self.method in PRUNE_METHODS:
            return "sparse"
        if self.method in LOWRANK_METHODS:
            return "lowrank"
        return self.method  # "dense" or "combo"

    @property
    def prune_step(self) -> "MethodSpec | None":
        if self.family == "sparse":
            return self
        return next((s for s in self.steps if s.family == "sparse"), None)

    @property
    def quant_step(self) -> "MethodSpec | None":
        if self.family == "quant":
            return self
        return next((s for s in self.steps if s.family == "quant"), None)

    def needs(self) -> set[str]:
        """Calibration statistics the method needs: "H" (X^T X / n) and/or "sq" (sum of x^2)."""
        if self.method == "combo":
            return set().union(*(s.needs() for s in self.steps))
        if self.method in ("gptq", "sparsegpt", "whitened_svd"):
            return {"H"}
        if self.method == "wanda":
            return {"sq"}
        return set()

    def to_dict(self) -> dict[str, Any]:
        """Canonical plain-data form (only the fields that are set): stable across runs."""
        d: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("method", "steps") or v is None:
                continue
            d[f.name] = v
        if self.steps:
            d["steps"] = [s.to_dict() for s in self.steps]
        return d

    @property
    def prune_scope(self) -> str:
        """``"row"`` or ``"layer"`` for magnitude/wanda unstructured pruning, ``""`` where it does not apply."""
        if self.method not in ("magnitude", "wanda") or self.pattern != "unstructured":
            return ""
        return self.scope or "row"

    def label(self) -> str:
        """Short human-readable label, e.g. ``gptq-w3-g64-asym-act`` or ``sparsegpt-2:4+gptq-w4-g64-asym``.

        Settings that differ from the former defaults are named: ``-layer`` for a per-layer
        magnitude/wanda threshold, ``-damp<d>`` for a damping other than 0.01.
        """
        if self.method == "combo":
            return "+".join(s.label() for s in self.steps)
        damp = f"-damp{self.damp:g}" if self.damp is not None and self.damp != _LABEL_DAMP else ""
        if self.family == "quant":
            g = "pc" if self.group_size == -1 else f"g{self.group_size}"
            s = "sym" if self.symmetric else "asym"
            return f"{self.method}-w{self.bits}-{g}-{s}" + ("-act" if self.act_order else "") + damp
        if self.family == "sparse":
            if ":" in self.pattern and not self.pattern.startswith("block"):
                return f"{self.method}-{self.pattern}{damp}"
            return f"{self.method}-{self.pattern}-{self.sparsity:g}" + ("-layer" if self.scope == "layer" else "") + damp
        if self.family == "lowrank":
            for k in ("ratio", "rank", "energy"):
                if getattr(self, k) is not None:
                    return f"{self.method}-{k}{getattr(self, k):g}{damp}"
        return self.method


def _fail(where: str, msg: str) -> None:
    raise ValueError(f"{where}: {msg}")


def parse_spec(spec: Mapping[str, Any] | MethodSpec, *, where: str = "method spec") -> MethodSpec:
    """Validate a plain-data spec and fill defaults; ``ValueError`` names the bad option."""
    if isinstance(spec, MethodSpec):
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a mapping like {{'method': 'rtn', 'bits': 4}}, got {type(spec).__name__}")
    method = spec.get("method")
    if method not in METHODS:
        _fail(where, f"unknown method={method!r}; choose one of {', '.join(METHODS)}")
    unknown = set(spec) - _OPTIONS[method] - {"method"}
    if unknown:
        _fail(where, f"unknown option(s) {sorted(unknown)} for method={method!r}; "
                     f"it accepts {sorted(_OPTIONS[method]) or 'no options'}")
    kw: dict[str, Any] = {"method": method}

    if method in QUANT_METHODS:
        bits = spec.get("bits")
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            _fail(where, f"bits={bits!r} must be an integer in 1..8 (the kernels' code widths)")
        g = spec.get("group_size", DEFAULT_GROUP_SIZE)
        if not isinstance(g, int) or isinstance(g, bool) or not (g == -1 or g >= 1):
            _fail(where, f"group_size={g!r} must be a positive integer or -1 (one group per output channel)")
        if g != -1 and g & (g - 1):
            # QuantLinear's storage format takes power-of-two groups only.
            p2 = 1 << (g.bit_length() - 1)
            _fail(where, f"group_size={g} is not a power of two (QuantLinear stores power-of-two groups); "
                         f"use e.g. {p2} or {2 * p2}, or -1 for one group per output channel")
        sym = spec.get("symmetric", False)
        if not isinstance(sym, bool):
            _fail(where, f"symmetric={sym!r} must be true or false")
        if sym and bits == 1:
            # The kernels' symmetric grid is w = (q - 2^(bits-1)) * s with s = 2 max|w| / (2^bits - 1):
            # at 1 bit its levels are {-2 max|w|, 0} and every |w| <= max|w| rounds to 0.
            _fail(where, "bits=1 with symmetric=true cannot work: the symmetric 1-bit grid is {-s, 0} with "
                         "s = 2*max|w|, so every weight rounds to 0; use symmetric=false (levels {0, +-(max-min)} "
                         "per group) or bits >= 2")
        kw.update(bits=bits, group_size=g, symmetric=sym)
        if method == "gptq":
            act = spec.get("act_order", False)
            if not isinstance(act, bool):
                _fail(where, f"act_order={act!r} must be true or false")
            kw.update(act_order=act, damp=_damp(spec, where))

    elif method in PRUNE_METHODS:
        pattern = spec.get("pattern", "unstructured")
        if not isinstance(pattern, str):
            _fail(where, f"pattern={pattern!r} must be a string: 'unstructured', 'N:M' (e.g. '2:4') or 'block:BNxBK'")
        from experiments.algorithms.prune import parse_pattern
        try:
            pat = parse_pattern(pattern)
        except ValueError as e:
            _fail(where, str(e))
        pattern = str(pat)
        sparsity = spec.get("sparsity")
        if pat.kind == "nm":
            implied = 1 - pat.n / pat.m
            if sparsity is not None and not math.isclose(float(sparsity), implied):
                _fail(where, f"sparsity={sparsity!r} contradicts pattern={pattern!r} (which means sparsity {implied:g}); omit sparsity")
            sparsity = implied
        elif not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 < sparsity < 1:
            _fail(where, f"sparsity={sparsity!r} must be a fraction in (0, 1) for pattern={pattern!r}")
        kw.update(pattern=pattern, sparsity=float(sparsity))
        if method == "sparsegpt":
            kw.update(damp=_damp(spec, where))
        if "scope" in spec:
            scope = spec["scope"]
            if scope not in PRUNE_SCOPES:
                _fail(where, f"scope={scope!r} must be 'row' (compare weights within each output row) or "
                             f"'layer' (one threshold for the whole layer, the papers' magnitude baseline)")
            if pat.kind != "unstructured":
                _fail(where, f"scope={scope!r} applies to pattern='unstructured' only; pattern={pattern!r} "
                             f"fixes its own groups (N:M within each row's groups of M, blocks across the layer)")
            # "row" is what a spec without the key means (and meant before the key existed): canonical None.
            kw.update(scope=None if scope == "row" else scope)

    elif method in LOWRANK_METHODS:
        given = [k for k in ("ratio", "rank", "energy") if spec.get(k) is not None]
        if len(given) != 1:
            _fail(where, f"give exactly one of ratio (kept parameters / N*K), rank or energy; got {given or 'none'}")
        k = given[0]
        v = spec[k]
        if k == "rank":
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _fail(where, f"rank={v!r} must be a positive integer")
        elif k == "ratio":
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1:
                _fail(where, f"ratio={v!r} must be in (0, 1): it is the fraction of the layer's parameters kept, and ratio >= 1 saves nothing")
            v = float(v)
        else:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= 1:
                _fail(where, f"energy={v!r} must be in (0, 1]")
            v = float(v)
        kw[k] = v
        if method == "whitened_svd":
            kw.update(damp=_damp(spec, where, DEFAULT_WHITENING_DAMP))

    elif method == "combo":
        steps = spec.get("steps")
        if not isinstance(steps, (list, tuple)) or len(steps) != 2:
            _fail(where, "combo needs steps=[<pruning step>, <quantization step>] (prune, then quantize the kept weights)")
        parsed = tuple(parse_spec(s, where=f"{where} step {i + 1}") for i, s in enumerate(steps))
        if parsed[0].family != "sparse" or parsed[1].family != "quant":
            _fail(where, f"combo steps are {[s.method for s in parsed]}; the supported combination is a "
                         f"pruning step ({'/'.join(PRUNE_METHODS)}) followed by a quantization step ({'/'.join(QUANT_METHODS)})")
        kw["steps"] = parsed
    return MethodSpec(**kw)


def _damp(spec: Mapping[str, Any], where: str, default: float = DEFAULT_DAMP) -> float:
    d = spec.get("damp", default)
    if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0 <= d < 1:
        _fail(where, f"damp={d!r} must be in [0, 1) (fraction of the mean diagonal of H added before inverting)")
    return float(d)


# ----------------------------------------------------------------------------- model structure

def _models():
    # Imported lazily: spec parsing and the CLI's `list` must work without transformers.
    from experiments import models
    return models


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of every linear the harness compresses, in execution order."""
    m = _models()
    out = []
    for i, block in enumerate(m.find_blocks(model)):
        for name, layer in m.find_linears(block).items():
            out.append((f"block{i}.{name}", layer))
    return out


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    m = _models()
    return {name: tuple(m.linear_weight(layer).shape) for name, layer in linear_layers(model)}


def check_spec_fits(spec: MethodSpec, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Raise ``ValueError`` if ``spec`` cannot be applied to a layer of shape (N, K) in ``shapes``."""
    steps = spec.steps if spec.method == "combo" else (spec,)
    if not shapes:
        return
    ks = sorted({k for _, k in shapes.values()})
    ns = sorted({n for n, _ in shapes.values()})
    for s in steps:
        if s.family == "quant" and s.group_size != -1 and s.group_size > ks[0]:
            _fail("group_size", f"group_size={s.group_size} is larger than the layer's in_features K={ks[0]} "
                                f"(layers have K in {ks}); use a group size <= {ks[0]} (a partial last group is fine) "
                                f"or -1 for one group per output channel")
        if s.pattern is not None:
            from experiments.algorithms.prune import parse_pattern
            pat = parse_pattern(s.pattern)
            for name, (n, k) in shapes.items():
                try:
                    pat.check_fits(n, k)
                except ValueError as e:
                    _fail("pattern", f"layer {name} ({n}x{k}): {e}")
        if s.family == "lowrank" and s.rank is not None:
            worst = min(shapes.items(), key=lambda kv: min(kv[1]))
            limit = min(worst[1])
            if s.rank > limit:
                _fail("rank", f"rank={s.rank} is larger than min(out_features, in_features)={limit} of layer "
                              f"{worst[0]} {worst[1]}; use rank <= {limit} (or a ratio < 1)")
        if s.family == "lowrank" and s.rank is not None:
            # A factorization that stores more than the dense matrix is never what a sweep means.
            waste = [(name, nk) for name, nk in shapes.items() if s.rank * (nk[0] + nk[1]) >= nk[0] * nk[1]]
            if waste:
                name, (n, k) = waste[0]
                _fail("rank", f"rank={s.rank} stores at least as many parameters as the dense layer {name} ({n}x{k}); "
                              f"use rank < {n * k // (n + k)} for it, or a ratio in (0, 1)")


# ----------------------------------------------------------------------------- source grid

def aliases_source_grid(spec: MethodSpec, source_grid: Mapping[str, Any] | None) -> bool:
    """Whether a setting's quantization step (alone or inside a combo) can reproduce the source grid.

    The rule is :func:`experiments.models.aliases_source_grid` (grid containment), applied to the
    quantization step with integer zero-points (the convention of our quantizers and kernels).
    RTN and GPTQ are treated alike: on weights that lie on the setting's grid GPTQ's error feedback
    is zero. Consequence on the default model: its Q4_1 grid has fractional zero-points (m/d), so
    no integer-zero setting contains it, not even 4-bit asymmetric groups of 32, and the flag is
    False there (measured: RTN w4 g32 leaves about half a step of error, see models.py); the
    ``weight_rel_error`` column shows how close every setting came to the source weights.
    """
    q = spec.quant_step
    if q is None or not source_grid:
        return False
    return bool(_models().aliases_source_grid(dict(source_grid), bits=q.bits, group_size=q.group_size,
                                              symmetric=bool(q.symmetric), integer_zero=True))


# ----------------------------------------------------------------------------- report

@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]  # (out_features N, in_features K)
    module: str  # class name of the module that replaced the layer
    bytes: int
    fp16_bytes: int
    weight_sq_error: float  # ||W - W_hat||_F^2
    weight_sq_norm: float  # ||W||_F^2
    rank: int | None = None
    nnz: int | None = None


@dataclass
class CompressionReport:
    spec: MethodSpec
    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0
    size_is_modelled: bool = False
    # Optional (``keep_weights=True``): the dense W_hat of every compressed layer, for tests.
    weights: dict[str, torch.Tensor] | None = None

    @property
    def n_weights(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.layers)

    @property
    def fp16_bytes(self) -> int:
        return sum(r.fp16_bytes for r in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.n_weights if self.layers else float("nan")

    @property
    def compression_vs_fp16(self) -> float:
        return self.fp16_bytes / self.bytes if self.bytes else float("nan")

    @property
    def weight_rel_error(self) -> float:
        """sqrt(sum ||W - W_hat||^2 / sum ||W||^2) over the compressed layers (0 for dense)."""
        num = sum(r.weight_sq_error for r in self.layers)
        den = sum(r.weight_sq_norm for r in self.layers)
        return math.sqrt(num / den) if den else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "n_layers": len(self.layers),
            "n_weights": self.n_weights,
            "bytes": self.bytes,
            "fp16_bytes": self.fp16_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "compression_vs_fp16": round(self.compression_vs_fp16, 4),
            "weight_rel_error": float(f"{self.weight_rel_error:.6g}"),
            "compress_seconds": round(self.seconds, 2),
            "size_is_modelled": self.size_is_modelled,
        }


def _fp16_bytes(n: int, k: int) -> int:
    # Bias excluded, as in _stored_bytes: it is not compressed.
    return 2 * n * k


# ----------------------------------------------------------------------------- calibration

class _Stats:
    """Accumulates H = X^T X / n and/or the per-input-feature sum of squares over calibration tokens."""

    def __init__(self, k: int, needs: set[str]):
        self.k, self.n = k, 0
        # float64 sums: the sum runs over ~10^4-10^5 tokens and H is inverted/Cholesky-factored later.
        self.H = torch.zeros(k, k, dtype=torch.float64) if "H" in needs else None
        self.sq = torch.zeros(k, dtype=torch.float64) if "sq" in needs else None
        # Contribution of the latest batch, reused by layers that receive the same input tensor.
        self.last_n, self.last_H, self.last_sq = 0, None, None

    def hessian(self) -> torch.Tensor:
        return (self.H / max(self.n, 1)).float()


def _capture(model: nn.Module, calib_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Hidden states entering block 0 and the kwargs each block is called with (one dict per block)."""
    got = _models().block_prefix_forward(model, calib_ids)
    return got.hidden, got.kwargs


# ----------------------------------------------------------------------------- per-layer compression

def _bias(layer: nn.Module) -> torch.Tensor | None:
    b = getattr(layer, "bias", None)
    return None if b is None else b.detach().float().clone()


def _dense_linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _prune(s: MethodSpec, w: torch.Tensor, st: _Stats | None) -> tuple[torch.Tensor, torch.Tensor]:
    from experiments.algorithms import prune
    if s.method == "magnitude":
        return prune.magnitude(w, sparsity=s.sparsity, pattern=s.pattern, scope=s.scope or "row")
    if s.method == "wanda":
        return prune.wanda(w, st.sq.float(), sparsity=s.sparsity, pattern=s.pattern, scope=s.scope or "row")
    return prune.sparsegpt(w, st.hessian(), sparsity=s.sparsity, pattern=s.pattern, damp=s.damp)


def _quantize(s: MethodSpec, w: torch.Tensor, st: _Stats | None, mask: torch.Tensor | None = None):
    from experiments.algorithms import quant
    if s.method == "rtn":
        return quant.rtn(w, bits=s.bits, group_size=s.group_size, symmetric=s.symmetric)
    return quant.gptq(w, st.hessian(), bits=s.bits, group_size=s.group_size, symmetric=s.symmetric,
                      act_order=s.act_order, damp=s.damp, mask=mask)


def _sparse_module(w_hat: torch.Tensor, mask: torch.Tensor, bias, pattern: str):
    """SparseLinear over ``w_hat`` with exactly ``mask``.

    The module picks its backend (and with it what it holds) at construction: on a CPU without
    Triton, "auto" may keep the masked weight dense because that is the fastest CPU forward. Its
    ``memory_bytes()`` still describes the sparse kernel's format (values + indices/metadata), which
    is what the size columns report.
    """
    from experiments.algorithms.prune import parse_pattern
    from triton_kernels.nn.sparse import SparseLinear
    kw = parse_pattern(pattern).module_kwargs()
    return SparseLinear.from_linear(_dense_linear(w_hat, bias), mask=mask, **kw)


def _fp16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back: the values a deployment stores, kept in fp32 for the fp32 evaluation."""
    return t.to(torch.float16).float()


def _stored_bytes(mod: nn.Module) -> int:
    """``memory_bytes()`` of the module: its storage format, floats at 16 bits, bias excluded.

    The evaluation runs in fp32 (the model's dtype), but a compressed layer is deployed with fp16
    floats (scales, factors, kept values), and the ratio is taken against fp16 dense weights. The
    modules count their formats that way whatever dtype and backend they hold; the values were
    rounded to fp16 before the module was built (see ``_fp16_exact``), so this is the size of
    exactly what was evaluated. The bias is not compressed and is counted on neither side.
    """
    return int(mod.memory_bytes())


def _quant_module(res, bias):
    from triton_kernels.nn.quant import QuantLinear
    # Scales are stored in fp16, as GGUF and GPTQ checkpoints store them: 16 bits per group is what
    # a deployment pays, and the algorithms' fp32 scales would overstate bits/weight by 16/group.
    # The reported error and the dense simulation use the module's own dequantized weight.
    # Zero-points are integers in [0, 2^bits), exact in fp16; QuantLinear takes them as floats, so
    # they cost 16 bits per group like the scales (as GGUF Q4_1 stores its fp16 min).
    zeros = None if res.zeros is None else res.zeros.to(torch.float16)
    return QuantLinear.from_codes(res.q, res.scales.to(torch.float16), zeros, bits=res.bits,
                                  group_size=res.group_size, symmetric=res.symmetric, bias=bias)


def _modelled_sparse_quant_bytes(sparse_mod: nn.Module, qmod: nn.Module) -> int:
    """Size model for prune-then-quantize: sparse metadata + ``bits`` per stored value + scales/zeros.

    The sparse format stores its values as 16-bit floats (``format_values()`` of them: N:M and block
    formats the kept values, the unstructured masked-tile format the whole weight plus a bit mask);
    exactly those value bytes are replaced by ``bits`` per stored value, and the quantizer's
    scales/zeros are added as QuantLinear's format stores them.
    """
    values = sparse_mod.format_values()
    meta_bytes = _stored_bytes(sparse_mod) - values * 2
    scale_zero_bytes = _stored_bytes(qmod) - qmod.packed.numel() * qmod.packed.element_size()
    return meta_bytes + math.ceil(values * qmod.bits / 8) + scale_zero_bytes


def compress_layer(layer: nn.Module, spec: MethodSpec, stats: _Stats | None, *, name: str = ""):
    """Compress one linear layer; returns ``(new_module, LayerRecord, W_hat, size_is_modelled)``."""
    w = _models().linear_weight(layer).detach().float().clone()
    n, k = w.shape
    bias = _bias(layer)
    modelled = False
    rank = nnz = None
    if spec.family == "quant":
        mod = _quant_module(_quantize(spec, w, stats), bias)
        w_hat = mod.dequantize().float()
        size = _stored_bytes(mod)
    elif spec.family == "sparse":
        w_hat, mask = _prune(spec, w, stats)
        w_hat = _fp16_exact(w_hat.float() * mask)
        mod = _sparse_module(w_hat, mask, bias, spec.pattern)
        size = _stored_bytes(mod)
        nnz = int(mask.sum())
    elif spec.family == "lowrank":
        from experiments.algorithms import lowrank
        from triton_kernels.nn.lowrank import LowRankLinear
        if spec.rank is not None:
            rank = spec.rank
        elif spec.ratio is not None:
            rank = lowrank.rank_for_ratio(n, k, spec.ratio)
        else:
            rank = lowrank.rank_for_energy(w, spec.energy)
        if spec.method == "svd":
            u, v = lowrank.svd(w, rank=rank)
        else:
            u, v = lowrank.whitened_svd(w, stats.hessian(), rank=rank, damp=spec.damp)
        u, v = _fp16_exact(u).contiguous(), _fp16_exact(v).contiguous()
        w_hat = (u.double() @ v.double()).float()
        mod = LowRankLinear(u, v, bias)
        size = _stored_bytes(mod)
    elif spec.family == "combo":
        p, q = spec.steps
        w_p, mask = _prune(p, w, stats)
        mask = mask.bool()
        qmod = _quant_module(_quantize(q, w_p.float() * mask, stats, mask=mask), None)
        # Pruned positions are structural zeros of the sparse format, not stored values; the kept
        # values are exactly the quantized ones (fp16 scales included).
        w_hat = qmod.dequantize().float() * mask
        mod = _sparse_module(w_hat, mask, bias, p.pattern)
        size = _modelled_sparse_quant_bytes(mod, qmod)
        modelled = True
        nnz = int(mask.sum())
    else:
        raise ValueError(f"method={spec.method!r} does not compress layers")
    rec = LayerRecord(name=name, shape=(n, k), module=type(mod).__name__, bytes=int(size),
                      fp16_bytes=_fp16_bytes(n, k),
                      weight_sq_error=float((w - w_hat).double().square().sum()),
                      weight_sq_norm=float(w.double().square().sum()), rank=rank, nnz=nnz)
    return mod, rec, w_hat, modelled


def module_backends(model: nn.Module) -> str:
    """The backends the compressed modules ran (or will run) with, e.g. "QuantLinear:dequant"."""
    seen = set()
    for mod in model.modules():
        name = type(mod).__name__
        if name in ("QuantLinear", "SparseLinear", "LowRankLinear"):
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
                   *, progress: bool = True, chunk: int = 8, keep_weights: bool = False) -> CompressionReport:
    """Compress every linear of every transformer block of ``model`` in place; see module docstring.

    ``calib_ids`` (LongTensor (n_samples, seqlen)) is only used by methods that need calibration
    statistics (gptq, wanda, sparsegpt, whitened_svd, and combos containing them); rtn, magnitude
    and svd skip the capture entirely. Blocks run on ``chunk`` calibration samples at a time.
    """
    spec = parse_spec(spec)
    m = _models()
    blocks = m.find_blocks(model)
    per_block = [m.find_linears(b) for b in blocks]
    shapes = {f"block{i}.{n}": tuple(m.linear_weight(l).shape)
              for i, ls in enumerate(per_block) for n, l in ls.items()}
    check_spec_fits(spec, shapes)
    report = CompressionReport(spec=spec, weights={} if keep_weights else None)
    t0 = time.perf_counter()
    if spec.method == "dense":
        # The baseline is reported as fp16 storage, the reference of the compression ratio.
        for i, ls in enumerate(per_block):
            for name, layer in ls.items():
                n, k = shapes[f"block{i}.{name}"]
                fb = _fp16_bytes(n, k)
                w2 = float(m.linear_weight(layer).double().square().sum())
                report.layers.append(LayerRecord(f"block{i}.{name}", (n, k), "dense-fp16", fb, fb, 0.0, w2))
        return report
    needs = spec.needs()
    if needs and calib_ids is None:
        raise ValueError(f"method {spec.label()} needs calibration data: pass calib_ids")
    hidden = kwargs = None
    if needs:
        hidden, kwargs = _capture(model, calib_ids)
    from experiments.progress import progress_bar
    for i, block in enumerate(progress_bar(blocks, desc=f"compress {spec.label()}", unit="block", leave=False,
                                           enabled=progress)):
        linears = per_block[i]
        stats: dict[str, _Stats] = {}
        if needs:
            handles = []
            shared: dict[str, Any] = {"x": None, "owner": None}
            for name, layer in linears.items():
                k = m.linear_weight(layer).shape[1]
                st = stats[name] = _Stats(k, needs)
                handles.append(layer.register_forward_pre_hook(_make_hook(st, shared)))
            try:
                m.run_block(block, hidden, kwargs[i], batch_size=chunk)
            finally:
                for h in handles:
                    h.remove()
        for name, layer in linears.items():
            new, rec, w_hat, modelled = compress_layer(layer, spec, stats.get(name), name=f"block{i}.{name}")
            _set_submodule(block, name, new)
            report.layers.append(rec)
            report.size_is_modelled |= modelled
            if keep_weights:
                report.weights[rec.name] = w_hat
        stats.clear()
        if needs:
            hidden = m.run_block(block, hidden, kwargs[i], batch_size=chunk)
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
