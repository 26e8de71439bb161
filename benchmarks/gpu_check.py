"""Everything a lent GPU should answer, in one time-boxed call, what matters most first.

    make gpu-check                    # = python -m benchmarks.gpu_check --out-dir results/gpu
    python -m benchmarks.gpu_check --dry-run [--budget-s 420]       # the plan, on any machine
    python -m benchmarks.gpu_check [--budget-s 420] [--workers 12] [--out-dir DIR] [--only decode4,harness,...]

Sections, in priority order (what matters most if the time runs out comes first; each writes its CSV as
it goes, so a call cut short keeps what it measured):

1. ``correctness``: every kernel compiled for this GPU (not the interpreter) against its pure-torch
   ``*_reference``: dequant-matmul at every bit width 1-8 x group sizes x sym/asym x fp16/bf16/fp32,
   decode (M <= 16) and prefill paths, odd shapes and real ones (4096x4096, 8192x28672, 28672x8192);
   block / N:M / unstructured / activation sparsity; low rank fused and two-GEMM; codebook-matmul at
   every bit width 1-8 (so every lookup: select, gather, load) x shared / per-row tables x scales. Outputs are
   NaN-poisoned buffers; inputs are column slices of NaN-padded buffers. The error bound is the
   rounding bound of a dot product: ``|y - ref| <= atol + rtol * (|x| @ |W|^T + |bias|)`` with
   ``rtol = c * u + K * 2^-24`` (u = the activation dtype's unit roundoff). The cases run in a pool of
   worker processes so that Triton's compiles (one per autotune config) overlap.
2. ``bandwidth``: device-to-device copy GB/s, the yardstick for "% of copy bandwidth".
3. ``decode4``: 4-bit g128 ``dequant_matmul`` at M=1 against cuBLAS fp16/bf16 ``F.linear``, with the
   achieved GB/s (weight storage + activations + output) as % of the copy bandwidth, on the large shapes
   and the default model's four (``LARGE_SHAPES``, ``MODEL_SHAPES``).
4. ``harness``: the harness's CUDA paths end to end (``run_harness``): compression on the GPU (GPTQ 4-bit
   g128, SparseGPT 2:4, SqueezeLLM 2-bit, whitened SVD) of a model of the default model's architecture with
   random weights, perplexity through the Triton modules against their reference path, ``latency --quick``.
5. ``sweep`` / 6. ``large``: bits 2/3/4/8 (g128) x M in {1, 2, 4, 8, 16, 32, 64, 128, 2048} on 28672x8192
   (the speedup-vs-batch figure), then on the other large shapes.
7. ``gemlite``: GemLite's layer on the same 4-bit codes beside ours (only where ``gemlite`` is importable).
8. ``codebook``: ``codebook_matmul`` (a shared NF4-style table with g128 scales, and per-row
   SqueezeLLM-style tables with per-channel scales) against ``dequant_matmul`` at the same bits and
   group size and against cuBLAS fp16, M in {1, 16, 2048}; ``time_vs_uniform`` is the codebook kernel's
   time over the uniform kernel's (goal: <= 1.1); at 4 bits also the ``load`` lookup forced.
9. ``sparse_lowrank``: block 90%, 2:4, unstructured 50%, activation 50% and low rank r in
   {32, 64, 128, 256} (fused vs two GEMMs vs two cuBLAS matmuls) against dense fp16.
10. ``compile``: ``torch.compile(fullgraph=True)`` (Inductor) of a stack of every compressed layer on the
    GPU through the kernels' custom operators: output equal to eager, graphs, eager vs compiled vs CUDA
    graphs (``reduce-overhead``) per forward at M=1.
11. ``decode``: greedy decoding (32 new tokens) of the default model's architecture (30 Llama blocks, 576
    wide, random weights: the GGUF is not on the GPU machine, and decode speed depends on the shapes only),
    fp16, dense vs RTN 4-bit g128, 3-bit g128 and magnitude 2:4 through the Triton backends, eager, then
    ``torch.compile`` of dense and 4-bit. A 135M model is launch-bound on a large GPU.

The budget (``--budget-s``, default 420 s): before a section starts, its estimate (``Section.estimate``:
from the one GPU run so far where the section ran there, else a guess, said so in the plan) is compared
with what is left; one that would not fit is skipped and recorded as ``SKIPPED (estimate ...)`` in
``summary.csv``, never silently. A running section is cut at 1.5x its estimate (points past it recorded
as skipped), and ``GRACE_S`` past the budget a watchdog writes the summary and ends the process.
``--dry-run`` prints the plan (no GPU needed).

Results: ``<out-dir>/<section>.csv`` with provenance columns (GPU name, driver, torch, triton, CUDA,
commit, ``kernel_revision``), ``summary.csv``, ``latency_cuda.csv`` (the harness), and
``configs/<gpu>.json``: the autotuner's choice per dequant call key (``triton_kernels.nn.tuned``; copy
it to ``triton_kernels/nn/configs/`` and commit it). Timings: ``triton.testing.do_bench`` (median, p20,
p80; it flushes L2 between calls).

On a CPU (no GPU) ``--device cpu`` runs the correctness, harness, compile and decode sections under
``TRITON_INTERPRET=1`` at small shapes (compile with the ``aot_eager`` backend): that is how the
plumbing is tested (``tests/test_gpu_check.py``); it measures nothing.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime as _dt
import math
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.core.provenance import git_commit, package_version
from experiments.core.results import write_rows as write_csv
from triton_kernels.provenance import KERNEL_REVISION

SECTIONS = ("correctness", "bandwidth", "dequant", "sparse_lowrank", "codebook", "compile", "decode")
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}
DNAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
DTYPES = {v: k for k, v in DNAME.items()}


# ----------------------------------------------------------------------------------------------
# Provenance and CSV
# ----------------------------------------------------------------------------------------------
def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def provenance(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor()}"
    return {
        "device": gpu, "device_type": device.type,
        "driver": _driver() if device.type == "cuda" else "",
        "cuda": torch.version.cuda or "", "torch": torch.__version__, "triton": package_version("triton"),
        "python": platform.python_version(), "git_commit": git_commit(), "kernel_revision": KERNEL_REVISION,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------
# Correctness cases (picklable dicts; run in worker processes)
# ----------------------------------------------------------------------------------------------
def _sliced(M, K, dtype, randn, pad=7):
    """x (M, K) as a column slice of a NaN-padded (M, K + pad) buffer."""
    v = randn(M, K)
    buf = torch.full((M, K + pad), float("nan"), dtype=dtype, device=v.device)
    x = buf[:, :K]
    x.copy_(v)
    return x


def _poisoned(M, N, dtype, device):
    return torch.full((M, N), float("nan"), dtype=dtype, device=device)


def _judge(case, y, ref, bound, dtype, K, c=2.0) -> dict:
    rtol = c * UNIT_ROUNDOFF[dtype] + K * 2.0 ** -24
    atol = 1e-6
    y64, r64, b64 = y.double(), ref.double(), bound.double()
    nan = int(torch.isnan(y64).sum())
    err = (y64 - r64).abs()
    ratio = (err / (atol + rtol * b64)).nan_to_num(nan=float("inf")).max().item() if y.numel() else 0.0
    return {**case, "status": "ok" if nan == 0 and ratio <= 1.0 else "FAIL", "nan_outputs": nan,
            "max_abs_err": f"{err.nan_to_num(nan=float('inf')).max().item():.3e}",
            "worst_err_over_bound": f"{ratio:.3g}", "rtol": f"{rtol:.3g}"}


def dequant_cases(device_type: str) -> list[dict]:
    """Covering design: every bit width meets every group size, sym/asym, all three dtypes, both paths."""
    small = device_type == "cpu"
    groups = [16, 32, 64, 128, 256, -1]
    dts = ["fp16", "bf16", "fp32"]
    Ms = [1, 5, 16] if small else [1, 5, 16, 33, 300]
    shape = (45, 100) if small else (300, 1000)
    cases = []
    for bits in range(1, 9):
        for j, gs in enumerate(groups if not small else groups[bits % 2::2]):
            dt = dts[(bits + j) % 3]
            for M in Ms[(bits + j) % 2::2] if small else Ms:
                cases.append(dict(family="dequant", bits=bits, group_size=gs, symmetric=(bits + j) % 2 == 0,
                                  dtype=dt, M=M, N=shape[0], K=shape[1] + bits, bias=j % 2 == 0))
    if not small:
        for N, K in [(4096, 4096), (28672, 8192), (8192, 28672)]:
            for bits in (2, 3, 4, 8):
                for M in (1, 16, 128):
                    cases.append(dict(family="dequant", bits=bits, group_size=128, symmetric=False,
                                      dtype="fp16", M=M, N=N, K=K, bias=False))
        for dt in ("bf16", "fp32"):
            cases.append(dict(family="dequant", bits=4, group_size=64, symmetric=True, dtype=dt, M=1,
                              N=4096, K=4096, bias=False))
    return cases


def sparse_cases(device_type: str) -> list[dict]:
    small = device_type == "cpu"
    shapes = [(1, 97, 131), (17, 45, 77)] if small else [(1, 300, 1000), (5, 300, 1000), (33, 300, 1000),
                                                         (1, 4096, 4096), (128, 4096, 4096)]
    dts = ["fp16", "bf16"] + ([] if small else ["fp32"])
    cases = []
    for i, (M, N, K) in enumerate(shapes):
        for j, dt in enumerate(dts):
            common = dict(family="sparse", dtype=dt, M=M, N=N, K=K, bias=(i + j) % 2 == 0)
            cases.append({**common, "pattern": "block", "block": [(32, 16), (16, 64), (64, 64), (32, 32)][(i + j) % 4],
                          "sparsity": 0.9})
            cases.append({**common, "pattern": "nm", "nm": [(2, 4), (1, 4), (4, 8)][(i + j) % 3]})
            cases.append({**common, "pattern": "unstructured", "sparsity": 0.5})
            cases.append({**common, "pattern": "activation", "sparsity": 0.5})
    return cases


def lowrank_cases(device_type: str) -> list[dict]:
    small = device_type == "cpu"
    shapes = [(1, 70, 45, 17), (17, 100, 67, 33)] if small else [
        (1, 300, 1000, 33), (5, 300, 1000, 128), (33, 1000, 300, 129), (1, 4096, 4096, 128),
        (16, 8192, 8192, 64), (2048, 4096, 4096, 256)]
    dts = ["fp16", "bf16"] + ([] if small else ["fp32"])
    cases = []
    for i, (M, N, K, r) in enumerate(shapes):
        for j, dt in enumerate(dts):
            for path in ("fused", "two_gemm"):
                if path == "fused" and r > 256:
                    continue
                cases.append(dict(family="lowrank", dtype=dt, M=M, N=N, K=K, rank=r, path=path,
                                  bias=(i + j) % 2 == 0))
    return cases


def codebook_cases(device_type: str) -> list[dict]:
    """Every bit width (so every lookup) x shared / per-row tables x scales (none, g32/g128, per-channel)."""
    small = device_type == "cpu"
    scalings = [("g", 128), ("pc", -1), ("none", -1), ("g", 32)]  # ("g", 32) and K = 100 + bits: partial groups
    dts = ["fp16", "bf16", "fp32"]
    Ms = [1, 5, 16, 33, 300]
    shape = (45, 100) if small else (300, 1000)
    cases = []
    for bits in range(1, 9):
        if small:  # on CPU (interpreter): one case per bit width, rotating table, scales, M and dtype
            kind, gs = scalings[bits % 4]
            cases.append(dict(family="codebook", bits=bits, shared=bits % 2 == 0, scales=kind, group_size=gs,
                              dtype=dts[bits % 3], M=[1, 5, 17][(bits + 1) % 3], N=shape[0], K=shape[1] + bits,
                              bias=bits % 3 != 0))
            continue
        for j, shared in enumerate((True, False)):
            kind, gs = scalings[(bits + j) % 4]
            for i, M in enumerate(Ms):
                cases.append(dict(family="codebook", bits=bits, shared=shared, scales=kind, group_size=gs,
                                  dtype=dts[(bits + j + i) % 3], M=M, N=shape[0], K=shape[1] + bits,
                                  bias=(bits + i) % 2 == 0))
    if not small:
        for N, K in [(4096, 4096), (28672, 8192)]:
            for bits in (2, 3, 4):
                for shared in (True, False):
                    for M in (1, 16, 128):
                        cases.append(dict(family="codebook", bits=bits, shared=shared, scales="g", group_size=128,
                                          dtype="fp16", M=M, N=N, K=K, bias=False))
    return cases


def all_cases(device_type: str) -> list[dict]:
    return (dequant_cases(device_type) + sparse_cases(device_type) + lowrank_cases(device_type)
            + codebook_cases(device_type))


def run_case(case: dict, device_type: str) -> dict:
    """One correctness case; never raises (an exception becomes status ERROR with its message)."""
    try:
        return _run_case(case, torch.device(device_type))
    except Exception as e:  # noqa: BLE001 - a worker must report, not die
        return {**case, "status": "ERROR", "error": f"{type(e).__name__}: {e}"[:400],
                "traceback": traceback.format_exc()[-1500:]}


def _run_case(case: dict, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(_case_name(case).encode()))  # fixed per case
    dt = DTYPES[case["dtype"]]
    M, N, K = case["M"], case["N"], case["K"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    x = _sliced(M, K, dt, randn)
    bias = (randn(N) * 0.1).to(dt) if case["bias"] else None
    out = _poisoned(M, N, dt, device)
    t0 = time.perf_counter()
    if case["family"] == "dequant":
        from triton_kernels import dequant_matmul as dq
        bits, gs, sym = case["bits"], case["group_size"], case["symmetric"]
        G = 1 if gs == -1 else math.ceil(K / gs)
        q = torch.randint(0, 2 ** bits, (N, K), generator=gen, device=device, dtype=torch.int32)
        scales = ((torch.rand(N, G, generator=gen, device=device) + 0.5) * (2.0 / 2 ** bits)).to(dt)
        zeros = None if sym else torch.randint(0, 2 ** bits, (N, G), generator=gen, device=device).to(dt)
        packed = dq.pack(q, bits)
        del q
        kw = dict(bits=bits, group_size=gs, symmetric=sym)
        y = dq.dequant_matmul(x, packed, scales, zeros, bias=bias, out=out, **kw)
        torch.cuda.synchronize() if device.type == "cuda" else None
        elapsed = time.perf_counter() - t0
        ref = dq.dequant_matmul_reference(x, packed, scales, zeros, bias=bias, **kw)
        w = dq.dequantize(packed, scales, zeros, K=K, **kw)
        bound = x.double().abs() @ w.double().abs().T
        c = 2.0
    elif case["family"] == "sparse":
        from triton_kernels import sparse_matmul as sm
        w = (randn(N, K) / K ** 0.5).to(dt)
        pat = case["pattern"]
        if pat == "block":
            mask = sm.block_prune(w, tuple(case["block"]), case["sparsity"])
            bsw = sm.to_block_sparse(w * mask, tuple(case["block"]))
            y = sm.block_sparse_matmul(x, bsw, bias, out=out)
            ref = sm.block_sparse_matmul_reference(x, bsw, bias)
            weff = bsw.to_dense()
        elif pat == "nm":
            n, m = case["nm"]
            nmw = sm.nm_compress(w * sm.nm_prune(w, n, m), n, m)
            y = sm.nm_matmul(x, nmw, bias, out=out)
            ref = sm.nm_matmul_reference(x, nmw, bias)
            weff = nmw.to_dense()
        elif pat == "unstructured":
            mask = sm.magnitude_prune(w, case["sparsity"])
            mw = sm.to_masked(w, mask)
            y = sm.packed_masked_matmul(x, mw, bias, out=out)
            ref = sm.packed_masked_matmul_reference(x, mw, bias)
            weff = mw.to_dense()
        else:
            thr = x.float().abs().quantile(case["sparsity"]).item()
            wt = sm.activation_sparse_weight(w)
            y = sm.activation_sparse_matmul(x, wt, threshold=thr, bias=bias, out=out)
            ref = sm.activation_sparse_matmul_reference(x, wt, threshold=thr, bias=bias)
            weff = w
        torch.cuda.synchronize() if device.type == "cuda" else None
        elapsed = time.perf_counter() - t0
        bound = x.double().abs().nan_to_num(0) @ weff.double().abs().T
        c = 2.0
    elif case["family"] == "codebook":
        from triton_kernels import codebook_matmul as cbm
        bits, gs = case["bits"], case["group_size"]
        q = torch.randint(0, 2 ** bits, (N, K), generator=gen, device=device, dtype=torch.int32)
        table = (torch.randn(1 if case["shared"] else N, 2 ** bits, generator=gen, device=device) / K ** 0.5).to(dt)
        scales = None
        if case["scales"] != "none":
            G = 1 if gs == -1 else math.ceil(K / gs)
            scales = (torch.rand(N, G, generator=gen, device=device) + 0.5).to(dt)
        packed = cbm.pack(q, bits)
        del q
        kw = dict(bits=bits, group_size=gs)
        y = cbm.codebook_matmul(x, packed, table, scales, bias=bias, out=out, **kw)
        torch.cuda.synchronize() if device.type == "cuda" else None
        elapsed = time.perf_counter() - t0
        ref = cbm.codebook_matmul_reference(x, packed, table, scales, bias=bias, **kw)
        w = cbm.dequantize_codebook(packed, table, scales, K=K, **kw)
        bound = x.double().abs() @ w.double().abs().T
        c = 3.0  # + the group scale applied after the per-group sum (M == 1)
    else:
        from triton_kernels.lowrank_linear import lowrank_linear, lowrank_linear_reference
        r = case["rank"]
        U = (randn(N, r) / r ** 0.5).to(dt)
        V = (randn(r, K) / K ** 0.5).to(dt)
        y = lowrank_linear(x, U, V, bias, path=case["path"], out=out)
        torch.cuda.synchronize() if device.type == "cuda" else None
        elapsed = time.perf_counter() - t0
        ref = lowrank_linear_reference(x, U, V, bias)
        bound = (x.double().abs() @ V.double().abs().T) @ U.double().abs().T
        K = K + r  # two accumulations
        c = 3.0  # t is rounded to the activation dtype too
    if bias is not None:
        bound = bound + bias.double().abs()
    row = _judge(case, y, ref, bound, dt, K, c)
    row["first_call_s"] = round(elapsed, 3)
    return row


def _case_name(c: dict) -> str:
    keys = [k for k in ("family", "pattern", "bits", "shared", "scales", "group_size", "symmetric", "nm", "block",
                        "sparsity",
                        "rank", "path", "dtype", "M", "N", "K", "bias") if k in c]
    return " ".join(f"{k}={c[k]}" for k in keys)


def run_correctness(device: torch.device, workers: int, deadline: float) -> list[dict]:
    cases = all_cases(device.type)
    print(f"[correctness] {len(cases)} cases on {device.type} with {workers} worker(s)", flush=True)
    rows = []
    if workers <= 1:
        for c in cases:
            if time.monotonic() > deadline:
                rows.append({**c, "status": "SKIPPED", "error": "time budget"})
                continue
            rows.append(run_case(c, device.type))
    else:
        ctx = mp.get_context("spawn")
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        futs = {pool.submit(run_case, c, device.type): c for c in cases}
        try:
            for f in cf.as_completed(futs, timeout=max(1.0, deadline - time.monotonic())):
                try:
                    rows.append(f.result())
                except Exception as e:  # noqa: BLE001 - a dead worker: record, go on
                    rows.append({**futs[f], "status": "ERROR", "error": f"{type(e).__name__}: {e}"[:400]})
                if len(rows) % 25 == 0 or len(rows) == len(cases):
                    bad = sum(r["status"] != "ok" for r in rows)
                    print(f"[correctness] {len(rows)}/{len(cases)} done, {bad} not ok", flush=True)
        except cf.TimeoutError:
            rows += [{**c, "status": "SKIPPED", "error": "time budget"} for f, c in futs.items() if not f.done()]
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    for r in rows:
        r["case"] = _case_name(r)
        if r["status"] != "ok":
            print(f"[correctness] {r['status']}: {r['case']}  {r.get('error', '')}"
                  f"{r.get('worst_err_over_bound', '')}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Benchmarks (main process only)
# ----------------------------------------------------------------------------------------------
def _bench(fn) -> dict:
    import triton.testing
    med, p20, p80 = triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": round(float(med), 5), "p20_ms": round(float(p20), 5), "p80_ms": round(float(p80), 5)}


def run_bandwidth(device) -> list[dict]:
    n = 1 << 28  # 512 MiB of fp16: far beyond L2
    src = torch.empty(n, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    t = _bench(lambda: dst.copy_(src))
    gbps = 2 * src.numel() * 2 / (t["median_ms"] * 1e-3) / 1e9
    print(f"[bandwidth] device-to-device copy: {gbps:.0f} GB/s", flush=True)
    del src, dst
    return [{"bench": "copy", "bytes_moved": 2 * n * 2, **t, "gbps": round(gbps, 1)}]


LARGE_SHAPES = [(28672, 8192), (8192, 28672), (8192, 8192)]  # (N, K), the Marlin figure's shape first
# The default model's (SmolLM2-135M) linears: q/o, k/v, gate/up, down. K = 576 is not a multiple of 128:
# its last group of 128 is partial (64 columns).
MODEL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
SWEEP_BITS = (2, 3, 4, 8)
SWEEP_M = (1, 2, 4, 8, 16, 32, 64, 128, 2048)
GEMLITE_M = (1, 16, 128, 2048)


def _optional_gemlite():
    try:
        import gemlite  # noqa: F401
        return gemlite
    except Exception:  # noqa: BLE001 - not installed / incompatible: a blank column, said in the note
        return None


def run_dequant(device, copy_gbps, deadline, save, *, shapes, bits_list=(4,), group_size=128, m_values=(1,),
                gemlite=None, tuned_table=None, bench=None, clock=time.monotonic) -> list[dict]:
    """``dequant_matmul`` (asym, ``group_size``) at each bit width against cuBLAS fp16/bf16 ``F.linear``, per
    shape and M: one row per (shape, M, variant) with the time, GB/s moved, % of the copy bandwidth and
    the speedups. ``gemlite``: the GemLite module, to time its layer on the same 4-bit codes beside ours.
    ``tuned_table``: a ``triton_kernels.nn.tuned.TunedConfigs`` that gets the config the autotuner chose
    for each call. ``bench`` (tests only) replaces ``_bench``. Weights: random, RTN-quantized."""
    from triton_kernels import dequant_matmul as dq
    from triton_kernels.nn import tuned
    bench = bench or _bench
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for N, K in shapes:
        w = torch.randn(N, K, generator=gen, device=device) / K ** 0.5
        dense = {dt: w.to(dt) for dt in (torch.float16, torch.bfloat16)}
        formats, gemlite_layers = {}, {}
        for bits in bits_list:
            q, s, z = dq.quantize_rtn(w, bits=bits, group_size=group_size, symmetric=False)
            s, z = s.to(torch.float16), z.to(torch.float16)
            formats[bits] = (dq.pack(q, bits), s, z)
            if gemlite is not None and bits == 4:  # GemLite autotunes per M: one format
                gemlite_layers[bits] = _gemlite_layer(gemlite, q, s, z, bits, group_size)
            del q
        del w
        for M in m_values:
            if clock() > deadline:
                rows.append({"shape": f"{N}x{K}", "N": N, "K": K, "M": M, "variant": "all",
                             "status": "SKIPPED (time budget)"})
                continue
            x = torch.randn(M, K, device=device, dtype=torch.float16)
            base = {}
            for dt, wd in dense.items():
                xd = x.to(dt)
                t = bench(lambda: F.linear(xd, wd))
                base[DNAME[dt]] = t["median_ms"]
                rows.append(_dq_row(N, K, M, f"dense_{DNAME[dt]}", "cuBLAS F.linear", t, N * K * 2, x, copy_gbps))
            for bits, (packed, s, z) in formats.items():
                kw = dict(bits=bits, group_size=group_size, symmetric=False)
                fn = lambda: dq.dequant_matmul(x, packed, s, z, **kw)  # noqa: E731
                fn()  # autotune outside the timing
                if tuned_table is not None:
                    tuned.note_dequant(M, N, K, **kw, dtype=x.dtype, param_dtype=s.dtype, device=x.device,
                                       table=tuned_table)
                t = bench(fn)
                wbytes = packed.numel() * 4 + s.numel() * 2 + z.numel() * 2
                g = "pc" if group_size == -1 else f"g{group_size}"
                r = _dq_row(N, K, M, f"int{bits}_{g}_asym", "triton dequant_matmul", t, wbytes, x, copy_gbps)
                r.update(bits=bits, group_size=group_size, kernel_variant=dq.launch_plan(M, N, x.dtype, x.device)[0])
                for name, ms in base.items():
                    r[f"speedup_vs_{name}"] = round(ms / t["median_ms"], 3)
                r["ideal_speedup_vs_fp16"] = round(N * K * 2 / wbytes, 3)
                rows.append(r)
                gl = gemlite_layers.get(bits)
                if gl is not None:
                    r.update(_gemlite_timing(gl, x, t["median_ms"], fn, bench))
                save(rows)
                print(f"[dequant] {N}x{K} M={M:<5d} int{bits} {g}: {t['median_ms']:.4f} ms  "
                      f"x{r['speedup_vs_fp16']:.2f} vs fp16  {r['pct_copy_bw']}% of copy BW"
                      + (f"  gemlite {r.get('gemlite_ms', r.get('gemlite_error', ''))}" if gl is not None else ""),
                      flush=True)
    return rows


def _gemlite_layer(gemlite, q, s, z, bits, gs):
    """GemLite's layer on the same codes (HQQ convention w = (q - z) * s, which is ours), or the error."""
    try:
        N, K = q.shape
        layer = gemlite.GemLiteLinear(bits, group_size=gs, in_features=K, out_features=N,
                                      input_dtype=gemlite.DType.FP16, output_dtype=gemlite.DType.FP16)
        layer.pack(q.to(torch.uint8), s, z, None)
        return layer
    except Exception as e:  # noqa: BLE001 - a column with the error, not a crash
        return f"{type(e).__name__}: {e}"[:200]


