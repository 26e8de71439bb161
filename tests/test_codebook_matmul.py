"""Tests for triton_kernels/codebook_matmul.py (interpreter on CPU; conftest sets TRITON_INTERPRET=1).

A covering design, not a Cartesian product (the interpreter costs ~0.5 s per launch): every bit width
1..8 (so all three lookups: select, gather, load) meets shared and per-row tables, every activation
and table dtype, scales None / groups with a partial last group / per-channel, M in {1, 3, 17}
(M=1 sum path, 16-row dot path, prefill), with and without bias, x sliced out of a wider NaN-padded
buffer and outputs NaN-poisoned. Plus bit-exact checks where the arithmetic is exact, leading batch
dims, the direct-store decode variant, bad input, and property tests for the reference and packing.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_kernels import codebook_matmul as cb
from triton_kernels import dequant_matmul as dq
from triton_kernels.codebook_matmul import codebook_matmul, codebook_matmul_reference, dequantize_codebook, pack
from tests import matmul_checks
from tests.matmul_checks import sliced  # noqa: F401  (used by the tests below)

ACT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DNAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Bounds relative to sum_k |x_mk| |w_nk| (+ |bias_n|), the scale of a dot product's rounding error:
# w rounded to the activation dtype for tl.dot (u), the output rounded to it (u), fp32 accumulation
# over K <= 300 terms, and the factored group scale of the M == 1 path (one more fp32 rounding).
MAX_TEST_K = 300
TOL = {  # dtype: (atol, rtol)
    torch.float32: (1e-6, 3 * 2**-24 + MAX_TEST_K * 2**-24),
    torch.float16: (1e-6, 2 * 2**-11 + MAX_TEST_K * 2**-24),
    torch.bfloat16: (1e-6, 2 * 2**-8 + MAX_TEST_K * 2**-24),
}


def make_weight(N, K, bits, group_size, *, shared, scaled, table_dtype=torch.float16,
                scale_dtype=torch.float16, seed=0):
    """Random codes, a random (sorted, |T| <= 1) table, scales so that |w| <~ 1."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (N, K), generator=g)
    rows = 1 if shared else N
    table = torch.sort(torch.rand(rows, 2**bits, generator=g) * 2 - 1, dim=1).values.to(table_dtype)
    scales = None
    if scaled:
        G = 1 if group_size == -1 else math.ceil(K / group_size)
        scales = (torch.rand(N, G, generator=g) + 0.5).to(scale_dtype)
    return q, pack(q, bits), table, scales


def assert_matmul_close(y, ref, x, w, bias, dtype):
    matmul_checks.assert_matmul_close(y, ref, x, w, bias, *TOL[dtype])


def _grid():
    # (group_size, scaled): no scales, groups of 16 and 32 (K=100: partial last group), per-channel
    scalings = [(-1, False), (32, True), (-1, True), (16, True)]
    Ms = [1, 3, 17]
    cases = []
    for bits in range(1, 9):
        for j in range(3):
            i = bits + j
            act = ACT_DTYPES[i % 3]
            table_dt = ACT_DTYPES[(bits + 2 * j) % 3]
            gs, scaled = scalings[(bits + j) % 4]
            shared = i % 2 == 0
            M = Ms[(bits + 2 * j) % 3]
            bias = (bits + j) % 3 != 0
            cases.append(pytest.param(
                bits, gs, scaled, shared, act, table_dt, M, bias,
                id=f"b{bits}-{cb.lookup_mode(bits)}-{'shared' if shared else 'rows'}-"
                   f"{('pc' if gs == -1 else 'g' + str(gs)) if scaled else 'noscale'}-{DNAME[act]}-t{DNAME[table_dt]}-M{M}"
                   f"{'-bias' if bias else ''}"))
    return cases


@pytest.mark.parametrize("bits,group_size,scaled,shared,act,table_dt,M,has_bias", _grid())
def test_codebook_matmul_grid(bits, group_size, scaled, shared, act, table_dt, M, has_bias):
    N, K = 40, 100
    _, packed, table, scales = make_weight(N, K, bits, group_size, shared=shared, scaled=scaled,
                                           table_dtype=table_dt, scale_dtype=ACT_DTYPES[bits % 3], seed=bits)
    x = sliced((M, K), act)
    bias = torch.randn(N).to(act) if has_bias else None
    kw = dict(bits=bits, group_size=group_size, bias=bias)
    out = torch.full((M, N), float("nan"), dtype=act)
    y = codebook_matmul(x, packed, table, scales, out=out, **kw)
    assert y is out and y.dtype == act and y.shape == (M, N)
    ref = codebook_matmul_reference(x, packed, table, scales, **kw)
    w = dequantize_codebook(packed, table, scales, bits=bits, group_size=group_size, K=K)
    assert_matmul_close(y, ref, x, w, bias, act)


