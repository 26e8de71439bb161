"""Mixed precision under a bit budget (a model-level family): a uniform-grid format per layer, chosen exactly.

    {"method": "mixed", "budget": 3.25}                      # bits {2,3,4,8} x groups {64,128}, then RTN
    {"method": "mixed", "budget": 3.25, "gptq": true}        # the same allocation, quantized by GPTQ
    {"method": "mixed", "budget": 2.5, "bit_choices": [2, 3, 4], "group_choices": [32, 64, 128]}

``budget`` is in effective bits per weight over the block linears, counted as every row's
``bits_per_weight`` is: the packed codes plus the fp16 scales and zeros of each layer's ``QuantLinear``
(on SmolLM2, whose K = 576 leaves a partial last group of 128: RTN w3 g128 is 3.27, w2 g64 2.5, w4 g128
4.27). The allocation:

1. **Sensitivity** (``sensitivity: fisher``, the only one so far): the dense model's per-weight empirical
   Fisher ``F`` on the calibration windows (``models.squared_gradients``, as SqueezeLLM's), and for every
   layer ``l`` and candidate format ``c`` (every ``bit_choices`` x ``group_choices``) the cost
   ``sum F * (W - Q_c(W))^2`` with ``Q_c`` RTN on that grid (the fp16-stored values): the second-order
   estimate of the loss increase (HAWQ-V2/V3, SqueezeLLM), additive over layers.
2. **Allocation**: the candidate per layer that minimises the summed cost with the summed bytes within
   the budget, an exact multiple-choice knapsack (:func:`experiments.methods.algorithms.allocate.allocate`:
   a 0/1 integer program, HiGHS, gap 0).
3. **Quantization**: the driver quantizes every layer in its format, with RTN or (``gptq: true``) GPTQ
   (sequential calibration, as always; the allocation was chosen on RTN's errors, not GPTQ's).

Each layer is a plain ``QuantLinear`` of its own bits and group size: save/reload and every kernel and CPU
path run it unchanged; the GGUF export maps the layers whose grid it has and refuses the others, naming
them. Rows carry ``allocation`` (per layer ``<block>.<layer>=<bits>/<group>``, layer names shortened:
:func:`parse_allocation` reads it back) and ``allocation_cost`` (the summed predicted cost). The
``bits`` and ``group_size`` columns are empty (no single value); ``bits_per_weight`` is the realised size.
Cost of the allocation: one forward and backward per calibration window, plus one RTN per layer and
candidate (8 per layer by default); the Fisher holds one float32 copy of the block linears' weights.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Any, Mapping

import torch

from experiments.methods.families import quant
from experiments.methods.families.base import is_int, is_number, random_linear, stored_bytes
from experiments.methods.spec import CompressionReport, Family, fail, parse_spec, register

DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_GROUPS = (64, 128)
SENSITIVITIES = ("fisher",)
_OPTS = frozenset({"budget", "bit_choices", "group_choices", "symmetric", "sensitivity", "gptq", "act_order",
                   "damp"})


def _choices(v: Any, default: tuple[int, ...], name: str, where: str, check) -> str:
    """A list of integer choices as its canonical string ("2,3,4,8": sorted, unique), so a spec's plain
    data survives a JSON round trip (saved points compare their spec with the sweep's)."""
    if v is None:
        v = default
    if isinstance(v, str):
        try:
            v = [int(x) for x in v.split(",")]
        except ValueError:
            fail(where, f"{name}={v!r} must be a list of integers, e.g. {list(default)}")
    if not isinstance(v, (list, tuple)) or not v or not all(is_int(x) for x in v):
        fail(where, f"{name}={v!r} must be a non-empty list of integers, e.g. {list(default)}")
    for x in v:
        check(x)
    return ",".join(str(x) for x in sorted(set(v)))


def candidates(spec, k: int | None = None) -> list[tuple[int, int]]:
    """Every ``(bits, group_size)`` a layer may take; with ``k`` (its in_features) only the groups that fit
    it (``g <= K`` or ``-1``, as :func:`~experiments.methods.families.base.check_group_fits` asks)."""
    return [(int(b), int(g)) for b in spec.bit_choices.split(",") for g in spec.group_choices.split(",")
            if k is None or int(g) == -1 or int(g) <= k]


@functools.lru_cache(maxsize=None)
def format_bytes(n: int, k: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Stored bytes of an (N, K) ``QuantLinear`` of that grid: its ``memory_bytes()`` (built once per key)."""
    spec = parse_spec({"method": "rtn", "bits": bits, "group_size": group_size, "symmetric": symmetric})
    w = random_linear(n, k, torch.float32, "cpu", torch.Generator().manual_seed(0)).weight.detach()
    return stored_bytes(quant.quant_module(quant.quantize(spec, w, None), None))


def _short(name: str) -> str:
    """``block3.self_attn.q_proj`` -> ``3.q`` (the allocation column's layer names)."""
    block, _, rest = name.partition(".")
    leaf = rest.rsplit(".", 1)[-1]
    return f"{block.removeprefix('block')}.{leaf.removesuffix('_proj')}"


def format_allocation(alloc: Mapping[str, tuple[int, int]]) -> str:
    return ";".join(f"{_short(n)}={b}/{g}" for n, (b, g) in alloc.items())


def parse_allocation(text: str) -> list[tuple[int, str, int, int]]:
    """The ``allocation`` column back as ``[(block, layer, bits, group_size), ...]`` in layer order."""
    out = []
    for item in filter(None, str(text).split(";")):
        where, _, fmt = item.partition("=")
        block, _, layer = where.partition(".")
        b, _, g = fmt.partition("/")
        out.append((int(block), layer, int(b), int(g)))
    return out


class MixedFamily(Family):
    name = "mixed"
    methods = {"mixed": _OPTS}
    columns = ("quant_method", "symmetric", "gptq", "act_order", "damp")
    level = "model"

    def parse(self, method: str, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
        budget = spec.get("budget")
        if not is_number(budget) or not 0 < budget <= 16:
            fail(where, f"budget={budget!r} must be a number of effective bits per weight in (0, 16] "
                        f"(codes plus fp16 scales and zeros, as the bits_per_weight column; RTN w3 g128 on SmolLM2 is 3.27)")

        def bits_ok(b):
            if not 1 <= b <= 8:
                fail(where, f"bit_choices: {b} is not a code width of the kernels (1..8)")

        def group_ok(g):
            if not (g == -1 or (g >= 1 and not g & (g - 1))):
                fail(where, f"group_choices: {g} is not a power of two or -1 (QuantLinear's groups)")

        sym = spec.get("symmetric", False)
        if not isinstance(sym, bool):
            fail(where, f"symmetric={sym!r} must be true or false")
        sens = spec.get("sensitivity", "fisher")
        if sens not in SENSITIVITIES:
            fail(where, f"sensitivity={sens!r} must be one of {', '.join(SENSITIVITIES)}")
        kw = {"budget": float(budget), "symmetric": sym, "sensitivity": sens,
              "bit_choices": _choices(spec.get("bit_choices"), DEFAULT_BITS, "bit_choices", where, bits_ok),
              "group_choices": _choices(spec.get("group_choices"), DEFAULT_GROUPS, "group_choices", where, group_ok),
              **quant.parse_gptq_step(spec, where, "the allocated model")}
        if sym and "1" in kw["bit_choices"].split(","):
            fail(where, "bit_choices with 1 and symmetric=true cannot work (the symmetric 1-bit grid rounds "
                        "every weight to 0); drop 1 or use symmetric=false")
        return kw

    def label(self, spec) -> str:
        s = f"mixed-b{spec.budget:g}"
        if spec.bit_choices != ",".join(map(str, DEFAULT_BITS)):
            s += f"-w{spec.bit_choices.replace(',', '')}"
        if spec.group_choices != ",".join(map(str, DEFAULT_GROUPS)):
            s += "-g" + spec.group_choices.replace(",", "_")
        return s + ("-sym" if spec.symmetric else "") + quant.gptq_suffix(spec)

    def needs(self, spec) -> set[str]:
        # The Fisher is the family's own pass (the driver hands it calibration windows for it); GPTQ's H
        # is collected by the driver's quantization pass.
        return {"fisher"} | ({"H"} if spec.gptq else set())

    def check_fits(self, spec, shapes) -> None:
        for name, (n, k) in shapes.items():
            if not candidates(spec, k):
                fail(f"method='mixed', group_choices={spec.group_choices}",
                     f"no group fits layer {name} (in_features K={k}); add a group size <= {k} or -1")
        smallest = sum(min(format_bytes(n, k, b, g, bool(spec.symmetric)) for b, g in candidates(spec, k))
                       for n, k in shapes.values())
        n_weights = sum(n * k for n, k in shapes.values())
        if 8 * smallest > spec.budget * n_weights:
            fail(f"method='mixed', budget={spec.budget:g}",
                 f"below the smallest allocation of these candidates ({8 * smallest / n_weights:.4f} bits per "
                 f"weight: every layer at the fewest bits and largest groups); raise the budget or add smaller "
                 f"candidates (bit_choices, group_choices)")

    def compress_model(self, model, spec, calib_ids, *, driver, progress=True):
        """Measure every layer's cost per candidate, allocate exactly, quantize with ``driver``."""
        from experiments.core.progress import progress_bar
        from experiments.lm.models import linear_layers, linear_weight, squared_gradients
        from experiments.methods.algorithms.allocate import allocate
        if calib_ids is None:
            raise ValueError(f"method {spec.label()} needs calibration data (the Fisher): pass calib_ids")
        layers = linear_layers(model)
        fisher = squared_gradients(model, calib_ids)
        cost, size, cands = [], [], []
        for name, layer in progress_bar(layers, desc=f"{spec.label()}: sensitivity", unit="layer", leave=False,
                                        enabled=progress):
            w = linear_weight(layer).detach().float()
            f = fisher.pop(name).float()
            row_c, row_s = [], []
            cands.append(candidates(spec, w.shape[1]))
            for b, g in cands[-1]:
                step = parse_spec({"method": "rtn", "bits": b, "group_size": g, "symmetric": bool(spec.symmetric)})
                mod = quant.quant_module(quant.quantize(step, w, None), None)
                row_c.append(float((f * (w - mod.dequantize().float()).square()).sum()))
                row_s.append(stored_bytes(mod))
            cost.append(row_c)
            size.append(row_s)
        n_weights = sum(linear_weight(l).numel() for _, l in layers)
        pick = allocate(cost, size, int(spec.budget * n_weights // 8))
        alloc = {name: c[p] for (name, _), c, p in zip(layers, cands, pick)}
        common = Counter(alloc.values()).most_common(1)[0][0]
        report = driver(model, quant.quantizer_spec(spec, *common), calib_ids, progress=progress,
                        layer_specs={n: quant.quantizer_spec(spec, b, g) for n, (b, g) in alloc.items()})
        report = CompressionReport(spec=spec, layers=report.layers, size_is_modelled=report.size_is_modelled,
                                   weights=report.weights)
        report.extra = {"allocation": format_allocation(alloc),
                        "allocation_cost": float(f"{sum(c[p] for c, p in zip(cost, pick)):.6g}")}
        return report

    def method_columns(self, spec) -> dict[str, Any]:
        return {"quant_method": spec.method, "symmetric": bool(spec.symmetric), "gptq": bool(spec.gptq),
                "act_order": "" if spec.act_order is None else spec.act_order,
                "damp": "" if spec.damp is None else spec.damp}


FAMILY = register(MixedFamily())
