"""Greedy-decode tokens/s of a few formats with *this* checkout's code, appended to a CSV, for A/B runs
of two checkouts alternated round by round on an idle machine (one process per round and checkout):

    for i in 1 2 3; do
      PYTHONPATH=OLD python OLD_OR_THIS/benchmarks/decode_ab.py --code old --round $i --out ab.csv
      PYTHONPATH=NEW python benchmarks/decode_ab.py --code new --round $i --out ab.csv
    done

Each row is a ``run_decode`` row (provenance, tokens/s, speedup over the dense model of the same process)
plus ``ab_code``, ``ab_round`` and the 1-minute load average before the round. Works with the layered
harness (``experiments.measure.decode_speed``) and the flat one before it (``experiments.latency``).
"""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch

SPECS = [{"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False},
         {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": False},
         {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": False},
         {"method": "rtn", "bits": 2, "group_size": 64, "symmetric": False}]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", required=True, help="a name for the checkout measured (e.g. old, new)")
    ap.add_argument("--round", required=True, type=int)
    ap.add_argument("--out", required=True, type=Path, help="CSV to append to (outside results/)")
    args = ap.parse_args(argv)
    try:
        from experiments.measure.decode_speed import run_decode
    except ImportError:  # the flat harness before the layered one
        from experiments.latency import run_decode
    load = os.getloadavg()[0]
    rows = run_decode(SPECS, device=torch.device("cpu"), dtypes=(torch.bfloat16,), out=None, log=lambda s: None)
    extra = {"ab_code": args.code, "ab_round": args.round, "load_avg_1m_before": f"{load:.2f}"}
    new = not args.out.exists()
    with args.out.open("a", newline="") as f:
        columns = list(dict.fromkeys(k for r in rows for k in r))  # the dense row has no speedup column
        w = csv.DictWriter(f, fieldnames=[*extra, *columns])
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**extra, **r})
            print(args.code, args.round, r["label"], f"{float(r['tokens_per_s']):.1f} tok/s")


if __name__ == "__main__":
    main()
