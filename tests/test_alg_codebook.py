"""Codebook quantization (experiments/methods/algorithms/codebook.py): tables, round trips, each method's
defining property, GPTQ over a codebook."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.methods.algorithms import codebook as cb
from experiments.methods.algorithms.quant import dequantize_result, gptq, rtn
from alg_data import calibration, weight


def hessian(K, seed, n=768):
    X = calibration(n, K, seed)
    return X.T @ X / n


def brute_nearest(x, table):
    """Index of the nearest table entry by exhaustive comparison, independent of nearest_codes."""
    return (x[..., None] - table[:, None, :]).abs().argmin(dim=-1)


METHODS = {
    "nf": lambda W, H, bits, gs: cb.nf(W, bits=bits, group_size=gs),
    "fp4": lambda W, H, bits, gs: cb.fp4(W, group_size=gs),
    "piecewise": lambda W, H, bits, gs: cb.piecewise(W, bits=bits, group_size=gs),
    "kmeans": lambda W, H, bits, gs: cb.kmeans(W, bits=bits, group_size=gs),
    "squeezellm": lambda W, H, bits, gs: cb.squeezellm(W, H.diagonal(), bits=bits, group_size=gs),
}
SHARED_TABLE = {"nf", "fp4"}

ROUND_TRIP_CASES = [
    pytest.param(m, bits, gs, id=f"{m}-{bits}b-g{gs}")
    for m in METHODS for bits in ((4,) if m == "fp4" else (2, 3, 4)) for gs in (32, -1)
]


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------

def test_nf4_table_equals_published_values_to_fp16():
    ours = cb.nf_table(4)
    published = torch.tensor(cb.NF4_PUBLISHED)
    assert torch.equal(ours.half(), published.half()), (ours - published).abs().max()
    assert (ours - published).abs().max().item() < 1e-6


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_nf_tables_are_asymmetric_normal_quantiles(bits):
    t = cb.nf_table(bits)
    L = 2 ** bits
    assert t.shape == (L,) and t.dtype == torch.float32
    assert bool((t.diff() > 0).all()), "NF table must be strictly increasing"
    assert t[0].item() == -1.0 and t[-1].item() == 1.0 and 0.0 in t.tolist()
    # QLoRA's asymmetric construction: one more positive value than negative ones.
    assert (t > 0).sum().item() == L // 2 and (t < 0).sum().item() == L // 2 - 1
    # Denser near zero than at the ends (normal quantiles): the step grows outwards on each side.
    pos = t[t >= 0]
    assert bool((pos.diff().diff() > -1e-6).all()), f"positive steps not non-decreasing: {pos.diff()}"


def test_fp4_table_is_e2m1():
    t = cb.fp4_table()
    expected = [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert t.tolist() == expected


# ---------------------------------------------------------------------------------------------------
# Round trips and nearest rounding
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, bits, group_size", ROUND_TRIP_CASES)
def test_round_trip_format_and_nearest(method, bits, group_size):
    N, K = 24, 100          # 100 = 3 groups of 32 + a partial group of 4
    W = weight(N, K, 1) * torch.linspace(0.2, 2.0, K)
    H = hessian(K, 1)
    r = METHODS[method](W, H, bits, group_size)
    L, G = 2 ** bits, (1 if group_size == -1 else -(-K // group_size))
    assert isinstance(r, cb.CodebookResult) and r.bits == bits and r.group_size == group_size
    assert r.q.shape == (N, K) and r.q.dtype == torch.uint8 and int(r.q.max()) < L
    assert r.codebook.dtype == torch.float32
    assert r.codebook.shape == ((1, L) if method in SHARED_TABLE else (N, L))
    assert bool((r.codebook.diff(dim=1) >= 0).all()), "tables must be ascending"
    if group_size == -1 and method not in SHARED_TABLE:
        assert r.scales is None
    else:
        assert r.scales.shape == (N, G) and r.scales.dtype == torch.float32 and bool((r.scales > 0).all())
    W_hat = cb.dequantize_codebook_result(r)
    table = r.codebook.expand(N, L)
    s = torch.ones(N, K) if r.scales is None else r.scales.repeat_interleave(K if group_size == -1 else group_size, 1)[:, :K]
    torch.testing.assert_close(W_hat, table.gather(1, r.q.long()) * s, atol=0, rtol=0)
    # Every weight went to its nearest entry: no other entry (times the same scale) is closer.
    best = (table.gather(1, brute_nearest(W / s, table)) * s - W).abs()
    excess = ((W_hat - W).abs() - best).max().item()
    assert excess <= 1e-6 * W.abs().max().item(), f"a weight is {excess} farther than its nearest entry"
    # Re-quantizing the dequantized weight with the same table and scales is the identity.
    again = cb.nearest_codes(W_hat / s, r.codebook)
    torch.testing.assert_close(table.gather(1, again) * s, W_hat, atol=0, rtol=1e-6)


@pytest.mark.parametrize("method, bits", [("nf", 3), ("fp4", 4)])
def test_weights_on_the_grid_are_exact(method, bits):
    N, K, gs = 8, 64, 16
    table = cb.nf_table(bits) if method == "nf" else cb.fp4_table()
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 2 ** bits, (N, K), generator=g)
    q[:, ::gs] = int(table.argmax())          # every group holds its absmax: the scale is recovered
    # Power-of-two scales (as MX uses) make absmax / 6 exact in float32, so the round trip is exact.
    s = 2.0 ** torch.randint(-6, 4, (N, K // gs), generator=g).float()
    W = table[q] * s.repeat_interleave(gs, 1)
    r = cb.nf(W, bits=bits, group_size=gs) if method == "nf" else cb.fp4(W, group_size=gs)
    assert torch.equal(cb.dequantize_codebook_result(r), W)


def test_kmeans_represents_few_distinct_values_exactly():
    # Rows holding 2^bits distinct values, each equally often, are their own best table.
    N, K, bits = 6, 96, 3
    g = torch.Generator().manual_seed(3)
    levels = torch.randn(N, 8, generator=g).sort(dim=1).values
    idx = torch.arange(K) % 8
    W = levels[:, idx][:, torch.randperm(K, generator=g)]
    r = cb.kmeans(W, bits=bits, zero_level=False)
    assert torch.equal(cb.dequantize_codebook_result(r), W)
    torch.testing.assert_close(r.codebook, levels, atol=0, rtol=0)
    # With the zero level, rows whose values include 0 are still represented exactly.
    levels[:, 3] = 0
    W = levels[:, idx][:, torch.randperm(K, generator=g)]
    r = cb.kmeans(W, bits=bits)
    assert torch.equal(cb.dequantize_codebook_result(r), W)
    torch.testing.assert_close(r.codebook, levels.sort(dim=1).values, atol=0, rtol=0)


@settings(max_examples=40, deadline=None, database=None)
@given(N=st.integers(1, 6), K=st.integers(1, 70), bits=st.integers(1, 8), seed=st.integers(0, 2 ** 16),
       shared=st.booleans())
def test_nearest_codes_property(N, K, bits, seed, shared):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(1 if shared else N, 2 ** bits, generator=g)   # unsorted, any order
    x = torch.randn(N, K, generator=g) * 2
    q = cb.nearest_codes(x, table)
    t = table.expand(N, -1)
    d_ours = (x - t.gather(1, q)).abs()
    d_best = (x - t.gather(1, brute_nearest(x, t))).abs()
    assert torch.equal(d_ours, d_best)


# ---------------------------------------------------------------------------------------------------
# k-means and SqueezeLLM
# ---------------------------------------------------------------------------------------------------

def lloyd_step(X, w, table):
    """One Lloyd step written directly (masks per cluster): assignment, then weighted means."""
    q = brute_nearest(X, table)
    new = table.clone().double()
    for i in range(table.shape[1]):
        m = (q == i).double() * w
        n = m.sum(dim=1)
        new[:, i] = torch.where(n > 0, (m * X).sum(dim=1) / n.clamp(min=1e-300), new[:, i])
    return q, new


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("weighted", [False, True], ids=["kmeans", "squeezellm"])
@pytest.mark.parametrize("zero_level", [False, True], ids=["free", "zero"])
def test_kmeans_is_a_fixed_point(bits, weighted, zero_level):
    N, K = 16, 200
    W = weight(N, K, 4) * torch.linspace(0.2, 2.0, K)
    H = hessian(K, 4)
    r = (cb.squeezellm(W, H.diagonal(), bits=bits, zero_level=zero_level) if weighted
         else cb.kmeans(W, bits=bits, zero_level=zero_level))
    w = H.diagonal().double().expand(N, K) if weighted else torch.ones(N, K, dtype=torch.float64)
    q, new = lloyd_step(W.double(), w, r.codebook.double())
    assert torch.equal(q, r.q.long()), f"{(q != r.q.long()).sum().item()} weights not at their nearest entry"
    zero = r.codebook == 0
    # The zero level: exactly one exact 0 per row, held there (Lloyd for the table constrained to hold 0).
    assert zero.sum(dim=1).tolist() == [int(zero_level)] * N
    diff = (new - r.codebook.double())[~zero].abs().max().item()
    # Every other entry is the weighted mean of its cluster (to float32, the table's precision).
    assert diff <= 2e-7 * W.abs().max().item(), f"one Lloyd step moves an entry by {diff}"


def test_kmeans_deterministic_and_each_weighting_wins_its_own_objective():
    N, K = 32, 192
    W = weight(N, K, 5)
    H = hessian(K, 5)
    km, km2 = cb.kmeans(W, bits=3, zero_level=False), cb.kmeans(W, bits=3, zero_level=False)
    assert torch.equal(km.q, km2.q) and torch.equal(km.codebook, km2.codebook)   # seeded k-means++ starts
    sq = cb.squeezellm(W, H.diagonal(), bits=3)
    hd = H.diagonal()

    def err(r, w):
        return (w * (W - cb.dequantize_codebook_result(r)) ** 2).sum().item()
    # Several starts: both local optima, each best on the objective it was fitted to.
    assert err(km, 1.0) < err(sq, 1.0)
    assert err(sq, hd) < err(km, hd)
    # And on the layer-output error the sensitivity weighting targets (this data has outlier inputs).
    assert cb.weighted_error(W, cb.dequantize_codebook_result(sq), H) < \
        cb.weighted_error(W, cb.dequantize_codebook_result(km), H)


def test_kmeans_beats_uniform_grid_in_mse():
    # On Gaussian rows the k-means table (a Lloyd-Max quantizer for the row) beats the uniform grid.
    N, K = 32, 256
    W = weight(N, K, 6)
    for bits in (2, 3, 4):
        e_km = cb.weighted_error(W, cb.dequantize_codebook_result(cb.kmeans(W, bits=bits)))
        e_u = cb.weighted_error(W, dequantize_result(rtn(W, bits=bits, group_size=-1, symmetric=False)))
        assert e_km < e_u, f"{bits} bits: k-means {e_km:.4g} vs uniform {e_u:.4g}"


def fisher_like_rows(N, K, seed):
    """Heavy-tailed weight rows and per-weight sensitivities shaped like SqueezeLLM's Fisher on a real
    layer (an output factor x the input's E[x^2], with outlier inputs, x a log-normal per-weight spread)."""
    g = torch.Generator().manual_seed(seed)
    W = weight(N, K, seed) / torch.rand(N, K, generator=g).clamp(min=0.05).sqrt() * 0.05
    xsq = calibration(256, K, seed).square().mean(0)
    sens = torch.rand(N, 1, generator=g) * xsq * torch.exp(1.5 * torch.randn(N, K, generator=g))
    return W, sens


@pytest.mark.parametrize("bits", [3, 4])
def test_squeezellm_clusterer_at_least_as_good_as_the_references_sklearn_kmeans(bits):
    """SqueezeLLM's nuq.py clusters each row with sklearn's KMeans (k-means++, random_state=0,
    max_iter=50) under sample weights; ours must reach a weighted SSE no worse (within 2%)."""
    np = pytest.importorskip("numpy")
    KMeans = pytest.importorskip("sklearn.cluster", reason="scikit-learn is in the dev extra").KMeans
    W, sens = fisher_like_rows(24, 576, 40 + bits)

    def sse(table, q):
        return (sens.double() * (W.double() - table.double().gather(1, q.long())) ** 2).sum().item()
    from threadpoolctl import threadpool_limits   # sklearn's own dependency

    r = cb.squeezellm(W, sens, bits=bits)
    tables, codes = [], []
    with threadpool_limits(1):       # one row of 576 values: OpenMP threads only wait on a shared machine
        for i in range(W.shape[0]):
            km = KMeans(n_clusters=2 ** bits, random_state=0, n_init="auto", max_iter=50).fit(
                W[i].numpy().reshape(-1, 1), sample_weight=sens[i].numpy())
            tables.append(km.cluster_centers_.reshape(-1))
            codes.append(km.labels_.astype(np.int64))
    e_ours, e_ref = sse(r.codebook, r.q), sse(torch.tensor(np.array(tables)), torch.tensor(np.array(codes)))
    assert e_ours <= 1.02 * e_ref, f"weighted SSE ours / sklearn = {e_ours / e_ref:.3f}"


def test_kmeans_restarts_are_seeded_and_only_add_starts():
    W, sens = fisher_like_rows(16, 192, 45)

    def err(r):
        return (sens.double() * (W - cb.dequantize_codebook_result(r)).double() ** 2).sum(dim=1)
    a, b = cb.kmeans(W, bits=3, weights=sens), cb.kmeans(W, bits=3, weights=sens)
    assert torch.equal(a.codebook, b.codebook) and torch.equal(a.q, b.q)
    none = cb.kmeans(W, bits=3, weights=sens, restarts=0)
    # Each row keeps its best start, so adding k-means++ starts can only lower a row's error.
    assert bool((err(a) <= err(none) * (1 + 1e-6)).all())
    assert err(a).sum() < err(none).sum()


def test_squeezellm_leaves_zero_weights_out_of_the_fit():
    """nuq.py multiplies the sample weights by (w != 0): weights that are exactly 0 (pruned) do not
    pull a level to 0, so the levels serve the remaining weights."""
    N, K = 16, 192
    W, sens = fisher_like_rows(N, K, 46)
    W[:, ::3] = 0
    sens[:, ::3] *= 100              # sensitive, but zero: the mask removes them anyway
    keep = W != 0

    def err_kept(r):
        return (sens.double() * keep * (W - cb.dequantize_codebook_result(r)).double() ** 2).sum().item()
    masked = cb.squeezellm(W, sens, bits=3)
    unmasked = cb.kmeans(W, bits=3, weights=sens, zero_level=False)
    torch.testing.assert_close(masked.codebook, cb.kmeans(W, bits=3, weights=sens * keep, zero_level=False).codebook,
                               atol=0, rtol=0)
    assert err_kept(masked) < 0.9 * err_kept(unmasked), (err_kept(masked), err_kept(unmasked))


# ---------------------------------------------------------------------------------------------------
# Piecewise-linear grid
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, group_size, segments", [
    (2, -1, 4), (3, -1, 2), (3, 32, 4), (4, -1, 4), (4, 64, 3), (4, -1, 1)])