@pytest.mark.parametrize("bits,M,act,shared", [(4, 1, torch.float16, False), (3, 7, torch.bfloat16, True),
                                               (8, 1, torch.bfloat16, False), (2, 5, torch.float16, False)],
                         ids=["b4-gather-M1", "b3-gather-M7-shared", "b8-load-M1", "b2-select-M5"])
def test_decode_direct_store(bits, M, act, shared):
    """N large enough that the decode kernel stores its rows directly (no split-K workspace)."""
    N, K = 260, 100  # ceil(260 / 64) = 5 row tiles >= 2 x the interpreter's 2 "SMs": no split
    _, packed, table, scales = make_weight(N, K, bits, 64, shared=shared, scaled=True)
    x = sliced((M, K), act)
    bias = torch.randn(N).to(act)
    kw = dict(bits=bits, group_size=64, bias=bias)
    out = torch.full((M, N), float("nan"), dtype=act)
    y = codebook_matmul(x, packed, table, scales, out=out, **kw)
    ref = codebook_matmul_reference(x, packed, table, scales, **kw)
    w = dequantize_codebook(packed, table, scales, bits=bits, group_size=64, K=K)
    assert_matmul_close(y, ref, x, w, bias, act)


@pytest.mark.parametrize("lead,act", [((2, 3), torch.bfloat16), ((3, 7), torch.float16), ((1, 1, 1), torch.float32)],
                         ids=["2x3-decode-bf16", "3x7-prefill-fp16", "1x1x1-gemv-fp32"])
def test_leading_batch_dims(lead, act):
    N, K, bits, gs = 29, 70, 4, 32
    _, packed, table, scales = make_weight(N, K, bits, gs, shared=False, scaled=True)
    x = sliced((*lead, K), act, offset=3, extra=2)
    bias = torch.randn(N).to(act)
    kw = dict(bits=bits, group_size=gs, bias=bias)
    y = codebook_matmul(x, packed, table, scales, **kw)
    assert y.shape == (*lead, N) and y.dtype == act
    ref = codebook_matmul_reference(x, packed, table, scales, **kw)
    w = dequantize_codebook(packed, table, scales, bits=bits, group_size=gs, K=K)
    assert_matmul_close(y, ref, x, w, bias, act)


@pytest.mark.parametrize("bits,M,act,shared", [
    (1, 1, torch.float32, True), (2, 5, torch.float32, False), (3, None, torch.float16, False),
    (4, 1, torch.float32, False), (4, None, torch.bfloat16, True), (5, 5, torch.float32, True),
    (6, 1, torch.float32, True), (8, None, torch.float16, False)],
    ids=["b1-sum-fp32", "b2-dot-fp32", "b3-tiled-fp16", "b4-sum-fp32", "b4-tiled-bf16", "b5-dot-fp32",
         "b6-sum-fp32", "b8-tiled-fp16"])
def test_kernel_dequantizes_bit_exactly(bits, M, act, shared):
    """x = rows of the identity: every output is one weight times 1 plus exact zeros, so y must equal
    dequantize_codebook() bit for bit (fp32 activations) or rounded once to the activation dtype
    (fp16/bf16: the tiled kernel rounds w for tl.dot, the sum and store are then exact). Full-mantissa
    fp32 tables and scales make any other arithmetic visible; the M == 1 path applies the group scale
    after the sum, exact here since each group's sum is one table value."""
    N, K, gs = 37, 75, 16
    _, packed, table, scales = make_weight(N, K, bits, gs, shared=shared, scaled=True,
                                           table_dtype=torch.float32, scale_dtype=torch.float32)
    table = table * (1 + torch.rand_like(table) * 1e-3)
    w = dequantize_codebook(packed, table, scales, bits=bits, group_size=gs, K=K)
    rows = list(range(K)) if M is None else list(range(7, 7 + M))
    x = torch.eye(K, dtype=act)[rows]
    y = codebook_matmul(x, packed, table, scales, bits=bits, group_size=gs).float()
    expect = w[:, rows].T.to(act).float()
    diff = (y != expect).sum().item()
    assert diff == 0, f"{diff} weights differ from dequantize_codebook(); max abs err {(y - expect).abs().max():.3e}"


