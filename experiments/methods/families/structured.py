"""Structured pruning, a model-level family: MLP channels, attention heads or whole blocks are removed.

    {"method": "channels", "criterion": "flap", "sparsity": 0.2}
    {"method": "heads", "criterion": "wanda", "sparsity": 0.3, "scope": "global", "head_unit": "query"}
    {"method": "channels_heads", "criterion": "wanda-sp", "sparsity": 0.2, "head_unit": "query"}
    {"method": "channels_heads", "criterion": "taylor", "sparsity": 0.2}
    {"method": "layers", "criterion": "bi", "blocks": 4}
    {"method": "channels", "criterion": "flap", "sparsity": 0.2, "steps": [{"method": "gptq", "bits": 4}]}

The algorithms are :mod:`experiments.methods.algorithms.structured` (criteria ``magnitude`` / ``wanda`` /
``flap`` / ``taylor`` / ``magnitude-sp`` / ``wanda-sp`` for channels and heads, ``bi`` / ``last`` for
layers; ``scope`` uniform or global; ``head_unit`` group or query; ``floor``: the fraction of each
layer's units always kept).

What follows which paper (details in the algorithms module):

- ``flap`` follows FLAP (An et al. 2024; CASIA-IVA-Lab/FLAP ``lib/prune.py``): the WIFV fluctuation
  metric, squared and summed over a head for attention, bias compensation; ``scope: global`` is its
  adaptive search (each layer's metric standardized with the layer's own mean and std, then one
  threshold across layers and kinds, units weighted by their parameters). Not as FLAP: a ``floor``
  of units kept in every layer, MLP-only and attention-only global runs, GQA head units.
- ``magnitude-sp`` and ``wanda-sp`` are FLAP's baselines (``prune_magnitude_sp``, ``prune_wanda_sp``):
  a channel or head is scored from its down_proj / o_proj input columns only; Wanda-sp is computed
  block by block on the already pruned model, so it runs with ``scope: uniform`` only (as FLAP runs
  both). Not as FLAP: the per-layer count is the one nearest to the ratio of the layer's parameters
  (FLAP truncates ``int(ratio * n)``), and GQA heads are removed as groups or query slots.
- ``magnitude`` and ``wanda`` are this project's: the same quantities summed over *every* weight the
  unit removes (gate/up rows and the down column; q/k/v rows and o columns), from one pass of the
  dense model. ``taylor`` is LLM-Pruner's first-order element-wise score (Ma et al. 2023) summed
  over the unit, without its LoRA recovery. ``bi`` is ShortGPT's Block Influence (Men et al. 2024).
``sparsity`` is the fraction of the pruned structures' parameters removed (of the MLP linears for
``channels``, of the attention linears for ``heads``, of both for ``channels_heads``); the result rows
say what was removed from the whole model (``params``, ``params_kept``).

The result is an ordinary dense model with smaller ``nn.Linear`` modules (FLAP's compensation adds a
bias to down_proj / o_proj), so its size is real: each remaining linear stores ``2*N*K`` bytes of
its *new* shape (fp16, bias excluded as everywhere), and is reported against the fp16 bytes of its
*original* shape, so ``bits_per_weight`` (per original weight) and ``compression_vs_fp16`` compare
with the dense model. A removed block's linears keep their records with 0 stored bytes.
``steps=[<rtn|gptq spec>]`` quantizes the pruned model's linears afterwards (block by block with
calibration, as the quant family does): structured + GPTQ.

Speed: with ``decode_tokens`` > 0 (default 32) the family keeps a copy of the dense model and, on
bf16 copies of both (``decode_dtype``: the dtype every decode comparison of this project uses, so that
structured + GPTQ runs the quantized CPU kernels and not the fp32 dequantize fallback), measures in the
same process on the same device:

- greedy decoding of the dense and the pruned model interleaved (:func:`decode_pair`: fixed 16-token
  prompt, 5 alternating pairs after a warm-up each, speedup = the median of the pair ratios):
  ``decode_tokens_per_s``, ``dense_decode_tokens_per_s``, ``decode_speedup``;
- the layer latency at the model's new shapes (:func:`linear_latency`): every block linear of each
  model timed alone at M=1 (one decode token), summed over the model: ``linears_m1_ms``,
  ``dense_linears_m1_ms``, ``linears_m1_speedup``. On CPU these small layers stay in the L3 cache
  across calls, so this is a hot-cache latency.

``compress_seconds`` excludes these timings.
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from experiments.core.dtypes import DTYPE_NAMES
from experiments.methods.algorithms import structured as structured_pruning
from experiments.methods.families.base import is_int, is_number
from experiments.methods.spec import (CompressionReport, Family, LayerRecord, fail, family_of, fp16_bytes, parse_spec,
                                      register)

WIDTH_METHODS = ("channels", "heads", "channels_heads")
DEFAULT_DECODE_TOKENS = 32
DECODE_PROMPT_TOKENS = 16
DECODE_DTYPE = torch.bfloat16
_COMMON = frozenset({"criterion", "decode_tokens", "steps"})


@dataclass
class StructuredReport(CompressionReport):
    """The driver's ``CompressionReport`` with the structured columns added."""
    params_dense: int = 0
    params: int = 0
    removed_fraction: float = float("nan")
    kept_blocks: list = field(default_factory=list)
    widths: dict = field(default_factory=dict)
    decode: dict = field(default_factory=dict)
    decode_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        s = super().summary()
        s["compress_seconds"] = round(self.seconds - self.decode_seconds, 2)
        dense_tps, tps = self.decode.get("dense_tokens_per_s"), self.decode.get("tokens_per_s")
        s.update({
            "params_dense": self.params_dense, "params": self.params,
            "params_kept": round(self.params / self.params_dense, 6) if self.params_dense else "",
            "structure_removed": round(self.removed_fraction, 6),
            "n_blocks": len(self.kept_blocks),
            "kept_blocks": json.dumps(self.kept_blocks),
            "layer_widths": json.dumps(self.widths, sort_keys=True),
            "decode_tokens_per_s": round(tps, 3) if tps else "",
            "dense_decode_tokens_per_s": round(dense_tps, 3) if dense_tps else "",
            "decode_speedup": round(self.decode["speedup"], 4) if "speedup" in self.decode else "",
            "decode_new_tokens": self.decode.get("new_tokens", ""),
            "decode_timer": self.decode.get("timer", ""),
            "decode_dtype": self.decode.get("dtype", ""),
            "linears_m1_ms": _rounded_or_blank(self.decode.get("linears_ms")),
            "dense_linears_m1_ms": _rounded_or_blank(self.decode.get("dense_linears_ms")),
            "linears_m1_speedup": _rounded_or_blank(self.decode.get("linears_speedup")),
        })
        return s