def _gemlite_timing(layer, x, ours_ms, ours_fn, bench=None) -> dict:
    bench = bench or _bench
    if isinstance(layer, str):
        return {"gemlite_error": layer}
    try:
        y = layer(x)
        ref = ours_fn().float()
        err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        t = bench(lambda: layer(x))
        return {"gemlite_ms": t["median_ms"], "gemlite_p20_ms": t["p20_ms"], "gemlite_p80_ms": t["p80_ms"],
                "speedup_vs_gemlite": round(t["median_ms"] / ours_ms, 3), "gemlite_rel_err_vs_ours": f"{err:.2e}"}
    except Exception as e:  # noqa: BLE001
        return {"gemlite_error": f"{type(e).__name__}: {e}"[:200]}


def _dq_row(N, K, M, variant, backend, t, wbytes, x, copy_gbps) -> dict:
    moved = wbytes + M * K * 2 + M * N * 2
    gbps = moved / (t["median_ms"] * 1e-3) / 1e9
    return {"shape": f"{N}x{K}", "N": N, "K": K, "M": M, "variant": variant, "backend": backend,
            "act_dtype": "fp16", **t, "weight_bytes": wbytes, "gbps": round(gbps, 1),
            "pct_copy_bw": round(100 * gbps / copy_gbps, 1) if copy_gbps else "", "status": "ok"}