@pytest.mark.parametrize("weighted", [False, True], ids=["mse", "hdiag"])
@pytest.mark.parametrize("zero_level", [False, True], ids=["free", "zero"])
def test_piecewise_monotone_never_worse_than_uniform_start(bits, group_size, segments, weighted, zero_level):
    N, K = 24, 160
    W = weight(N, K, 7) / torch.randn(N, K, generator=torch.Generator().manual_seed(8)).abs().clamp(min=0.3).sqrt()
    W[:4] = W[:4].abs() + 0.1       # rows that never cross 0: the zero level is an end of their grid
    hd = hessian(K, 7).diagonal() if weighted else None
    kw = dict(bits=bits, group_size=group_size, segments=segments, weights=hd, zero_level=zero_level)
    r = cb.piecewise(W, **kw)
    start = cb.piecewise(W, iters=0, **kw)
    L = 2 ** bits
    assert bool((r.codebook.diff(dim=1) > 0).all()), "piecewise table must be strictly increasing"
    # The start is a uniform grid over each row's range (of W / s when grouped).
    steps0 = start.codebook.double().diff(dim=1)
    torch.testing.assert_close(steps0, steps0[:, :1].expand_as(steps0), atol=0, rtol=1e-5)
    X = W if group_size == -1 else W / r.scales.repeat_interleave(group_size, 1)[:, :K]
    if zero_level:
        # ... RTN's asymmetric grid of the row (of W / s), exact 0 included; the fit keeps the exact 0.
        assert (start.codebook == 0).sum(dim=1).tolist() == [1] * N
        assert (r.codebook == 0).sum(dim=1).tolist() == [1] * N
        u = rtn(X, bits=bits, group_size=-1, symmetric=False)
        rtn_levels = (torch.arange(L)[None, :] - u.zeros) * u.scales
        torch.testing.assert_close(start.codebook, rtn_levels, atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(start.codebook[:, 0], X.amin(dim=1), atol=0, rtol=0)
    # Per-segment steps: the L - 1 steps form (at most) `segments` runs of equal steps.
    S = min(segments, L - 1)
    sizes = [(L - 1) // S + (1 if j < (L - 1) % S else 0) for j in range(S)]
    for run in r.codebook.double().diff(dim=1).split(sizes, dim=1):
        torch.testing.assert_close(run, run[:, :1].expand_as(run), atol=1e-6, rtol=1e-4)
    # Never worse than the start, row by row, in the (weighted) squared error it minimises.
    w = torch.ones(K) if hd is None else hd
    def row_err(res):
        return (w * (W - cb.dequantize_codebook_result(res)) ** 2).double().sum(dim=1)
    e, e0 = row_err(r), row_err(start)
    excess = (e - e0).max().item()
    assert excess <= 1e-9 * e0.max().item(), f"a row got worse than the uniform start by {excess}"
    if S > 1:
        assert e.sum() < 0.97 * e0.sum(), f"the fit should improve on heavy-tailed rows: {e.sum():.4g} vs {e0.sum():.4g}"
    if zero_level and group_size == -1:
        # so per channel it is never worse than RTN-asym, row by row
        e_rtn = (w * (W - dequantize_result(rtn(W, bits=bits, group_size=-1, symmetric=False))) ** 2).double().sum(dim=1)
        assert (e - e_rtn).max().item() <= 1e-6 * e_rtn.max().item()


# ---------------------------------------------------------------------------------------------------
# The zero level (issue 23): a massive-activation input column whose weights are tiny
# ---------------------------------------------------------------------------------------------------

def massive_activation_layer():
    """A layer shaped like the default model's: row RMS 0.17, and one input column whose weights are
    tiny (|w| ~ 0.01) but whose activation is huge on a few "sink" tokens (E[x^2] ~10^5 x the median
    column's; the default model has 4,863x to 7*10^5x, issue 23)."""
    N, K, c = 96, 256, 37
    W = weight(N, K, 30) * 0.17
    W[:, c] = weight(N, 1, 31)[:, 0] * 0.014
    X = calibration(512, K, 30)
    X[:8, c] = 1e4
    return W, X


@pytest.mark.parametrize("method", ["kmeans", "piecewise"])
@pytest.mark.parametrize("group_size", [128, -1])
def test_zero_level_keeps_tiny_weights_of_massive_activation_inputs(method, group_size):
    W, X = massive_activation_layer()
    fit = getattr(cb, method)

    def out_err(W_hat):
        return ((W - W_hat) @ X.T).square().sum().item()
    e_zero = out_err(cb.dequantize_codebook_result(fit(W, bits=3, group_size=group_size)))
    e_free = out_err(cb.dequantize_codebook_result(fit(W, bits=3, group_size=group_size, zero_level=False)))
    e_rtn = out_err(dequantize_result(rtn(W, bits=3, group_size=group_size, symmetric=False)))
    # Without 0 in the table the tiny weights become +-(smallest level), several times their own
    # size, and the sink tokens multiply that; with it (the default) the table beats RTN's grid.
    assert e_zero < e_rtn, f"{method}: output error {e_zero:.4g} vs RTN {e_rtn:.4g}"
    assert e_free > 2 * e_zero, f"{method}: without zero level {e_free:.4g}, with {e_zero:.4g}"


# ---------------------------------------------------------------------------------------------------
# GPTQ over a codebook
# ---------------------------------------------------------------------------------------------------

GPTQ_CASES = [
    pytest.param(m, bits, gs, ao, id=f"{m}-{bits}b-g{gs}{'-actorder' if ao else ''}")
    for m, bits, gs, ao in [
        ("nf", 4, 32, False), ("nf", 3, -1, True), ("nf", 2, 64, False), ("fp4", 4, 32, True),
        ("kmeans", 3, -1, False), ("squeezellm", 3, -1, False), ("squeezellm", 2, -1, True),
        ("squeezellm", 4, 64, False), ("piecewise", 3, -1, False), ("piecewise", 4, 32, True)]
]


@pytest.mark.parametrize("method, bits, group_size, act_order", GPTQ_CASES)
def test_gptq_codebook_never_worse_than_nearest(method, bits, group_size, act_order):
    N, K = 32, 192
    W, H = weight(N, K, 9), hessian(K, 9)
    r = METHODS[method](W, H, bits, group_size)
    g = cb.gptq_codebook(W, H, r.codebook, r.scales, group_size=group_size, act_order=act_order)
    assert torch.equal(g.codebook, r.codebook) and (g.scales is None) == (r.scales is None)
    assert g.q.shape == (N, K) and g.q.dtype == torch.uint8
    e_g = cb.weighted_error(W, cb.dequantize_codebook_result(g), H)
    e_n = cb.weighted_error(W, cb.dequantize_codebook_result(r), H)
    # GPTQ greedily minimises tr((W - Q) H (W - Q)^T) on the same grid that nearest rounding uses.
    assert e_g < e_n, f"GPTQ-over-codebook {e_g:.4g} vs nearest {e_n:.4g} (ratio {e_g / e_n:.3f})"


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "actorder"])
def test_gptq_codebook_with_diagonal_hessian_is_nearest_rounding(act_order):
    N, K = 20, 96
    W = weight(N, K, 10)
    H = torch.diag(torch.linspace(0.5, 2.0, K))
    for r in (cb.nf(W, bits=3, group_size=32), cb.kmeans(W, bits=3)):
        g = cb.gptq_codebook(W, H, r.codebook, r.scales, group_size=r.group_size, act_order=act_order)
        assert torch.equal(g.q, r.q), f"{(g.q != r.q).sum().item()} codes differ from nearest rounding"


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "actorder"])
def test_gptq_codebook_on_the_uniform_grid_is_gptq(act_order):
    """The symmetric per-channel uniform grid written as a codebook, ``(q - 2^(b-1)) * s``, gives
    quant.gptq's codes: the two implementations share only the Hessian helpers."""
    N, K, bits = 24, 128, 3
    W, H = weight(N, K, 11), hessian(K, 11)
    ref = gptq(W, H, bits=bits, group_size=-1, symmetric=True, act_order=act_order)
    table = (torch.arange(2 ** bits) - 2 ** (bits - 1)).float()[None, :]
    g = cb.gptq_codebook(W, H, table, ref.scales, group_size=-1, act_order=act_order)
    frac = (g.q != ref.q).float().mean().item()
    # Only a code sitting exactly on a rounding boundary may flip (ties: round-half-even vs lower).
    assert frac <= 1e-3, f"{frac:.2%} of codes differ from quant.gptq"


