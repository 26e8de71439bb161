"""HQQ (experiments/methods/algorithms/hqq.py): the solver against a per-group reference written here, and
against the authors' code (``mobiusml/hqq``, ``pip install -e '.[reference]'``) on real-shaped and real
layers: same weights, same grid, ratio of weight errors ours / theirs."""
from __future__ import annotations

import math

import pytest
import torch

from experiments.methods.algorithms.hqq import DEFAULTS, MIN_SPACING_DIV, codes_for, hqq, shrink_lp
from experiments.methods.algorithms.quant import dequantize_result, rtn


def _heavy(N: int, K: int, seed: int) -> torch.Tensor:
    """LLM-like weights: Student-t rows (df 4) at 0.02 scale with a few outlier input columns."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / torch.randn(4, N, K, generator=g).square().mean(0).sqrt()
    w[:, torch.randperm(K, generator=g)[:4]] *= 8
    return 0.02 * w


def _naive(W, bits, gs, lp_norm=0.7, beta=10.0, kappa=1.01, iters=20):
    """HQQ one group at a time (Python lists, no padding): the algorithm of the module docstring,
    written independently of its vectorised form. Returns the dequantized weight."""
    N, K = W.shape
    maxq = 2 ** bits - 1
    groups = [(r, c, W[r, c:c + gs].double()) for r in range(N) for c in range(0, K, gs)]
    inv, zero = [], []
    for _, _, w in groups:
        lo, hi = float(w.min()), float(w.max())
        rng = max(hi - lo, max(abs(lo), abs(hi)) * maxq / MIN_SPACING_DIV)
        a = maxq / rng if rng > 0 else 1.0
        z = -lo * a
        inv.append(a)
        zero.append(float(round(z)) if bits == 4 else z)

    def step(zs):
        qs = [torch.clamp(torch.round(w * a + z), 0, maxq) for (_, _, w), a, z in zip(groups, inv, zs)]
        wr = [(q - z) / a for q, a, z in zip(qs, inv, zs)]
        err = sum(float((w - r).abs().sum()) for (_, _, w), r in zip(groups, wr)) / (N * K)
        return qs, wr, err

    best, best_z = math.inf, zero
    for _ in range(iters):
        qs, wr, err = step(zero)
        if not err < best:
            break
        best, best_z = err, zero
        zero = [float((q - (w - shrink_lp(w - r, beta, lp_norm)) * a).mean())
                for (_, _, w), q, r, a in zip(groups, qs, wr, inv)]
        beta *= kappa
    else:
        if step(zero)[2] < best:
            best_z = zero
    out = torch.empty(N, K, dtype=torch.float64)
    for (r, c, w), a, z in zip(groups, inv, best_z):
        out[r, c:c + gs] = (torch.clamp(torch.round(w * a + z), 0, maxq) - z) / a
    return out


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("N,K,gs", [(6, 100, 32), (5, 64, 64), (3, 40, -1)], ids=["partial-group", "one-group", "pc"])
def test_hqq_equals_the_per_group_reference(bits, N, K, gs):
    """The vectorised solver is the per-group algorithm, partial last groups (K=100, groups of 32: the
    last has 4 columns) included: padding enters no min/max, zero update or error."""
    W = _heavy(N, K, seed=bits)
    W[:, -4:] += 0.05  # an all-positive last partial group: zero padding would change its min
    res = hqq(W, bits=bits, group_size=gs)
    got = dequantize_result(res).double()
    want = _naive(W, bits, K if gs == -1 else gs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert res.q.dtype == torch.uint8 and int(res.q.max()) <= 2 ** bits - 1
    assert res.zeros is not None and not res.symmetric


def test_zero_points_are_fractional_and_beat_rtn_in_lp_error():
    """The solver moves the zero-points off the min/max start (which at 3 bits is not rounded) and
    lowers the lp error it minimises below RTN's on the same grid."""
    W = _heavy(64, 256, seed=0)
    res = hqq(W, bits=3, group_size=64)
    frac = (res.zeros - res.zeros.round()).abs()
    assert float(frac.max()) > 0.01
    start = hqq(W, bits=3, group_size=64, iters=1)  # one evaluation of the start: the min/max zero
    assert not torch.equal(start.zeros, res.zeros)

    def lp(r):
        return float((W - dequantize_result(r)).abs().pow(DEFAULTS["lp_norm"]).sum())
    assert lp(res) < lp(start)
    assert lp(res) < lp(rtn(W, bits=3, group_size=64, symmetric=False))


