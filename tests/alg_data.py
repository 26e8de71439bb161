"""Synthetic calibration data shared by the algorithm tests (built inside tests, never at import time)."""
import torch


def calibration(n: int, K: int, seed: int) -> torch.Tensor:
    """Correlated, heavy-tailed inputs with a few outlier features, like LLM activations.

    A shared low-rank factor correlates the features; Student-t-like rows (Gaussian over a random
    scale) make the tails heavy; five features are 20x larger (the outlier channels GPTQ, Wanda and
    SparseGPT exploit).
    """
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5
    shared = torch.randn(n, 8, generator=g) @ torch.randn(8, K, generator=g)
    heavy = torch.randn(n, 1, generator=g).abs().clamp(min=0.3)
    X = (torch.randn(n, K, generator=g) @ mix + 0.5 * shared) / heavy
    X[:, torch.randperm(K, generator=g)[:5]] *= 20
    return X


def weight(N: int, K: int, seed: int) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


def output_error(W, W_hat, X) -> float:
    return ((W - W_hat) @ X.T).norm().item()
