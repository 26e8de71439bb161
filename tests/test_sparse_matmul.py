"""Interpreter tests for ``triton_kernels.sparse_matmul``: every pattern x dtype on odd shapes.

Each kernel is compared with its ``*_reference`` (fp32 math on the same stored weight, rounded to the
activation dtype). Tolerances allow about two units in the last place of the output dtype, since the
kernel and the reference sum the same exact products in a different order.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_kernels import sparse_matmul as sm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-3, 1.6e-2)}
# (M, N, K): decode row, a few rows, more than one BLOCK_M=16 tile; N, K never block multiples
SHAPES = [(1, 97, 131), (3, 70, 200), (17, 45, 77)]
NM = [(2, 4), (1, 4), (4, 8)]


def _id(v):
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def assert_close(out, ref, dtype):
    atol, rtol = TOL[dtype]
    out, ref = out.float(), ref.float()
    assert not torch.isnan(out[~torch.isnan(ref)]).any(), "output has NaN where the reference has none"
    err = (out - ref).abs()
    bad = err > atol + rtol * ref.abs()
    assert not bad.any(), (f"{int(bad.sum())} mismatches: max abs err {err.max().item():.3g}, "
                           f"max rel err {(err / ref.abs().clamp_min(1e-12)).max().item():.3g}")


def _data(M, N, K, dtype, bias=True):
    # x sliced out of a wider NaN-filled buffer: a load that ignores the K mask or the stride reads NaN
    buf = torch.full((M, K + 7), float("nan"), dtype=dtype)
    buf[:, :K] = torch.randn(M, K).to(dtype)
    x = buf[:, :K]
    w = (torch.randn(N, K) / K ** 0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    return x, w, b


def _poisoned(M, N, dtype):
    return torch.full((M, N), float("nan"), dtype=dtype)


# ---------------------------------------------------------------- block sparsity
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("block", [(32, 16), (16, 64)], ids=_id)
def test_block_sparse_matches_reference(shape, dtype, block):
    M, N, K = shape
    x, w, b = _data(M, N, K, dtype)
    mask = sm.block_prune(w, block, 0.6)
    mask[: block[0]] = False  # an empty block row: its outputs are bias only
    mask[-1, -1] = True  # keep an edge block (magnitude pruning drops the smaller edge blocks)
    bsw = sm.to_block_sparse(w * mask, block)
    assert int(bsw.row_ptr[1] - bsw.row_ptr[0]) == 0
    out = sm.block_sparse_matmul(x, bsw, b, out=_poisoned(M, N, dtype))
    assert_close(out, sm.block_sparse_matmul_reference(x, bsw, b), dtype)
    assert_close(out, torch.nn.functional.linear(x.float(), (w * mask).float(), b.float()), dtype)


@pytest.mark.parametrize("density", ["empty", "full"])
def test_block_sparse_all_zero_and_all_dense(density):
    M, N, K = 3, 50, 70
    x, w, b = _data(M, N, K, torch.float32, bias=False)
    if density == "empty":
        w = torch.zeros_like(w)
    bsw = sm.to_block_sparse(w, (16, 32))
    assert bsw.values.shape[0] == (0 if density == "empty" else 4 * 3)
    out = sm.block_sparse_matmul(x, bsw, out=_poisoned(M, N, torch.float32))
    assert_close(out, x @ w.t(), torch.float32)


def test_block_sparse_batch_dims_and_memory():
    x = torch.randn(2, 3, 64)
    w = torch.randn(96, 64)
    w = w * sm.block_prune(w, (32, 32), 0.5)
    bsw = sm.to_block_sparse(w, (32, 32))
    y = sm.block_sparse_matmul(x, bsw)
    assert y.shape == (2, 3, 96)
    assert_close(y, sm.block_sparse_matmul_reference(x, bsw), torch.float32)
    # 3 of 6 blocks of 32x32 fp32 + row_ptr (4) + col_idx (3) int32
    assert bsw.memory_bytes() == 3 * 32 * 32 * 4 + 4 * 4 + 3 * 4


# ---------------------------------------------------------------- N:M
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("nm", NM, ids=lambda v: f"{v[0]}of{v[1]}")
def test_nm_matches_reference(shape, dtype, nm):
    M, N, K = shape
    x, w, b = _data(M, N, K, dtype)
    pruned = w * sm.nm_prune(w, *nm)
    nmw = sm.nm_compress(pruned, *nm)
    assert torch.equal(nmw.to_dense(), pruned)
    out = sm.nm_matmul(x, nmw, b, out=_poisoned(M, N, dtype))
    assert_close(out, sm.nm_matmul_reference(x, nmw, b), dtype)


def test_nm_sparser_than_pattern_and_memory():
    # groups with fewer than n nonzeros (incl. an all-zero weight row) are stored with explicit zeros
    w = torch.randn(40, 64)
    w = w * sm.nm_prune(w, 1, 4)
    w[5] = 0
    nmw = sm.nm_compress(w, 2, 4)
    assert torch.equal(nmw.to_dense(), w)
    x = torch.randn(3, 64)
    assert_close(sm.nm_matmul(x, nmw), x @ w.t(), torch.float32)
    # 2:4 of K=64: 32 values per row (fp32) + 32 2-bit indices = 2 int32 words per row
    assert nmw.memory_bytes() == 40 * 32 * 4 + 40 * 2 * 4


def test_nm_padding_of_last_group():
    # K = 10 is padded to 12 for m=4: the padded positions must never be read from x
    w = torch.randn(20, 10)
    w = w * sm.nm_prune(w, 2, 4)
    nmw = sm.nm_compress(w, 2, 4)
    assert nmw.values.shape == (20, 6) and nmw.to_dense().shape == (20, 10)
    xbuf = torch.full((2, 16), float("nan"))
    xbuf[:, :10] = torch.randn(2, 10)
    x = xbuf[:, :10]
    assert_close(sm.nm_matmul(x, nmw), x @ w.t(), torch.float32)


def _misaligned(words: torch.Tensor) -> torch.Tensor:
    """The same int32 words starting 4 bytes past an 8-byte boundary (the kernels then read 32-bit words)."""
    buf = torch.zeros(words.numel() + 1, dtype=torch.int32)
    out = buf[1:].view(words.shape)
    out.copy_(words)
    return out


def test_nm_m8_bit_plane_layout():
    """m = 8 indices are bit planes in chunks of 64: plane p of chunk c is the 64-bit word 3c + p
    (int32 words 6c + 2p, low half, and 6c + 2p + 1), its bit i = bit p of index 64c + i; exactly
    3 bits per index, the last chunk zero-padded."""
    N, K = 3, 8 * 100  # 4:8: KC = 400 kept per row, 7 chunks (the last holds 16)
    w = torch.randn(N, K)
    nmw = sm.nm_compress(w * sm.nm_prune(w, 4, 8), 4, 8)
    assert nmw.meta.shape == (N, 6 * 7) and nmw.meta.dtype == torch.int32
    idx = nmw.indices()
    words = nmw.meta.long() & 0xFFFFFFFF
    for j in (0, 31, 32, 63, 64, 200, 399):
        for p in range(3):
            word = words[:, 6 * (j // 64) + 2 * p + (j % 64) // 32]
            assert torch.equal((word >> (j % 32)) & 1, (idx[:, j] >> p) & 1), (j, p)
    assert int((words[:, 6 * 6:] >> 16).sum()) == 0  # padding of the last chunk (indices 400..447)
    assert nmw.memory_bytes() == N * 400 * 4 + N * 6 * 7 * 4
    # K a multiple of 128: exactly 3 bits per kept value (4:8 at K=4096: 768 bytes of planes per row)
    big = sm.nm_compress(torch.zeros(2, 4096), 4, 8)
    assert big.meta.shape == (2, 192) and big.meta.numel() * 32 == 2 * 2048 * 3


@pytest.mark.parametrize("nm", [(4, 8), (2, 8), (1, 8)], ids=lambda v: f"{v[0]}of{v[1]}")
def test_nm_m8_misaligned_planes_are_copied(nm):
    """The plane words are read 64 bits wide: a meta view 4 bytes off an 8-byte boundary is copied."""
    M, N, K = 2, 21, 300
    x, w, b = _data(M, N, K, torch.float32)
    nmw = sm.nm_compress(w * sm.nm_prune(w, *nm), *nm)
    ref = sm.nm_matmul_reference(x, nmw, b)
    odd = sm.NMWeight(nmw.values, _misaligned(nmw.meta), nmw.shape, *nm)
    assert not sm.words64(odd.meta)
    assert_close(sm.nm_matmul(x, odd, b), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("nm, K", [((2, 4), 250), ((2, 4), 64), ((2, 4), 1000), ((1, 4), 500), ((1, 4), 128)],
                         ids=["2of4-K250", "2of4-K64", "2of4-K1000", "1of4-K500", "1of4-K128"])
def test_nm_64bit_index_words(nm, K, dtype):
    """m = 4 rows with an even number of index words are read 64 bits at a time: 2:4 tiles take whole
    word pairs (partial last word at K=250: 126 kept, 8 words; one pair per row at K=64; many tiles at
    K=1000), 1:4 tiles (16 indices) half a pair each (K=500: 125 kept, 8 words). The same words 4 bytes
    off an 8-byte boundary take the 32-bit paths and give the same result."""
    M, N = 3, 37
    x, w, b = _data(M, N, K, dtype)
    pruned = w * sm.nm_prune(w, *nm)
    nmw = sm.nm_compress(pruned, *nm)
    assert nmw.meta.shape[1] % 2 == 0 and sm.words64(nmw.meta)
    out = sm.nm_matmul(x, nmw, b, out=_poisoned(M, N, dtype))
    ref = sm.nm_matmul_reference(x, nmw, b)
    assert_close(out, ref, dtype)
    odd = sm.NMWeight(nmw.values, _misaligned(nmw.meta), nmw.shape, *nm)
    assert not sm.words64(odd.meta)
    assert torch.equal(sm.nm_matmul(x, odd, b), out)


@pytest.mark.parametrize("K", [250, 128, 77], ids=lambda k: f"K{k}")
def test_masked_64bit_mask_words(K):
    """64-wide tiles read a row's mask bits as one 64-bit word when rows hold an even number of int32
    words (K=250: 8 words, the last partial; K=128), else two 32-bit words (K=77: 3 words)."""
    M, N = 3, 45
    x, w, b = _data(M, N, K, torch.float32)
    mask = torch.rand(N, K, generator=torch.Generator().manual_seed(2)) < 0.4
    mask[:, 64:128] = False  # an empty 64-wide tile column
    w[~mask] = float("nan")
    mw = sm.to_masked(w, mask, tile=(16, 64))
    assert sm.words64(mw.bits) == (-(-K // 32) % 2 == 0)
    out = sm.packed_masked_matmul(x, mw, b, out=_poisoned(M, N, torch.float32))
    assert_close(out, sm.masked_matmul_reference(x, w, mask, b), torch.float32)
    off = sm.MaskedWeight(mw.weight, _misaligned(mw.bits), mw.tile_ptr, mw.tile_k, mw.shape, mw.tile)
    assert not sm.words64(off.bits)
    assert torch.equal(sm.packed_masked_matmul(x, off, b), out)


def test_words64_needs_aligned_rows_of_even_length():
    w = torch.zeros(4, 6, dtype=torch.int32)
    assert sm.words64(w)
    assert not sm.words64(torch.zeros(4, 5, dtype=torch.int32))  # odd words per row
    assert not sm.words64(_misaligned(w))  # 4 bytes off
    assert not sm.words64(torch.zeros(4, 12, dtype=torch.int32)[:, ::2])  # strided words


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 20), K=st.integers(1, 40), nm=st.sampled_from(sorted(sm._NM_PATTERNS)),
       seed=st.integers(0, 2**16))
def test_nm_round_trip_property(N, K, nm, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    w[torch.rand(N, K, generator=g) < 0.2] = 0
    pruned = w * sm.nm_prune(w, *nm)
    nmw = sm.nm_compress(pruned, *nm)
    assert torch.equal(nmw.to_dense(), pruned)
    assert bool((nmw.indices() < nm[1]).all())


# ---------------------------------------------------------------- unstructured
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_masked_matches_reference(shape, dtype):
    M, N, K = shape
    x, w, b = _data(M, N, K, dtype)
    mask = torch.rand(N, K) < 0.3
    mask[:, 64:] = False  # whole tile columns are empty and skipped
    w[~mask] = float("nan")  # dropped weights must not leak, whatever they hold
    out = sm.masked_matmul(x, w, mask, b, out=_poisoned(M, N, dtype))
    assert_close(out, sm.masked_matmul_reference(x, w, mask, b), dtype)


@pytest.mark.parametrize("tile", [(16, 16), (16, 32), (32, 64)], ids=_id)
def test_masked_tiles_narrower_and_wider_than_a_mask_word(tile):
    """16- and 32-wide tiles read one mask word per row (a 16-wide tile may start mid-word), 64-wide
    tiles two: every tile width against the reference, K not a multiple of the tile or of 32."""
    M, N, K = 3, 45, 77
    x, w, b = _data(M, N, K, torch.float32)
    mask = torch.rand(N, K, generator=torch.Generator().manual_seed(1)) < 0.4
    mask[:, 16:32] = False  # an empty 16-wide tile column in the middle of the first word
    w[~mask] = float("nan")
    mw = sm.to_masked(w, mask, tile=tile)
    out = sm.packed_masked_matmul(x, mw, b, out=_poisoned(M, N, torch.float32))
    assert_close(out, sm.masked_matmul_reference(x, w, mask, b), torch.float32)


@pytest.mark.parametrize("density", ["empty", "full"])
def test_masked_all_zero_and_all_dense(density):
    M, N, K = 17, 45, 77
    x, w, b = _data(M, N, K, torch.float32)
    mask = torch.full((N, K), density == "full")
    mw = sm.to_masked(w, mask)
    assert mw.tile_k.numel() == (0 if density == "empty" else 1 * 2)
    out = sm.packed_masked_matmul(x, mw, b, out=_poisoned(M, N, torch.float32))
    assert_close(out, x @ (w * mask).t() + b, torch.float32)


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 70), K=st.integers(1, 100), p=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_mask_pack_round_trip_property(N, K, p, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(N, K, generator=g) < p
    w = torch.randn(N, K, generator=g)
    mw = sm.to_masked(w, mask, tile=(16, 32))
    assert torch.equal(mw.mask(), mask)
    tiles = torch.nn.functional.pad(mask, (0, -K % 32, 0, -N % 16)).reshape(-(-N // 16), 16, -1, 32)
    assert mw.tile_k.numel() == int(tiles.any(3).any(1).sum())


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 70), K=st.integers(1, 70), block=st.sampled_from([(16, 16), (32, 16), (16, 64)]),
       s=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_block_round_trip_property(N, K, block, s, seed):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    pruned = w * sm.block_prune(w, block, s)
    assert torch.equal(sm.to_block_sparse(pruned, block).to_dense(), pruned)


# ---------------------------------------------------------------- activation sparsity
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("layout", ["transposed", "nn_linear"])
def test_activation_threshold_matches_reference(shape, dtype, layout):
    M, N, K = shape
    x, w, b = _data(M, N, K, dtype)
    wk = sm.activation_sparse_weight(w) if layout == "transposed" else w
    out = sm.activation_sparse_matmul(x, wk, threshold=0.7, bias=b, out=_poisoned(M, N, dtype))
    assert_close(out, sm.activation_sparse_matmul_reference(x, w, threshold=0.7, bias=b), dtype)


def test_activation_mask_union_keeps_rows_separate():
    # feature 3 is kept only in row 0: its weight column is loaded (union) but row 1 must drop it
    M, N, K = 2, 33, 40
    x, w, _ = _data(M, N, K, torch.float32, bias=False)
    mask = torch.zeros(M, K, dtype=torch.bool)
    mask[0, 3] = True
    mask[1, 7:9] = True
    out = sm.activation_sparse_matmul(x, w, mask=mask, out=_poisoned(M, N, torch.float32))
    expected = torch.stack([x[0, 3] * w[:, 3], x[1, 7] * w[:, 7] + x[1, 8] * w[:, 8]])
    assert_close(out, expected, torch.float32)
    assert_close(out, sm.activation_sparse_matmul_reference(x, w, mask=mask), torch.float32)


@pytest.mark.parametrize("M", [1, 3])
def test_activation_all_dropped_gives_bias(M):
    x, w, b = _data(M, 20, 30, torch.float32)
    out = sm.activation_sparse_matmul(x, w, threshold=1e9, bias=b, out=_poisoned(M, 20, torch.float32))
    assert torch.equal(out, b.expand(M, 20))


def test_activation_broadcast_mask_and_batch_dims():
    x = torch.randn(2, 3, 50)
    w = torch.randn(24, 50)
    mask = torch.rand(50) < 0.5  # one feature mask for every row
    y = sm.activation_sparse_matmul(x, w, mask=mask)
    assert y.shape == (2, 3, 24)
    assert_close(y, (x * mask) @ w.t(), torch.float32)


# ---------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    w = torch.randn(16, 32)
    with pytest.raises(ValueError, match="weight is not 2:4"):
        sm.nm_compress(w, 2, 4)
    with pytest.raises(ValueError, match=r"\(n, m\)"):
        sm.nm_compress(w, 3, 4)
    with pytest.raises(ValueError, match="block"):
        sm.to_block_sparse(w, (8, 32))
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        sm.masked_matmul(torch.randn(2, 32), w, torch.ones(16, 31, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a boolean"):
        sm.masked_matmul(torch.randn(2, 32), w, torch.ones(16, 32))
    bsw = sm.to_block_sparse(w, (16, 16))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., K=32\)"):
        sm.block_sparse_matmul(torch.randn(2, 31), bsw)
    with pytest.raises(TypeError, match="x has dtype torch.float16"):
        sm.block_sparse_matmul(torch.randn(2, 32, dtype=torch.float16), bsw)
    with pytest.raises(ValueError, match="x is on meta"):
        sm.block_sparse_matmul(torch.randn(2, 32, device="meta"), bsw)
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(16,\)"):
        sm.block_sparse_matmul(torch.randn(2, 32), bsw, torch.randn(15))
    with pytest.raises(TypeError, match="bsw must be a BlockSparseWeight"):
        sm.block_sparse_matmul(torch.randn(2, 32), w)
    with pytest.raises(ValueError, match="exactly one of threshold"):
        sm.activation_sparse_matmul(torch.randn(2, 32), w, threshold=0.1, mask=torch.ones(32, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        sm.activation_sparse_matmul(torch.randn(2, 32), w, mask=torch.ones(3, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="sparsity must be a fraction"):
        sm.magnitude_prune(w, 1.5)


def test_prune_helpers_keep_the_requested_amount():
    w = torch.randn(50, 70)
    assert int(sm.magnitude_prune(w, 0.75).sum()) == round(0.25 * w.numel())
    m = sm.nm_prune(w, 2, 4)
    assert (torch.nn.functional.pad(m, (0, 2)).reshape(50, -1, 4).sum(-1) <= 2).all()
    keep = sm.magnitude_prune(w, 0.5)
    assert w.abs()[keep].min() >= w.abs()[~keep].max()


@pytest.mark.parametrize("M", [1, 16, 17, 128])
def test_decode_keeps_only_the_block_m_16_configs(M):
    """At M <= 16 the launchers autotune only the BLOCK_M = 16 tiles (the configs the compile check
    holds to the wide-load rule); above, every tile that fits shared memory."""
    x = torch.empty(M, 4096, dtype=torch.bfloat16)
    for configs, prune, extra in ((sm.block_sparse_configs(False), sm.prune_tiled_configs,
                                   {"BLOCK_N": 32, "BLOCK_K": 32}),
                                  (sm.masked_configs(False), sm.prune_tiled_configs, {"BLOCK_N": 64, "BLOCK_K": 64}),
                                  (sm.nm_configs(False), sm.prune_nm_configs, {})):
        kept = prune(configs, {"x_ptr": x, "M": M}, **extra)
        sizes = {c.kwargs["BLOCK_M"] for c in kept}
        assert sizes == {16} if M <= 16 else len(sizes) > 1, (M, sizes)
