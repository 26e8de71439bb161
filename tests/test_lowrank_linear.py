"""Tests for ``triton_kernels.lowrank_linear`` (under TRITON_INTERPRET=1) and ``nn.LowRankLinear``.

Every kernel result is compared with ``lowrank_linear_reference``. Inputs are views into NaN-filled
buffers (padding columns and rows beyond r, K, N) and the output is a NaN-filled buffer with a NaN
tail, so a missing load mask, a missing store or an out-of-bounds store shows up as NaN.
"""
import pytest
import torch
from torch import nn

from triton_kernels.lowrank_linear import (FUSED_AUTO_MAX_RANK, FUSED_MAX_RANK, choose_path,
                                           lowrank_linear, lowrank_linear_reference, svd_factors)
from triton_kernels.nn.lowrank import LowRankLinear

# The kernels and the reference agree up to fp32 summation order: t may round to the neighbouring
# value of the activation dtype, and y by one unit in the last place. (atol, rtol) of about two
# units in the last place at |y| ~ 1 (fp16 eps 2^-10, bf16 eps 2^-7).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
DTYPES = list(TOL)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (M, N, K, r): non-multiples of the interpreter's 16 x 32 x 32 blocks everywhere.
SHAPES = {
    "M1_r1": (1, 70, 45, 1),
    "M3_r=K": (3, 70, 45, 45),  # r = K = min(N, K): full rank
    "M17_r33": (17, 100, 67, 33),
    "M5_r128_threshold": (5, 150, 140, 128),  # largest rank path="auto" sends to the fused kernel
    "M5_r129_over": (5, 150, 140, 129),  # smallest rank sent to two GEMMs (R_PAD 256 if fused)
}


def _poisoned_view(rows: int, cols: int, dtype, pad_rows: int = 8, pad_cols: int = 7) -> torch.Tensor:
    """A (rows, cols) view into a NaN buffer with NaN padding right of and below the view."""
    buf = torch.full((rows + pad_rows, cols + pad_cols), float("nan"), dtype=dtype)
    return buf[:rows, :cols]