def test_shrink_lp():
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0])
    # p = 1: soft-thresholding at 1/beta
    torch.testing.assert_close(shrink_lp(x, 10.0, 1.0), torch.tensor([-1.9, 0.0, 0.0, 0.0, 1.9]))
    # p < 1: threshold |x|^(p-1)/beta, zero stays zero (no 0^(p-1) = inf leaking as NaN)
    y = shrink_lp(x, 10.0, 0.7)
    want = torch.sign(x) * (x.abs() - x.abs().pow(-0.3) / 10).clamp_min(0)
    want[2] = 0.0
    torch.testing.assert_close(y, want)
    assert torch.isfinite(y).all() and y[1] == 0 and y[3] == 0


def test_constant_and_zero_groups_are_exact():
    W = torch.zeros(3, 64)
    W[0] = 0.37
    W[1] = -1e-3
    res = hqq(W, bits=2, group_size=32)
    torch.testing.assert_close(dequantize_result(res), W, atol=0, rtol=2.0 ** -20)
    assert (res.scales > 0).all() and res.zeros.abs().max() <= MIN_SPACING_DIV


def test_codes_for_is_the_nearest_code_on_the_given_grid():
    W = _heavy(8, 96, seed=3)
    res = hqq(W, bits=3, group_size=32)
    s16, z16 = res.scales.half().float(), res.zeros.half().float()
    again = codes_for(W, s16, z16, bits=3, group_size=32)
    deq = dequantize_result(again)
    # every code's level is at least as close as its neighbours' (within [0, 7])
    s = s16.repeat_interleave(32, 1)
    z = z16.repeat_interleave(32, 1)
    q = again.q.float()
    for d in (-1, 1):
        alt = (q + d).clamp(0, 7)
        assert ((W - deq).abs() <= (W - (alt - z) * s).abs() + 1e-7).all()


@pytest.mark.parametrize("kw,match", [
    ({"bits": 0}, "bits must be an int"),
    ({"group_size": 48}, "power of two"),
    ({"lp_norm": 0.0}, r"lp_norm must be in \(0, 1\]"),
    ({"lp_norm": 1.5}, r"lp_norm must be in \(0, 1\]"),
    ({"beta": 0.0}, "beta must be > 0"),
    ({"kappa": 1.0}, "kappa must be > 1"),
    ({"iters": 0}, "iters must be a positive int"),
])
def test_bad_arguments_name_what_fits(kw, match):
    args = {"bits": 3, "group_size": 32, **kw}
    with pytest.raises(ValueError, match=match):
        hqq(torch.randn(4, 64), **args)


# ---------------------------------------------------------------------------------- the authors' code

def _reference(W: torch.Tensor, bits: int, gs: int, solver: str = "default") -> torch.Tensor:
    """mobiusml/hqq: ``Quantizer.quantize`` with ``BaseQuantizeConfig``'s settings (axis=1, round_zero at
    4 bits), its default solver (``optimize_weights_proximal`` = ``_legacy``) or ``_v2``; dequantized."""
    hqq_q = pytest.importorskip("hqq.core.quantize")
    from hqq.core import optimize
    cfg = hqq_q.BaseQuantizeConfig(nbits=bits, group_size=gs)["weight_quant_params"]
    assert cfg["axis"] == 1 and cfg["optimize"] and cfg["round_zero"] == (bits == 4)
    old = hqq_q.Quantizer.optimize_weights
    if solver == "v2":
        hqq_q.Quantizer.optimize_weights = optimize.optimize_weights_proximal_v2
    try:
        Wq, meta = hqq_q.Quantizer.quantize(W.float(), nbits=bits, channel_wise=True, group_size=gs,
                                            optimize=True, round_zero=cfg["round_zero"], axis=1, bitpack=False,
                                            device="cpu")
    finally:
        hqq_q.Quantizer.optimize_weights = old
    return ((Wq.float() - meta["zero"]) * meta["scale"]).reshape(W.shape)


