"""Sparse and low-rank linear layers against dense: break-even curves. A benchmark script, not a test.

    python -m benchmarks.bench_sparse_lowrank [--quick] [--device cpu|cuda] [--out runs/local/bench_sparse_lowrank_cpu.csv]

One 4096x4096 layer (N = out_features, K = in_features), M in {1, 16, 128} rows, against dense
``F.linear`` in fp32 and bf16 from the same run (``speedup_vs_dense_fp32`` / ``_bf16`` columns):

- block sparsity 50-95 %, blocks 32x32 (``SparseLinear(pattern="block")``, magnitude ``block_prune``);
- 2:4 (``pattern="nm"``);
- activation sparsity 0-90 % (``pattern="activation", sparsity=...``: per call the top-|x| features
  of each row are kept, so the top-k selection is part of the timed cost);
- rank 32-2048 (``LowRankLinear``; random factors, since latency does not depend on the values).

Backends: on CPU the layers' fast torch CPU paths, named in the ``backend`` column: ``torch_bsr``
(fp32 only in torch 2.13), ``torch_gather`` (fp32 and bf16), ``two_matmul`` (fp32 and bf16) and, for
2:4, ``dense`` (no faster N:M CPU kernel exists; the row is there to say so). On CUDA: ``triton``
for every family, bf16 activations. CPU numbers are CPU numbers: they say nothing about a GPU.
Weights of 32 MiB or less (every low-rank and sparse layer here, and dense bf16) stay in this
development CPU's L3 between calls, so those are hot-cache timings (``note`` column); dense fp32
(64 MiB) is not. The development machine has 2 cores shared with other users: read the IQR.

``crossover`` rows (``family == "crossover"``): for each swept family, dtype, backend, M and
baseline, the sweep value where the speedup first crosses 1.0x, linearly interpolated between the
two measured points around it (in log2(rank) for ranks), or a note that it stays on one side in
range. Noisy timings make the curve non-monotone: the ``note`` names the bracketing points.

``--threads 1`` makes CPU timings on an oversubscribed machine far less erratic: with more OpenMP
threads than free cores, torch's parallel kernels stall on descheduled threads (seen here: a 0.1 ms
matmul timed at tens of ms while other jobs ran). The ``threads`` column records the setting.

Every timed layer is first checked once against a dense recomputation (``max_rel_err`` column).
Rows are upserted into the CSV (long format) with ``experiments.core.provenance`` columns.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from experiments.core.provenance import provenance
from experiments.core.results import replace_rows
from experiments.core.runs import MEASURE_CONTEXT, mode_dir, refuse_reference, run_root
from experiments.core.timing import time_fn
from triton_kernels.lowrank_linear import lowrank_linear_reference
from triton_kernels.nn.lowrank import LowRankLinear
from triton_kernels.nn.sparse import SparseLinear

N = K = 4096
M_VALUES = (1, 16, 128)
BLOCK = (32, 32)
SWEEPS = {  # family -> sweep values (sparsity fraction or rank)
    "block": (0.5, 0.75, 0.85, 0.9, 0.95),
    "activation": (0.0, 0.25, 0.5, 0.75, 0.9),
    "rank": (32, 64, 128, 256, 512, 1024, 2048),
}
QUICK_SWEEPS = {
    "block": (0.5, 0.75, 0.9, 0.95),
    "activation": (0.0, 0.5, 0.9),
    "rank": (32, 256, 1024, 2048),
}
KEY = ("device", "shape", "M", "family", "variant", "dtype", "backend", "baseline")
L3_BYTES = 32 * 2 ** 20  # this development CPU's L3 (PLATFORM.md)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _variants(device: torch.device, sweeps: dict) -> list[tuple[str, object, torch.dtype, str]]:
    """(family, sweep value, dtype, backend) for every layer to time on ``device``."""
    out = []
    if device.type == "cuda":
        for fam in ("block", "activation", "rank"):
            out += [(fam, v, torch.bfloat16, "triton") for v in sweeps[fam]]
        out.append(("nm", 0.5, torch.bfloat16, "triton"))
        return out
    out += [("block", s, torch.float32, "torch_bsr") for s in sweeps["block"]]
    out.append(("nm", 0.5, torch.float32, "dense"))
    for dt in (torch.float32, torch.bfloat16):
        out += [("activation", s, dt, "torch_gather") for s in sweeps["activation"]]
        out += [("rank", r, dt, "two_matmul") for r in sweeps["rank"]]
    return out


def _build(family: str, value, lin: nn.Linear, backend: str, seed: int) -> nn.Module:
    if family == "block":
        return SparseLinear.from_linear(lin, "block", sparsity=value, block=BLOCK, backend=backend)
    if family == "nm":
        return SparseLinear.from_linear(lin, "nm", sparsity=0.5, n=2, m=4, backend=backend)
    if family == "activation":
        return SparseLinear.from_linear(lin, "activation", sparsity=value, backend=backend)
    g = torch.Generator().manual_seed(seed)
    dt, dev = lin.weight.dtype, lin.weight.device
    U = (torch.randn(N, value, generator=g) / value ** 0.25).to(dev, dt)
    V = (torch.randn(value, K, generator=g) / (value ** 0.25 * K ** 0.5)).to(dev, dt)
    return LowRankLinear(U, V, lin.bias.detach(), backend=backend)


def _check(family: str, layer: nn.Module, x: torch.Tensor) -> float:
    """Max relative error of the layer against a dense fp32 recomputation of what it should compute."""
    with torch.no_grad():
        y = layer(x).float()
        if family == "rank":
            ref = lowrank_linear_reference(x.float(), layer.U.float(), layer.V.float(), layer.bias.float())
        else:
            xs = x
            if family == "activation":
                xs = torch.where(layer._activation_mask(x), x, torch.zeros((), dtype=x.dtype))
            ref = F.linear(xs.float(), layer.dense_weight().float(), layer.bias.float())
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _weight_bytes(layer: nn.Module) -> int:
    # What the timed module holds (its backend's storage, e.g. a masked dense fp32 weight on CPU), not
    # the sparse format's size (memory_bytes): the hot-cache note is about the bytes actually read.
    if hasattr(layer, "resident_bytes"):
        return layer.resident_bytes()
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def _row(prov, M, family, value, variant, dtype, backend, t, wbytes, err, device) -> dict:
    hot = device.type == "cpu" and wbytes <= L3_BYTES
    return {
        **prov, "shape": f"{N}x{K}", "M": M, "family": family,
        "param": "" if value is None else value, "variant": variant,
        "dtype": DTYPE_NAMES[dtype], "backend": backend, "baseline": "",
        "median_ms": round(t["median_ms"], 5), "iqr_ms": round(t["iqr_ms"], 5),
        "p20_ms": round(t["p20_ms"], 5), "p80_ms": round(t["p80_ms"], 5),
        "weight_bytes": wbytes, "max_rel_err": "" if err is None else f"{err:.2e}",
        "note": "hot cache (weights fit the 32 MiB L3)" if hot else "",
        "threads": torch.get_num_threads() if device.type == "cpu" else "",
    }


def crossover(points: list[tuple[float, float]], log_x: bool = False) -> tuple[str, str]:
    """(value, note) where speedup crosses 1.0 over sorted (x, speedup) points."""
    pts = sorted(points)
    for (x0, s0), (x1, s1) in zip(pts, pts[1:]):
        if (s0 - 1.0) * (s1 - 1.0) <= 0 and s0 != s1:
            a, b = (math.log2(x0), math.log2(x1)) if log_x else (x0, x1)
            xc = a + (1.0 - s0) * (b - a) / (s1 - s0)
            xc = 2 ** xc if log_x else xc
            side = "faster above" if s1 > s0 else "faster below"
            return f"{xc:.4g}", f"crosses 1.0x between {x0:g} and {x1:g}; {side}"
    if all(s > 1.0 for _, s in pts):
        return "", f"faster than the baseline at every point in [{pts[0][0]:g}, {pts[-1][0]:g}]"
    return "", f"slower than the baseline at every point in [{pts[0][0]:g}, {pts[-1][0]:g}]"


def run(device: torch.device, sweeps: dict, m_values, min_run_time: float | None, out: Path) -> list[dict]:
    prov = provenance(device)
    torch.manual_seed(0)
    lin32 = nn.Linear(K, N).to(device)
    lins = {torch.float32: lin32, torch.bfloat16: nn.Linear(K, N).to(device, torch.bfloat16)}
    lins[torch.bfloat16].load_state_dict({k: v.to(torch.bfloat16) for k, v in lin32.state_dict().items()})
    layers = {}
    for i, (fam, value, dt, backend) in enumerate(_variants(device, sweeps)):
        layers[(fam, value, dt, backend)] = _build(fam, value, lins[dt], backend, seed=i)

    rows: list[dict] = []
    for M in m_values:
        xs = {dt: torch.randn(M, K, device=device).to(dt) for dt in lins}
        dense_ms = {}
        m_rows = []
        with torch.no_grad():
            for dt, lin in lins.items():
                t = time_fn(lambda: F.linear(xs[dt], lin.weight, lin.bias), device, min_run_time=min_run_time)
                dense_ms[dt] = t["median_ms"]
                m_rows.append(_row(prov, M, "dense", None, f"dense_{DTYPE_NAMES[dt]}", dt, "F.linear", t,
                                   _weight_bytes(lin), None, device))
            for (fam, value, dt, backend), layer in layers.items():
                err = _check(fam, layer, xs[dt])
                t = time_fn(lambda: layer(xs[dt]), device, min_run_time=min_run_time)
                name = {"block": f"block32_s{value:g}", "nm": "2:4", "activation": f"act_s{value:g}",
                        "rank": f"rank{value}"}[fam]
                m_rows.append(_row(prov, M, fam, value, name, dt, backend, t, _weight_bytes(layer), err, device))
                print(f"{device.type} M={M:4d} {name:14s} {DTYPE_NAMES[dt]} {backend:12s} "
                      f"{t['median_ms']:8.4f} ms  x{dense_ms[torch.float32] / t['median_ms']:6.2f} vs fp32  "
                      f"x{dense_ms[torch.bfloat16] / t['median_ms']:6.2f} vs bf16  err {err:.1e}", flush=True, file=sys.stderr)
        for r in m_rows:
            r["speedup_vs_dense_fp32"] = round(dense_ms[torch.float32] / r["median_ms"], 3)
            r["speedup_vs_dense_bf16"] = round(dense_ms[torch.bfloat16] / r["median_ms"], 3)
        m_rows += _crossover_rows(prov, M, m_rows)
        replace_rows(out, m_rows, KEY, context=MEASURE_CONTEXT)
        rows += m_rows
    return rows


def _crossover_rows(prov, M, m_rows) -> list[dict]:
    out = []
    groups: dict = {}
    for r in m_rows:
        if r["family"] in SWEEPS:
            groups.setdefault((r["family"], r["dtype"], r["backend"]), []).append(r)
    for (fam, dtype, backend), rs in groups.items():
        for base in ("fp32", "bf16"):
            pts = [(float(r["param"]), r[f"speedup_vs_dense_{base}"]) for r in rs]
            value, note = crossover(pts, log_x=fam == "rank")
            out.append({**prov, "shape": f"{N}x{K}", "M": M, "family": "crossover",
                        "param": {"rank": "rank"}.get(fam, f"{fam} sparsity"), "variant": f"{fam}_crossover",
                        "dtype": dtype, "backend": backend, "baseline": f"dense_{base}",
                        "crossover": value, "note": note})
            print(f"crossover M={M:4d} {fam:10s} {dtype} {backend:12s} vs dense {base}: "
                  f"{value or '-':>7s} ({note})", file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sweep points (still M in {1, 16, 128})")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=None, help="CSV path (default runs/local[/quick]/bench_sparse_lowrank_<device_type>.csv; experiments.core.runs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per CPU timing (default 0.2, 0.1 with --quick)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    try:
        out = refuse_reference(args.out) if args.out else \
            mode_dir(run_root(), args.quick) / f"bench_sparse_lowrank_{device.type}.csv"
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.1 if args.quick else None)
    run(device, QUICK_SWEEPS if args.quick else SWEEPS, M_VALUES, min_run_time, out)
    print(f"wrote {out}", file=sys.stderr)
    print(out)  # stdout: the product only (see experiments.core.progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