def _rounded_or_blank(v, nd: int = 4):
    return "" if v is None else round(v, nd)


def linear_latency(model, *, m: int = 1, min_run_time: float = 0.05) -> float:
    """Milliseconds of every linear layer inside the transformer blocks of ``model`` (``nn.Linear`` or a
    compressed module of this project: anything with ``in_features``/``out_features``) run alone on an
    ``(m, in_features)`` input of the model's dtype, summed over the model (``experiments.core.timing.time_fn``
    per module, median). Modules of the same class and configuration (``extra_repr``: shape, bias, bits,
    backend...) are timed once and counted as often as they occur, so a uniformly pruned model costs a
    handful of timings and a globally pruned one one per distinct shape."""
    from experiments.lm.models import find_blocks
    from experiments.core.timing import time_fn
    p = next(model.parameters())
    seen: dict[tuple, float] = {}
    total, count = 0.0, 0
    with torch.inference_mode():
        for block in find_blocks(model):
            for layer in block.modules():
                k, n = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
                if not isinstance(k, int) or not isinstance(n, int):
                    continue
                key = (type(layer).__name__, layer.extra_repr())
                if key not in seen:
                    x = torch.randn(m, k, device=p.device, dtype=p.dtype)
                    seen[key] = time_fn(lambda: layer(x), p.device, min_run_time=min_run_time)["median_ms"]
                total += seen[key]
                count += 1
    if not count:
        raise ValueError(f"linear_latency found no layer with in_features/out_features in the blocks of "
                         f"{type(model).__name__}")
    return total


