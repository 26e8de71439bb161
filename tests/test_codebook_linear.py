"""CodebookLinear: every backend against ``codebook_matmul_reference``, ``auto`` selection, from_linear's
nearest-entry rounding and NF4 table, exact memory accounting (tables counted), the dense cache in
``resident_bytes()``, state_dict/.to(), bad input.

The Triton backend runs under the interpreter (conftest sets TRITON_INTERPRET=1), so its cases are
few and small; the CPU backends run on every layer case.
"""
import io
import math

import pytest
import torch
from torch import nn

from triton_kernels import codebook_matmul as cb
from triton_kernels.nn import CodebookLinear
from triton_kernels.nn import codebook as cbnn

# Compared to the float64 reference rounded once to the activation dtype: fp32 backends differ by the
# accumulation order only; bf16/fp16 round the weight to the activation dtype (and the output once more).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPE_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (id, N, K, bits, group_size or None for no scales, shared table)
LAYERS = [
    ("4b-shared-g32-40x100", 40, 100, 4, 32, True),      # NF4-like, partial last group
    ("3b-rows-pc-19x75", 19, 75, 3, -1, False),          # SqueezeLLM-like per-row table, per-channel scale
    ("2b-rows-noscale-33x70", 33, 70, 2, None, False),   # k-means-like, table holds the values
    ("8b-shared-g64-24x96", 24, 96, 8, 64, True),
]


def _layer(N, K, bits, gs, shared, *, bias=True, seed=0, table_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (N, K), generator=g)
    table = (torch.randn(1 if shared else N, 2 ** bits, generator=g) / math.sqrt(K)).to(table_dtype)
    scales = None if gs is None else (0.5 + torch.rand(N, 1 if gs == -1 else math.ceil(K / gs), generator=g))
    b = torch.randn(N, generator=g) if bias else None
    return CodebookLinear.from_codes(q, table, scales, bits=bits, group_size=-1 if gs is None else gs, bias=b)


def _sliced_input(lead, K, dtype):
    """x (..., K) viewed out of a NaN-filled buffer 7 columns wider: a read past K shows as NaN."""
    buf = torch.full((*lead, K + 7), float("nan"), dtype=dtype)
    buf[..., :K] = torch.randn(*lead, K).to(dtype)
    return buf[..., :K]


def _reference(m, x):
    return cb.codebook_matmul_reference(x, m.packed, m.codebook, m.scales, bits=m.bits, group_size=m.group_size,
                                        bias=m.bias)


def _assert_close(y, ref, dtype, what):
    atol, rtol = TOL[dtype]
    assert y.dtype == ref.dtype and y.shape == ref.shape, (what, y.dtype, y.shape, ref.shape)
    assert not torch.isnan(y).any(), f"{what}: NaN outputs"
    err = (y.double() - ref.double()).abs()
    ok = err <= atol + rtol * ref.double().abs()
    assert ok.all(), f"{what}: max abs err {err.max().item():.3e} ({int((~ok).sum())} outside tolerance)"