def run_sparse_lowrank(device, deadline, save) -> list[dict]:
    from triton_kernels import sparse_matmul as sm
    from triton_kernels.lowrank_linear import lowrank_linear
    N = K = 8192
    dt = torch.float16
    gen = torch.Generator(device=device).manual_seed(1)
    w = (torch.randn(N, K, generator=gen, device=device) / K ** 0.5).to(dt)
    variants = {
        "block32_s0.9": (lambda: sm.to_block_sparse(w * sm.block_prune(w, (32, 32), 0.9), (32, 32)),
                         sm.block_sparse_matmul),
        "block64_s0.9": (lambda: sm.to_block_sparse(w * sm.block_prune(w, (64, 64), 0.9), (64, 64)),
                         sm.block_sparse_matmul),
        "2:4": (lambda: sm.nm_compress(w * sm.nm_prune(w, 2, 4), 2, 4), sm.nm_matmul),
        "unstructured_s0.5": (lambda: sm.to_masked(w, sm.magnitude_prune(w, 0.5)), sm.packed_masked_matmul),
    }
    built = {k: b() for k, (b, _) in variants.items()}
    wt = sm.activation_sparse_weight(w)
    rows = []
    for M in (1, 16, 2048):
        if time.monotonic() > deadline:
            rows.append({"M": M, "variant": "all", "status": "SKIPPED (time budget)"})
            continue
        x = torch.randn(M, K, device=device, dtype=dt)
        dense = _bench(lambda: F.linear(x, w))
        rows.append({"family": "dense", "variant": "dense_fp16", "M": M, **dense, "speedup_vs_fp16": 1.0})
        for name, (_, fn) in variants.items():
            op = built[name]
            f = lambda: fn(x, op)  # noqa: E731
            f()
            t = _bench(f)
            rows.append({"family": "sparse", "variant": name, "M": M, **t,
                         "speedup_vs_fp16": round(dense["median_ms"] / t["median_ms"], 3)})
        if M <= 16:
            thr = x.float().abs().quantile(0.5).item()
            f = lambda: sm.activation_sparse_matmul(x, wt, threshold=thr)  # noqa: E731
            f()
            t = _bench(f)
            rows.append({"family": "sparse", "variant": "activation_s0.5", "M": M, **t,
                         "speedup_vs_fp16": round(dense["median_ms"] / t["median_ms"], 3)})
        for r in (32, 64, 128, 256):
            U = (torch.randn(N, r, generator=gen, device=device) / r ** 0.5).to(dt)
            V = (torch.randn(r, K, generator=gen, device=device) / K ** 0.5).to(dt)
            paths = {"fused": lambda: lowrank_linear(x, U, V, path="fused"),
                     "two_gemm": lambda: lowrank_linear(x, U, V, path="two_gemm"),
                     "cublas_two_matmul": lambda: F.linear(F.linear(x, V), U)}
            for pname, f in paths.items():
                f()
                t = _bench(f)
                rows.append({"family": "lowrank", "variant": f"rank{r}_{pname}", "rank": r, "path": pname,
                             "M": M, **t, "speedup_vs_fp16": round(dense["median_ms"] / t["median_ms"], 3)})
        for r in rows:
            if r.get("M") == M and "median_ms" in r:
                r.setdefault("shape", f"{N}x{K}")
                r.setdefault("dtype", "fp16")
                r.setdefault("status", "ok")
        save(rows)
        print(f"[sparse_lowrank] M={M}: " + "  ".join(f"{r['variant']} x{r['speedup_vs_fp16']}"
                                                       for r in rows if r.get("M") == M and "speedup_vs_fp16" in r),
              flush=True)
    return rows