def decode_pair(dense, pruned, new_tokens: int, *, repeats: int = 5, progress: bool = False) -> dict:
    """Greedy-decode speed of ``dense`` and ``pruned`` timed *interleaved* on the same device: one
    warm-up each, then ``repeats`` pairs of ``generate`` calls in alternating order. The speedup is the
    median of the per-pair time ratios, so a change of machine load during the measurement (the
    development machine is shared) shifts both sides of a pair alike. Fixed 16-token prompt (token ids
    1..16: the speed does not depend on the text, and no tokenizer is needed); ``min_new_tokens`` pins
    the length, as :func:`experiments.measure.decode_speed.decode_tokens_per_second` does."""
    from experiments.core.progress import progress_bar
    device = next(pruned.parameters()).device
    ids = torch.arange(1, DECODE_PROMPT_TOKENS + 1, device=device).unsqueeze(0)
    pad = pruned.generation_config.pad_token_id
    pad = pruned.generation_config.eos_token_id if pad is None else pad
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=pad)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once(m) -> float:
        sync()
        t0 = time.perf_counter()
        out = m.generate(**kw)
        sync()
        if out.shape[1] - ids.shape[1] != new_tokens:
            raise RuntimeError(f"generate produced {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")
        return time.perf_counter() - t0

    td, tp = [], []
    bar = progress_bar(total=2 + 2 * repeats, desc="decode dense vs pruned", unit="generate call", enabled=progress)
    with torch.inference_mode():
        for m in (dense, pruned):  # warm-up: caches, allocator
            once(m)
            bar.update(1)
        for r in range(repeats):
            order = ((dense, td), (pruned, tp)) if r % 2 == 0 else ((pruned, tp), (dense, td))
            for m, acc in order:
                acc.append(once(m))
                bar.update(1)
    bar.close()
    return {"tokens_per_s": new_tokens / statistics.median(tp), "dense_tokens_per_s": new_tokens / statistics.median(td),
            "speedup": statistics.median(d / p for d, p in zip(td, tp)), "new_tokens": new_tokens, "repeats": repeats,
            "timer": f"time.perf_counter around model.generate (greedy, {DECODE_PROMPT_TOKENS}-token prompt), "
                     f"dense and pruned interleaved, {repeats} pairs; speedup = median pair ratio"}


def measure_speed(dense, pruned, new_tokens: int, *, dtype: torch.dtype = DECODE_DTYPE,
                  progress: bool = False) -> dict:
    """:func:`decode_pair` and :func:`linear_latency` of ``dense`` and ``pruned``, both run as ``dtype``
    copies (``dense`` is cast in place: pass a copy; ``pruned`` is copied, so the model the sweep
    evaluates keeps its dtype). Returns the decode dict with ``dtype``, ``linears_ms``,
    ``dense_linears_ms`` and ``linears_speedup`` added."""
    dense = dense.to(dtype)
    fast = copy.deepcopy(pruned).to(dtype)
    out = decode_pair(dense, fast, new_tokens, progress=progress)
    out["dtype"] = DTYPE_NAMES[dtype]
    out["linears_ms"] = linear_latency(fast)
    out["dense_linears_ms"] = linear_latency(dense)
    out["linears_speedup"] = out["dense_linears_ms"] / out["linears_ms"]
    return out