def test_gptq_codebook_dead_inputs_and_blocks():
    N, K = 16, 96
    W, X = weight(N, K, 12), calibration(256, K, 12)
    X[:, [0, 7, 50]] = 0
    H = X.T @ X / X.shape[0]
    r = cb.nf(W, bits=4, group_size=32)
    ref = cb.gptq_codebook(W, H, r.codebook, r.scales, group_size=32, block_size=1)
    for bs in (20, 128):
        g = cb.gptq_codebook(W, H, r.codebook, r.scales, group_size=32, block_size=bs)
        frac = (g.q != ref.q).float().mean().item()
        assert frac <= 2e-3, f"block_size={bs}: {frac:.2%} of codes differ from column-by-column"
    W_hat = cb.dequantize_codebook_result(ref)
    assert torch.equal(W_hat[:, [0, 7, 50]], torch.zeros(N, 3))   # NF tables hold an exact 0


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

def test_bad_arguments():
    W = weight(8, 96, 13)
    with pytest.raises(ValueError, match="bits"):
        cb.nf_table(1)
    with pytest.raises(ValueError, match="bits"):
        cb.nf(W, bits=9, group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        cb.fp4(W, group_size=24)
    with pytest.raises(ValueError, match="bits"):
        cb.kmeans(W, bits=0)
    with pytest.raises(ValueError, match="iters"):
        cb.kmeans(W, bits=2, iters=0)
    with pytest.raises(ValueError, match="weights must be"):
        cb.kmeans(W, bits=2, weights=torch.ones(95))
    with pytest.raises(ValueError, match="restarts must be"):
        cb.kmeans(W, bits=2, restarts=-1)
    with pytest.raises(ValueError, match="zero_level must be"):
        cb.kmeans(W, bits=2, zero_level=1)
    with pytest.raises(ValueError, match="zero_level must be"):
        cb.piecewise(W, bits=2, zero_level="yes")
    with pytest.raises(ValueError, match="sensitivity must be a \\(96,\\) per-input .* or \\(8, 96\\) per-weight"):
        cb.squeezellm(W, torch.ones(7, 96), bits=2)
    with pytest.raises(ValueError, match="no calibration input or gradient"):
        cb.squeezellm(W, torch.zeros(8, 96), bits=2)
    with pytest.raises(ValueError, match="segments"):
        cb.piecewise(W, bits=3, segments=0)
    r = cb.nf(W, bits=3, group_size=32)
    with pytest.raises(ValueError, match="codebook must be a \\(1, L\\) or \\(8, L\\)"):
        cb.gptq_codebook(W, torch.eye(96), torch.zeros(3, 8), r.scales, group_size=32)
    with pytest.raises(ValueError, match="2\\^bits entries"):
        cb.gptq_codebook(W, torch.eye(96), torch.zeros(1, 6), r.scales, group_size=32)
    with pytest.raises(ValueError, match="scales must be None or a \\(8, 3\\)"):
        cb.gptq_codebook(W, torch.eye(96), r.codebook, r.scales[:, :2], group_size=32)
    with pytest.raises(ValueError, match="H must be a \\(96, 96\\)"):
        cb.gptq_codebook(W, torch.eye(95), r.codebook, r.scales, group_size=32)


def test_round_to_codebook_reproduces_each_method_and_rounds_to_a_changed_table():
    N, K = 12, 96
    W, H = weight(N, K, 14), hessian(K, 14)
    for r in (cb.nf(W, bits=3, group_size=32), cb.squeezellm(W, H.diagonal(), bits=3),
              cb.piecewise(W, bits=2, group_size=64)):
        again = cb.round_to_codebook(W, r.codebook, r.scales, group_size=r.group_size)
        assert torch.equal(again.q, r.q) and again.bits == r.bits
        # A table rounded to float16 (what a deployment stores): codes are nearest on the new table.
        t16 = r.codebook.half().float()
        s16 = None if r.scales is None else r.scales.half().float()
        h = cb.round_to_codebook(W, t16, s16, group_size=r.group_size)
        x = W if s16 is None else W / s16.repeat_interleave(r.group_size, 1)[:, :K]
        tab = t16.expand(N, -1)
        d = (x - tab.gather(1, h.q.long())).abs()
        assert torch.equal(d, (x - tab.gather(1, brute_nearest(x, tab))).abs())
