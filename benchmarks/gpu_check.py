"""Everything measured on a real GPU in one command: compiled-kernel correctness, then benchmarks.

    make gpu-check                    # = python -m benchmarks.gpu_check --out-dir results/gpu
    python -m benchmarks.gpu_check [--budget-s 420] [--workers 12] [--out-dir DIR] [--only correctness,dequant,...]

Sections, in order (each writes its CSV as soon as it finishes, so a run cut short keeps what it measured):

1. ``correctness``: every kernel compiled for this GPU (not the interpreter) against its pure-torch
   ``*_reference``: dequant-matmul at every bit width 1-8 x group sizes x sym/asym x fp16/bf16/fp32,
   decode (M <= 16) and prefill paths, odd shapes and real ones (4096x4096, 8192x28672, 28672x8192);
   block / N:M / unstructured / activation sparsity; low rank fused and two-GEMM; codebook-matmul at
   every bit width 1-8 (so every lookup: select, gather, load) x shared / per-row tables x scales. Outputs are
   NaN-poisoned buffers; inputs are column slices of NaN-padded buffers. The error bound is the
   rounding bound of a dot product: ``|y - ref| <= atol + rtol * (|x| @ |W|^T + |bias|)`` with
   ``rtol = c * u + K * 2^-24`` (u = the activation dtype's unit roundoff). The cases run in a pool of
   worker processes so that Triton's compiles (one per autotune config) overlap.
2. ``bandwidth``: device-to-device copy GB/s, the yardstick for "% of bandwidth".
3. ``dequant``: ``dequant_matmul`` against torch fp16/bf16 ``F.linear`` (cuBLAS) at LLM shapes and
   M in {1, 4, 16, 64, 128, 512, 2048}; achieved GB/s (weight storage + activations + output) and %
   of the copy bandwidth measured in this run. GemLite / torchao columns when importable.
4. ``sparse_lowrank``: block 90%, 2:4, unstructured 50%, activation 50% and low rank r in
   {32, 64, 128, 256} (fused vs two GEMMs vs two cuBLAS matmuls) against dense fp16.
5. ``codebook``: ``codebook_matmul`` (lookup-table weights: a shared NF4-style table with g128 scales,
   and per-row SqueezeLLM-style tables with per-channel scales) against ``dequant_matmul`` at the same
   bits and group size (g128 asym) and against cuBLAS fp16, M in {1, 16, 2048}; the column
   ``time_vs_uniform`` is the codebook kernel's time over the uniform kernel's (goal: <= 1.1); at 4 bits
   also with the ``load`` lookup forced, to choose between lookups by measurement.
6. ``compile``: ``torch.compile(fullgraph=True)`` (Inductor) of a stack of QuantLinear (3 and 4 bits),
   CodebookLinear, SparseLinear (block, 2:4) and LowRankLinear layers on the GPU, through the kernels'
   custom operators (``triton_kernels.nn._ops``): compiled output equal to eager, number of graphs,
   and eager vs compiled (and CUDA-graph ``reduce-overhead``) time per forward at M=1.
7. ``decode``: end-to-end greedy decoding (``experiments.measure.decode_speed.decode_tokens_per_second``, 32 new
   tokens) of a model with the default model's architecture (SmolLM2-135M: 30 Llama blocks, 576 wide;
   random weights, since the GGUF cannot be carried to the GPU machine and decode speed depends on the
   shapes only), fp16, dense vs RTN 4-bit g128, 3-bit g128 and magnitude 2:4 through the Triton
   backends: eager for each, then ``torch.compile`` (static KV cache, Inductor) of dense and 4-bit while
   the budget lasts. A 135M model is launch-bound on a large GPU: the eager rows show the per-layer
   launch cost, the compiled ones what is left once it is fused away.

Timings: ``triton.testing.do_bench`` (median, p20, p80; it flushes L2 between calls). The whole run
is time-boxed (``--budget-s``): a section that would start after the budget is skipped and recorded
as skipped in ``summary.csv``, never silently. Results: ``<out-dir>/*.csv`` with provenance columns
(GPU name, driver, torch, triton, CUDA, commit). The last thing printed is a short summary table.

On a CPU (no GPU) ``--device cpu`` runs only the correctness and compile parts under
``TRITON_INTERPRET=1`` at small shapes (compile with the ``aot_eager`` backend): that is how the
plumbing is tested; it measures nothing.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import math
import multiprocessing as mp
import os
import platform
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
        "python": platform.python_version(), "git_commit": git_commit(),
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


DEQUANT_SHAPES = [(28672, 8192), (8192, 28672), (8192, 8192), (4096, 4096)]  # (N, K), headline first
DEQUANT_FORMATS = [(4, 128), (3, 128), (2, 128), (8, 128), (4, 32)]  # (bits, group size), asym
M_VALUES = [1, 4, 16, 64, 128, 512, 2048]


def _optional_gemlite():
    try:
        import gemlite  # noqa: F401
        return gemlite
    except Exception:  # noqa: BLE001 - not installed / incompatible: a blank column, said in the note
        return None


def run_dequant(device, copy_gbps, deadline, save) -> list[dict]:
    from triton_kernels import dequant_matmul as dq
    rows = []
    gemlite = _optional_gemlite()
    print(f"[dequant] GemLite: {'version ' + package_version('gemlite') if gemlite else 'not importable (no column)'}",
          flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    for N, K in DEQUANT_SHAPES:
        w = torch.randn(N, K, generator=gen, device=device) / K ** 0.5
        dense = {dt: w.to(dt) for dt in (torch.float16, torch.bfloat16)}
        formats, gemlite_layers = {}, {}
        for bits, gs in DEQUANT_FORMATS:
            q, s, z = dq.quantize_rtn(w, bits=bits, group_size=gs, symmetric=False)
            s, z = s.to(torch.float16), z.to(torch.float16)
            formats[(bits, gs)] = (dq.pack(q, bits), s, z)
            if gemlite is not None and (bits, gs) == (4, 128):  # GemLite autotunes per M: one format
                gemlite_layers[(bits, gs)] = _gemlite_layer(gemlite, q, s, z, bits, gs)
            del q
        del w
        for M in M_VALUES:
            if time.monotonic() > deadline:
                rows.append({"shape": f"{N}x{K}", "M": M, "variant": "all", "status": "SKIPPED (time budget)"})
                continue
            x = torch.randn(M, K, device=device, dtype=torch.float16)
            base = {}
            for dt, wd in dense.items():
                xd = x.to(dt)
                t = _bench(lambda: F.linear(xd, wd))
                base[DNAME[dt]] = t["median_ms"]
                rows.append(_dq_row(N, K, M, f"dense_{DNAME[dt]}", "cuBLAS F.linear", t, N * K * 2, x, copy_gbps))
            for (bits, gs), (packed, s, z) in formats.items():
                if M > 128 and (bits, gs) not in ((4, 128), (3, 128)):
                    continue  # prefill: two formats are enough to see the tiled kernel
                kw = dict(bits=bits, group_size=gs, symmetric=False)
                fn = lambda: dq.dequant_matmul(x, packed, s, z, **kw)  # noqa: E731
                fn()  # autotune outside the timing
                t = _bench(fn)
                wbytes = packed.numel() * 4 + s.numel() * 2 + z.numel() * 2
                r = _dq_row(N, K, M, f"int{bits}_g{gs}_asym", "triton dequant_matmul", t, wbytes, x, copy_gbps)
                r.update(bits=bits, group_size=gs)
                for name, ms in base.items():
                    r[f"speedup_vs_{name}"] = round(ms / t["median_ms"], 3)
                rows.append(r)
                gl = gemlite_layers.get((bits, gs))
                if gl is not None and deadline - time.monotonic() > 60:
                    r.update(_gemlite_timing(gl, x, t["median_ms"], fn))
                save(rows)
                print(f"[dequant] {N}x{K} M={M:<5d} int{bits} g{gs}: {t['median_ms']:.4f} ms  "
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


def _gemlite_timing(layer, x, ours_ms, ours_fn) -> dict:
    if isinstance(layer, str):
        return {"gemlite_error": layer}
    try:
        y = layer(x)
        ref = ours_fn().float()
        err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        t = _bench(lambda: layer(x))
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="results/gpu", help="where the CSVs go (default results/gpu)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget; sections past it are skipped and recorded (default 420)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for the correctness cases (default min(12, CPUs); 1 on CPU)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"),
                   help="cuda (default when present); cpu runs the correctness plumbing under the interpreter")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--device cpu runs the kernels under the interpreter: set TRITON_INTERPRET=1")
        only = [s for s in only if s in ("correctness", "compile", "decode")]
    workers = args.workers or (min(12, os.cpu_count() or 1) if device.type == "cuda" else 1)
    start = time.monotonic()
    deadline = start + args.budget_s
    out_dir = Path(args.out_dir)
    prov = provenance(device)
    print(f"gpu_check on {prov['device']} (driver {prov['driver']}, CUDA {prov['cuda']}), torch {prov['torch']}, "
          f"triton {prov['triton']}, commit {prov['git_commit']}", flush=True)
    summary = []
    copy_gbps = None
    for section in SECTIONS:
        if section not in only:
            continue
        t0 = time.monotonic()
        def save(rows, section=section):  # a section that measured nothing writes no file
            if rows:
                write_csv(out_dir / f"{section}.csv", [{**r, **prov} for r in rows])
        if t0 > deadline:
            summary.append({"section": section, "status": "SKIPPED (time budget)", "seconds": 0})
            continue
        try:
            # Each section gets a share of what is left, so every one of them measures something.
            share = {"correctness": 0.4, "bandwidth": 1.0, "dequant": 0.6, "sparse_lowrank": 0.6,
                     "codebook": 0.8, "compile": 0.5, "decode": 1.0}[section]
            section_deadline = t0 + share * (deadline - t0)
            if section == "correctness":
                rows = run_correctness(device, workers, section_deadline)
                n_ok = sum(r["status"] == "ok" for r in rows)
                status = f"{n_ok}/{len(rows)} ok"
            elif section == "bandwidth":
                rows = run_bandwidth(device)
                copy_gbps = rows[0]["gbps"]
                status = f"copy {copy_gbps} GB/s"
            elif section == "dequant":
                rows = run_dequant(device, copy_gbps, section_deadline, save)
                status = _dequant_headline(rows)
            elif section == "sparse_lowrank":
                rows = run_sparse_lowrank(device, section_deadline, save)
                status = _sparse_headline(rows)
            elif section == "codebook":
                rows = run_codebook(device, copy_gbps, section_deadline, save)
                status = _codebook_headline(rows)
            elif section == "compile":
                rows = run_compile(device)
                n_ok = sum(r["status"] == "ok" for r in rows)
                status = f"{n_ok}/{len(rows)} ok"
            else:
                rows = run_decode(device, section_deadline)
                status = _decode_headline(rows)
        except Exception as e:  # noqa: BLE001 - record, continue with the next section
            traceback.print_exc()
            rows, status = [], f"ERROR {type(e).__name__}: {e}"[:300]
        save(rows)
        summary.append({"section": section, "status": status, "seconds": round(time.monotonic() - t0, 1)})
        print(f"[{section}] {status} ({summary[-1]['seconds']} s)", flush=True)
    write_csv(out_dir / "summary.csv", [{**s, **prov} for s in summary])
    print("\nsection          seconds  result")
    for s in summary:
        print(f"{s['section']:<16s} {s['seconds']:>7}  {s['status']}")
    print(f"total {time.monotonic() - start:.0f} s; CSVs in {out_dir}/")
    failed = any(s["status"].startswith("ERROR") or ("/" in s["status"] and s["status"].split("/")[0] !=
                 s["status"].split("/")[1].split()[0]) for s in summary)
    return 1 if failed else 0


def _dequant_headline(rows) -> str:
    want = [r for r in rows if r.get("shape") == "28672x8192" and r.get("variant") == "int4_g128_asym"
            and r.get("M") in (1, 16)]
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