def test_power_of_two_table_is_exact_in_fp32():
    """fp32 activations and power-of-two table values and scales: every product is exact and the fp32
    sums of small-integer multiples of powers of two are too, so the kernel equals the float64 reference."""
    N, K, bits = 24, 64, 3
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 8, (N, K), generator=g)
    table = torch.tensor([[-4.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 4.0]])
    scales = 2.0 ** torch.randint(-3, 3, (N, 2), generator=g).float()
    x = torch.randint(-8, 8, (3, K), generator=g).float()
    y = codebook_matmul(x, pack(q, bits), table, scales, bits=bits, group_size=32)
    ref = codebook_matmul_reference(x, pack(q, bits), table, scales, bits=bits, group_size=32)
    assert torch.equal(y, ref)
    assert torch.equal(ref, (x.double() @ (table[0][q] * scales.repeat_interleave(32, dim=1)).double().T).float())


def test_dequantize_definition():
    """dequantize_codebook() is the documented formula, on a hand-checkable example."""
    q = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0, 3], [3, 3, 0, 0, 1, 1, 2, 2, 0]])
    packed = pack(q, 2)
    rows = torch.tensor([[-1.0, -0.25, 0.5, 2.0], [10.0, 20.0, 30.0, 40.0]], dtype=torch.bfloat16)
    s = torch.tensor([[0.5, 2.0, -1.0], [1.0, 1.0, 0.5]], dtype=torch.float16)
    w = dequantize_codebook(packed, rows, s, bits=2, group_size=4, K=9)
    expect = torch.tensor([[-0.5, -0.125, 0.25, 1.0, 4.0, 1.0, -0.5, -2.0, -2.0],
                           [40, 40, 10, 10, 20, 20, 30, 30, 5.0]])
    assert w.dtype == torch.float32 and torch.equal(w, expect)
    shared = dequantize_codebook(packed, rows[:1], None, bits=2, K=9)
    assert torch.equal(shared, rows[0].float()[q])


# ---------------------------------------------------------------------------------------------
# Reference and packing properties
# ---------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), N=st.integers(1, 5), K=st.integers(1, 97), shared=st.booleans(),
       group_size=st.sampled_from([None, -1, 16, 32]), seed=st.integers(0, 2**31 - 1))
def test_dequantize_codebook_round_trip(bits, N, K, shared, group_size, seed):
    """pack -> dequantize_codebook equals a direct per-weight gather table[r][q] * s[n][k // g]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (N, K), generator=g)
    table = torch.randn(1 if shared else N, 2**bits, generator=g).to(torch.bfloat16)
    scales = None
    gs = -1 if group_size is None else group_size
    if group_size is not None:
        G = 1 if gs == -1 else math.ceil(K / gs)
        scales = torch.randn(N, G, generator=g).to(torch.float16)
    w = dequantize_codebook(pack(q, bits), table, scales, bits=bits, group_size=gs, K=K)
    for n in range(N):
        for k in range(K):
            v = table[0 if shared else n, q[n, k]].float()
            if scales is not None:
                v = v * scales[n, 0 if gs == -1 else k // gs].float()
            assert w[n, k].item() == v.item() or (math.isnan(w[n, k].item()) and math.isnan(v.item()))


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 8), N=st.integers(1, 4), K=st.integers(0, 97), seed=st.integers(0, 2**31 - 1))
def test_pack_is_dequant_matmul_pack(bits, N, K, seed):
    """The copied packing helpers are the uniform kernel's layout, bit for bit."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (N, K), generator=g)
    packed = pack(q, bits)
    assert torch.equal(packed, dq.pack(q, bits))
    assert torch.equal(cb.unpack(packed, bits, K), dq.unpack(packed, bits, K))


@pytest.mark.parametrize("bits,lookup,M", [(3, "load", 1), (4, "load", 17), (2, "gather", 3), (1, "gather", 1)])
def test_forced_lookup_gives_the_same_result(bits, lookup, M):
    """The strategies a benchmark may force are the same computation (fp32: exact against the default)."""
    _, packed, table, scales = make_weight(40, 100, bits, 32, shared=bits % 2 == 0, scaled=True,
                                           table_dtype=torch.float32, scale_dtype=torch.float32)
    x = sliced((M, 100), torch.float32)
    y = codebook_matmul(x, packed, table, scales, bits=bits, group_size=32, lookup=lookup)
    assert torch.equal(y, codebook_matmul(x, packed, table, scales, bits=bits, group_size=32))
    with pytest.raises(ValueError, match="lookup"):
        codebook_matmul(x, packed, table, scales, bits=bits, group_size=32, lookup="select" if bits > 2 else "lut")


