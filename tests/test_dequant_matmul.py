"""Tests for triton_kernels/dequant_matmul.py (interpreter on CPU; conftest sets TRITON_INTERPRET=1).

The grid is a covering design, not a Cartesian product: every bit width 1..8 meets every group size
(16..256, -1, always with a partial last group), both grids (sym/asym, integer and float zeros),
all three activation and parameter dtypes, M in {1, 3, 17, 64} (both kernel paths, both decode
variants), with and without bias, x always sliced out of a wider buffer at an offset.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_kernels.dequant_matmul import (dequant_matmul, dequant_matmul_reference, dequantize, pack,
                                           quantize_rtn, unpack)
from tests import matmul_checks
from tests.matmul_checks import sliced  # noqa: F401  (used by the tests below)

ACT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Bounds relative to sum_k |x_mk| |w_nk| (+ |bias_n|), the scale of a dot product's rounding error:
# w rounded to the activation dtype for tl.dot (u), the output rounded to it (u), fp32 accumulation
# over K <= 300 terms (K * 2^-24 <= 1.8e-5). u = 2^-11 (fp16), 2^-8 (bf16), 0 for fp32 inputs.
MAX_TEST_K = 300
TOL = {  # dtype: (atol, rtol)
    torch.float32: (1e-6, 2 * 2**-24 + MAX_TEST_K * 2**-24),
    torch.float16: (1e-6, 2 * 2**-11 + MAX_TEST_K * 2**-24),
    torch.bfloat16: (1e-6, 2 * 2**-8 + MAX_TEST_K * 2**-24),
}
GROUP_K = {16: 75, 32: 100, 64: 150, 128: 200, 256: 300, -1: 77}  # every K leaves a partial group
DNAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def make_weight(N, K, bits, group_size, symmetric, param_dtype=torch.float16, float_zeros=False):
    """Random codes, scales sized so |w| <~ 1, zeros integer-valued or arbitrary floats."""
    q = torch.randint(0, 2**bits, (N, K), dtype=torch.int32)
    G = 1 if group_size == -1 else math.ceil(K / group_size)
    scales = ((torch.rand(N, G) + 0.5) * (2.0 / 2**bits)).to(param_dtype)
    if symmetric:
        zeros = None
    elif float_zeros:
        zeros = (torch.rand(N, G) * (2**bits - 1)).to(param_dtype)
    else:
        zeros = torch.randint(0, 2**bits, (N, G)).to(param_dtype)
    return q, pack(q, bits), scales, zeros


def assert_matmul_close(y, ref, x, w, bias, dtype):
    matmul_checks.assert_matmul_close(y, ref, x, w, bias, *TOL[dtype])


def _grid():
    group_sizes = [16, 32, 64, 128, 256, -1]
    Ms = [1, 3, 17, 64]
    Ns = [45, 19, 33, 50]
    cases = []
    for bits in range(1, 9):
        for j, gs in enumerate(group_sizes):
            i = bits + j
            act = ACT_DTYPES[i % 3]
            param = ACT_DTYPES[(bits + 2 * j) % 3]
            sym = i % 2 == 0
            float_zeros = (not sym) and (bits + j // 2) % 2 == 0
            M = Ms[(bits + 3 * j) % 4]
            N = Ns[(bits * 3 + j) % 4]
            bias = (bits + j // 3) % 2 == 0
            K = GROUP_K[gs]
            cases.append(pytest.param(
                bits, gs, sym, float_zeros, act, param, M, N, K, bias,
                id=f"b{bits}-g{gs}-{'sym' if sym else ('asymf' if float_zeros else 'asym')}-{DNAME[act]}"
                   f"-p{DNAME[param]}-M{M}-N{N}-K{K}{'-bias' if bias else ''}"))
    return cases


@pytest.mark.parametrize("bits,group_size,symmetric,float_zeros,act,param,M,N,K,has_bias", _grid())
def test_dequant_matmul_grid(bits, group_size, symmetric, float_zeros, act, param, M, N, K, has_bias):
    _, packed, scales, zeros = make_weight(N, K, bits, group_size, symmetric, param, float_zeros)
    x = sliced((M, K), act)
    bias = torch.randn(N).to(act) if has_bias else None
    kw = dict(bits=bits, group_size=group_size, symmetric=symmetric, bias=bias)
    out = torch.full((M, N), float("nan"), dtype=act)
    y = dequant_matmul(x, packed, scales, zeros, out=out, **kw)
    assert y is out and y.dtype == act and y.shape == (M, N)
    ref = dequant_matmul_reference(x, packed, scales, zeros, **kw)
    w = dequantize(packed, scales, zeros, bits=bits, group_size=group_size, K=K, symmetric=symmetric)
    assert_matmul_close(y, ref, x, w, bias, act)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("K", [128, 100], ids=["K128-planes-aligned", "K100-planes-midword"])
@pytest.mark.parametrize("M,act,group_size,symmetric", [(1, torch.float16, 64, False), (7, torch.bfloat16, -1, True)],
                         ids=["M1-fp16-g64-asym", "M7-bf16-perchannel-sym"])
def test_decode_direct_store(bits, K, M, act, group_size, symmetric):
    """N large enough that the decode kernel stores its rows directly (no split-K workspace), with
    3/5/6/7-bit planes starting on a word (K=128) and mid-word (K=100, funnel-shifted loads)."""
    N = 260  # ceil(260 / 64) * 1 = 5 row tiles >= 2 x the interpreter's 2 "SMs": no split
    _, packed, scales, zeros = make_weight(N, K, bits, group_size, symmetric, torch.float16)
    x = sliced((M, K), act)
    bias = torch.randn(N).to(act)
    kw = dict(bits=bits, group_size=group_size, symmetric=symmetric, bias=bias)
    out = torch.full((M, N), float("nan"), dtype=act)
    y = dequant_matmul(x, packed, scales, zeros, out=out, **kw)
    ref = dequant_matmul_reference(x, packed, scales, zeros, **kw)
    w = dequantize(packed, scales, zeros, bits=bits, group_size=group_size, K=K, symmetric=symmetric)
    assert_matmul_close(y, ref, x, w, bias, act)


@pytest.mark.parametrize("lead", [(2, 3), (3, 7), (1, 1, 1)], ids=["2x3-decode", "3x7-prefill", "1x1x1-gemv"])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_leading_batch_dims(lead, act):
    N, K, bits, gs = 29, 70, 4, 32
    _, packed, scales, zeros = make_weight(N, K, bits, gs, False, torch.float16)
    x = sliced((*lead, K), act, offset=3, extra=2)
    bias = torch.randn(N).to(act)
    kw = dict(bits=bits, group_size=gs, symmetric=False, bias=bias)
    y = dequant_matmul(x, packed, scales, zeros, **kw)
    assert y.shape == (*lead, N)
    ref = dequant_matmul_reference(x, packed, scales, zeros, **kw)
    w = dequantize(packed, scales, zeros, bits=bits, group_size=gs, K=K, symmetric=False)
    assert_matmul_close(y, ref, x, w, bias, act)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("M,act", [(1, torch.float32), (5, torch.float32), (None, torch.float32),
                                   (None, torch.float16), (None, torch.bfloat16)],
                         ids=["gemv-sum", "gemv-dot", "gemv-row-chunks", "tiled-fp16", "tiled-bf16"])
def test_kernel_dequantizes_bit_exactly(bits, M, act):
    """x = rows of the identity: every output is one dequantized weight times 1 plus exact zeros, so y
    must equal dequantize() bit for bit (fp32 activations) or dequantize() rounded once to the
    activation dtype (fp16/bf16: the prefill kernel rounds w for tl.dot, the sum and store are then
    exact). Float zeros and full-mantissa fp32 scales make any other arithmetic (e.g. q*s - z*s)
    visible."""
    N, K, gs = 37, 75, 16 if bits % 2 else 32
    _, packed, scales, zeros = make_weight(N, K, bits, gs, False, torch.float32, float_zeros=True)
    scales = scales * (1 + torch.rand_like(scales) * 1e-3)
    w = dequantize(packed, scales, zeros, bits=bits, group_size=gs, K=K, symmetric=False)
    eye = torch.eye(K, dtype=act)
    rows = range(K) if M is None else range(7, 7 + M)
    x = eye[list(rows)]
    y = dequant_matmul(x, packed, scales, zeros, bits=bits, group_size=gs, symmetric=False).float()
    expect = w[:, list(rows)].T.to(act).float()
    diff = (y != expect).sum().item()
    assert diff == 0, f"{diff} weights differ from dequantize(); max abs err {(y - expect).abs().max().item():.3e}"
    # symmetric grid, per-channel scales, same exactness
    ws = dequantize(packed, scales[:, :1], None, bits=bits, group_size=-1, K=K, symmetric=True)
    ys = dequant_matmul(x, packed, scales[:, :1].contiguous(), None, bits=bits, group_size=-1, symmetric=True)
    assert torch.equal(ys.float(), ws[:, list(rows)].T.to(act).float())


def test_dequantize_definition():
    """dequantize() is the documented fp32 formula, on a hand-checkable example."""
    q = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0, 3]])
    packed = pack(q, 2)
    s = torch.tensor([[0.5, 2.0, -1.0]], dtype=torch.float16)
    z = torch.tensor([[1.0, 0.25, 3.0]], dtype=torch.bfloat16)
    w = dequantize(packed, s, z, bits=2, group_size=4, K=9, symmetric=False)
    expect = torch.tensor([[-0.5, 0, 0.5, 1.0, 5.5, 3.5, 1.5, -0.5, -0.0]])
    assert w.dtype == torch.float32 and torch.equal(w, expect)
    ws = dequantize(packed, s, None, bits=2, group_size=4, K=9, symmetric=True)
    assert torch.equal(ws, torch.tensor([[-1.0, -0.5, 0, 0.5, 2, 0, -2, -4, -1.0]]))


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------
PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}


def naive_pack(q, bits):
    """The layout spec, bit by bit: a code's bits split into planes of widths PLANES[bits] (low bits
    first); bit b of code j's field in the plane of width w that starts at code bit lo is stream bit
    K*lo + j*w + b, and stream bit i is bit (i % 32) of word i // 32."""
    N, K = q.shape
    W = math.ceil(K * bits / 32)
    out = []
    for row in q.tolist():
        words = [0] * W
        lo = 0
        for w in PLANES[bits]:
            for j, code in enumerate(row):
                for b in range(w):
                    i = K * lo + j * w + b
                    words[i // 32] |= ((code >> (lo + b)) & 1) << (i % 32)
            lo += w
        out.append([v - 2**32 if v >= 2**31 else v for v in words])
    return torch.tensor(out, dtype=torch.int32).reshape(N, W)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), N=st.integers(1, 5), K=st.integers(0, 97), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (N, K), generator=g)
    packed = pack(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (N, math.ceil(K * bits / 32))
    assert torch.equal(packed, naive_pack(q, bits))
    back = unpack(packed, bits, K)
    assert torch.equal(back.long(), q)


def test_pack_4bit_is_eight_per_word():
    q = torch.arange(16).reshape(1, 16) % 16
    packed = pack(q, 4)
    for j in range(16):
        assert (int(packed[0, j // 8]) >> (4 * (j % 8))) & 0xF == j
    # extreme codes: every bit set, sign bit of the int32 word included
    assert torch.equal(pack(torch.full((2, 32), 7), 3), torch.full((2, 3), -1, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# quantize_rtn
# ---------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), group_size=st.sampled_from([16, 32, 64, -1]), symmetric=st.booleans(),
       N=st.integers(1, 4), K=st.integers(1, 140), scale=st.sampled_from([1e-3, 1.0, 300.0]),
       seed=st.integers(0, 2**31 - 1))
def test_quantize_rtn_round_trip(bits, group_size, symmetric, N, K, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * scale
    w[:, : K // 3] = 0.0  # all-zero groups (s would be 0) must stay exact
    q, s, z = quantize_rtn(w, bits, group_size, symmetric)
    assert q.dtype == torch.uint8 and q.shape == (N, K) and int(q.max()) < 2**bits
    assert (z is None) == symmetric
    packed = pack(q, bits)
    deq = dequantize(packed, s, z, bits=bits, group_size=group_size, K=K, symmetric=symmetric)
    gs = K if group_size == -1 else group_size
    half_step = (s.repeat_interleave(gs, dim=1)[:, :K] / 2).double()
    err = (deq.double() - w.double()).abs()
    # s/2 from rounding to the grid, plus the fp32 roundings in computing s and w (a few ulps of |w|)
    bound = half_step + 2**-21 * w.double().abs()
    assert (err <= bound).all(), f"max err/half-step {(err / half_step).max():.6f}"


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def _good():
    N, K = 6, 40
    _, packed, scales, zeros = make_weight(N, K, 3, 16, False)
    return torch.randn(2, K, dtype=torch.float16), packed, scales, zeros


def _call(**over):
    x, packed, scales, zeros = _good()
    args = dict(x=x, packed=packed, scales=scales, zeros=zeros, bits=3, group_size=16, symmetric=False)
    args.update(over)
    x, packed, scales, zeros = args.pop("x"), args.pop("packed"), args.pop("scales"), args.pop("zeros")
    return lambda fn: fn(x, packed, scales, zeros, **args)


BAD = [
    ("bits0", _call(bits=0), ValueError, "bits"),
    ("bits9", _call(bits=9), ValueError, "bits"),
    ("bits-float", _call(bits=3.0), ValueError, "bits"),
    ("group-size-48", _call(group_size=48), ValueError, "group_size"),
    ("packed-dtype", _call(packed=_good()[1].to(torch.int64)), TypeError, "packed"),
    ("packed-shape", _call(packed=_good()[1][:, :-1].contiguous()), ValueError, "packed"),
    ("packed-1d", _call(packed=_good()[1].reshape(-1)), ValueError, "packed"),
    ("K-mismatch", _call(x=torch.randn(2, 50, dtype=torch.float16)), ValueError, "K"),
    ("scales-shape", _call(scales=_good()[2][:, :2]), ValueError, "scales"),
    ("scales-dtype", _call(scales=_good()[2].to(torch.float64)), TypeError, "scales"),
    ("zeros-shape", _call(zeros=_good()[3][:4]), ValueError, "zeros"),
    ("zeros-missing", _call(zeros=None), ValueError, "zeros"),
    ("scales-per-channel-mismatch", _call(group_size=-1), ValueError, "scales"),
    ("x-int", _call(x=torch.ones(2, 40, dtype=torch.int32)), TypeError, "x"),
    ("x-float64", _call(x=torch.randn(2, 40, dtype=torch.float64)), TypeError, "x"),
    ("bias-shape", _call(bias=torch.zeros(5)), ValueError, "bias"),
    ("x-meta-device", _call(x=torch.empty(2, 40, dtype=torch.float16, device="meta")), ValueError, "device|on"),
    ("scales-meta-device", _call(scales=torch.empty(6, 3, dtype=torch.float16, device="meta")), ValueError, "scales"),
]


@pytest.mark.parametrize("fn", [dequant_matmul, dequant_matmul_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("make,exc,word", [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_input(make, exc, word, fn):
    with pytest.raises(exc, match=word):
        make(fn)


@pytest.mark.parametrize("q,bits,exc,word", [
    (torch.tensor([[0, 8]]), 3, ValueError, "outside"),
    (torch.tensor([[-1, 0]]), 3, ValueError, "outside"),
    (torch.tensor([[0.0, 1.0]]), 3, TypeError, "integer"),
    (torch.tensor([0, 1]), 3, ValueError, "2-D"),
    (torch.tensor([[0, 1]]), 0, ValueError, "bits"),
], ids=["code-too-big", "code-negative", "float-codes", "1d", "bits0"])
def test_pack_bad_input(q, bits, exc, word):
    with pytest.raises(exc, match=word):
        pack(q, bits)


def test_unpack_and_dequantize_bad_input():
    packed = pack(torch.zeros(2, 10, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="K=13"):
        unpack(packed, 5, 13)
    with pytest.raises(ValueError, match="scales"):
        dequantize(packed, torch.ones(2, 2), None, bits=5, group_size=16, K=10, symmetric=True)