class StructuredFamily(Family):
    name = "structured"
    methods = {"channels": _COMMON | {"sparsity", "scope", "floor"},
               "heads": _COMMON | {"sparsity", "scope", "floor", "head_unit"},
               "channels_heads": _COMMON | {"sparsity", "scope", "floor", "head_unit"},
               "layers": _COMMON | {"blocks"}}
    columns = ("prune_method", "criterion", "sparsity", "blocks", "scope", "head_unit", "quant_method", "bits",
               "group_size")
    level = "model"

    def parse(self, method: str, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
        crit = spec.get("criterion")
        allowed = structured_pruning.LAYER_CRITERIA if method == "layers" else structured_pruning.CRITERIA
        if crit not in allowed:
            fail(where, f"criterion={crit!r} for method={method!r} must be one of {', '.join(allowed)}")
        out: dict[str, Any] = {"criterion": crit}
        if method == "layers":
            b = spec.get("blocks")
            if not is_int(b) or b < 1:
                fail(where, f"blocks={b!r} must be a positive integer (number of transformer blocks removed)")
            out["blocks"] = b
        else:
            sp = spec.get("sparsity")
            if not is_number(sp) or not 0 < sp < 1:
                fail(where, f"sparsity={sp!r} must be a number in (0, 1): the fraction of the "
                            f"{'MLP' if method == 'channels' else 'attention' if method == 'heads' else 'MLP + attention'}"
                            f" parameters removed")
            out["sparsity"] = float(sp)
            scope = spec.get("scope", "uniform")
            if scope not in structured_pruning.SCOPES:
                fail(where, f"scope={scope!r} must be one of {', '.join(structured_pruning.SCOPES)} "
                            f"(same ratio in every layer, or one threshold across layers on scores "
                            f"standardized within each layer)")
            if crit in structured_pruning.SEQUENTIAL and scope != "uniform":
                fail(where, f"scope={scope!r} does not fit criterion={crit!r}: it prunes block by block (FLAP's "
                            f"Wanda-sp takes each block's statistics from the already pruned blocks before it), "
                            f"so it runs with scope: uniform only")
            out["scope"] = scope
            fl = spec.get("floor", 0.1)
            if not is_number(fl) or not 0 <= fl < 1:
                fail(where, f"floor={fl!r} must be in [0, 1): the fraction of each layer's units always kept")
            out["floor"] = float(fl)
            if method != "channels":
                hu = spec.get("head_unit", "group")
                if hu not in structured_pruning.HEAD_UNITS:
                    fail(where, f"head_unit={hu!r} must be one of {', '.join(structured_pruning.HEAD_UNITS)} "
                                f"(whole k/v groups, or "
                                f"query heads removed evenly from every group)")
                out["head_unit"] = hu
        dt = spec.get("decode_tokens", DEFAULT_DECODE_TOKENS)
        if not is_int(dt) or dt < 0:
            fail(where, f"decode_tokens={dt!r} must be a non-negative integer (0: do not measure decode speed)")
        out["decode_tokens"] = dt
        steps = spec.get("steps")
        if steps is not None:
            if not isinstance(steps, (list, tuple)) or len(steps) != 1:
                fail(where, "steps must be a list of one quantization spec, e.g. [{method: gptq, bits: 4, "
                            "group_size: 64}] (applied to the pruned model)")
            q = parse_spec(steps[0], where=f"{where} step 1")
            if q.family != "quant":
                fail(where, f"steps[0] method={q.method!r} is not a quantization method; the pruned model can be "
                            f"quantized with rtn or gptq")
            out["steps"] = (q,)
        return out

    def label(self, spec) -> str:
        if spec.method == "layers":
            s = f"layers-{spec.criterion}-b{spec.blocks}"
        else:
            s = f"{spec.method}-{spec.criterion}-s{spec.sparsity:g}"
            if spec.scope != "uniform":
                s += f"-{spec.scope}"
            if spec.head_unit not in (None, "group"):
                s += f"-{spec.head_unit}"
            if spec.floor != 0.1:
                s += f"-floor{spec.floor:g}"
        return s + "".join(f"+{q.label()}" for q in spec.steps)

    def needs(self, spec) -> set[str]:
        # No per-layer statistics from the driver (this family collects its own), but the sweep only
        # hands calibration windows to points that need something: say so for calibrated criteria.
        calibrated = spec.criterion in structured_pruning.CALIBRATED
        return ({"sq"} if calibrated else set()).union(*(q.needs() for q in spec.steps))

    def check_fits(self, spec, shapes) -> None:
        blocks = {name.split(".", 1)[0] for name in shapes}
        names = {name.split(".", 1)[1] for name in shapes}
        need = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"}
        if not need <= names:
            fail(f"method={spec.method!r}", f"structured pruning needs Llama-family blocks ({', '.join(sorted(need))}); "
                                            f"this model's block linears are {sorted(names)}")
        if spec.method == "layers" and spec.blocks >= len(blocks):
            fail("method='layers'", f"blocks={spec.blocks} must be smaller than the model's {len(blocks)} blocks")
        for q in spec.steps:
            family_of(q.method).check_fits(q, shapes)

    def compress_model(self, model, spec, calib_ids, *, driver, progress=True):
        """Prune ``model`` in place, then (``steps``) quantize its linears with ``driver`` (the driver's
        ``compress_model``); with ``decode_tokens``, time it against the dense model."""
        from experiments.lm.models import linear_layers, linear_weight
        t0 = time.perf_counter()
        timing = 0.0
        decode: dict[str, Any] = {}
        dense_copy = None
        if spec.decode_tokens:  # the dense model, kept to time it interleaved with the pruned one
            t = time.perf_counter()
            dense_copy = copy.deepcopy(model)
            timing += time.perf_counter() - t
        # Original weights by (block, linear), to report sizes and errors against the dense model.
        orig = {name: linear_weight(layer).detach().clone() for name, layer in linear_layers(model)}
        res = structured_pruning.prune_model(model, method=spec.method, criterion=spec.criterion, ratio=spec.sparsity,
                            blocks=spec.blocks, scope=spec.scope or "uniform", head_unit=spec.head_unit or "group",
                            floor=spec.floor if spec.floor is not None else 0.1, calib_ids=calib_ids,
                            progress=progress)
        # Pruning only selects rows/columns: the new weights are exactly the kept original ones.
        kept_sq = {name: float(linear_weight(layer).detach().double().square().sum())
                   for name, layer in linear_layers(model)}
        qreport = None
        for q in spec.steps:
            qreport = driver(model, q, calib_ids, progress=progress)
        qrecs = {r.name: r for r in qreport.layers} if qreport is not None else {}
        report = StructuredReport(spec=spec)
        new_index = {old: new for new, old in enumerate(res.kept_blocks)}
        now = dict(linear_layers(model))
        for name, w in orig.items():
            block, lin = name.split(".", 1)
            n, k = w.shape
            w2 = float(w.double().square().sum())
            old = int(block[len("block"):])
            if old not in new_index:
                report.layers.append(LayerRecord(name, (n, k), "removed", 0, fp16_bytes(n, k), w2, w2, nnz=0))
                continue
            new_name = f"block{new_index[old]}.{lin}"
            if new_name in qrecs:  # quantized after pruning: its format bytes and its error on the kept part
                rec = qrecs[new_name]
                nn_, kk = rec.shape
                b, err, mod = rec.bytes, (w2 - kept_sq[new_name]) + rec.weight_sq_error, rec.module
            else:
                layer = now[new_name]
                nn_, kk = linear_weight(layer).shape
                b, err, mod = fp16_bytes(nn_, kk), w2 - kept_sq[new_name], type(layer).__name__
            report.layers.append(LayerRecord(name, (n, k), mod, b, fp16_bytes(n, k), max(err, 0.0), w2,
                                             nnz=nn_ * kk))
        report.size_is_modelled = bool(qreport.size_is_modelled) if qreport is not None else False
        if dense_copy is not None:
            t = time.perf_counter()
            decode = measure_speed(dense_copy, model, spec.decode_tokens, progress=progress)
            del dense_copy
            timing += time.perf_counter() - t
        report.params_dense, report.params = res.params_before, res.params_after
        report.removed_fraction = res.removed_fraction
        report.kept_blocks = res.kept_blocks
        report.widths = {"channels": res.channels, "q_heads": res.q_heads, "kv_heads": res.kv_heads}
        report.decode, report.decode_seconds = decode, timing
        report.seconds = time.perf_counter() - t0
        return report

    def uniform_grid(self, spec) -> dict[str, Any] | None:
        """The quantization step's grid (the kept weights are the original ones), ``None`` without one."""
        return family_of(spec.steps[0].method).uniform_grid(spec.steps[0]) if spec.steps else None

    def method_columns(self, spec) -> dict[str, Any]:
        cols = {"prune_method": spec.method, "criterion": spec.criterion,
                "sparsity": "" if spec.sparsity is None else spec.sparsity,
                "blocks": "" if spec.blocks is None else spec.blocks,
                "scope": spec.scope or "", "head_unit": spec.head_unit or ""}
        for q in spec.steps:
            cols.update({"quant_method": q.method, "bits": q.bits, "group_size": q.group_size})
        return cols


FAMILY = register(StructuredFamily())
