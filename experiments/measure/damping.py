"""Evidence for whitened SVD's default damping: layer reconstruction error on the default model's real layers.

    python -m experiments.measure.damping [--blocks 0 3 6 ...] [--out results/damping_whitened_svd.csv]

SVD-LLM (Wang et al. 2024) whitens with the Cholesky factor of ``X^T X`` itself (no damping);
``experiments.methods.algorithms.lowrank.whitened_svd`` adds ``damp * mean(diag H) * I`` first, so that ``S``
stays invertible when inputs are dead or collinear. Damping changes which subspace is kept, so its
value is a modelling choice: this script measures it. For every linear layer of the chosen blocks of
the dense default model it collects ``H = X^T X / n`` on the calibration windows the sweeps use
(16 x 512 tokens of the calibration novels, seed 0) and, separately, on held-out windows of *Emma*
(which neither calibration nor evaluation uses), then factorizes each layer at several parameter
ratios with each damping and reports the relative output error

    err(H') = tr(E H' E^T) / tr(W H' W^T),   E = W - U V,

on the calibration statistics (what the factorization was fitted to) and on the held-out ones (what
generalizes). One row per (layer, ratio, damp); ``damp = 0`` is SVD-LLM's undamped whitening
(``status`` says when its Cholesky fails). The inputs come from the dense model (not from already
compressed upstream blocks, as in a sweep), which isolates the per-layer choice.

The default ``DEFAULT_WHITENING_DAMP`` in ``experiments/methods/compress.py`` cites the numbers this wrote
(``results/damping_whitened_svd.csv``); ``tests/test_alg_lowrank.py`` checks the same ordering on a
synthetic layer with anisotropic inputs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DAMPS = (0.0, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2)
RATIOS = (0.9, 0.7, 0.5)
BLOCKS = (0, 5, 10, 15, 20, 25, 29)


def layer_stats(model, windows: torch.Tensor, blocks: list[int], *, chunk: int = 4) -> dict[str, torch.Tensor]:
    """``H = X^T X / n`` (float64) of every linear of ``blocks``, from a dense forward of ``windows``."""
    from experiments.lm import models

    all_blocks = models.find_blocks(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for i in blocks:
        for name, layer in models.find_linears(all_blocks[i]).items():
            key = f"block{i}.{name}"

            def hook(_m, args, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + x.T @ x
                counts[key] = counts.get(key, 0) + x.shape[0]
            handles.append(layer.register_forward_pre_hook(hook))
    class _Done(Exception):
        pass

    def stop(*_):  # nothing after the last requested block is needed
        raise _Done
    handles.append(all_blocks[max(blocks)].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for s in range(0, windows.shape[0], chunk):
                try:
                    model(input_ids=windows[s:s + chunk], use_cache=False)
                except _Done:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {k: (sums[k] / counts[k]) for k in sums}


def rel_error(E: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    return float(torch.trace(E @ H @ E.T) / torch.trace(W @ H @ W.T))


def study(blocks=BLOCKS, damps=DAMPS, ratios=RATIOS, *, log=lambda s: print(s, file=sys.stderr)) -> list[dict]:
    from experiments.lm import data, models
    from experiments.methods.algorithms.lowrank import rank_for_ratio, whitened_svd
    from experiments.core.progress import progress_bar

    t0 = time.perf_counter()
    model, tok, info = models.load_model("default")
    calib_text, _, _ = data.get_texts("austen")
    emma = data.load_corpus("austen")["Emma"]
    calib = data.calibration_batches(tok, calib_text, n_samples=16, seqlen=512, seed=0)
    held = data.calibration_batches(tok, emma, n_samples=16, seqlen=512, seed=1)
    log(f"model and text ready in {time.perf_counter() - t0:.0f}s; collecting X^T X of {len(blocks)} blocks")
    H_cal = layer_stats(model, calib, list(blocks))
    H_held = layer_stats(model, held, list(blocks))
    weights = {f"block{i}.{n}": models.linear_weight(l).detach().double()
               for i in blocks for n, l in models.find_linears(models.find_blocks(model)[i]).items()}
    rows = []
    for key in progress_bar(list(weights), desc="whitened SVD per layer", unit="layer"):
        W = weights[key]
        N, K = W.shape
        ranks = {ratio: rank_for_ratio(N, K, ratio) for ratio in ratios}
        for d in damps:
            # One factorization per damping at the largest rank: the rank-r factors are its first r
            # components (U = P_r Sigma_r, V = Q_r^T S^-1 row by row), exactly what rank=r returns.
            try:
                U, V = whitened_svd(W.float(), H_cal[key].float(), rank=max(ranks.values()), damp=d)
                failure = None
            except ValueError as e:  # undamped Cholesky of a singular H
                failure = f"failed: {e}"[:200]
            for ratio, r in ranks.items():
                row = {"layer": key, "N": N, "K": K, "ratio": ratio, "rank": r, "damp": d,
                       "calib_tokens": int(calib.numel()), "heldout_tokens": int(held.numel())}
                if failure:
                    rows.append({**row, "status": failure, "calib_rel_err": "", "heldout_rel_err": ""})
                    continue
                E = W - U[:, :r].double() @ V[:r].double()
                rows.append({**row, "status": "ok", "calib_rel_err": rel_error(E, W, H_cal[key]),
                             "heldout_rel_err": rel_error(E, W, H_held[key])})
    return rows


def summarize(rows: list[dict]) -> str:
    """Per damp: geometric-mean error ratio against undamped whitening, and worst case, on both statistics."""
    import math
    from collections import defaultdict

    base = {(r["layer"], r["ratio"]): r for r in rows if r["damp"] == 0.0 and r["status"] == "ok"}
    acc = defaultdict(lambda: {"calib": [], "held": []})
    for r in rows:
        b = base.get((r["layer"], r["ratio"]))
        if r["status"] != "ok" or b is None:
            continue
        acc[r["damp"]]["calib"].append(r["calib_rel_err"] / b["calib_rel_err"])
        acc[r["damp"]]["held"].append(r["heldout_rel_err"] / b["heldout_rel_err"])
    lines = ["damp     | calib err / undamped: geo-mean, worst | held-out err / undamped: geo-mean, worst, "
             "cases <= undamped"]
    for d in sorted(acc):
        c, h = acc[d]["calib"], acc[d]["held"]
        gm = lambda v: math.exp(sum(math.log(x) for x in v) / len(v))  # noqa: E731
        lines.append(f"{d:<8g} | {gm(c):.4f}, {max(c):.4f} | {gm(h):.4f}, {max(h):.4f}, "
                     f"{sum(x <= 1 + 1e-9 for x in h)}/{len(h)}")
    failed = sum(1 for r in rows if r["status"] != "ok")
    if failed:
        lines.append(f"{failed} factorization(s) failed (undamped Cholesky of a singular H)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS), help="block indices (default: %(default)s)")
    ap.add_argument("--out", default=None, help="CSV to write (default: print the summary only)")
    args = ap.parse_args(argv)
    from experiments.core import results
    from experiments.core.provenance import provenance
    from experiments.core.runs import refuse_reference

    if args.out:
        try:
            refuse_reference(args.out, "--out")
        except ValueError as e:
            ap.error(str(e))

    prov = provenance("cpu")  # at the start: the commit whose code runs
    rows = study(args.blocks)
    print(summarize(rows), file=sys.stderr)
    if args.out:
        results.write_rows(args.out, [{**r, **prov, "command": "python -m experiments.measure.damping"} for r in rows])
        print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
