"""Mixed precision under a size budget: one format per layer, minimising a summed sensitivity, solved exactly.

    choice = allocate(cost, size, budget)      # cost[l][c], size[l][c]: layer l in candidate format c

The problem is the multiple-choice knapsack: pick exactly one candidate ``c_l`` per layer ``l`` so that
``sum_l size[l][c_l] <= budget`` and ``sum_l cost[l][c_l]`` is smallest. It is solved as a 0/1 integer
program (one binary per layer x candidate, one "exactly one" row per layer, one budget row) by HiGHS
through :func:`scipy.optimize.milp` with a relative MIP gap of 0: the optimum, not a heuristic (a
greedy or Lagrangian allocation can miss it when the budget falls between the convex hull's vertices).
Candidates that are dominated inside their layer (no smaller and no cheaper than another) are dropped
first, which changes no optimum and keeps the program small.

``cost`` is whatever additive sensitivity the caller measured (the ``mixed`` family: the dense model's
per-weight Fisher times the squared weight error, the second-order estimate of the loss increase that
HAWQ and SqueezeLLM use, summed per layer); ``size`` is each candidate's stored bytes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class BudgetError(ValueError):
    """The budget is below the smallest allocation (every layer in its smallest candidate)."""


def _pareto(costs: Sequence[float], sizes: Sequence[int]) -> list[int]:
    """Indices of the candidates no other candidate beats in both size and cost (ties: the first)."""
    order = sorted(range(len(costs)), key=lambda c: (sizes[c], costs[c], c))
    keep, best = [], float("inf")
    for c in order:
        if costs[c] < best:
            keep.append(c)
            best = costs[c]
    return keep


def allocate(cost: Sequence[Sequence[float]], size: Sequence[Sequence[int]], budget: float) -> list[int]:
    """The candidate index per layer that minimises ``sum cost`` with ``sum size <= budget`` (exact).

    ``cost`` and ``size``: one row per layer, one column per candidate (rows may differ in length);
    costs finite and >= 0, sizes positive integers. Raises :class:`BudgetError` (naming the smallest
    feasible total) when no allocation fits.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    if len(cost) != len(size) or not cost:
        raise ValueError(f"cost and size need one row per layer (got {len(cost)} and {len(size)} rows)")
    for l, (cr, sr) in enumerate(zip(cost, size)):
        if len(cr) != len(sr) or not cr:
            raise ValueError(f"layer {l}: {len(cr)} costs for {len(sr)} sizes (one per candidate, at least one)")
        if not all(np.isfinite(c) and c >= 0 for c in cr):
            raise ValueError(f"layer {l}: costs must be finite and >= 0, got {list(cr)}")
        if not all(int(s) == s and s > 0 for s in sr):
            raise ValueError(f"layer {l}: sizes must be positive integers, got {list(sr)}")
    smallest = sum(min(sr) for sr in size)
    if budget < smallest:
        raise BudgetError(f"budget={budget:g} is below the smallest allocation ({smallest}: every layer in its "
                          f"smallest candidate)")
    keep = [_pareto(cr, sr) for cr, sr in zip(cost, size)]
    if sum(max(size[l][c] for c in k) for l, k in enumerate(keep)) <= budget:
        return [k[-1] for k in keep]  # everything fits at the cheapest cost of each layer
    var = [(l, c) for l, k in enumerate(keep) for c in k]
    n = len(var)
    # Costs scaled to O(1): HiGHS's tolerances are absolute; the optimum does not change under scaling.
    scale = max(max(cr) for cr in cost) or 1.0
    c_vec = np.array([cost[l][c] / scale for l, c in var])
    one = np.zeros((len(cost), n))
    for j, (l, _) in enumerate(var):
        one[l, j] = 1.0
    sizes = np.array([[float(size[l][c]) for l, c in var]])
    limit = float(budget)
    for _ in range(4):
        res = milp(c_vec, integrality=np.ones(n), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one, 1, 1), LinearConstraint(sizes, -np.inf, limit)],
                   options={"mip_rel_gap": 0.0, "presolve": True})
        if res.x is None:
            raise RuntimeError(f"the integer program found no allocation ({res.message})")
        pick = [-1] * len(cost)
        for j, (l, c) in enumerate(var):
            if res.x[j] > 0.5:
                pick[l] = c
        if any(p < 0 for p in pick):
            raise RuntimeError("the integer program left a layer without a candidate")
        # The budget must hold in exact integers, not only up to HiGHS's feasibility tolerance: if the
        # rounded solution is over, solve again with the budget lowered by the excess.
        total = sum(size[l][p] for l, p in enumerate(pick))
        if total <= budget:
            return pick
        limit -= total - budget
    raise RuntimeError(f"no allocation within budget={budget:g} after tightening for the solver's tolerance")