CODEBOOK_SHAPES = [(28672, 8192), (8192, 8192)]  # (N, K), headline first
CODEBOOK_BITS = (4, 3, 2)
CODEBOOK_M = (1, 16, 2048)


def run_codebook(device, copy_gbps, deadline, save, *, shapes=CODEBOOK_SHAPES, bits_list=CODEBOOK_BITS,
                 m_values=CODEBOOK_M, bench=None) -> list[dict]:
    """codebook_matmul vs dequant_matmul at the same bits (g128) and vs cuBLAS fp16, per M.

    Two table layouts: ``shared_g128`` (one 2^bits table, NF4-style, fp16 group scales) and
    ``rows_pc`` (one table per output row, SqueezeLLM-style, one fp16 scale per row). Weight bytes
    count the tables and scales at 16 bits. ``bench`` (tests only) replaces ``_bench``.
    """
    from triton_kernels import codebook_matmul as cbm
    from triton_kernels import dequant_matmul as dq
    bench = bench or _bench
    rows = []
    gen = torch.Generator(device=device).manual_seed(2)
    for N, K in shapes:
        w = torch.randn(N, K, generator=gen, device=device) / K ** 0.5
        dense = w.to(torch.float16)
        formats = {}
        for bits in bits_list:
            q, s, z = dq.quantize_rtn(w, bits=bits, group_size=128, symmetric=False)
            packed = dq.pack(q, bits)
            formats[bits] = dict(
                uniform=(packed, s.to(torch.float16), z.to(torch.float16)),
                shared_g128=(torch.randn(1, 2 ** bits, generator=gen, device=device).to(torch.float16),
                             s.to(torch.float16)),
                rows_pc=(torch.randn(N, 2 ** bits, generator=gen, device=device).to(torch.float16),
                         s[:, :1].contiguous().to(torch.float16)))
            del q
        del w
        for M in m_values:
            if time.monotonic() > deadline:
                rows.append({"shape": f"{N}x{K}", "M": M, "variant": "all", "status": "SKIPPED (time budget)"})
                continue
            x = torch.randn(M, K, device=device, dtype=torch.float16)
            t_dense = bench(lambda: F.linear(x, dense))
            rows.append(_dq_row(N, K, M, "dense_fp16", "cuBLAS F.linear", t_dense, N * K * 2, x, copy_gbps))
            for bits, f in formats.items():
                packed, s, z = f["uniform"]
                kw = dict(bits=bits, group_size=128, symmetric=False)
                fn = lambda: dq.dequant_matmul(x, packed, s, z, **kw)  # noqa: E731
                fn()  # autotune outside the timing
                t_uni = bench(fn)
                r = _dq_row(N, K, M, f"int{bits}_g128_asym", "triton dequant_matmul", t_uni,
                            packed.numel() * 4 + 2 * s.numel() * 2, x, copy_gbps)
                r.update(bits=bits, speedup_vs_fp16=round(t_dense["median_ms"] / t_uni["median_ms"], 3))
                rows.append(r)
                # At 4 bits also the "load" lookup (L1 table loads) against the default "gather" (shuffles),
                # so the choice in lookup_mode can be made by measurement.
                variants = [(lay, None) for lay in ("shared_g128", "rows_pc")]
                variants += [(lay, "load") for lay in ("shared_g128", "rows_pc") if bits == 4]
                for layout, lookup in variants:
                    table, sc = f[layout]
                    gs = 128 if layout == "shared_g128" else -1
                    kw = dict(bits=bits, group_size=gs, lookup=lookup)
                    fn = lambda: cbm.codebook_matmul(x, packed, table, sc, **kw)  # noqa: E731
                    fn()
                    t = bench(fn)
                    name = f"codebook{bits}_{layout}" + (f"_{lookup}" if lookup else "")
                    r = _dq_row(N, K, M, name, "triton codebook_matmul", t,
                                packed.numel() * 4 + table.numel() * 2 + sc.numel() * 2, x, copy_gbps)
                    r.update(bits=bits, lookup=lookup or cbm.lookup_mode(bits), table=layout,
                             speedup_vs_fp16=round(t_dense["median_ms"] / t["median_ms"], 3),
                             time_vs_uniform=round(t["median_ms"] / t_uni["median_ms"], 3))
                    rows.append(r)
                    print(f"[codebook] {N}x{K} M={M:<5d} {bits}b {layout} {r['lookup']}: {t['median_ms']:.4f} ms, "
                          f"x{r['time_vs_uniform']} of uniform int{bits} g128, x{r['speedup_vs_fp16']} vs fp16",
                          flush=True)
                save(rows)
    return rows


