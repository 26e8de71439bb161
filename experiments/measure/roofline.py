"""Roofline model: the ideal time of every compressed-linear kernel on named GPUs (not a measurement).

A linear layer ``y[M, N] = x[M, K] @ W[N, K]^T`` must at least move its weights in their storage
format (packed codes, scales, zeros, indices, metadata), read its activations and write its outputs,
and do its FLOPs. Its ideal time on a GPU is

    max(bytes / peak_bandwidth, flops / peak_fp16_tensor_flops)

Weight bytes come from the modules' own ``memory_bytes()`` (a module of exactly that shape and format
is built from random weights), so the model charges precisely what the storage format holds.
Activations are fp16 in and out. Kernel overheads (launch, dequant ALU work, imperfect overlap, tails)
are not modelled: measured times should sit above these lines, and the ratio says how far.

    python -m experiments roofline            # writes runs/local/roofline_model.csv (--run NAME, --out PATH)

Every row carries ``model="roofline (not a measurement)"``.
"""
from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path
from typing import Iterable

import torch

from experiments.core import results
from experiments.measure.formats import KINDS, build_layer, format_from_row, format_label, triton_interpret

MODEL_TAG = "roofline (not a measurement)"
OUT_NAME = "roofline_model.csv"  # in the run directory (experiments.core.runs), never results/ directly
ACT_BYTES = 2  # fp16/bf16 activations in and out

# Peak DRAM bandwidth (bytes/s) and dense (no 2:4 sparsity) fp16/bf16 tensor-core FLOP/s with fp32
# accumulation, from the vendors' datasheets:
# - H100 SXM5 80GB: NVIDIA H100 Tensor Core GPU datasheet (2023): 3.35 TB/s HBM3; FP16/BF16 tensor
#   core 1,979 TFLOPS "with sparsity", i.e. 989.4 dense.
# - A100 80GB SXM: NVIDIA A100 Tensor Core GPU datasheet (2021): 2,039 GB/s HBM2e; FP16/BF16 tensor
#   core 312 TFLOPS dense (624 with sparsity).
# - RTX 4090: NVIDIA Ada Lovelace GPU architecture whitepaper v1.0, appendix table: 1,008 GB/s GDDR6X;
#   peak FP16/BF16 tensor TFLOPS with FP32 accumulate 165.2 dense (330.4 with sparsity).
GPUS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bandwidth": 3.35e12, "fp16_flops": 989.4e12},
    "A100 80GB": {"bandwidth": 2.039e12, "fp16_flops": 312e12},
    "RTX 4090": {"bandwidth": 1.008e12, "fp16_flops": 165.2e12},
}
# Substrings of torch.cuda.get_device_name() that identify a GPU of the table (for the measured join).
_NAME_HINTS = {"H100": "H100 SXM", "A100": "A100 80GB", "4090": "RTX 4090"}

# The standard LLM shapes (N, K) of the latency sweep, plus the default model's own shapes are
# added by callers that have the model.
STANDARD_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
STANDARD_M = (1, 16, 128)

# The formats the default table covers: one per storage format the modules implement.
DEFAULT_FORMATS: tuple[dict, ...] = (
    {"kind": "dense"},
    {"kind": "quant", "bits": 8, "group_size": -1, "symmetric": True},
    {"kind": "quant", "bits": 4, "group_size": 128, "symmetric": False},
    {"kind": "quant", "bits": 4, "group_size": 64, "symmetric": False},
    {"kind": "quant", "bits": 3, "group_size": 64, "symmetric": False},
    {"kind": "quant", "bits": 2, "group_size": 64, "symmetric": False},
    {"kind": "sparse", "pattern": "nm", "n": 2, "m": 4},
    {"kind": "sparse", "pattern": "unstructured", "sparsity": 0.5},
    {"kind": "sparse", "pattern": "unstructured", "sparsity": 0.9},
    {"kind": "sparse", "pattern": "block", "sparsity": 0.5, "block": (32, 32)},
    {"kind": "sparse", "pattern": "block", "sparsity": 0.9, "block": (32, 32)},
    {"kind": "lowrank", "rank": 128},
    {"kind": "lowrank", "rank": 512},
)


def _check_gpu(gpu: str) -> dict[str, float]:
    if gpu not in GPUS:
        raise ValueError(f"gpu={gpu!r} is not in the roofline table; use one of {sorted(GPUS)}")
    return GPUS[gpu]


def _check_shape(N: int, K: int, M: int) -> None:
    for name, v in (("N", N), ("K", K), ("M", M)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")


def _freeze(fmt: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fmt.items()))


