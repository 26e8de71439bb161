"""Weight-only quantized linear vs dense, at LLM layer shapes: a benchmark script, not a test.

    python -m benchmarks.bench_dequant [--quick] [--device cpu|cuda] [--out runs/local/bench_dequant_cpu.csv]

- CUDA: ``QuantLinear`` with the Triton kernel (fp16 activations) against torch fp16 dense
  ``F.linear``; effective GB/s (weight storage + activation + output bytes per call / time; the
  weight counted as the codes + scales + zeros the layer holds) and the share of
  the GPU's peak DRAM bandwidth, from a table of named GPUs (an unlisted GPU gets a blank, not a guess).
- CPU: ``QuantLinear``'s CPU backend (``auto``, bf16 activations: torch's int4/int8 weight-only
  kernels for every bit width and group size, ``torch_int4x2`` for 5-8 bits; see
  ``triton_kernels.nn.quant``) against dense fp32 and bf16 ``F.linear``. CPU numbers are CPU numbers. Weights of 32 MB or less (every quantized 4096x4096
  and 4096x11008 weight here, and the dense bf16 4096x4096 one) stay in this CPU's 32 MiB L3 across
  repeated calls: those are hot-cache timings, not DRAM-bandwidth ones (the ``note`` column says so,
  judged on ``resident_bytes``: storage plus the prepacked copy torch's kernels read).

The CPU thread count is part of the ``device`` column (``--threads`` sets it). With more threads
than idle cores (a shared machine), torch's OpenMP kernels of ~1 ms slow down by 10x or more
(measured here: int4 M=1 4096x4096 3.3 ms on 1 thread vs 26 ms on 2 threads at load average 10).

Shapes are (N, K) = (out_features, in_features): 4096x4096, 4096x11008 (down projection) and
11008x4096 (up projection); M in {1, 2, 4, 8, 16, 32, 64, 128, 512}. ``--quick``: 4096x4096, M in {1, 16}.
Weights are random (latency does not depend on the values), quantized by RTN. Before timing, every
quantized variant is checked once against ``dequant_matmul_reference`` (``max_rel_err`` column).

Rows (one per (shape, M, variant), long format) are upserted into the CSV with the provenance
columns of ``experiments.core.provenance``; ``speedup_vs_*`` divide the dense medians of the same run
by the variant's median.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from experiments.core.provenance import provenance
from experiments.core.results import replace_rows
from experiments.core.runs import MEASURE_CONTEXT, mode_dir, refuse_reference, run_root
from experiments.core.timing import time_fn

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 512)
QUICK_SHAPES = ((4096, 4096),)
QUICK_M = (1, 16)
KEY = ("device", "shape", "M", "variant")
L3_BYTES = 32 * 2 ** 20  # this development CPU's L3 (PLATFORM.md)

# Peak DRAM bandwidth in GB/s (vendor datasheets), keyed by torch.cuda.get_device_name() exactly.
PEAK_BW_GBPS = {
    "NVIDIA H100 80GB HBM3": 3350,   # SXM5
    "NVIDIA H100 PCIe": 2000,
    "NVIDIA H100 NVL": 3900,
    "NVIDIA H200": 4800,
    "NVIDIA A100-SXM4-80GB": 2039,
    "NVIDIA A100-SXM4-40GB": 1555,
    "NVIDIA A100-PCIE-40GB": 1555,
    "NVIDIA A100 80GB PCIe": 1935,
    "NVIDIA L40S": 864,
    "NVIDIA L4": 300,
    "NVIDIA A10G": 600,
    "NVIDIA A10": 600,
    "NVIDIA GeForce RTX 4090": 1008,
    "NVIDIA GeForce RTX 3090": 936,
    "AMD Instinct MI300X": 5300,
}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    bits: int
    group_size: int
    symmetric: bool


# 4-bit g128 and 8-bit per-channel meet torch's CPU kernels; 3-bit g128 shows the dequant fallback.
VARIANTS = (
    Variant("q4_g128_asym", 4, 128, False),
    Variant("q8_perchannel_sym", 8, -1, True),
    Variant("q8_perchannel_asym", 8, -1, False),
    Variant("q3_g128_asym", 3, 128, False),
)


def peak_bandwidth_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return PEAK_BW_GBPS.get(torch.cuda.get_device_name(device))


def _linear(N: int, K: int, device: torch.device, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N, bias=False)
    lin.weight.data = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(device)
    return lin


def _check(layer, x: torch.Tensor) -> float:
    """Max error of the timed path relative to the reference's largest output, on ``x``."""
    from triton_kernels.dequant_matmul import dequant_matmul_reference
    want = dequant_matmul_reference(x, layer.packed, layer.scales, layer.zeros, bits=layer.bits,
                                    group_size=layer.group_size, symmetric=layer.symmetric).double()
    got = layer(x).double()
    return ((got - want).abs().max() / want.abs().max()).item()