def _make(M, N, K, r, dtype, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Scaled so t and y are O(1): the tolerance table is in units of the last place at |y| ~ 1.
    x = _poisoned_view(M, K, dtype, pad_rows=16)
    x.copy_(torch.randn(M, K, generator=g))
    U = _poisoned_view(N, r, dtype, pad_rows=32)
    U.copy_(torch.randn(N, r, generator=g) / r ** 0.5)
    # Padding rows cover R_PAD - r, so a missing rank mask reads NaN rather than other memory.
    V = _poisoned_view(r, K, dtype, pad_rows=256)
    V.copy_(torch.randn(r, K, generator=g) / K ** 0.5)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, U, V, b


def _assert_close(got, ref, dtype):
    atol, rtol = TOL[dtype]
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert not torch.isnan(got).any() or torch.isnan(ref).any(), "NaN in output where the reference has none"
    err = (got.float() - ref.float()).abs()
    rel = (err / ref.float().abs().clamp_min(1e-6)).max().item()
    ok = (err <= atol + rtol * ref.float().abs()).all().item()
    assert ok, f"max abs err {err.max().item():.3e}, max rel err {rel:.3e} (atol {atol}, rtol {rtol})"


def _run_poisoned_out(x, U, V, b, **kw):
    """Launch into a NaN buffer followed by a sentinel tail; check the tail is untouched."""
    lead, N = x.shape[:-1], U.shape[0]
    numel = N * (x.numel() // x.shape[-1])
    buf = torch.full((numel + 64,), float("nan"), dtype=x.dtype)
    buf[numel:] = 7.0
    out = buf[:numel].view(*lead, N)
    y = lowrank_linear(x, U, V, b, out=out, **kw)
    assert y.data_ptr() == out.data_ptr()
    assert (buf[numel:] == 7.0).all(), "store past the end of the output"
    return y


@pytest.mark.parametrize("path", ["fused", "two_gemm"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_matches_reference(dtype, shape, path):
    x, U, V, _ = _make(*shape, dtype)
    y = _run_poisoned_out(x, U, V, None, path=path)
    _assert_close(y, lowrank_linear_reference(x, U, V), dtype)


@pytest.mark.parametrize("path", ["auto", "fused", "two_gemm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_bias_and_batch_dims(dtype, path):
    M, N, K, r = 7, 50, 37, 9
    x2, U, V, b = _make(2 * M, N, K, r, dtype, bias=True)
    x = x2.reshape(2, M, K)  # copies the strided view; the leading dims are what matters here
    y = _run_poisoned_out(x, U, V, b, path=path)
    assert y.shape == (2, M, N)
    _assert_close(y, lowrank_linear_reference(x, U, V, b), dtype)


@pytest.mark.parametrize("n_split", [1, 2, 3, 8], ids=lambda s: f"n_split{s}")
def test_fused_tile_loop_split(n_split):
    """Programs per row block from one (loops over all 6 N tiles) to more than there are tiles."""
    x, U, V, b = _make(20, 170, 40, 24, torch.float16, bias=True)
    y = _run_poisoned_out(x, U, V, b, path="fused", n_split=n_split)
    _assert_close(y, lowrank_linear_reference(x, U, V, b), torch.float16)


def test_transposed_factor_views():
    """Factors passed as transposed views (column-major) go through the stride arguments."""
    x, U, V, _ = _make(3, 60, 50, 12, torch.float32)
    Ut = U.t().contiguous().t()  # same values, strides (1, N)
    Vt = V.t().contiguous().t()
    for path in ("fused", "two_gemm"):
        _assert_close(lowrank_linear(x, Ut, Vt, path=path), lowrank_linear_reference(x, U, V), torch.float32)


def test_empty_batch():
    x, U, V, _ = _make(1, 30, 20, 4, torch.float32)
    assert lowrank_linear(x[:0], U, V).shape == (0, 30)


def test_auto_path_threshold():
    assert choose_path(1) == "fused"
    assert choose_path(FUSED_AUTO_MAX_RANK) == "fused"
    assert choose_path(FUSED_AUTO_MAX_RANK + 1) == "two_gemm"


def test_reference_rounds_intermediate_to_activation_dtype():
    """The documented numerics: t is rounded to x.dtype, which differs from an fp32 t in bf16."""
    x, U, V, _ = _make(4, 64, 64, 64, torch.bfloat16)
    fp32_t = ((x.float() @ V.float().t()) @ U.float().t()).to(torch.bfloat16)
    ref = lowrank_linear_reference(x, U, V)
    t = (x.float() @ V.float().t()).to(torch.bfloat16)
    assert torch.equal(ref, (t.float() @ U.float().t()).to(torch.bfloat16))
    assert not torch.equal(ref, fp32_t)


def _tensors():
    return (torch.randn(3, 8), torch.randn(6, 4), torch.randn(4, 8))


@pytest.mark.parametrize("fn", [lowrank_linear, lowrank_linear_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("case,exc,match", [
    ("rank_mismatch", ValueError, "U.shape\\[1\\] must equal V.shape\\[0\\]"),
    ("k_mismatch", ValueError, "x must have last dim K"),
    ("dtype_mismatch", TypeError, "U.dtype"),
    ("int_dtype", TypeError, "x.dtype must be one of"),
    ("device_mismatch", ValueError, "V is on meta"),
    ("bias_shape", ValueError, "bias must have shape \\(6,\\)"),
    ("U_1d", ValueError, "U must be \\(N, r\\)"),
])
def test_bad_inputs(fn, case, exc, match):
    x, U, V = _tensors()
    b = None
    if case == "rank_mismatch":
        V = torch.randn(5, 8)
    elif case == "k_mismatch":
        x = torch.randn(3, 9)
    elif case == "dtype_mismatch":
        U = U.half()
    elif case == "int_dtype":
        x, U, V = x.int(), U.int(), V.int()
    elif case == "device_mismatch":
        V = V.to("meta")
    elif case == "bias_shape":
        b = torch.randn(5)
    elif case == "U_1d":
        U = U[:, 0]
    with pytest.raises(exc, match=match):
        fn(x, U, V, b)


def test_bad_launcher_options():
    x, U, V = _tensors()
    with pytest.raises(ValueError, match="path="):
        lowrank_linear(x, U, V, path="three_gemm")
    with pytest.raises(ValueError, match="n_split"):
        lowrank_linear(x, U, V, n_split=0)
    with pytest.raises(ValueError, match="out must be"):
        lowrank_linear(x, U, V, out=torch.empty(3, 5))
    big_r = FUSED_MAX_RANK + 1
    with pytest.raises(ValueError, match=f"rank <= {FUSED_MAX_RANK}"):
        lowrank_linear(torch.randn(1, 300), torch.randn(300, big_r), torch.randn(big_r, 300), path="fused")


# ----------------------------------------------------------------------------------------------
# svd_factors
# ----------------------------------------------------------------------------------------------
def _with_singular_values(s: torch.Tensor, n: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    qa, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    qb, _ = torch.linalg.qr(torch.randn(k, len(s), generator=g, dtype=torch.float64))
    return (qa * s) @ qb.t()


def test_svd_full_rank_reconstructs():
    w = torch.randn(40, 30, dtype=torch.float64)
    U, V = svd_factors(w, rank=30)
    err = (U @ V - w).abs().max().item()
    assert err < 1e-10, f"max abs err {err:.3e}"


def test_svd_sqrt_split_and_truncation():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    w = _with_singular_values(s, 20, 12)
    U, V = svd_factors(w, rank=2)
    # sqrt split: column j of U and row j of V both have norm sqrt(s_j).
    assert torch.allclose(U.norm(dim=0), s[:2].sqrt(), rtol=1e-10)
    assert torch.allclose(V.norm(dim=1), s[:2].sqrt(), rtol=1e-10)
    # Eckart-Young: the Frobenius error of the best rank-2 approximation is sqrt(sum s_j^2, j >= 2).
    err = (U @ V - w).norm().item()
    assert abs(err - s[2:].square().sum().sqrt().item()) < 1e-10


@pytest.mark.parametrize("energy,rank", [(1.0, 5), (0.75, 1), (0.76, 2), (0.938, 2), (0.939, 3), (0.99, 4)])
def test_svd_energy_picks_smallest_rank(energy, rank):
    # Squared singular values 64, 16, 4, 1, 0.25 of 85.25: prefixes 0.7507, 0.9384, 0.9853, 0.9971, 1.
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    U, V = svd_factors(_with_singular_values(s, 20, 12), energy=energy)
    assert U.shape == (20, rank) and V.shape == (rank, 12)


@pytest.mark.parametrize("kw,exc,match", [
    ({"rank": 0}, ValueError, "rank must be in"),
    ({"rank": 13}, ValueError, "rank must be in \\[1, min\\(N, K\\)\\] = \\[1, 12\\]"),
    ({"energy": 0.0}, ValueError, "energy must be in \\(0, 1\\]"),
    ({"energy": 1.5}, ValueError, "energy must be in"),
    ({}, ValueError, "exactly one of"),
    ({"rank": 2, "energy": 0.5}, ValueError, "exactly one of"),
    ({"rank": 2.0}, TypeError, "rank must be an int"),
])
def test_svd_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        svd_factors(torch.randn(20, 12), **kw)


# ----------------------------------------------------------------------------------------------
# LowRankLinear
# ----------------------------------------------------------------------------------------------
def _linear(n=60, k=44, bias=True, dtype=torch.float32):
    lin = nn.Linear(k, n, bias=bias)
    return lin.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("rank", [1, 20, 44], ids=lambda r: f"r{r}")
def test_module_backends_agree(dtype, rank):
    layer = LowRankLinear.from_linear(_linear(dtype=dtype), rank=rank)
    x = torch.randn(2, 3, 44).to(dtype)
    ref = lowrank_linear_reference(x, layer.U, layer.V, layer.bias)
    outs = {}
    for backend in ("auto", "triton", "two_matmul"):
        layer.backend = backend
        outs[backend] = layer(x)
        _assert_close(outs[backend], ref, dtype)
    assert layer.resolved_backend(x.device) == "two_matmul"
    layer.backend = "auto"
    assert layer.resolved_backend(x.device) == "triton"  # TRITON_INTERPRET=1 in tests


def test_module_full_rank_equals_linear():
    lin = _linear()
    layer = LowRankLinear.from_linear(lin, rank=44)
    x = torch.randn(5, 44)
    _assert_close(layer(x), lin(x).detach(), torch.float32)


def test_module_energy_rank():
    lin = _linear()
    s = torch.linalg.svdvals(lin.weight.detach().double()).square()
    frac = s.cumsum(0) / s.sum()
    layer = LowRankLinear.from_linear(lin, energy=0.8)
    r = layer.rank
    assert frac[r - 1] >= 0.8 and (r == 1 or frac[r - 2] < 0.8), (r, frac[:r + 1])


def test_module_forced_triton_without_interpreter(monkeypatch):
    layer = LowRankLinear.from_linear(_linear(), rank=4, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' cannot run on cpu"):
        layer(torch.randn(2, 44))
    layer.backend = "auto"
    assert layer.resolved_backend(torch.device("cpu")) == "two_matmul"
    x = torch.randn(2, 44)
    _assert_close(layer(x), lowrank_linear_reference(x, layer.U, layer.V, layer.bias), torch.float32)


def test_module_accounting_and_repr():
    layer = LowRankLinear.from_linear(_linear(60, 44, dtype=torch.float16), rank=8)
    assert layer.rank == 8
    assert layer.memory_bytes() == (60 * 8 + 8 * 44) * 2
    assert layer.memory_bytes(include_bias=True) == (60 * 8 + 8 * 44 + 60) * 2
    assert layer.resident_bytes() == (60 * 8 + 8 * 44 + 60) * 2
    assert layer.bits_per_weight() == pytest.approx(16 * (60 * 8 + 8 * 44) / (60 * 44))
    text = repr(layer)
    for part in ("in_features=44", "out_features=60", "rank=8", "bias=True", "backend='auto'"):
        assert part in text, text
    # fp32 factors: the format counts them at 16 bits (as the harness does), resident_bytes as held.
    no_bias = LowRankLinear.from_linear(_linear(bias=False), rank=3)
    assert no_bias.memory_bytes() == (60 * 3 + 3 * 44) * 2
    assert no_bias.resident_bytes() == (60 * 3 + 3 * 44) * 4
    assert no_bias.bits_per_weight() == pytest.approx(layer.bits_per_weight() * 3 / 8)


def test_module_state_dict_round_trip():
    layer = LowRankLinear.from_linear(_linear(), rank=7)
    other = LowRankLinear(torch.zeros(60, 7), torch.zeros(7, 44), torch.zeros(60))
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 44)
    assert torch.equal(other(x), layer(x))
    assert set(layer.state_dict()) == {"U", "V", "bias"}


@pytest.mark.parametrize("case,exc,match", [
    ("rank_too_big", ValueError, "rank must be an int in \\[1, min\\(out_features, in_features\\)\\] = \\[1, 44\\]"),
    ("rank_zero", ValueError, "rank must be an int in"),
    ("energy_zero", ValueError, "energy must be in \\(0, 1\\]"),
    ("energy_big", ValueError, "energy must be in \\(0, 1\\]"),
    ("both", ValueError, "exactly one of"),
    ("not_linear", TypeError, "linear must be an nn.Linear"),
    ("bad_backend", ValueError, "backend='cuda' is not one of"),
])
def test_module_from_linear_bad_arguments(case, exc, match):
    lin = _linear()
    kw = {"rank_too_big": {"rank": 45}, "rank_zero": {"rank": 0}, "energy_zero": {"energy": 0.0},
          "energy_big": {"energy": 1.01}, "both": {"rank": 3, "energy": 0.5},
          "not_linear": {"rank": 3}, "bad_backend": {"rank": 3, "backend": "cuda"}}[case]
    with pytest.raises(exc, match=match):
        LowRankLinear.from_linear(nn.Conv1d(2, 2, 1) if case == "not_linear" else lin, **kw)


@pytest.mark.parametrize("case,exc,match", [
    ("shape_mismatch", ValueError, "disagree on the rank"),
    ("rank_too_big", ValueError, "rank 9 exceeds min\\(out_features, in_features\\) = 8"),
    ("rank_zero", ValueError, "rank must be >= 1"),
    ("dtype_mismatch", TypeError, "U.dtype .* and V.dtype"),
    ("device_mismatch", ValueError, "V is on meta"),
    ("bias_shape", ValueError, "bias must have shape \\(10,\\)"),
    ("bias_dtype", TypeError, "bias.dtype"),
])
def test_module_constructor_bad_arguments(case, exc, match):
    U, V, b = torch.randn(10, 4), torch.randn(4, 8), None
    if case == "shape_mismatch":
        V = torch.randn(5, 8)
    elif case == "rank_too_big":
        U, V = torch.randn(10, 9), torch.randn(9, 8)
    elif case == "rank_zero":
        U, V = torch.randn(10, 0), torch.randn(0, 8)
    elif case == "dtype_mismatch":
        V = V.double()
    elif case == "device_mismatch":
        V = V.to("meta")
    elif case == "bias_shape":
        b = torch.randn(9)
    elif case == "bias_dtype":
        b = torch.randn(10).double()
    with pytest.raises(exc, match=match):
        LowRankLinear(U, V, b)


def test_module_forward_bad_input():
    layer = LowRankLinear.from_linear(_linear(), rank=4)
    with pytest.raises(TypeError, match="x.dtype"):
        layer(torch.randn(2, 44).double())
    with pytest.raises(ValueError, match="in_features = 44"):
        layer(torch.randn(2, 45))