@functools.lru_cache(maxsize=None)
def _weight_bytes_cached(kind: str, N: int, K: int, frozen: tuple) -> int:
    # The GPU storage format is the one a backend="triton" module holds (SparseLinear keeps a
    # different storage per backend: on CPU ``auto`` may keep a masked dense weight). Building one
    # on CPU needs triton_usable(cpu), i.e. TRITON_INTERPRET=1; nothing is launched.
    with triton_interpret("1"):
        layer = build_layer(kind, N, K, dtype=torch.float16, device="cpu", backend="triton", **dict(frozen))
    return int(layer.memory_bytes())


def weight_bytes(kind: str, N: int, K: int, **fmt) -> int:
    """Bytes of an ``[N, K]`` weight in ``kind``'s storage format: the module's own ``memory_bytes()``.

    Dense is fp16 (``2*N*K``). The module is built from random fp16 weights of that shape with the
    storage of its Triton backend (the byte count depends on the format and, for masks, on how many
    weights or blocks are kept, never on the values) and cached per (kind, shape, format).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} must be one of {KINDS}")
    _check_shape(N, K, 1)
    fmt = {k: v for k, v in fmt.items() if k != "kind"}
    if kind == "dense":
        return N * K * 2
    return _weight_bytes_cached(kind, N, K, _freeze(fmt))


def kernel_flops(kind: str, N: int, K: int, M: int, **fmt) -> float:
    """FLOPs the kernel must do: ``2*M*N*K`` for dense/quant/codebook, times the kept fraction for sparse
    (a kernel that skips zeros: 2:4 tensor cores, skipped blocks, compacted nonzeros), and
    ``2*M*r*(N+K)`` for rank ``r``."""
    _check_shape(N, K, M)
    if kind in ("dense", "quant", "codebook"):
        return 2.0 * M * N * K
    if kind == "sparse":
        return 2.0 * M * N * K * (1.0 - sparsity_of(fmt))
    if kind == "lowrank":
        return 2.0 * M * int(fmt["rank"]) * (N + K)
    raise ValueError(f"kind={kind!r} must be one of {KINDS}")


def sparsity_of(fmt: dict) -> float:
    """Fraction of the multiply-adds a sparse kernel skips: ``1 - n/m`` for N:M, ``act_sparsity``
    (zeroed inputs) for the activation pattern, else the weight ``sparsity``."""
    if fmt.get("pattern") == "activation":
        return float(fmt.get("act_sparsity", 0.0))
    if fmt.get("pattern") == "nm":
        return 1.0 - fmt["n"] / fmt["m"]
    s = fmt.get("sparsity")
    if s is None:
        raise ValueError(f"sparse format {fmt} needs sparsity= (or pattern='nm' with n, m)")
    return float(s)


def kernel_bytes(kind: str, N: int, K: int, M: int, **fmt) -> int:
    """Bytes the kernel must move: weights in storage format + fp16 activations in + fp16 outputs out.

    The activation-sparsity pattern reads only the weight columns of active inputs; with one row
    (decode) that is the dense-stored weight times ``1 - act_sparsity``. For ``M > 1`` the union of
    active channels is charged as if all rows shared them (the most optimistic case).
    """
    w = weight_bytes(kind, N, K, **fmt)
    if kind == "sparse" and fmt.get("pattern") == "activation":
        w = int(round(w * (1.0 - float(fmt.get("act_sparsity", 0.0)))))
    return w + ACT_BYTES * M * K + ACT_BYTES * M * N


def ideal(kind: str, N: int, K: int, M: int, gpu: str, **fmt) -> dict:
    """Bytes, FLOPs, the two bounds (s), the ideal time (s) and which bound wins (``regime``)."""
    spec = _check_gpu(gpu)
    b = kernel_bytes(kind, N, K, M, **fmt)
    f = kernel_flops(kind, N, K, M, **fmt)
    t_mem, t_comp = b / spec["bandwidth"], f / spec["fp16_flops"]
    return {"bytes": b, "flops": f, "t_memory_s": t_mem, "t_compute_s": t_comp,
            "ideal_s": max(t_mem, t_comp), "regime": "memory" if t_mem >= t_comp else "compute"}


def ideal_time(kind: str, N: int, K: int, M: int, gpu: str, **fmt) -> float:
    """Ideal seconds of ``y[M, N] = x[M, K] @ W[N, K]^T`` with W in ``kind``'s format on ``gpu``:
    ``max(bytes / bandwidth, flops / peak)``."""
    return ideal(kind, N, K, M, gpu, **fmt)["ideal_s"]


def table(gpus: Iterable[str] = tuple(GPUS), formats: Iterable[dict] = DEFAULT_FORMATS,
          shapes: Iterable[tuple[int, int]] = STANDARD_SHAPES, Ms: Iterable[int] = STANDARD_M, *,
          progress: bool = False) -> list[dict]:
    """Long table: one row per (gpu, format, shape, M) with the ideal time and speedup over dense fp16."""
    from experiments.core.progress import progress_bar

    rows = []
    gpus, formats, shapes, Ms = list(gpus), list(formats), list(shapes), list(Ms)
    # The slow part (~40 s): building one module per format and shape to count its bytes (cached).
    for N, K in progress_bar(shapes, desc="roofline: weight bytes per format", unit="shape", enabled=progress):
        for fmt in formats:
            rest = {k: v for k, v in fmt.items() if k != "kind"}
            if not (fmt["kind"] == "lowrank" and rest["rank"] > min(N, K)):
                weight_bytes(fmt["kind"], N, K, **rest)
    for gpu in gpus:
        spec = _check_gpu(gpu)
        for N, K in shapes:
            for M in Ms:
                dense_s = ideal_time("dense", N, K, M, gpu)
                for fmt in formats:
                    kind = fmt["kind"]
                    rest = {k: v for k, v in fmt.items() if k != "kind"}
                    if kind == "lowrank" and rest["rank"] > min(N, K):
                        continue  # a rank above min(N, K) is not a compression of this shape
                    r = ideal(kind, N, K, M, gpu, **rest)
                    rows.append({
                        "model": MODEL_TAG, "gpu": gpu, "bandwidth_Bps": spec["bandwidth"],
                        "peak_fp16_flops": spec["fp16_flops"], "kind": kind, "format": format_label(fmt),
                        **{k: _cell(v) for k, v in rest.items()},
                        "N": N, "K": K, "M": M, "bytes": r["bytes"], "flops": r["flops"],
                        "regime": r["regime"], "ideal_us": r["ideal_s"] * 1e6,
                        "dense_fp16_ideal_us": dense_s * 1e6, "ideal_speedup_vs_dense_fp16": dense_s / r["ideal_s"],
                    })
    return rows


def _cell(v):
    if isinstance(v, (tuple, list)):
        return "x".join(str(x) for x in v)
    return "" if v is None else v


def gpu_of_device_name(name: str) -> str | None:
    """The roofline GPU matching ``torch.cuda.get_device_name()`` text, or None."""
    for hint, gpu in _NAME_HINTS.items():
        if hint in name:
            return gpu
    return None


def measured_vs_ideal(latency_csv: str | Path) -> list[dict]:
    """Join GPU latency rows with the roofline of the GPU they ran on (for measured-vs-ideal plots).

    Only ``device_type == "cuda"`` rows whose device name matches a GPU of the table are joined; each
    output row is the measured row plus ``roofline_gpu``, ``ideal_us``, ``regime`` and
    ``fraction_of_roofline`` (ideal / measured, 1.0 = at the roofline).
    """
    out = []
    for row in results.read_rows(latency_csv):
        if row.get("device_type") != "cuda":
            continue
        gpu = gpu_of_device_name(row.get("device", ""))
        if gpu is None:
            continue
        fmt = format_from_row(row)
        if fmt is None:
            continue
        kind = fmt.pop("kind")
        N, K, M = int(row["N"]), int(row["K"]), int(row["M"])
        r = ideal(kind, N, K, M, gpu, **fmt)
        measured_us = float(row["median_ms"]) * 1e3
        out.append({**row, "roofline_gpu": gpu, "ideal_us": r["ideal_s"] * 1e6, "regime": r["regime"],
                    "fraction_of_roofline": r["ideal_s"] * 1e6 / measured_us if measured_us > 0 else math.nan})
    return out


def main(args: argparse.Namespace | None = None) -> list[Path]:
    """``python -m experiments roofline``: write the roofline table (and the measured join if any).

    Returns the paths written; status lines go to stderr (``experiments.core.progress``).
    """
    from experiments.core.progress import status
    from experiments.core.runs import refuse_reference, run_root

    out = refuse_reference(getattr(args, "out", None) or run_root(run=getattr(args, "run", None)) / OUT_NAME)
    status("[roofline] ideal times from bytes and FLOPs (a model, not a measurement); the first GPU "
           "builds one module per format and shape to count its bytes")
    rows = table(progress=True)
    results.write_rows(out, rows)
    status(f"[roofline] wrote {len(rows)} roofline rows (not measurements) to {out}")
    written = [out]
    joined = measured_vs_ideal(getattr(args, "latency_csv", None) or out.with_name("latency_cuda.csv"))
    if joined:
        jpath = out.with_name("roofline_vs_measured.csv")
        results.write_rows(jpath, joined)
        status(f"[roofline] wrote {len(joined)} measured-vs-ideal rows to {jpath}")
        written.append(jpath)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default=None, metavar="NAME", help="run directory runs/NAME (default: local)")
    p.add_argument("--out", default=None, help=f"roofline table CSV (default runs/<run>/{OUT_NAME})")
    p.add_argument("--latency-csv", default=None,
                   help="GPU latency table to join with the roofline, if present (default: latency_cuda.csv "
                        "beside --out)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    main(ap.parse_args())
