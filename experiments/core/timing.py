"""Timing helpers shared by the benchmarks and ``experiments.measure``.

    time_fn(fn, device)   -> {"median_ms", "iqr_ms", "p20_ms", "p80_ms", "n", "runs", "timer"}
    time_interleaved({name: fn}, device, rounds=R, min_run_time=T) + ratio_of(...): ratios that
                             cancel the machine's drift (each round times every function once)

- CPU: ``torch.utils.benchmark.Timer(...).blocked_autorange`` (it handles warm-up, thread settings
  and picks the number of calls per measurement). CPU numbers are CPU numbers: they say nothing
  about a GPU, and on the development machine (2 cores shared with other users) they are noisy,
  so report the median with the IQR. Weights of 32 MB or less stay in the 32 MiB L3 across
  repeated calls, so a CPU timing of such a layer is a hot-cache timing, not a DRAM-bandwidth one.
- CUDA: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` (it flushes the L2 between
  calls and syncs); triton is imported only when a CUDA timing is asked for.

All results are in milliseconds per call of ``fn``.
"""
from __future__ import annotations

from typing import Callable

import torch


def _quantile(sorted_vals: list[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default), on an already sorted list.
    if not sorted_vals:
        return float("nan")
    pos = (len(sorted_vals) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def time_cpu(fn: Callable[[], object], *, min_run_time: float = 0.2,
             num_threads: int | None = None) -> dict:
    """Time ``fn()`` on the CPU with ``torch.utils.benchmark`` (``blocked_autorange``).

    Returns ``median_ms`` and the 20th/80th percentiles and IQR (25th-75th) over the measured
    blocks (each block's time is per call), ``n`` the number of blocks, ``runs`` the total calls.
    ``num_threads`` defaults to ``torch.get_num_threads()`` (``Timer`` would otherwise use 1).
    These are CPU numbers, taken with a hot cache for anything that fits the L3.
    """
    from torch.utils import benchmark

    if min_run_time <= 0:
        raise ValueError(f"min_run_time must be > 0 seconds, got {min_run_time}")
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                            num_threads=num_threads or torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    per_call = sorted(t * 1e3 for t in m.times)  # m.times are seconds per call, one per block
    return {
        "median_ms": _quantile(per_call, 0.5),
        "iqr_ms": _quantile(per_call, 0.75) - _quantile(per_call, 0.25),
        "p20_ms": _quantile(per_call, 0.2),
        "p80_ms": _quantile(per_call, 0.8),
        "n": len(per_call),
        "runs": len(per_call) * m.number_per_run,
        "timer": "torch.utils.benchmark.blocked_autorange",
    }


def time_cuda(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100) -> dict:
    """Time ``fn()`` on the current CUDA device with ``triton.testing.do_bench``.

    ``warmup`` and ``rep`` are do_bench's target times in ms. do_bench returns quantiles, not a
    sample count, so ``n`` is None. ``iqr_ms`` comes from the 25th/75th quantiles of the same run.
    """
    import triton.testing

    med, p20, p80, p25, p75 = triton.testing.do_bench(fn, warmup=warmup, rep=rep,
                                                      quantiles=[0.5, 0.2, 0.8, 0.25, 0.75])
    return {
        "median_ms": float(med),
        "iqr_ms": float(p75 - p25),
        "p20_ms": float(p20),
        "p80_ms": float(p80),
        "n": None,
        "timer": "triton.testing.do_bench",
    }


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str, *, rounds: int,
                     min_run_time: float) -> dict[str, dict]:
    """Time several functions in ``rounds`` interleaved rounds (each round times every function once,
    for ``min_run_time / rounds`` seconds), so that slow drift of the machine (another tenant's memory
    traffic, clock changes) hits them alike and cancels in their ratios.

    Returns, per name, ``median_ms``/``p20_ms``/``p80_ms``/``iqr_ms`` over the round medians, ``runs``
    (all calls), ``rounds_ms`` (the round medians, in order) and ``timer``. Ratios between two functions
    should be taken per round (``ratio_of``), not from the two medians.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    per = {name: [] for name in fns}
    runs = {name: 0 for name in fns}
    timer = ""
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time_fn(fn, device, min_run_time=min_run_time / rounds)
            per[name].append(t["median_ms"])
            runs[name] += t.get("runs") or 0
            timer = t["timer"]
    out = {}
    for name, vals in per.items():
        v = sorted(vals)
        out[name] = {"median_ms": _quantile(v, 0.5), "p20_ms": _quantile(v, 0.2), "p80_ms": _quantile(v, 0.8),
                     "iqr_ms": _quantile(v, 0.75) - _quantile(v, 0.25), "runs": runs[name], "rounds_ms": vals,
                     "timer": f"{timer}, {rounds} interleaved rounds (median of round medians)"}
    return out


def ratio_of(timings: dict[str, dict], num: str, den: str) -> float:
    """Median over the rounds of ``num``'s time / ``den``'s time, from :func:`time_interleaved`."""
    r = sorted(a / b for a, b in zip(timings[num]["rounds_ms"], timings[den]["rounds_ms"]))
    return _quantile(r, 0.5)


def time_fn(fn: Callable[[], object], device: torch.device | str, *,
            min_run_time: float | None = None) -> dict:
    """Dispatch on ``device``: ``time_cuda`` for CUDA (``min_run_time`` in seconds becomes
    do_bench's ``rep`` in ms), ``time_cpu`` otherwise (default ``min_run_time`` 0.2 s)."""
    device = torch.device(device)
    if device.type == "cuda":
        if min_run_time is None:
            return time_cuda(fn)
        return time_cuda(fn, rep=max(1, int(min_run_time * 1e3)))
    if device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")
    return time_cpu(fn, min_run_time=0.2 if min_run_time is None else min_run_time)