def test_lookup_modes():
    import triton
    mid = "gather" if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8) else "load"
    assert cb.GATHER_SHUFFLES == (mid == "gather")
    assert [cb.lookup_mode(b) for b in range(1, 9)] == ["select"] * 2 + [mid] * 3 + ["load"] * 3
    assert [cb.lookup_mode(b, amd=True) for b in range(1, 9)] == ["select"] * 2 + ["load"] * 6


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def _good():
    N, K = 6, 40
    _, packed, table, scales = make_weight(N, K, 3, 16, shared=False, scaled=True)
    return torch.randn(2, K, dtype=torch.float16), packed, table, scales


def _call(**over):
    x, packed, table, scales = _good()
    args = dict(x=x, packed=packed, codebook=table, scales=scales, bits=3, group_size=16)
    args.update(over)
    x, packed, table, scales = args.pop("x"), args.pop("packed"), args.pop("codebook"), args.pop("scales")
    return lambda fn: fn(x, packed, table, scales, **args)


BAD = [
    ("bits0", _call(bits=0), ValueError, "bits"),
    ("bits9", _call(bits=9), ValueError, "bits"),
    ("bits-float", _call(bits=3.0), ValueError, "bits"),
    ("group-size-48", _call(group_size=48), ValueError, "group_size"),
    ("packed-dtype", _call(packed=_good()[1].to(torch.int64)), TypeError, "packed"),
    ("packed-shape", _call(packed=_good()[1][:, :-1].contiguous()), ValueError, "packed"),
    ("K-mismatch", _call(x=torch.randn(2, 50, dtype=torch.float16)), ValueError, "K mismatch"),
    ("codebook-entries", _call(codebook=torch.randn(6, 4)), ValueError, r"codebook has shape \(6, 4\).*\(6, 8\)"),
    ("codebook-rows", _call(codebook=torch.randn(3, 8)), ValueError, "codebook.*one shared table"),
    ("codebook-1d", _call(codebook=torch.randn(8)), ValueError, "codebook"),
    ("codebook-dtype", _call(codebook=torch.randn(6, 8, dtype=torch.float64)), TypeError, "codebook.*float64"),
    ("codebook-int", _call(codebook=torch.zeros(6, 8, dtype=torch.int32)), TypeError, "codebook"),
    ("codebook-list", _call(codebook=[0.0] * 8), TypeError, "codebook"),
    ("codebook-meta-device", _call(codebook=torch.empty(6, 8, device="meta")), ValueError, "codebook is on meta"),
    ("scales-shape", _call(scales=_good()[3][:, :2]), ValueError, "scales"),
    ("scales-dtype", _call(scales=_good()[3].to(torch.float64)), TypeError, "scales"),
    ("scales-per-channel-mismatch", _call(group_size=-1), ValueError, "scales"),
    ("scales-meta-device", _call(scales=torch.empty(6, 3, dtype=torch.float16, device="meta")), ValueError, "scales"),
    ("x-int", _call(x=torch.ones(2, 40, dtype=torch.int32)), TypeError, "x"),
    ("x-float64", _call(x=torch.randn(2, 40, dtype=torch.float64)), TypeError, "x"),
    ("x-meta-device", _call(x=torch.empty(2, 40, dtype=torch.float16, device="meta")), ValueError, "x is on meta"),
    ("bias-shape", _call(bias=torch.zeros(5)), ValueError, "bias"),
]


@pytest.mark.parametrize("fn", [codebook_matmul, codebook_matmul_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("make,exc,word", [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_input(make, exc, word, fn):
    with pytest.raises(exc, match=word):
        make(fn)


def test_dequantize_codebook_bad_input():
    _, packed, table, scales = _good()
    with pytest.raises(ValueError, match="K=50"):
        dequantize_codebook(packed, table, scales, bits=3, group_size=16, K=50)
    with pytest.raises(ValueError, match="scales"):
        dequantize_codebook(packed, table, scales[:, :1], bits=3, group_size=16, K=40)
