"""Magnitude, Wanda and SparseGPT (experiments/methods/algorithms/prune.py): exact patterns, error vs magnitude."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.methods.algorithms import Pattern, magnitude, parse_pattern, sparsegpt, wanda
from alg_data import calibration, weight, output_error


def run(method, W, X, **kw):
    H = X.T @ X / X.shape[0]
    if method == "magnitude":
        return magnitude(W, **kw)
    if method == "wanda":
        return wanda(W, (X ** 2).sum(0), **kw)
    return sparsegpt(W, H, **kw)


METHODS = ["magnitude", "wanda", "sparsegpt"]
N, K = 48, 160


@pytest.mark.parametrize("text, expected", [
    ("unstructured", Pattern("unstructured")), ("2:4", Pattern("nm", n=2, m=4)),
    (" 4:8 ", Pattern("nm", n=4, m=8)), ("block:32x16", Pattern("block", bn=32, bk=16)),
], ids=["unstructured", "2of4", "4of8", "block"])
def test_parse_pattern(text, expected):
    p = parse_pattern(text)
    assert p == expected and parse_pattern(str(p)) == p


@pytest.mark.parametrize("text", ["", "dense", "4:2", "0:4", "2:2", "block:0x8", "block:8", "2-4"])
def test_parse_pattern_rejects(text):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(text)


def _check_common(W, W_p, mask):
    assert W_p.shape == W.shape and mask.shape == W.shape and mask.dtype == torch.bool
    nonzero = (W_p[~mask] != 0).sum().item()
    assert nonzero == 0, f"{nonzero} pruned weights are not exactly zero"
    assert torch.isfinite(W_p).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4"])
def test_nm_counts_exact(method, nm):
    W, X = weight(N, K, 1), calibration(512, K, 1)
    W_p, mask = run(method, W, X, sparsity=None, pattern=nm)
    _check_common(W, W_p, mask)
    n, m = map(int, nm.split(":"))
    counts = mask.reshape(N, K // m, m).sum(-1)
    assert bool((counts == n).all()), f"groups keep {counts.unique().tolist()} weights, expected exactly {n}"


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.0, 0.9])
def test_unstructured_exact_per_row(method, sparsity):
    W, X = weight(N, K, 2), calibration(512, K, 2)
    W_p, mask = run(method, W, X, sparsity=sparsity, pattern="unstructured")
    _check_common(W, W_p, mask)
    assert torch.equal(W_p[mask], W[mask]), "kept weights must be unchanged"
    pruned = (~mask).sum(1)
    expected = int(sparsity * K + 1e-9)
    assert bool((pruned == expected).all()), f"rows prune {pruned.unique().tolist()}, expected {expected}"


def test_magnitude_layer_scope_and_order():
    W = weight(N, K, 3)
    W_p, mask = magnitude(W, sparsity=0.5, pattern="unstructured", scope="layer")
    assert (~mask).sum().item() == N * K // 2
    assert W.abs()[~mask].max() <= W.abs()[mask].min()
    _, mask_row = magnitude(W, sparsity=0.5, pattern="unstructured")
    for r in range(N):
        assert W[r].abs()[~mask_row[r]].max() <= W[r].abs()[mask_row[r]].min(), f"row {r}"


def test_wanda_metric_and_uniform_norms_equal_magnitude():
    W, X = weight(N, K, 4), calibration(512, K, 4)
    act = (X ** 2).sum(0)
    _, mask = wanda(W, act, sparsity=0.5, pattern="unstructured")
    score = W.abs() * act.sqrt()
    for r in range(N):
        assert score[r][~mask[r]].max() <= score[r][mask[r]].min(), f"row {r} prunes a higher score"
    for pattern in ("unstructured", "2:4", "block:8x16"):
        _, m_w = wanda(W, torch.full((K,), 3.0), sparsity=0.5, pattern=pattern)
        _, m_m = magnitude(W, sparsity=0.5, pattern=pattern)
        assert torch.equal(m_w, m_m), f"{pattern}: uniform activations must reproduce magnitude"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("block", ["8x16", "16x32"])
def test_block_structure_exact(method, block):
    W, X = weight(N, K, 5), calibration(512, K, 5)
    bn, bk = map(int, block.split("x"))
    W_p, mask = run(method, W, X, sparsity=0.5, pattern=f"block:{block}")
    _check_common(W, W_p, mask)
    tiles = mask.reshape(N // bn, bn, K // bk, bk).permute(0, 2, 1, 3).reshape(N // bn, K // bk, -1)
    assert bool((tiles.all(-1) | ~tiles.any(-1)).all()), "a block is partly pruned"
    kept_blocks = tiles.all(-1)
    if method == "sparsegpt":
        # Selected per column block (128 columns rounded down to a multiple of BK).
        width = 128 // bk
        for c0 in range(0, K // bk, width):
            nb = kept_blocks[:, c0:c0 + width].numel()
            assert (~kept_blocks[:, c0:c0 + width]).sum().item() == int(0.5 * nb)
    else:
        assert (~kept_blocks).sum().item() == int(0.5 * kept_blocks.numel())


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_unstructured_exact_per_column_block(sparsity):
    W, X = weight(N, K, 6), calibration(512, K, 6)
    W_p, mask = sparsegpt(W, X.T @ X / X.shape[0], sparsity=sparsity, pattern="unstructured", block_size=64)
    _check_common(W, W_p, mask)
    for c0 in range(0, K, 64):
        blk = mask[:, c0:c0 + 64]
        assert (~blk).sum().item() == int(sparsity * blk.numel() + 1e-9), f"column block at {c0}"


def test_sparsegpt_reduces_to_magnitude_without_correlation():
    # With H = I there is nothing to compensate: N:M masks are magnitude masks and kept weights are
    # unchanged; with sparsity 0 nothing moves at all.
    W = weight(N, K, 7)
    W_p, mask = sparsegpt(W, torch.eye(K), sparsity=None, pattern="2:4")
    W_m, mask_m = magnitude(W, sparsity=None, pattern="2:4")
    assert torch.equal(mask, mask_m)
    torch.testing.assert_close(W_p, W_m, atol=0, rtol=0)
    W_p, mask = sparsegpt(W, torch.eye(K), sparsity=0.0, pattern="unstructured")
    assert bool(mask.all()) and torch.equal(W_p, W)


def test_sparsegpt_dead_inputs():
    W, X = weight(N, K, 8), calibration(512, K, 8)
    X[:, [0, 77, 159]] = 0
    W_p, mask = sparsegpt(W, X.T @ X / X.shape[0], sparsity=0.5, pattern="unstructured")
    _check_common(W, W_p, mask)
    assert not bool(mask[:, [0, 77, 159]].any()), "weights of dead inputs are free and pruned first"


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("2:4", None), ("4:8", None),
                                               ("block:8x16", 0.5)],
                         ids=["unstructured50", "2of4", "4of8", "block8x16"])
def test_wanda_and_sparsegpt_beat_magnitude(pattern, sparsity):
    W, X = weight(N, K, 9), calibration(768, K, 9)
    errs = {m: output_error(W, run(m, W, X, sparsity=sparsity, pattern=pattern)[0], X) for m in METHODS}
    assert errs["wanda"] < errs["magnitude"], errs
    assert errs["sparsegpt"] < errs["magnitude"], errs


@pytest.mark.parametrize("kwargs, match", [
    pytest.param(dict(sparsity=1.0), "sparsity", id="sparsity-1"),
    pytest.param(dict(sparsity=-0.1), "sparsity", id="sparsity-neg"),
    pytest.param(dict(sparsity=None), "sparsity", id="sparsity-none"),
    pytest.param(dict(pattern="2:4", sparsity=0.7), "sparsity=0.7 contradicts", id="nm-contradiction"),
    pytest.param(dict(pattern="2:3", sparsity=None), "m=3 does not divide K=160", id="nm-misfit"),
    pytest.param(dict(pattern="block:7x16"), "block rows that fit", id="block-misfit"),
    pytest.param(dict(pattern="3:4:5"), "pattern", id="bad-pattern"),
])
def test_bad_prune_arguments(kwargs, match):
    W, X = weight(N, K, 10), calibration(64, K, 10)
    args = dict(sparsity=0.5, pattern="unstructured") | kwargs
    for method in METHODS:
        with pytest.raises(ValueError, match=match):
            run(method, W, X, **args)


def test_bad_statistics():
    W = weight(N, K, 11)
    with pytest.raises(ValueError, match="act_sq_norm must be a \\(160,\\)"):
        wanda(W, torch.ones(K + 1), sparsity=0.5, pattern="unstructured")
    with pytest.raises(ValueError, match="act_sq_norm must be finite and non-negative"):
        wanda(W, -torch.ones(K), sparsity=0.5, pattern="unstructured")
    with pytest.raises(ValueError, match="H must be"):
        sparsegpt(W, torch.eye(K - 1), sparsity=0.5, pattern="unstructured")
    with pytest.raises(ValueError, match="scope"):
        magnitude(W, sparsity=0.5, pattern="unstructured", scope="column")


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("2:4", None), ("block:8x16", 0.5)],
                         ids=["unstructured50", "2of4", "block8x16"])
def test_sparsegpt_update_compensates(pattern, sparsity):
    # The OBS update must do better than zeroing the same weights and leaving the rest alone.
    W, X = weight(N, K, 12), calibration(512, K, 12)
    W_s, mask = sparsegpt(W, X.T @ X / X.shape[0], sparsity=sparsity, pattern=pattern)
    e_update = output_error(W, W_s, X)
    e_zeroed = output_error(W, torch.where(mask, W, torch.zeros(())), X)
    assert e_update < 0.9 * e_zeroed, f"with updates {e_update:.4g}, same mask without {e_zeroed:.4g}"


@settings(max_examples=30, deadline=None, database=None)
@given(n_rows=st.integers(1, 12), groups=st.integers(1, 9), nm=st.sampled_from([(1, 2), (2, 4), (3, 8), (4, 8)]),
       sparsity=st.floats(0, 0.95), seed=st.integers(0, 2 ** 16))
def test_masks_exact_property(n_rows, groups, nm, sparsity, seed):
    n, m = nm
    K = groups * m
    W = weight(n_rows, K, seed)
    W[:, ::3] = 0.0  # ties at zero must not change the counts
    _, mask = magnitude(W, sparsity=None, pattern=f"{n}:{m}")
    assert bool((mask.reshape(n_rows, groups, m).sum(-1) == n).all())
    _, mask = wanda(W, torch.rand(K, generator=torch.Generator().manual_seed(seed)), sparsity=sparsity,
                    pattern="unstructured")
    assert bool(((~mask).sum(1) == int(sparsity * K + 1e-9)).all())