def _ratios(W, bits, gs, solver="default"):
    ours = dequantize_result(hqq(W, bits=bits, group_size=gs))
    ref = _reference(W, bits, gs, solver)
    return ((W - ours).norm() / (W - ref).norm()).item(), ((W - ours).abs().sum() / (W - ref).abs().sum()).item()


def test_our_defaults_are_the_references():
    pytest.importorskip("hqq")
    import inspect

    from hqq.core import optimize
    ref = inspect.signature(optimize.optimize_weights_proximal_legacy).parameters["opt_params"].default
    assert {k: ref[k] for k in DEFAULTS} == DEFAULTS
    assert optimize.optimize_weights_proximal is optimize.optimize_weights_proximal_legacy


@pytest.mark.parametrize("N,K,gs,bits,solver", [
    (192, 576, 64, 2, "default"), (192, 576, 64, 3, "default"), (192, 576, 64, 4, "default"),
    (192, 1536, 128, 3, "default"), (192, 576, 64, 3, "v2")])
def test_weight_error_equals_the_authors_code_on_real_shapes(N, K, gs, bits, solver):
    """Same weights, same groups (``gs`` divides K, so the reference's flattened groups are rows'; K as
    the default model's layers, fewer rows), the reference's weight error: ours / theirs within 0.5% in
    L2 and in L1."""
    W = _heavy(N, K, seed=N + K + bits)
    l2, l1 = _ratios(W, bits, gs, solver)
    assert abs(l2 - 1) < 5e-3 and abs(l1 - 1) < 5e-3, (l2, l1)


@pytest.mark.slow
def test_weight_error_equals_the_authors_code_on_the_default_models_layers():
    """Every linear of blocks 0, 15 and 29 of the default model at 2, 3, 4 bits, groups of 64 (and 128
    where it divides K): ours / theirs within 1% per layer in L2 and L1; summed over these layers, the L1
    error is below RTN's at every bit width (not on every layer: at 2 bits a few are up to 2% above)."""
    pytest.importorskip("hqq")
    from experiments.lm import models
    model, _, _ = models.load_model("default")
    blocks = models.find_blocks(model)
    seen = 0
    sums = {bits: {"hqq": 0.0, "rtn": 0.0} for bits in (2, 3, 4)}
    for b in (0, 15, 29):
        for name, layer in models.find_linears(blocks[b]).items():
            W = models.linear_weight(layer).detach().float()
            for bits in (2, 3, 4):
                for gs in (64, 128):
                    if W.shape[1] % gs:
                        continue
                    l2, l1 = _ratios(W, bits, gs)
                    assert abs(l2 - 1) < 1e-2 and abs(l1 - 1) < 1e-2, (b, name, bits, gs, l2, l1)
                    ours = dequantize_result(hqq(W, bits=bits, group_size=gs))
                    base = dequantize_result(rtn(W, bits=bits, group_size=gs, symmetric=False))
                    sums[bits]["hqq"] += float((W - ours).abs().sum())
                    sums[bits]["rtn"] += float((W - base).abs().sum())
                    seen += 1
    assert seen == 3 * 7 * 3 + 3 * 1 * 3  # 7 linears x g64, plus down_proj (K=1536) x g128
    assert all(e["hqq"] < e["rtn"] for e in sums.values()), sums
