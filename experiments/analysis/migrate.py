"""Split a result table that mixes several contexts into one table per context (a one-off migration).

    python -m experiments.analysis.migrate results/bench_dequant_cpu.csv [...]

Tables written before ``experiments.core.results`` enforced one context per table could hold rows of
several machines (e.g. a 1-thread and a 2-thread benchmark run). This keeps the largest context's
rows, unchanged and in order, at the original path and moves every other context's rows, unchanged,
to ``<stem>.<differing values>.csv`` beside it. Deterministic: no value is edited or recomputed.
Sweep tables use ``experiments.core.runs.SWEEP_CONTEXT``, every other table ``MEASURE_CONTEXT``.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from experiments.core import results
from experiments.core.runs import MEASURE_CONTEXT, SWEEP_CONTEXT


def context_columns(path: Path) -> tuple[str, ...]:
    return SWEEP_CONTEXT if path.name.startswith("sweep_") else MEASURE_CONTEXT


def split_by_context(path: str | Path) -> list[Path]:
    """Split ``path`` in place (see module docstring); returns the tables written ([] if one context)."""
    path = Path(path)
    cols = context_columns(path)
    rows = results.read_rows(path)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(sorted(results.context_of(r, cols).items())), []).append(r)
    if len(groups) <= 1:
        return []
    keep = max(groups, key=lambda k: len(groups[k]))
    varying = [c for c in cols if len({dict(k).get(c) for k in groups}) > 1]
    written = [path]
    results.write_rows(path, groups[keep])
    for key, sub in groups.items():
        if key == keep:
            continue
        ctx = dict(key)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", "-".join(ctx[c] for c in varying)).strip("-")
        dst = path.with_name(f"{path.stem}.{slug}.csv")
        results.write_rows(dst, sub)
        written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    for p in (argv if argv is not None else sys.argv[1:]):
        out = split_by_context(p)
        print(f"{p}: " + ("one context, unchanged" if not out else "split into " + ", ".join(map(str, out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
