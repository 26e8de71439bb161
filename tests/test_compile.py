"""``torch.compile(fullgraph=True)`` over every layer and backend: no graph break, the eager result.

fullgraph=True turns any graph break into an error, so a passing test is the proof. The
``aot_eager`` backend runs the traced graph with the same aten ops as eager, so its output must be
bit-identical to eager; one test compiles with Inductor (the default backend, C++ code generated
for this CPU) and compares within the dtype's tolerance. The Triton backends run under
TRITON_INTERPRET=1 (``make test`` sets it) through their custom operators (``triton_kernels.nn._ops``).
"""
import os

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from triton_kernels.nn import CodebookLinear, LowRankLinear, QuantLinear, SparseLinear
from triton_kernels.nn import _backend

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="the Triton backends run on CPU only under "
                                                             "TRITON_INTERPRET=1")
N, K = 40, 100  # N: not a multiple of 16 (the int4 op pads it); K: not a multiple of 32 or of a group


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _linear(dtype=torch.float32, n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return lin.to(dtype)


def _compiled_equals_eager(mod, x, *, max_frames=2, calls=3):
    """Compile ``mod`` with fullgraph=True (aot_eager), call it ``calls`` times, compare with eager."""
    with torch.no_grad():
        ref = mod(x)
        cnt = CompileCounterWithBackend("aot_eager")
        f = torch.compile(mod, fullgraph=True, backend=cnt)
        outs = [f(x) for _ in range(calls)]
    for y in outs:
        assert y.dtype == ref.dtype and y.shape == ref.shape
        assert torch.equal(y, ref), f"compiled output differs from eager: max {(y - ref).abs().max().item():.3g}"
    # One graph, plus at most one recompilation after the first compiled call stored a prepacked
    # copy on the module (see triton_kernels.nn._ops); never one per call.
    assert 1 <= cnt.frame_count <= max_frames, cnt.frame_count
    return f


QUANT_CASES = [  # (backend, bits, group_size, dtype)
    ("torch_int4", 4, 32, torch.bfloat16), ("torch_int4", 3, -1, torch.bfloat16), ("torch_int4", 2, 16, torch.float16),
    ("torch_int4x2", 6, 64, torch.bfloat16), ("torch_int4x2", 8, -1, torch.bfloat16),
    ("torch_int8", 8, -1, torch.bfloat16), ("torch_int8", 8, -1, torch.float16),  # rowsum columns; fp16 scaling
    ("dequant", 3, 32, torch.float32), ("dequant", 4, 64, torch.bfloat16),
]


@pytest.mark.parametrize("backend,bits,group_size,dtype", QUANT_CASES, ids=str)
def test_quant_linear_cpu_backends(backend, bits, group_size, dtype):
    q = QuantLinear.from_linear(_linear(), bits=bits, group_size=group_size, backend=backend)
    x = torch.randn(3, 5, K).to(dtype)  # leading batch dims
    _compiled_equals_eager(q, x)
    assert q.last_backend == backend


def test_quant_linear_auto_compiles_without_timing(monkeypatch):
    """Under torch.compile ``auto`` never times (a timer cannot be traced): it takes the choice an
    eager call measured, and without one, auto's static order. No eager call first here."""
    if INTERPRET:
        monkeypatch.delenv("TRITON_INTERPRET")  # auto on CPU would pick the (interpreted) Triton kernel
    _backend.clear_choices()
    q = QuantLinear.from_linear(_linear(), bits=8, group_size=-1)  # candidates torch_int8, torch_int4x2
    x = torch.randn(2, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y = torch.compile(q, fullgraph=True, backend="aot_eager")(x)
    assert q.last_candidates_ms is None and _backend.cached_choices() == {}
    with torch.no_grad():
        assert torch.equal(y, q(x, backend="torch_int8"))  # the static order's first


def test_quant_linear_cache_dequantized():
    q = QuantLinear.from_linear(_linear(), bits=4, group_size=32, backend="dequant", cache_dequantized=True)
    _compiled_equals_eager(q, torch.randn(4, K, dtype=torch.bfloat16))


@needs_interpreter
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, -1)])
def test_quant_linear_triton_operator(bits, group_size):
    q = QuantLinear.from_linear(_linear(), bits=bits, group_size=group_size, backend="triton")
    _compiled_equals_eager(q, torch.randn(2, K, dtype=torch.float16), max_frames=1, calls=2)