def run(device: torch.device, shapes, m_values, variants, min_run_time: float | None, out: Path) -> list[dict]:
    from triton_kernels.nn.quant import QuantLinear

    prov = provenance(device)
    peak = peak_bandwidth_gbps(device)
    cuda = device.type == "cuda"
    act = torch.float16 if cuda else torch.bfloat16
    dense_dtypes = (torch.float16,) if cuda else (torch.float32, torch.bfloat16)
    all_rows = []
    for N, K in shapes:
        shape = f"{N}x{K}"
        lin = _linear(N, K, device, seed=N * 7 + K)
        dense_w = {dt: lin.weight.detach().to(dt).contiguous() for dt in dense_dtypes}
        layers = {}
        for v in variants:
            layers[v] = QuantLinear.from_linear(lin, bits=v.bits, group_size=v.group_size,
                                                symmetric=v.symmetric, backend="triton" if cuda else "auto")
        g = torch.Generator().manual_seed(1)
        x_check = torch.randn(1, K, generator=g).to(device=device, dtype=act)
        errs = {v: _check(layers[v], x_check) for v in variants}
        for M in m_values:
            x32 = torch.randn(M, K, generator=g).to(device)
            rows, dense_ms = [], {}
            for dt, w in dense_w.items():
                x = x32.to(dt)
                t = time_fn(lambda: F.linear(x, w), device, min_run_time=min_run_time)
                name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dt]
                dense_ms[name] = t["median_ms"]
                rows.append(_row(prov, shape, N, K, M, f"dense_{name}", None, dt, "torch F.linear", t,
                                 N * K * w.element_size(), x.element_size(), peak, None))
            x = x32.to(act)
            for v in variants:
                layer = layers[v]
                layer(x)  # resolves the backend and builds any prepacked weights outside the timing
                t = time_fn(lambda: layer(x), device, min_run_time=min_run_time)
                rows.append(_row(prov, shape, N, K, M, v.name, v, act, layer.last_backend, t,
                                 _stored_nbytes(layer), x.element_size(), peak, errs[v],
                                 resident_bytes=layer.resident_bytes()))
            for r in rows:
                for name, ms in dense_ms.items():
                    r[f"speedup_vs_{name}"] = round(ms / r["median_ms"], 4)
                print(f"{shape:>11s} M={M:<4d} {r['variant']:<20s} {r['backend']:<16s} "
                      f"{r['median_ms']:9.4f} ms (IQR {r['iqr_ms']:.4f})  "
                      + "  ".join(f"x{r[f'speedup_vs_{n}']:.2f} vs {n}" for n in dense_ms), file=sys.stderr, flush=True)
            replace_rows(out, rows, KEY, context=MEASURE_CONTEXT)
            all_rows += rows
    return all_rows


def _stored_nbytes(layer) -> int:
    """Bytes of the codes, scales and zeros as the layer holds them (what the kernel reads per call).

    Not ``memory_bytes()``, which counts the format with 16-bit scales: RTN leaves fp32 scales here,
    and the bandwidth of a measured call must count the bytes that call moved."""
    return sum(t.numel() * t.element_size() for t in (layer.packed, layer.scales, layer.zeros) if t is not None)


def _row(prov, shape, N, K, M, variant, v: Variant | None, act_dtype, backend, t, weight_bytes,
         act_size, peak, err, resident_bytes=None) -> dict:
    # GB/s counts the weight's stored tensors (codes + scales + zeros as held) plus activations and output.
    moved = weight_bytes + M * K * act_size + M * N * act_size
    gbps = moved / (t["median_ms"] * 1e-3) / 1e9
    resident = weight_bytes if resident_bytes is None else resident_bytes
    note = ""
    if prov["device_type"] == "cpu":
        note = ("weights fit the 32 MiB L3: hot-cache timing" if resident <= L3_BYTES
                else "weights exceed the 32 MiB L3")
    return {
        "bench": "dequant", "shape": shape, "N": N, "K": K, "M": M, "variant": variant,
        "bits": "" if v is None else v.bits,
        "group_size": "" if v is None else v.group_size,
        "symmetric": "" if v is None else v.symmetric,
        "act_dtype": str(act_dtype).replace("torch.", ""), "backend": backend,
        "median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
        "n": t.get("n"), "timer": t.get("timer", ""),
        "weight_bytes": weight_bytes, "resident_bytes": resident,
        "gbps": round(gbps, 2),
        "peak_bw_gbps": "" if peak is None else peak,
        "pct_peak_bw": "" if peak is None else round(100 * gbps / peak, 1),
        "max_rel_err": "" if err is None else f"{err:.3g}",
        "note": note, "weights": "random, RTN",
        **prov,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4096x4096 only, M in {1, 16}")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=None, help="CSV path (default runs/local[/quick]/bench_dequant_<device_type>.csv; experiments.core.runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); recorded in the device column. On a shared, "
                        "oversubscribed machine 1 thread gives far steadier numbers than 2")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per CPU timing (default 0.2, quick 0.1); ms of do_bench rep on CUDA x 1e-3")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        out = refuse_reference(args.out) if args.out else \
            mode_dir(run_root(), args.quick) / f"bench_dequant_{device.type}.csv"
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 would route QuantLinear to the Triton interpreter, whose timings are not "
              "performance numbers; unset it for a CPU benchmark.", file=sys.stderr)
        return 2
    min_run_time = args.min_run_time
    if min_run_time is None and device.type == "cpu":
        min_run_time = 0.1 if args.quick else 0.2
    shapes = QUICK_SHAPES if args.quick else SHAPES
    m_values = QUICK_M if args.quick else M_VALUES
    torch.manual_seed(0)
    with torch.inference_mode():
        run(device, shapes, m_values, VARIANTS, min_run_time, out)
    print(f"wrote {out}", file=sys.stderr)
    print(out)  # stdout: the product only (see experiments.core.progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