@pytest.mark.parametrize("dtype", list(TOL), ids=DTYPE_ID.get)
@pytest.mark.parametrize("lid,N,K,bits,gs,shared", LAYERS, ids=[c[0] for c in LAYERS])
def test_cpu_backends_match_reference(lid, N, K, bits, gs, shared, dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = _layer(N, K, bits, gs, shared)
    x = _sliced_input((3, 7), K, dtype)  # M = 21 >= 17 rows: the AMX column-slice case (cpu_dense_rows)
    ref = _reference(m, x)
    for backend in ("dense_cache", "dequant"):
        y = m(x, backend=backend)
        assert m.last_backend == backend
        _assert_close(y, ref, dtype, backend)
    assert m.resolve_backend(x) == "dense_cache"
    torch.testing.assert_close(m(x), m(x, backend="dequant"), rtol=0, atol=0)


@pytest.mark.parametrize("lid,N,K,bits,gs,shared,M,dtype", [
    ("4b-shared-g32-40x100", 40, 100, 4, 32, True, 1, torch.bfloat16),
    ("3b-rows-pc-19x75", 19, 75, 3, -1, False, 17, torch.float16),
    ("2b-rows-noscale-33x70", 33, 70, 2, None, False, 4, torch.float32),
    ("8b-shared-g64-24x96", 24, 96, 8, 64, True, 2, torch.bfloat16),
], ids=["4b-shared-M1-bf16", "3b-rows-M17-fp16", "2b-noscale-M4-fp32", "8b-shared-M2-bf16"])
def test_triton_backend_matches_reference(lid, N, K, bits, gs, shared, M, dtype):
    m = _layer(N, K, bits, gs, shared)
    x = _sliced_input((M,), K, dtype)
    assert m.resolve_backend(x) == "triton"  # TRITON_INTERPRET=1 (conftest)
    y = m(x)
    assert m.last_backend == "triton"
    _assert_close(y, _reference(m, x), dtype, "triton")


def test_auto_prefers_triton_where_usable(monkeypatch):
    m = _layer(16, 32, 4, 32, True)
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    monkeypatch.setattr(cbnn, "triton_usable", lambda device: True)
    assert m.resolve_backend(x) == "triton"
    monkeypatch.setattr(cbnn, "triton_usable", lambda device: False)
    assert m.resolve_backend(x) == "dense_cache"
    with pytest.raises(ValueError, match="TRITON_INTERPRET.*dense_cache"):
        m(x, backend="triton")


# ---------------------------------------------------------------------------------------------
# from_linear: shared table, group absmax scales, nearest entry
# ---------------------------------------------------------------------------------------------
def test_nf4_table_is_qlora_construction():
    """NF4 = quantiles of N(0, 1) at 8 points from 0.5 to 0.9677 (positive) and 7 (negative), plus 0,
    normalized to [-1, 1] (QLoRA / bitsandbytes create_normal_map); the constants agree to fp32."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.sort(torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])).values
    v = v / v.abs().max()
    torch.testing.assert_close(torch.tensor(cbnn.NF4, dtype=torch.float64), v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,gs,table", [(4, 32, None), (4, -1, None), (3, 64, "fp-e1m1"), (2, 16, "unsorted")])
def test_from_linear_picks_the_nearest_entry(bits, gs, table):
    lin = nn.Linear(100, 24)
    with torch.no_grad():
        lin.weight[:3, :40] = 0.0  # all-zero groups keep a usable scale
    codebook = {None: None, "fp-e1m1": torch.tensor([-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]),
                "unsorted": torch.tensor([0.3, -1.0, 1.0, -0.2])}[table]
    m = CodebookLinear.from_linear(lin, bits=bits, group_size=gs, codebook=codebook)
    assert m.codebook.shape == (1, 2 ** bits) and m.codebook.dtype == torch.float16
    assert m.scales.dtype == torch.float16 and m.bias is not None
    K = 100
    g = K if gs == -1 else gs
    s = m.scales.float().repeat_interleave(g, dim=1)[:, :K]
    z = lin.weight.detach().float() / s
    t = m.codebook.float()[0]
    q = cb.unpack(m.packed, bits, K).long()
    chosen = (z - t[q]).abs()
    best = (z[:, :, None] - t[None, None, :]).abs().min(dim=2).values
    assert torch.equal(chosen, best), "a weight did not take its nearest table entry"
    # the group's largest weight maps onto the table's largest magnitude (up to the fp16 scale rounding)
    assert (z.abs().amax(dim=1) <= t.abs().max() * (1 + 2 ** -10)).all()
    assert torch.equal(m.dequantize(), t[q] * s)


def test_from_linear_error_is_at_most_half_the_widest_gap():
    lin = nn.Linear(64, 32)
    m = CodebookLinear.from_linear(lin, bits=4, group_size=32)
    t = torch.tensor(cbnn.NF4, dtype=torch.float16).float()
    half_gap = (t[1:] - t[:-1]).max() / 2
    s = m.scales.float().repeat_interleave(32, dim=1)
    err = (m.dequantize() - lin.weight.detach()).abs() / s
    assert (err <= half_gap + 1e-3).all()


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------
def test_memory_bytes_counts_tables_and_scales_at_16_bits():
    N, K = 40, 100
    per_row = _layer(N, K, 3, 32, False)          # fp32 scales, fp16 per-row table, fp32 bias
    words, groups = math.ceil(K * 3 / 32), math.ceil(K / 32)
    codes, table, scales = N * words * 4, N * 8 * 2, N * groups * 2
    assert (codes, table, scales) == (1600, 640, 320)
    assert per_row.memory_bytes() == 2560
    assert per_row.memory_bytes(include_bias=True) == 2560 + N * 2
    assert per_row.bits_per_weight() == pytest.approx(2560 * 8 / (N * K))
    shared = _layer(N, K, 3, None, True, table_dtype=torch.float32)  # fp32 shared table, no scales
    assert shared.memory_bytes() == 1600 + 8 * 2
    assert shared.resident_bytes() == 1600 + 8 * 4 + N * 4
    # 4-bit NF4 g64 (the harness's number): 4 + 16/64 bits per weight + a 16-entry table
    nf4 = CodebookLinear.from_linear(nn.Linear(128, 64), bits=4, group_size=64)
    assert nf4.memory_bytes() == 64 * 128 // 2 + 64 * 2 * 2 + 16 * 2
    assert nf4.bits_per_weight() == pytest.approx(4.25 + 16 * 16 / (64 * 128))


def test_dense_cache_is_counted_and_reused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = _layer(24, 40, 3, 32, True)
    stored = m.resident_bytes()
    x = torch.randn(2, 40)
    y = m(x, backend="dequant")
    assert m.resident_bytes() == stored, "dequant keeps nothing"
    torch.testing.assert_close(m(x, backend="dense_cache"), y, rtol=0, atol=0)
    assert m.resident_bytes() == stored + 24 * 40 * 4  # one fp32 (N, K) weight
    m(x.bfloat16(), backend="dense_cache")
    assert m.resident_bytes() == stored + 24 * 40 * (4 + 2)
    calls = []
    monkeypatch.setattr(m, "dequantize", lambda: calls.append(1))
    m(x, backend="dense_cache")
    assert calls == [], "the cached weight must be reused, not rebuilt"
    assert m.memory_bytes() == _layer(24, 40, 3, 32, True).memory_bytes()
    m.to(torch.device("cpu"))
    assert m.resident_bytes() == stored


CODEBOOK_CHANGES = {  # name -> change of the storage after a forward; each one is seen by the next forward
    "scales-mul_": lambda m: m.scales.mul_(1.7),
    "scales-assigned": lambda m: setattr(m, "scales", m.scales * 0.6),
    "codebook-setitem": lambda m: m.codebook.__setitem__((0, slice(0, 4)), -3 * m.codebook[0, :4]),
    "codebook-assigned": lambda m: setattr(m, "codebook", torch.flip(m.codebook, dims=[1])),
    "packed-copy_": lambda m: m.packed.copy_(cb.pack(torch.randint(0, 2 ** m.bits, (24, 40)), m.bits)),
    "packed-assigned": lambda m: setattr(m, "packed", cb.pack(torch.randint(0, 2 ** m.bits, (24, 40)), m.bits)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("change", list(CODEBOOK_CHANGES))
@pytest.mark.parametrize("backend", ["dense_cache", "auto", "dequant"])
def test_storage_changes_after_a_forward_are_seen(backend, change, dtype, monkeypatch):
    """The dense cache follows packed/codebook/scales: changed in place or assigned after a first
    forward, the next forward matches dequantize() (it kept the old weight before)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # auto: dense_cache
    m = _layer(24, 40, 3, 32, True)
    x = torch.randn(2, 40, dtype=dtype)
    before = m(x, backend=backend)
    CODEBOOK_CHANGES[change](m)
    want = _reference(m, x)
    assert not torch.allclose(before.float(), want.float(), rtol=0.05, atol=0.05), "the change changed nothing"
    _assert_close(m(x, backend=backend), want, dtype, f"{backend} after {change}")
    assert len(m._dense) <= 1


def test_storage_change_is_checked_like_the_constructor(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = _layer(24, 40, 3, 32, True)
    x = torch.randn(2, 40)
    m(x)
    m.codebook = torch.zeros(1, 4)                       # 3 bits need 8 entries
    with pytest.raises(ValueError, match="codebook has shape"):
        m(x)
    m.codebook = torch.linspace(-1, 1, 8).reshape(1, 8)
    _assert_close(m(x), _reference(m, x), torch.float32, "after a valid table")
    m.release_dense_cache()
    assert m.resident_bytes() == _layer(24, 40, 3, 32, True).resident_bytes() - 8 * 2 + 8 * 4  # fp32 table


# ---------------------------------------------------------------------------------------------
# Module plumbing
# ---------------------------------------------------------------------------------------------
def test_state_dict_round_trip(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = _layer(32, 64, 4, 32, False)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = m(x)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = CodebookLinear(torch.zeros_like(m.packed), torch.zeros_like(m.codebook), torch.ones_like(m.scales),
                           in_features=64, bits=4, group_size=32, bias=torch.zeros(32))
    fresh(x)  # builds a dense cache of the placeholder weights, which loading must drop
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), y)


def test_to_moves_buffers_and_extra_repr():
    m = _layer(16, 32, 4, -1, True)
    r = repr(m)
    for s in ("in_features=32", "out_features=16", "bits=4", "codebook=shared", "group_size=per-channel",
              "backend='auto'"):
        assert s in r, r
    moved = m.to("meta")
    assert all(t.device.type == "meta" for t in (moved.packed, moved.codebook, moved.scales, moved.bias))


def test_bad_inputs():
    m = _layer(16, 32, 4, 32, True)
    with pytest.raises(ValueError, match=r"\(\.\.\., 32\)"):
        m(torch.randn(2, 31))
    with pytest.raises(TypeError, match="x must be"):
        m(torch.ones(2, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        m(torch.randn(2, 32), backend="torch_int4")
    q = torch.randint(0, 16, (16, 32))
    t = torch.randn(1, 16)
    with pytest.raises(ValueError, match=r"q must hold codes in \[0, 7\]"):
        CodebookLinear.from_codes(q, torch.randn(1, 8), None, bits=3)
    with pytest.raises(TypeError, match="q must be"):
        CodebookLinear.from_codes(q.float(), t, None, bits=4)
    with pytest.raises(ValueError, match=r"codebook has shape \(4, 16\)"):
        CodebookLinear.from_codes(q, torch.randn(4, 16), None, bits=4)
    with pytest.raises(TypeError, match="codebook must be float16"):
        CodebookLinear.from_codes(q, t.double(), None, bits=4)
    with pytest.raises(ValueError, match="scales has shape"):
        CodebookLinear.from_codes(q, t, torch.ones(16, 3), bits=4, group_size=16)
    with pytest.raises(ValueError, match="group_size"):
        CodebookLinear.from_codes(q, t, torch.ones(16, 2), bits=4, group_size=24)
    with pytest.raises(ValueError, match="bits"):
        CodebookLinear.from_codes(q, t, None, bits=9)
    with pytest.raises(ValueError, match="bias must have shape"):
        CodebookLinear.from_codes(q, t, None, bits=4, bias=torch.ones(15))
    with pytest.raises(TypeError, match="linear must be"):
        CodebookLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="NF4, which needs bits=4"):
        CodebookLinear.from_linear(nn.Linear(8, 8), bits=3)
    with pytest.raises(ValueError, match=r"codebook must have shape \(8,\)"):
        CodebookLinear.from_linear(nn.Linear(8, 8), bits=3, codebook=torch.randn(16))
    with pytest.raises(ValueError, match="words per row"):
        CodebookLinear(torch.zeros(16, 3, dtype=torch.int32), t, None, in_features=32, bits=4)
