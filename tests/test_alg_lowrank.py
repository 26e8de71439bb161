"""Plain and whitened (SVD-LLM) truncated SVD and rank selection (experiments/algorithms/lowrank.py)."""
import pytest
import torch

from experiments.algorithms import rank_for_energy, rank_for_ratio, svd, whitened_svd
from alg_data import calibration, weight


def rel(a, b) -> str:
    d = (a - b).abs().max().item()
    return f"max-abs {d:.3g}, relative {d / b.abs().max().item():.3g}"


@pytest.mark.parametrize("N, K, ratio, expected", [
    (576, 1536, 0.5, 209), (576, 576, 1.0, 288), (100, 37, 0.25, 6), (64, 64, 0.001, 1), (10, 10, 0.4, 2)],
    ids=["smollm-mlp", "square-full", "odd", "floor-to-1", "exact-integer"])
def test_rank_for_ratio(N, K, ratio, expected):
    r = rank_for_ratio(N, K, ratio)
    assert r == expected
    if r > 1:
        assert r * (N + K) <= ratio * N * K < (r + 1) * (N + K)


def test_rank_for_energy():
    sv = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(sv, 9 / 14 - 1e-6) == 1
    assert rank_for_energy(sv, 0.65) == 2
    assert rank_for_energy(sv, 13 / 14 + 1e-6) == 3
    assert rank_for_energy(sv, 1.0) == 3
    W = weight(30, 20, 1)
    s = torch.linalg.svdvals(W.double())
    for e in (0.5, 0.9, 0.99):
        r = rank_for_energy(W, e)
        kept = (s[:r] ** 2).sum() / (s ** 2).sum()
        short = (s[:r - 1] ** 2).sum() / (s ** 2).sum()
        assert kept >= e > short, f"energy {e}: rank {r} keeps {kept:.4f}, rank {r - 1} keeps {short:.4f}"


@pytest.mark.parametrize("N, K", [(37, 100), (100, 37), (64, 64)], ids=["wide", "tall", "square"])
def test_svd_shapes_and_eckart_young(N, K):
    W = weight(N, K, 2)
    s = torch.linalg.svdvals(W.double())
    for rank in (1, 7, min(N, K)):
        U, V = svd(W, rank=rank)
        assert U.shape == (N, rank) and V.shape == (rank, K) and U.dtype == V.dtype == torch.float32
        err = (W - U @ V).double().norm()
        best = s[rank:].norm()
        assert abs(err - best) <= 1e-4 * s[0], f"rank {rank}: error {err:.6g}, optimum {best:.6g}"


@pytest.mark.parametrize("rank", [4, 16, 40])
def test_whitened_svd_beats_plain_on_outputs(rank):
    N, K = 48, 96
    W, X = weight(N, K, 3), calibration(512, K, 3)
    H = X.T @ X / X.shape[0]
    U, V = svd(W, rank=rank)
    Uw, Vw = whitened_svd(W, H, rank=rank)
    assert Uw.shape == (N, rank) and Vw.shape == (rank, K)
    e_plain = ((W - U @ V) @ X.T).norm().item()
    e_white = ((W - Uw @ Vw) @ X.T).norm().item()
    assert e_white < e_plain, f"rank {rank}: whitened {e_white:.4g} vs plain {e_plain:.4g}"


def test_whitened_svd_identities():
    N, K = 30, 50
    W, X = weight(N, K, 4), calibration(256, K, 4)
    H = X.T @ X / X.shape[0]
    Uw, Vw = whitened_svd(W, H, rank=min(N, K))
    torch.testing.assert_close(Uw @ Vw, W, atol=1e-4, rtol=1e-4, msg=lambda m: f"full rank: {rel(Uw @ Vw, W)}")
    # Isotropic inputs: whitening is a scalar and the result is the plain truncated SVD.
    Uw, Vw = whitened_svd(W, 3.0 * torch.eye(K), rank=9)
    U, V = svd(W, rank=9)
    torch.testing.assert_close(Uw @ Vw, U @ V, atol=1e-5, rtol=1e-4,
                               msg=lambda m: f"isotropic H: {rel(Uw @ Vw, U @ V)}")


def test_whitened_svd_dead_inputs():
    N, K = 24, 40
    W, X = weight(N, K, 5), calibration(256, K, 5)
    X[:, [3, 17]] = 0
    Uw, Vw = whitened_svd(W, X.T @ X / X.shape[0], rank=8)
    assert torch.isfinite(Uw).all() and torch.isfinite(Vw).all()


def test_bad_lowrank_arguments():
    W = weight(20, 30, 6)
    for rank, match in ((0, "rank=0"), (21, "rank=21 does not fit a \\(20, 30\\).*<= 20")):
        with pytest.raises(ValueError, match=match):
            svd(W, rank=rank)
        with pytest.raises(ValueError, match=match):
            whitened_svd(W, torch.eye(30), rank=rank)
    with pytest.raises(TypeError, match="rank"):
        svd(W, rank=2.5)
    with pytest.raises(ValueError, match="H must be"):
        whitened_svd(W, torch.eye(29), rank=2)
    with pytest.raises(ValueError, match="no calibration input"):
        whitened_svd(W, torch.zeros(30, 30), rank=2)
    for ratio in (0, 1.5, -0.2):
        with pytest.raises(ValueError, match="ratio"):
            rank_for_ratio(20, 30, ratio)
    with pytest.raises(ValueError, match="N must be"):
        rank_for_ratio(0, 30, 0.5)
    for energy in (0, 1.01):
        with pytest.raises(ValueError, match="energy"):
            rank_for_energy(W, energy)
