"""Low-rank factorization: ``svd`` and activation-aware ``whitened_svd`` (SVD-LLM) onto LowRankLinear.

    {"method": "svd" | "whitened_svd", "ratio": 0.6}      # or "rank": 64, or "energy": 0.9

``ratio`` is the fraction of the layer's parameters kept, ``rank`` a fixed rank, ``energy`` the
fraction of the squared singular values kept. ``damp`` (whitened_svd) is added to H as
``damp * mean(diag H)``; its default is :data:`DEFAULT_WHITENING_DAMP` (chosen from measurements,
see there); labels name it when it is not 0.01 (``whitened_svd-ratio0.8-damp0.001``), so the labels
of rows computed with the former default 0.01 keep their meaning.
"""
from __future__ import annotations

from typing import Any, Mapping

from experiments.methods.families.base import damp_suffix, fp16_exact, is_int, is_number, parse_damp, stored_bytes
from experiments.methods.spec import Family, LayerResult, fail, register, register_format

# Whitened SVD: SVD-LLM whitens without damping; a little keeps S invertible (dead or collinear
# inputs). Chosen from `python -m experiments.measure.damping` (results/damping_whitened_svd.csv): 49 real
# layers of the default model (blocks 0, 5, ..., 29), ratios 0.9/0.7/0.5, errors relative to undamped
# whitening on held-out text (Emma): damp 1e-3 was never worse (147/147 cases, geometric mean 0.999)
# and cost at most +4.9% on the calibration statistics; the former default 0.01 was worse in 12/147
# held-out cases, up to +25% (+75% on calibration; worst: block 0 o_proj). Undamped (0) fails where H
# is singular. tests/test_alg_lowrank.py checks the ordering on a synthetic anisotropic layer.
DEFAULT_WHITENING_DAMP = 1e-3
_SIZES = ("ratio", "rank", "energy")


class LowRankFamily(Family):
    name = "lowrank"
    methods = {"svd": frozenset(_SIZES), "whitened_svd": frozenset(_SIZES) | {"damp"}}
    columns = ("damp", "ratio", "rank", "energy")

    def parse(self, method: str, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
        given = [k for k in _SIZES if spec.get(k) is not None]
        if len(given) != 1:
            fail(where, f"give exactly one of ratio (kept parameters / N*K), rank or energy; got {given or 'none'}")
        k = given[0]
        v = spec[k]
        if k == "rank":
            if not is_int(v) or v < 1:
                fail(where, f"rank={v!r} must be a positive integer")
        elif k == "ratio":
            if not is_number(v) or not 0 < v < 1:
                fail(where, f"ratio={v!r} must be in (0, 1): it is the fraction of the layer's parameters kept, "
                            f"and ratio >= 1 saves nothing")
            v = float(v)
        else:
            if not is_number(v) or not 0 < v <= 1:
                fail(where, f"energy={v!r} must be in (0, 1]")
            v = float(v)
        kw: dict[str, Any] = {k: v}
        if method == "whitened_svd":
            kw.update(damp=parse_damp(spec, where, DEFAULT_WHITENING_DAMP))
        return kw

    def label(self, spec) -> str:
        k = next(k for k in _SIZES if getattr(spec, k) is not None)
        return f"{spec.method}-{k}{getattr(spec, k):g}{damp_suffix(spec)}"

    def needs(self, spec) -> set[str]:
        return {"H"} if spec.method == "whitened_svd" else set()

    def check_fits(self, spec, shapes) -> None:
        if spec.rank is None:
            return
        worst = min(shapes.items(), key=lambda kv: min(kv[1]))
        limit = min(worst[1])
        if spec.rank > limit:
            fail("rank", f"rank={spec.rank} is larger than min(out_features, in_features)={limit} of layer "
                         f"{worst[0]} {worst[1]}; use rank <= {limit} (or a ratio < 1)")
        # A factorization that stores more than the dense matrix is never what a sweep means.
        waste = [(name, nk) for name, nk in shapes.items() if spec.rank * (nk[0] + nk[1]) >= nk[0] * nk[1]]
        if waste:
            name, (n, k) = waste[0]
            fail("rank", f"rank={spec.rank} stores at least as many parameters as the dense layer {name} ({n}x{k}); "
                         f"use rank < {n * k // (n + k)} for it, or a ratio in (0, 1)")

    def compress_layer(self, spec, w, bias, stats) -> LayerResult:
        from experiments.methods.algorithms import lowrank
        from triton_kernels.nn.lowrank import LowRankLinear
        n, k = w.shape
        if spec.rank is not None:
            rank = spec.rank
        elif spec.ratio is not None:
            rank = lowrank.rank_for_ratio(n, k, spec.ratio)
        else:
            rank = lowrank.rank_for_energy(w, spec.energy)
        if spec.method == "svd":
            u, v = lowrank.svd(w, rank=rank)
        else:
            u, v = lowrank.whitened_svd(w, stats.hessian(), rank=rank, damp=spec.damp)
        u, v = fp16_exact(u).contiguous(), fp16_exact(v).contiguous()
        mod = LowRankLinear(u, v, bias)
        return LayerResult(mod, (u.double() @ v.double()).float(), stored_bytes(mod), rank=rank)

    def method_columns(self, spec) -> dict[str, Any]:
        return {"ratio": "" if spec.ratio is None else spec.ratio, "rank": "" if spec.rank is None else spec.rank,
                "energy": "" if spec.energy is None else spec.energy, "damp": "" if spec.damp is None else spec.damp}

    def storage_format(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``LowRankLinear`` with a fixed ``rank`` or a parameter ``ratio`` (the rank then depends on the
        shape: :func:`rank_for`). An ``energy`` spec has no format without the real weights' spectrum."""
        if "rank" in spec or "ratio" in spec:
            return {"kind": "lowrank", **({"rank": int(spec["rank"])} if "rank" in spec else
                                          {"ratio": float(spec["ratio"])})}
        raise ValueError(f"spec={dict(spec)} keeps a fraction of spectral energy: its rank depends on the real "
                         "weights' spectrum, so random weights cannot reproduce its format; give rank= or ratio=")


FAMILY = register(LowRankFamily())


def rank_for(N: int, K: int, fmt: Mapping[str, Any]) -> int:
    """Rank of a low-rank format at shape ``[N, K]``: ``rank`` capped by the shape, or for ``ratio`` (the
    fraction of the dense parameter count kept, ``r*(N+K) = ratio*N*K``) the algorithms' own
    ``rank_for_ratio``."""
    if "rank" in fmt:
        return max(1, min(int(fmt["rank"]), N, K))
    from experiments.methods.algorithms.lowrank import rank_for_ratio
    return int(rank_for_ratio(N, K, fmt["ratio"]))


def _build(N, K, *, dtype, device, backend, seed, tune_m, rank=None, ratio=None):
    """Random ``[N, r]`` and ``[r, K]`` factors (no SVD: its cost at 11008x4096 buys nothing for timing)."""
    import math

    import torch
    from triton_kernels.nn.lowrank import LowRankLinear
    g = torch.Generator().manual_seed(seed)
    r = rank_for(N, K, {"rank": rank} if rank is not None else {"ratio": ratio})
    U = (torch.randn(N, r, generator=g) / math.sqrt(r)).to(device=device, dtype=dtype)
    V = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(device=device, dtype=dtype)
    return LowRankLinear(U, V, backend=backend)


register_format("lowrank", _build)
