"""Compile-check cases for ``triton_kernels.sparse_matmul``: every autotune config of the four kernels.

Representative problem: a 4096 x 4096 layer in bfloat16 (fp16 compiles the same tiles), M = 128 rows
for the tiled kernels (prefill) and M = 1 (GEMV path) and M = 16 (tl.dot path) for activation sparsity.
Block sparsity is compiled for 32 x 32 and 64 x 64 blocks, N:M for 2:4 and 1:4 (2-bit indices) and 4:8 (3-bit),
the masked kernel for its default 64 x 64 tiles. Configs are filtered by the same shared-memory pruning
the launcher applies, so every config that can run on a GPU is compiled. fp32 is not compiled: its
tiles are twice as large and the launch-time pruning drops the ones that would not fit.

The wide-load rule (packed weights fetched >= 64 bits at a time) holds for the decode configs: the
BLOCK_M = 16 tiles, which the launchers' pruning keeps as the only candidates at M <= 16, and both
activation-sparsity paths. There the values come in 128-bit loads, 2:4 index words and mask words as
64-bit pairs (rows with an even number of int32 words, as every K that is a multiple of 64 gives; 1:4's
16 indices per tile as half of such a pair), and 4:8's bit-plane words as 64-bit words. Not compiled
here: 1:8/2:8 (the same plane path as 4:8).
"""
import torch

from triton_kernels import sparse_matmul as sm
from triton_kernels.compile_cases.case import Case

M, N, K = 128, 4096, 4096
DTYPE = torch.bfloat16


def _name(cfg) -> str:
    return "_".join(f"{k}{v}" for k, v in cfg.kwargs.items()) + f"_w{cfg.num_warps}_s{cfg.num_stages}"


def _decode(cfg) -> bool:
    """A config the launchers keep at M <= 16 (see ``sparse_matmul.prune_tiled_configs``)."""
    return cfg.kwargs["BLOCK_M"] == 16


def _meta(cfg, **extra) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "DOT_PRECISION": "tf32", "UPCAST_DOT": False, "HAS_BIAS": True, **extra}


def _pruned(configs, x, **meta):
    return sm.prune_tiled_configs(configs, {"x_ptr": x}, **meta)


def cases() -> list[Case]:
    out = []
    x = torch.empty(M, K, dtype=DTYPE)
    y = torch.empty(M, N, dtype=DTYPE)
    bias = torch.empty(N, dtype=DTYPE)

    for bn, bk in ((32, 32), (64, 64)):
        nnzb = (N // bn) * (K // bk) // 10  # 90% block sparsity; the count does not change the code
        values = torch.empty(nnzb, bn, bk, dtype=DTYPE)
        row_ptr = torch.empty(N // bn + 1, dtype=torch.int32)
        col_idx = torch.empty(nnzb, dtype=torch.int32)
        for cfg in _pruned(sm.block_sparse_configs(interpret=False), x, BLOCK_N=bn, BLOCK_K=bk):
            args = (x, values, row_ptr, col_idx, bias, y, M, N, K, x.stride(0), x.stride(1), y.stride(0), y.stride(1))
            out.append(Case(sm.block_sparse_matmul_kernel.fn, f"sparse_block_{bn}x{bk}", _name(cfg), args,
                            _meta(cfg, BLOCK_N=bn, BLOCK_K=bk), weight_args=(1,), wide_loads=_decode(cfg)))

    for n, m in ((2, 4), (1, 4), (4, 8)):
        bits = sm.nm_index_bits(m)
        kc = K * n // m
        values = torch.empty(N, kc, dtype=DTYPE)
        meta = torch.empty(N, sm.nm_meta_words(kc, m), dtype=torch.int32)
        for cfg in sm.prune_nm_configs(sm.nm_configs(interpret=False), {"x_ptr": x}):
            args = (x, values, meta, bias, y, M, N, K, kc, x.stride(0), x.stride(1), values.stride(0),
                    values.stride(1), meta.stride(0), y.stride(0), y.stride(1))
            out.append(Case(sm.nm_matmul_kernel.fn, f"sparse_nm_{n}of{m}", _name(cfg), args,
                            _meta(cfg, NN=n, MM=m, IDX_BITS=bits, IDX_PER_WORD=32 // bits,
                                  WHOLE_WORDS=sm.nm_whole_words(n, m), WORDS64=sm.words64(meta)),
                            weight_args=(1, 2), wide_loads=_decode(cfg)))

    tn, tk = 64, 64
    w = torch.empty(N, K, dtype=DTYPE)
    bitsw = torch.empty(N, K // 32, dtype=torch.int32)
    tile_ptr = torch.empty(N // tn + 1, dtype=torch.int32)
    tile_k = torch.empty((N // tn) * (K // tk), dtype=torch.int32)
    for cfg in _pruned(sm.masked_configs(interpret=False), x, BLOCK_N=tn, BLOCK_K=tk):
        args = (x, w, bitsw, tile_ptr, tile_k, bias, y, M, N, K, x.stride(0), x.stride(1), w.stride(0),
                w.stride(1), bitsw.stride(0), y.stride(0), y.stride(1))
        out.append(Case(sm.masked_matmul_kernel.fn, "sparse_masked_64x64", _name(cfg), args,
                        _meta(cfg, BLOCK_N=tn, BLOCK_K=tk, WORDS64=sm.words64(bitsw)), weight_args=(1, 2),
                        wide_loads=_decode(cfg)))

    wt = torch.empty(K, N, dtype=DTYPE).t()  # (N, K) view of a contiguous (K, N) weight, as the layer stores it
    idx = torch.empty(K, dtype=torch.int32)
    count = torch.empty(1, dtype=torch.int32)
    for rows, block_m in ((1, 1), (16, 16)):
        xs = torch.empty(rows, K, dtype=DTYPE)
        ys = torch.empty(rows, N, dtype=DTYPE)
        for cfg in sm.activation_sparse_configs(interpret=False):
            args = (xs, wt, idx, count, bias, ys, rows, N, xs.stride(0), xs.stride(1), wt.stride(1),
                    wt.stride(0), ys.stride(0), ys.stride(1))
            out.append(Case(sm.activation_sparse_matmul_kernel.fn, f"sparse_activation_M{rows}", _name(cfg),
                            args, _meta(cfg, BLOCK_M=block_m), weight_args=(1,), wide_loads=True))
    return out