def _codebook_headline(rows) -> str:
    want = [r for r in rows if r.get("variant", "") in ("codebook4_shared_g128", "codebook4_rows_pc")
            and r.get("M") in (1, 16)
            and r.get("shape") == f"{CODEBOOK_SHAPES[0][0]}x{CODEBOOK_SHAPES[0][1]}"]
    return "; ".join(f"4b {r['table']} M={r['M']}: x{r['time_vs_uniform']} of uniform" for r in want) \
        or f"{len(rows)} rows"


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def compile_stack(device: torch.device, N: int, K: int, dtype: torch.dtype) -> torch.nn.Module:
    """A stack of every compressed layer (Triton backends on ``device``), K -> ... -> N features."""
    from torch import nn

    from triton_kernels.nn import CodebookLinear, LowRankLinear, QuantLinear, SparseLinear
    gen = torch.Generator().manual_seed(5)

    def lin(n, k):
        layer = nn.Linear(k, n)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
            layer.bias.copy_(torch.randn(n, generator=gen) * 0.01)
        return layer.to(device=device, dtype=dtype)
    return nn.Sequential(
        QuantLinear.from_linear(lin(K, K), bits=4, group_size=128, backend="triton"),
        QuantLinear.from_linear(lin(K, K), bits=3, group_size=64, backend="triton"),
        CodebookLinear.from_linear(lin(K, K), bits=4, group_size=64, backend="triton"),
        SparseLinear.from_linear(lin(K, K), "block", block=(32, 32), sparsity=0.5, backend="triton"),
        SparseLinear.from_linear(lin(K, K), "nm", n=2, m=4, sparsity=0.5, backend="triton"),
        LowRankLinear.from_linear(lin(N, K), rank=32, backend="triton"),
    )


def run_compile(device: torch.device) -> list[dict]:
    """torch.compile(fullgraph=True) of every layer's Triton path: equal to eager, graphs, time at M=1."""
    from torch._dynamo.testing import CompileCounterWithBackend
    cpu = device.type == "cpu"
    N, K = (48, 96) if cpu else (4096, 4096)
    rows = []
    for dt in (torch.float16, torch.bfloat16):
        model = compile_stack(device, N, K, dt)
        x = torch.randn(1, K, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dt)
        row = {"family": "compile", "case": f"stack {K}->{N} {DNAME[dt]} M=1", "dtype": DNAME[dt],
               "backend": "aot_eager" if cpu else "inductor"}
        torch._dynamo.reset()
        try:
            with torch.no_grad():
                ref = model(x)
                cnt = CompileCounterWithBackend(row["backend"])
                f = torch.compile(model, fullgraph=True, backend=cnt)
                y = f(x)
                y = f(x)
            row["graphs"] = cnt.frame_count
            row["max_abs_diff"] = float((y.float() - ref.float()).abs().max())
            # The layers are opaque operators: the compiled graph runs the same kernels as eager.
            row["status"] = "ok" if torch.equal(y, ref) else "FAIL"
            if not cpu:
                row["eager_ms"] = _bench(lambda: model(x))["median_ms"]
                row["compiled_ms"] = _bench(lambda: f(x))["median_ms"]
                torch._dynamo.reset()
                g = torch.compile(model, fullgraph=True, mode="reduce-overhead")
                for _ in range(3):
                    g(x)
                row["cudagraph_ms"] = _bench(lambda: g(x))["median_ms"]
        except Exception as e:  # noqa: BLE001 - a row per failure, the section goes on
            traceback.print_exc()
            row["status"] = f"ERROR {type(e).__name__}: {e}"[:300]
        rows.append(row)
    return rows