SPARSE_CASES = [  # (pattern, backend, options)
    ("block", "dense", {"block": (16, 16), "sparsity": 0.5}),
    ("block", "torch_bsr", {"block": (16, 16), "sparsity": 0.5}),
    ("nm", "dense", {"n": 2, "m": 4, "sparsity": 0.5}),
    ("unstructured", "dense", {"sparsity": 0.7}),
    ("unstructured", "torch_csr", {"sparsity": 0.7}),
    ("activation", "dense", {"threshold": 0.5}),
    ("activation", "torch_gather", {"threshold": 0.5}),
    ("activation", "torch_gather", {"sparsity": 0.5}),
]


@pytest.mark.parametrize("pattern,backend,opts", SPARSE_CASES, ids=str)
def test_sparse_linear_cpu_backends(pattern, backend, opts):
    mod = SparseLinear.from_linear(_linear(), pattern, backend=backend, **opts)
    _compiled_equals_eager(mod, torch.randn(2, 3, K), max_frames=1)


@needs_interpreter
@pytest.mark.parametrize("pattern,opts", [("block", {"block": (16, 16), "sparsity": 0.5}), ("nm", {"sparsity": 0.5}),
                                          ("unstructured", {"sparsity": 0.7}), ("activation", {"threshold": 0.5})],
                         ids=str)
def test_sparse_linear_triton_operators(pattern, opts):
    mod = SparseLinear.from_linear(_linear(), pattern, backend="triton", **opts)
    _compiled_equals_eager(mod, torch.randn(2, K), max_frames=1, calls=2)


def test_lowrank_two_matmul():
    mod = LowRankLinear.from_linear(_linear(), rank=8, backend="two_matmul")
    _compiled_equals_eager(mod, torch.randn(3, K), max_frames=1)


@needs_interpreter
def test_lowrank_triton_operator():
    mod = LowRankLinear.from_linear(_linear(), rank=8, backend="triton")
    _compiled_equals_eager(mod, torch.randn(2, K), max_frames=1, calls=2)


@pytest.mark.parametrize("backend", ["dense_cache", "dequant"] + (["triton"] if INTERPRET else []))
def test_codebook_linear(backend):
    mod = CodebookLinear.from_linear(_linear(), bits=4, group_size=32, backend=backend)
    _compiled_equals_eager(mod, torch.randn(2, K, dtype=torch.bfloat16), calls=2)


def test_inductor_model_of_every_layer(monkeypatch):
    """The default backend (Inductor) on a stack of all four layers with their CPU fast paths."""
    if INTERPRET:
        monkeypatch.delenv("TRITON_INTERPRET")
    dt = torch.bfloat16
    model = nn.Sequential(
        QuantLinear.from_linear(_linear(n=96, k=K, seed=1), bits=4, group_size=32, backend="torch_int4"),
        nn.ReLU(),
        QuantLinear.from_linear(_linear(n=64, k=96, seed=2), bits=6, group_size=32, backend="torch_int4x2"),
        LowRankLinear.from_linear(_linear(n=64, k=64, seed=3), rank=8),
        CodebookLinear.from_linear(_linear(n=48, k=64, seed=4), bits=4, group_size=32, backend="dense_cache"),
    ).to(dt)
    sparse = SparseLinear.from_linear(_linear(n=24, k=48, seed=5), "unstructured", sparsity=0.6, backend="torch_csr")
    x = torch.randn(3, K, dtype=dt)
    with torch.no_grad():
        ref = sparse(model(x).float())
        f = torch.compile(lambda t: sparse(model(t).float()), fullgraph=True)
        for _ in range(2):
            y = f(x)
            torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)  # bf16 layers, fused differently


