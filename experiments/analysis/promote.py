"""Make a run the reference: copy its tables and figures over the committed ones in ``results/``.

    python -m experiments promote --run NAME [--quick] [--force]
    make promote RUN=NAME [QUICK=1]

The reference tables change only through this explicit command. It replaces whole tables (a table
is never merged with the reference one, so it keeps one context) and the run's figures; reference
tables the run does not have are kept and listed. It refuses a run whose sweeps step has not finished
(``reproduce`` records finished steps in ``steps.json``) unless ``--force``. Review with
``git diff --stat results/`` and commit.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from experiments.core.atomic import copy_file
from experiments.core.runs import RUN_META, Steps, mode_dir, reference_dir, run_root


def promote(run_dir: Path, ref_dir: Path, *, force: bool = False) -> list[Path]:
    """Copy ``run_dir``'s tables (``*.csv`` but not the run's own bookkeeping) and ``figures/`` into ``ref_dir``."""
    tables = sorted(p for p in run_dir.glob("*.csv") if p.name not in RUN_META)
    if not any(p.name.startswith("sweep_") for p in tables):
        raise ValueError(f"--run: {run_dir} has no sweep tables to promote; run `python -m experiments reproduce` first")
    if not force and "sweeps" not in Steps(run_dir).all():
        raise ValueError(f"--run: the sweeps of {run_dir} have not finished (no 'sweeps' entry in "
                         f"{run_dir / 'steps.json'}); finish the run with `python -m experiments reproduce` (it "
                         f"resumes) or pass --force to promote partial tables")
    written = []
    for p in tables:
        copy_file(p, ref_dir / p.name)
        written.append(ref_dir / p.name)
    figures = run_dir / "figures"
    if figures.is_dir():
        for p in sorted(figures.iterdir()):
            if p.is_file():
                copy_file(p, ref_dir / "figures" / p.name)
                written.append(ref_dir / "figures" / p.name)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default=None, metavar="NAME", help="the run to promote, runs/NAME (default: local)")
    p.add_argument("--out-dir", default=None, metavar="DIR", help="an explicit run directory instead of --run")
    p.add_argument("--quick", action="store_true", help="promote the run's quick tables to results/quick/")
    p.add_argument("--force", action="store_true", help="promote even if the run's sweeps have not finished")


def main(args: argparse.Namespace) -> int:
    run_dir = mode_dir(run_root(out_dir=args.out_dir, run=args.run), args.quick)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist (--run / --out-dir)")
    ref = reference_dir(args.quick)
    written = promote(run_dir, ref, force=args.force)
    kept = sorted(p.name for p in ref.glob("*.csv") if not (run_dir / p.name).exists())
    print(f"promoted {run_dir} to the reference {ref}:")
    for p in written:
        print(f"  {p}")
    if kept:
        print(f"kept (not in this run): {', '.join(kept)}")
    print("review with `git diff --stat results/` and commit to make it the reference")
    return 0