# The default model's architecture (SmolLM2-135M-Instruct), for the decode section's random model.
DECODE_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                     rope_theta=100000.0, tie_word_embeddings=True)
# On CPU (plumbing only): two blocks, a few tokens.
DECODE_CONFIG_CPU = dict(DECODE_CONFIG, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
DECODE_SPECS = (None, {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": False},
                {"method": "rtn", "bits": 3, "group_size": 128, "symmetric": False},
                {"method": "magnitude", "pattern": "2:4", "sparsity": 0.5})


def run_decode(device: torch.device, deadline: float) -> list[dict]:
    """Greedy-decode tokens/s of the default model's architecture, dense vs compressed (see the module
    docstring). Each compressed row carries ``speedup_vs_dense``: over the dense model in the same mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from experiments.methods.compress import compress_model, parse_spec
    from experiments.measure.decode_speed import decode_tokens_per_second
    cpu = device.type == "cpu"
    cfg = LlamaConfig(**(DECODE_CONFIG_CPU if cpu else DECODE_CONFIG))
    dt = torch.bfloat16 if cpu else torch.float16
    new_tokens, repeats = (2, 1) if cpu else (32, 3)
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    rows, dense = [], {}
    modes = [False] if cpu else [False, True]
    # the tiny CPU model's layers are 64 wide: groups of 32 there
    specs = [s if s is None or not cpu or "group_size" not in s else {**s, "group_size": 32} for s in DECODE_SPECS]
    for compiled in modes:
        for spec in specs if not compiled else specs[:2]:
            label = "dense" if spec is None else parse_spec(spec).label()
            row = {"model": "SmolLM2-135M architecture, random weights" if not cpu else "tiny Llama (plumbing)",
                   "label": label, "dtype": DNAME[dt], "compiled": compiled, "new_tokens": new_tokens}
            if time.monotonic() > deadline:
                rows.append({**row, "status": "SKIPPED (time budget)"})
                continue
            try:
                torch.manual_seed(0)
                model = LlamaForCausalLM(cfg).eval()
                if spec is not None:
                    compress_model(model, parse_spec(spec), None, progress=False)
                model.to(device=device, dtype=dt)
                model.generation_config.pad_token_id = 0
                r = decode_tokens_per_second(model, None, input_ids=ids, new_tokens=new_tokens, repeats=repeats,
                                             label=f"decode {label}", progress=False, compile=compiled)
                row.update(tokens_per_s=round(r["tokens_per_s"], 2), status="ok",
                           compile_seconds=r.get("compile_seconds"))
                backends = sorted({type(m).__name__ + ":" + str(getattr(m, "last_backend", None) or
                                   getattr(m, "backend", "")) for m in model.modules()
                                   if type(m).__name__ in ("QuantLinear", "SparseLinear")})
                row["module_backends"] = " ".join(backends)
                if spec is None:
                    dense[compiled] = row["tokens_per_s"]
                elif dense.get(compiled):
                    row["speedup_vs_dense"] = round(row["tokens_per_s"] / dense[compiled], 3)
                del model
            except Exception as e:  # noqa: BLE001 - a row per failure, the section goes on
                traceback.print_exc()
                row["status"] = f"ERROR {type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(f"[decode] {label}{' compiled' if compiled else ''}: "
                  + (f"{row['tokens_per_s']} tok/s" + (f", x{row['speedup_vs_dense']} vs dense"
                                                       if "speedup_vs_dense" in row else "")
                     if row["status"] == "ok" else row["status"]), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# The harness on the device, end to end
# ----------------------------------------------------------------------------------------------
# One point per compression family the harness's CUDA paths need: GPTQ 4-bit g128 (QuantLinear),
# SparseGPT 2:4 (SparseLinear, N:M kernel), SqueezeLLM 2-bit (CodebookLinear, per-row tables; at 4 bits its
# Fisher-weighted fit with a zero level moved the plumbing model's perplexity by only 0.24%, too little to
# expose a wrong kernel) and
# activation-aware SVD (LowRankLinear); all but the last need calibration statistics, gathered on the device.
HARNESS_SPECS = ({"method": "gptq", "bits": 4, "group_size": 128, "symmetric": False},
                 {"method": "sparsegpt", "pattern": "2:4"},
                 {"method": "squeezellm", "bits": 2},
                 {"method": "whitened_svd", "ratio": 0.5})
HARNESS_LAYERS = 4  # the default model's blocks, fewer of them: the kernels see the same shapes
HARNESS_RTOL = 1e-3  # |ppl(Triton modules) - ppl(reference path)| / ppl(reference path)
# Each module's reference path: plain torch on the same stored weights (the modules' docstrings).
REFERENCE_BACKENDS = {"QuantLinear": "dequant", "CodebookLinear": "dequant", "LowRankLinear": "two_matmul",
                      "SparseLinear": "dense"}


def use_backends(model: torch.nn.Module, path: str) -> None:
    """Put every compressed module of ``model`` on its Triton path (``path="triton"``) or its plain-torch
    reference path (``"reference"``, :data:`REFERENCE_BACKENDS`). A SparseLinear holds its backend's storage,
    so for the reference it is rebuilt with the same effective weight and mask on the ``dense`` backend."""
    from torch import nn

    from triton_kernels.nn import SparseLinear
    if path not in ("triton", "reference"):
        raise ValueError(f"path must be 'triton' or 'reference', got {path!r}")
    for name, mod in list(model.named_modules()):
        kind = type(mod).__name__
        if kind not in REFERENCE_BACKENDS:
            continue
        want = "triton" if path == "triton" else REFERENCE_BACKENDS[kind]
        if kind != "SparseLinear":
            mod.backend = want
        elif mod.backend != want:
            if want == "triton":
                raise ValueError(f"{name}: a SparseLinear built for backend {mod.backend!r} cannot be switched "
                                 f"to 'triton' here; evaluate the Triton path first")
            w = mod.dense_weight().detach()
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                            device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            kw = ({"threshold": mod.threshold} if mod.threshold is not None else
                  {"sparsity": mod.activation_sparsity}) if mod.pattern == "activation" else {"mask": w != 0}
            new = SparseLinear.from_linear(lin, mod.pattern, block=mod.block, n=mod.n, m=mod.m, tile=mod.tile,
                                           backend="dense", **kw)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)


# Random weights of std 0.1, not transformers' 0.02: at 0.02 the logits are nearly uniform (perplexity
# ~ the vocabulary) and compressing moves the perplexity by about the tolerance, so a wrong kernel could
# hide; at 0.1, RTN 4-bit g32 moved it by 5% on the tiny CPU model and 31% on 2 blocks of the default
# model's architecture (0.2% and 2% at 0.02; 16 random tokens, CPU, this repository's compress_model).
HARNESS_INIT_STD = 0.1


def harness_config(device_type: str) -> dict:
    """The LlamaConfig of the harness section's model: the default model's sizes (``HARNESS_LAYERS`` blocks)
    on a GPU, the tiny rehearsal model on CPU; weights of std ``HARNESS_INIT_STD``."""
    base = dict(DECODE_CONFIG, num_hidden_layers=HARNESS_LAYERS) if device_type == "cuda" else HARNESS_CONFIG_CPU
    return dict(base, initializer_range=HARNESS_INIT_STD)


# On CPU (plumbing only): smaller still than the decode section's, since fp32 activations take the decode
# kernel under the interpreter at every M (a program per 16 rows x 16 columns x K split).
HARNESS_CONFIG_CPU = dict(DECODE_CONFIG_CPU, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          num_key_value_heads=1)


def run_harness(device: torch.device, deadline: float, out_dir: Path, *, specs=HARNESS_SPECS, config=None,
                latency: bool = True, clock=time.monotonic) -> list[dict]:
    """The harness end to end on ``device``: each point of ``specs`` compresses a model of the default
    model's architecture (random weights; calibration and evaluation on random tokens) on the device
    (``experiments.methods.compress.compress_model``), then its perplexity through the Triton modules is
    checked against the same compressed model on the modules' reference path (relative difference <=
    ``HARNESS_RTOL``); then the latency table's quick path (``run_latency`` with ``--quick``'s formats and M
    at the model's own shapes, into ``<out_dir>/latency_<device>.csv``). A row per point (and one for the
    latency); ``ppl_rel_vs_dense`` shows how far the compression itself moved the perplexity, i.e. how
    much larger than the tolerance an error of the modules would have to hide behind."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from experiments.lm.evaluate import perplexity
    from experiments.methods.compress import compress_model, module_backends, parse_spec
    from triton_kernels.nn import autotune
    cpu = device.type == "cpu"
    cfg = LlamaConfig(**(config or harness_config(device.type)))
    n_win, seqlen, n_cal = (1, 16, 2) if cpu else (4, 256, 8)
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, cfg.vocab_size, (n_win, seqlen), generator=gen)
    calib = torch.randint(0, cfg.vocab_size, (n_cal, seqlen), generator=gen).to(device)
    rows = []
    torch.manual_seed(0)
    dense = LlamaForCausalLM(cfg).eval().to(device)
    dense_ppl = perplexity(dense, windows, progress=False)["ppl"]
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    del dense
    # the tiny CPU model's layers are 32 wide: groups of 32 there
    specs = [s if not cpu or "group_size" not in s else {**s, "group_size": 32} for s in specs]
    for spec in specs:
        label = parse_spec(spec).label()
        row = {"label": label, "method": spec["method"], "model": _model_name(cfg, cpu), "dtype": "fp32",
               "windows": f"{n_win}x{seqlen} random tokens", "ppl_dense": dense_ppl}
        if clock() > deadline:
            rows.append({**row, "status": "SKIPPED (time budget)"})
            continue
        try:
            t0 = time.perf_counter()
            model = LlamaForCausalLM(cfg).eval()
            model.load_state_dict(state)
            model.to(device)
            with autotune(False):  # as the harness measures accuracy: no backend chosen by timing
                compress_model(model, parse_spec(spec), calib, progress=False)
                row["compress_s"] = round(time.perf_counter() - t0, 2)
                use_backends(model, "triton")
                ppl_t = perplexity(model, windows, progress=False)["ppl"]
                logits_t = _logits(model, windows[:1], device)
                row["triton_backends"] = module_backends(model)
                use_backends(model, "reference")
                ppl_r = perplexity(model, windows, progress=False)["ppl"]
                logits_r = _logits(model, windows[:1], device)
                row["reference_backends"] = module_backends(model)
            rel = abs(ppl_t - ppl_r) / ppl_r
            # the logits of one window too: max |difference| over max |logit| (perplexity averages errors)
            lrel = float((logits_t - logits_r).abs().max() / logits_r.abs().max())
            on_triton = all(b.endswith(":triton") for b in row["triton_backends"].split(","))
            ok = math.isfinite(rel) and rel <= HARNESS_RTOL and lrel <= HARNESS_RTOL
            row.update(ppl_triton=ppl_t, ppl_reference=ppl_r, ppl_rel_diff=float(f"{rel:.3e}"),
                       logits_rel_diff=float(f"{lrel:.3e}"),
                       ppl_rel_vs_dense=float(f"{abs(ppl_r - dense_ppl) / dense_ppl:.3e}"), rtol=HARNESS_RTOL,
                       status="ok" if ok and on_triton else
                       ("FAIL (not every module ran Triton)" if not on_triton else "FAIL"))
            del model
        except Exception as e:  # noqa: BLE001 - a row per failure, the section goes on
            traceback.print_exc()
            row["status"] = f"ERROR {type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(f"[harness] {label}: " + (f"ppl Triton {row['ppl_triton']:.6g} vs reference {row['ppl_reference']:.6g} "
                                        f"(rel {row['ppl_rel_diff']:.1e}) {row['status']}"
                                        if "ppl_triton" in row else row["status"]), flush=True)
    if latency:
        rows.append(_harness_latency(device, cfg, out_dir, deadline, clock))
    return rows


def _logits(model, ids, device) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids.to(device), use_cache=False).logits.double().cpu()


def _model_name(cfg, cpu: bool) -> str:
    return ("tiny Llama (plumbing)" if cpu else
            f"SmolLM2-135M architecture, {cfg.num_hidden_layers} blocks, random weights (std {cfg.initializer_range})")


def _harness_latency(device, cfg, out_dir: Path, deadline: float, clock) -> dict:
    """``latency --quick`` on ``device``: its formats and M at the shapes of ``cfg``'s model (the GGUF
    that ``latency`` reads them from is not on a GPU machine)."""
    from transformers import LlamaForCausalLM

    from experiments.measure.layer_latency import QUICK_M, QUICK_SPECS, model_layer_shapes, run_latency
    out = Path(out_dir) / f"latency_{device.type}.csv"
    row = {"label": "latency --quick", "method": "latency", "model": _model_name(cfg, device.type == "cpu")}
    if clock() > deadline:
        return {**row, "status": "SKIPPED (time budget)"}
    try:
        with torch.device("meta"):
            shapes = model_layer_shapes(LlamaForCausalLM(cfg))
        cpu = device.type == "cpu"
        lat = run_latency(list(QUICK_SPECS), shapes, (1,) if cpu else QUICK_M, device=device,
                          min_run_time=0.01 if cpu else 0.05, out=out, log=lambda m: print(m, flush=True))
        bad = [r for r in lat if r.get("status") != "ok"]
        row.update(status="ok" if lat and not bad else f"FAIL ({len(bad)} of {len(lat)} rows not ok)",
                   latency_rows=len(lat), latency_csv=out.name)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row["status"] = f"ERROR {type(e).__name__}: {e}"[:300]
    print(f"[harness] latency --quick: {row['status']}", flush=True)
    return row