def test_compressed_llama_fullgraph(monkeypatch):
    """A (tiny, random) Llama compressed by the harness, compiled whole: no graph break."""
    transformers = pytest.importorskip("transformers")
    from experiments.methods.compress import compress_model, parse_spec
    if INTERPRET:
        monkeypatch.delenv("TRITON_INTERPRET")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    compress_model(model, parse_spec({"method": "rtn", "bits": 4, "group_size": 32}), None, progress=False)
    model.to(torch.bfloat16)
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        cnt = CompileCounterWithBackend("aot_eager")
        f = torch.compile(model, fullgraph=True, backend=cnt)
        for _ in range(3):
            assert torch.equal(f(ids, use_cache=False).logits, ref)
    assert cnt.frame_count <= 2
    assert {type(m).__name__ for m in model.modules()} >= {"QuantLinear"}


def _opcheck_cases():
    """(operator, args) for every custom operator, built from small real layers."""
    from triton_kernels.nn import _ops
    x = torch.randn(3, K)
    csr = SparseLinear.from_linear(_linear(), "unstructured", sparsity=0.7, backend="torch_csr")
    bsr = SparseLinear.from_linear(_linear(), "block", block=(16, 16), sparsity=0.5, backend="torch_bsr")
    gat = SparseLinear.from_linear(_linear(), "activation", threshold=0.5, backend="torch_gather")
    amask = x.abs() >= 0.5
    cases = [
        (_ops.csr_linear, (x, csr.crow, csr.col, csr.values, csr.bias, N, K)),
        (_ops.bsr_linear, (x, bsr.row_ptr, bsr.col_idx, bsr.values, bsr.bias, N, K, 16, 16)),
        (_ops.gather_linear, (torch.where(amask, x, 0.0), amask, gat.weight_t, gat.bias)),
    ]
    if INTERPRET:
        xh = x.half()
        q = QuantLinear.from_linear(_linear(), bits=3, group_size=32, backend="triton")
        cbk = CodebookLinear.from_linear(_linear(), bits=4, group_size=32, backend="triton")
        lr = LowRankLinear.from_linear(_linear(torch.float16), rank=8, backend="triton")
        blk = SparseLinear.from_linear(_linear(), "block", block=(16, 16), sparsity=0.5, backend="triton")
        nm = SparseLinear.from_linear(_linear(), "nm", sparsity=0.5, backend="triton")
        un = SparseLinear.from_linear(_linear(), "unstructured", sparsity=0.7, backend="triton")
        act = SparseLinear.from_linear(_linear(), "activation", threshold=0.5, backend="triton")
        cases += [
            (_ops.dequant_linear, (xh, q.packed, q.scales, q.zeros, q.bias, 3, 32, False)),
            (_ops.codebook_linear, (xh, cbk.packed, cbk.codebook, cbk.scales, cbk.bias, 4, 32)),
            (_ops.lowrank_linear, (xh, lr.U, lr.V, lr.bias)),
            (_ops.block_sparse_linear, (x, blk.values, blk.row_ptr, blk.col_idx, blk.bias, N, K, 16, 16)),
            (_ops.nm_linear, (x, nm.values, nm.meta, nm.bias, N, K, 2, 4)),
            (_ops.masked_linear, (x, un.weight, un.bits, un.tile_ptr, un.tile_k, un.bias, 64, 64)),
            (_ops.activation_sparse_linear, (x, act.weight_t, amask, act.bias)),
        ]
    return cases


def test_custom_operators_pass_opcheck():
    """torch.library.opcheck: schema, fake (meta) implementation vs the real output (shape, dtype,
    strides), and tracing through AOT dispatch, for every operator of triton_kernels.nn._ops."""
    for op, args in _opcheck_cases():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