# ----------------------------------------------------------------------------------------------
# Sections, their time estimates and the budget
# ----------------------------------------------------------------------------------------------
DEFAULT_BUDGET_S = 420.0  # 7 min: one call on a lent 15-minute GPU, its start and the copy back included
DEFAULT_GPU_WORKERS = 12  # correctness worker processes on a GPU machine (the lent one has 16 CPUs)
GRACE_S = 45.0  # past the budget by this much, the watchdog writes the summary and ends the process
# Cost units from the one GPU run so far (NVIDIA H200, 2026-11-30, results/gpu/summary.csv): correctness
# 374 cases in 136 s with 12 workers; dequant 148 timed rows in 167 s (autotuning and compiles included).
CASE_WORKER_S = 136.0 * 12 / 374
BENCH_ROW_S = 167.2 / 148
# Sections that have never run on a GPU: guesses, said so in the plan.
GUESS_S = {"harness": 90.0, "compile": 60.0, "decode": 120.0, "gemlite_autotune": 60.0}
# On CPU (the interpreter rehearsal): guesses for the 2-core development machine.
CPU_GUESS_S = {"correctness": 60.0, "harness": 60.0, "compile": 30.0, "decode": 30.0}


class Ctx:
    """What the sections share in one call: the device, where to write, the clock and deadline, state
    (the copy bandwidth, the tuned-config table) and ``save(rows)`` (that section's CSV, written now)."""

    def __init__(self, device, out_dir, prov, workers, clock=time.monotonic):
        self.device, self.out_dir, self.prov, self.workers, self.clock = device, Path(out_dir), prov, workers, clock
        self.copy_gbps = None
        self.deadline = float("inf")
        self.gemlite = None
        self.tuned = None  # TunedConfigs of this GPU, filled by the dequant and decode sections
        self.save = lambda rows: None

    def save_tuned(self) -> None:
        """The configs chosen so far, into ``<out_dir>/configs/<gpu>.json`` (triton_kernels.nn.tuned)."""
        if self.tuned is not None and len(self.tuned):
            path = self.tuned.save(self.out_dir / "configs")
            print(f"[tuned] {len(self.tuned)} configs -> {path}", flush=True)


def _dequant_section(shapes, bits_list, m_values, gemlite=False):
    def run(ctx):
        rows = run_dequant(ctx.device, ctx.copy_gbps, ctx.deadline, ctx.save, shapes=shapes, bits_list=bits_list,
                           m_values=m_values, gemlite=ctx.gemlite if gemlite else None, tuned_table=ctx.tuned,
                           clock=ctx.clock)
        ctx.save_tuned()
        return rows, _dequant_headline(rows)
    return run


def _run_correctness(ctx):
    rows = run_correctness(ctx.device, ctx.workers, ctx.deadline)
    return rows, f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} ok"


def _run_bandwidth(ctx):
    rows = run_bandwidth(ctx.device)
    ctx.copy_gbps = rows[0]["gbps"]
    return rows, f"copy {ctx.copy_gbps} GB/s"


def _run_harness(ctx):
    rows = run_harness(ctx.device, ctx.deadline, ctx.out_dir, clock=ctx.clock)
    ok = sum(r["status"] == "ok" for r in rows)
    bad = [r["label"] for r in rows if r["status"] != "ok"]
    return rows, f"{ok}/{len(rows)} ok" + (f" (not ok: {', '.join(bad)})" if bad else "")


def _run_codebook(ctx):
    rows = run_codebook(ctx.device, ctx.copy_gbps, ctx.deadline, ctx.save)
    return rows, _codebook_headline(rows)


def _run_sparse_lowrank(ctx):
    rows = run_sparse_lowrank(ctx.device, ctx.deadline, ctx.save)
    return rows, _sparse_headline(rows)


def _run_compile(ctx):
    rows = run_compile(ctx.device)
    return rows, f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} ok"


def _run_decode(ctx):
    from triton_kernels.nn import tuned
    with tuned.recording(ctx.tuned) if ctx.tuned is not None else contextlib.nullcontext():
        rows = run_decode(ctx.device, ctx.deadline)
    ctx.save_tuned()
    return rows, _decode_headline(rows)


def _rows_estimate(rows: int) -> float:
    return rows * BENCH_ROW_S


def _dequant_rows(shapes, bits_list, m_values) -> int:
    return len(shapes) * len(m_values) * (2 + len(bits_list))  # dense fp16 + bf16, then each bit width


class Section:
    """One section of the call: ``run(ctx) -> (rows, status)``, ``estimate(device_type, workers, ctx) -> s``
    (and whether that estimate is measured or a guess), what it does, where it runs."""

    def __init__(self, name, what, run, estimate, basis="measured", devices=("cuda",)):
        self.name, self.what, self.run, self.estimate = name, what, run, estimate
        self.basis, self.devices = basis, devices


def sections() -> dict[str, Section]:
    """The sections in priority order: what matters most if the time runs out comes first."""
    decode4 = (LARGE_SHAPES + MODEL_SHAPES, (4,), (1,))
    sweep = (LARGE_SHAPES[:1], SWEEP_BITS, SWEEP_M)
    large = (LARGE_SHAPES[1:], SWEEP_BITS, SWEEP_M)
    gem = (LARGE_SHAPES[:1] + LARGE_SHAPES[2:], (4,), GEMLITE_M)

    def cpu_or(name, gpu_s):
        return lambda dev, workers: CPU_GUESS_S[name] if dev == "cpu" else gpu_s(workers)

    def rows_s(shapes, bits_list, m_values):
        return lambda dev, workers: _rows_estimate(_dequant_rows(shapes, bits_list, m_values))

    def gemlite_run(ctx):
        if ctx.gemlite is None:
            return [], "SKIPPED (gemlite not importable)"
        return _dequant_section(*gem, gemlite=True)(ctx)

    both = ("cuda", "cpu")
    return {s.name: s for s in (
        Section("correctness", "every kernel compiled for the device vs its pure-torch reference", _run_correctness,
                cpu_or("correctness", lambda w: len(all_cases("cuda")) * CASE_WORKER_S / max(w, 1)), devices=both),
        Section("bandwidth", "device-to-device copy GB/s (the yardstick of '% of copy bandwidth')", _run_bandwidth,
                lambda dev, w: 2.0),
        Section("decode4", f"4-bit g128 M=1 vs cuBLAS fp16, % of copy bandwidth: {len(decode4[0])} shapes (large "
                           f"+ the default model's)", _dequant_section(*decode4), rows_s(*decode4)),
        Section("harness", "the harness on the device: GPTQ 4-bit, SparseGPT 2:4, SqueezeLLM 2-bit, whitened SVD "
                           "on the default model's architecture; perplexity Triton vs reference; latency --quick",
                _run_harness, cpu_or("harness", lambda w: GUESS_S["harness"]), basis="guess", devices=both),
        Section("sweep", f"bits {'/'.join(map(str, SWEEP_BITS))} x M {'/'.join(map(str, SWEEP_M))} at "
                         f"{LARGE_SHAPES[0][0]}x{LARGE_SHAPES[0][1]} (the speedup-vs-batch figure)",
                _dequant_section(*sweep), rows_s(*sweep)),
        Section("large", "the same bits x M at " + ", ".join(f"{n}x{k}" for n, k in LARGE_SHAPES[1:]),
                _dequant_section(*large), rows_s(*large)),
        Section("gemlite", f"GemLite beside ours, 4-bit g128, M {'/'.join(map(str, GEMLITE_M))} (when importable)",
                gemlite_run, lambda dev, w: GUESS_S["gemlite_autotune"] + rows_s(*gem)(dev, w), basis="guess"),
        Section("codebook", "codebook_matmul vs dequant_matmul and cuBLAS fp16", _run_codebook,
                lambda dev, w: _rows_estimate(len(CODEBOOK_SHAPES) * len(CODEBOOK_M)
                                              * (1 + 3 * len(CODEBOOK_BITS) + 2))),
        Section("sparse_lowrank", "block / 2:4 / unstructured / activation sparsity, low rank vs dense fp16",
                _run_sparse_lowrank, lambda dev, w: _rows_estimate(3 * 17)),
        Section("compile", "torch.compile(fullgraph) of every layer's Triton path, eager vs compiled vs CUDA graphs",
                _run_compile, cpu_or("compile", lambda w: GUESS_S["compile"]), basis="guess", devices=both),
        Section("decode", "greedy decode of the default model's architecture, dense vs 4/3-bit and 2:4",
                _run_decode, cpu_or("decode", lambda w: GUESS_S["decode"]), basis="guess", devices=both),
    )}


SECTIONS = tuple(sections())


def plan(names, device_type: str, workers: int, budget_s: float, registry=None) -> list[dict]:
    """The call's plan: each section of ``names`` in priority order with its estimate, and whether it fits
    in what the budget leaves if every earlier section takes its estimate (one that does not is skipped,
    and the later, cheaper ones may still run)."""
    registry = registry or sections()
    left, rows = budget_s, []
    for name in registry:
        if name not in names:
            continue
        sec = registry[name]
        if device_type not in sec.devices:
            rows.append({"section": name, "estimate_s": 0.0, "fits": False, "what": sec.what,
                         "note": f"runs on {'/'.join(sec.devices)} only"})
            continue
        est = float(sec.estimate(device_type, workers))
        fits = est <= left
        rows.append({"section": name, "estimate_s": est, "fits": fits, "what": sec.what,
                     "basis": "guess" if device_type == "cpu" else sec.basis,
                     "note": "" if fits else f"skipped: estimate {est:.0f} s > {left:.0f} s left"})
        if fits:
            left -= est
    return rows


def format_plan(rows, device_type: str, budget_s: float, workers: int) -> str:
    lines = [f"gpu_check plan on {device_type} (budget {budget_s:.0f} s, {workers} correctness worker(s)); "
             f"estimates: 'measured' = cases or timed rows x their cost in the H200 run of 2026-11-30, 'guess' otherwise",
             f"{'#':>2}  {'section':<15} {'estimate':>9} {'basis':<9} {'ends at':>8}  what"]
    t = 0.0
    for i, r in enumerate(rows, 1):
        if r["fits"]:
            t += r["estimate_s"]
            lines.append(f"{i:>2}  {r['section']:<15} {r['estimate_s']:>7.0f} s {r['basis']:<9} {t:>6.0f} s  "
                         f"{r['what']}")
        else:
            lines.append(f"{i:>2}  {r['section']:<15} {'-':>9} {r.get('basis', ''):<9} {'-':>8}  {r['note']}")
    skipped = [r["section"] for r in rows if not r["fits"] and r.get("basis")]
    elsewhere = [r["section"] for r in rows if not r["fits"] and not r.get("basis")]
    lines.append(f"planned {t:.0f} s of {budget_s:.0f} s"
                 + (f"; skipped by the budget: {', '.join(skipped)}" if skipped else "; every section fits")
                 + (f"; not on {device_type}: {', '.join(elsewhere)}" if elsewhere else ""))
    return "\n".join(lines)


class Watchdog:
    """Calls ``on_fire()`` once ``seconds`` have passed unless cancelled: the hard end of the budget, for a
    section that does not return (a hung compile). ``on_fire`` writes the summary and ends the process."""

    def __init__(self, seconds: float, on_fire):
        import threading
        self._timer = threading.Timer(max(seconds, 0.0), on_fire)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        return False


def write_summary(out_dir: Path, summary: list[dict], prov: dict, running: str | None = None,
                  elapsed: float | None = None) -> Path:
    """``<out_dir>/summary.csv``: a row per section (run, skipped, or ``running``: INTERRUPTED)."""
    rows = list(summary)
    if running is not None:
        rows.append({"section": running, "status": "INTERRUPTED (budget: the watchdog ended the call)",
                     "seconds": round(elapsed, 1) if elapsed is not None else ""})
    path = Path(out_dir) / "summary.csv"
    write_csv(path, [{**s, **prov} for s in rows])
    return path


def main(argv=None, *, clock=time.monotonic, registry=None, hard_exit=os._exit) -> int:
    """The command line (module docstring). ``clock``, ``registry`` (sections) and ``hard_exit`` are for
    tests: a fake clock, fake sections, and what the watchdog calls instead of ending the process."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="results/gpu", help="where the CSVs go (default results/gpu)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"wall-clock budget; a section whose estimate exceeds what is left is skipped and "
                        f"recorded, a section running past its own share is cut, and {GRACE_S:.0f} s past "
                        f"the budget a watchdog ends the call (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for the correctness cases (default min(12, CPUs); 1 on CPU)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"),
                   help="cuda (default when present, and for --dry-run); cpu rehearses under the interpreter")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (sections in priority order, time estimates, what the budget skips) "
                        "and exit; needs no GPU")
    args = p.parse_args(argv)
    registry = registry or sections()
    names = list(registry)
    only = names if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in registry]
    if bad:
        p.error(f"--only: unknown section(s) {bad}; choose from {', '.join(names)}")
    if not args.budget_s > 0:
        p.error(f"--budget-s must be > 0 seconds, got {args.budget_s}")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.dry_run:
        dev_type = args.device or "cuda"
        # planning for the GPU machine from another one: its 16 CPUs give the default 12 workers
        workers = args.workers or (DEFAULT_GPU_WORKERS if dev_type == "cuda" else 1)
        print(format_plan(plan(only, dev_type, workers, args.budget_s, registry), dev_type, args.budget_s,
                          workers))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--device cpu runs the kernels under the interpreter: set TRITON_INTERPRET=1")
    workers = args.workers or (min(DEFAULT_GPU_WORKERS, os.cpu_count() or 1) if device.type == "cuda" else 1)
    only = [s for s in only if device.type in registry[s].devices]
    start = clock()
    deadline = start + args.budget_s
    out_dir = Path(args.out_dir)
    prov = provenance(device)
    print(f"gpu_check on {prov['device']} (driver {prov['driver']}, CUDA {prov['cuda']}), torch {prov['torch']}, "
          f"triton {prov['triton']}, commit {prov['git_commit']}, kernel revision {prov['kernel_revision']}",
          flush=True)
    print(format_plan(plan(only, device.type, workers, args.budget_s, registry), device.type, args.budget_s,
                      workers), flush=True)
    ctx = Ctx(device, out_dir, prov, workers, clock=clock)
    if device.type == "cuda":
        from triton_kernels.nn import tuned
        ctx.tuned = tuned.TunedConfigs(prov["device"])
        ctx.gemlite = _optional_gemlite()
    summary: list[dict] = []
    state = {"running": None, "t0": start}

    def overrun():  # the watchdog: what ran is on disk; say which section was cut, then end the call
        print(f"\n[budget] {args.budget_s + GRACE_S:.0f} s passed with {state['running']} still running: "
              f"summary written, ending the call", flush=True)
        write_summary(out_dir, summary, prov, running=state["running"], elapsed=clock() - state["t0"])
        hard_exit(3)

    with Watchdog(args.budget_s + GRACE_S, overrun):
        for name in only:
            sec = registry[name]
            t0 = clock()
            left = deadline - t0
            est = float(sec.estimate(device.type, workers))
            if est > left:
                status = f"SKIPPED (estimate {est:.0f} s > {max(left, 0):.0f} s left)"
                summary.append({"section": name, "status": status, "seconds": 0, "estimate_s": round(est, 1)})
                print(f"[{name}] {status}", flush=True)
                continue
            # A section may run past its estimate by half (estimates are rough), never past the budget;
            # on CPU (the rehearsal measures nothing) only the budget bounds it.
            ctx.deadline = deadline if device.type == "cpu" else min(deadline, t0 + 1.5 * est)
            ctx.save = lambda rows, name=name: write_csv(out_dir / f"{name}.csv", [{**r, **prov} for r in rows]) \
                if rows else None  # a section that measured nothing writes no file
            state.update(running=name, t0=t0)
            try:
                rows, status = sec.run(ctx)
            except Exception as e:  # noqa: BLE001 - record, continue with the next section
                traceback.print_exc()
                rows, status = [], f"ERROR {type(e).__name__}: {e}"[:300]
            state["running"] = None
            ctx.save(rows)
            summary.append({"section": name, "status": status, "seconds": round(clock() - t0, 1),
                            "estimate_s": round(est, 1)})
            print(f"[{name}] {status} ({summary[-1]['seconds']} s, estimate {est:.0f} s)", flush=True)
        write_summary(out_dir, summary, prov)
    print("\nsection          seconds  result")
    for s in summary:
        print(f"{s['section']:<16s} {s['seconds']:>7}  {s['status']}")
    print(f"total {clock() - start:.0f} s; CSVs in {out_dir}/")
    return 1 if any(_failed(s["status"]) for s in summary) else 0


def _failed(status: str) -> bool:
    """A section failed when it raised, or when its "a/b ok" count is short (skips are not failures)."""
    if status.startswith("ERROR"):
        return True
    m = re.match(r"(\d+)/(\d+) ok", status)
    return bool(m) and m.group(1) != m.group(2)


def _dequant_headline(rows) -> str:
    want = [r for r in rows if r.get("shape") == "28672x8192" and r.get("variant") == "int4_g128_asym"
            and r.get("M") in (1, 16, 2048)]
    return "; ".join(f"int4 g128 28672x8192 M={r['M']}: x{r['speedup_vs_fp16']} vs fp16, {r['pct_copy_bw']}% BW"
                     for r in want) or f"{len(rows)} rows"


def _decode_headline(rows) -> str:
    bad = [r for r in rows if r["status"].startswith("ERROR")]
    ok = [r for r in rows if r["status"] == "ok"]
    # no "/" here: main() reads "a/b ok" statuses as pass counts
    head = "; ".join(f"{r['label']}{' compiled' if r['compiled'] else ''} {r['tokens_per_s']} tok per s"
                     + (f" (x{r['speedup_vs_dense']})" if "speedup_vs_dense" in r else "") for r in ok)
    return (f"ERROR in {len(bad)} of {len(rows)}: " if bad else "") + (head or f"{len(rows)} rows")


def _sparse_headline(rows) -> str:
    want = [r for r in rows if r.get("M") == 1 and r.get("variant") in ("block32_s0.9", "activation_s0.5",
                                                                       "rank128_fused", "rank128_two_gemm")]
    return "; ".join(f"{r['variant']} M=1 x{r['speedup_vs_fp16']}" for r in want) or f"{len(rows)} rows"


if __name__ == "__main__":
    sys.exit(main())
