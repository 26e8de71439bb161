"""``SparseLinear``: every pattern x backend agrees with the masked dense layer; storage accounting."""
import pytest
import torch
from torch import nn

from triton_kernels import sparse_matmul as sm
from triton_kernels.nn import _backend
from triton_kernels.nn.sparse import BACKENDS, SparseLinear, cpu_candidates

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-3, 1.6e-2)}
N, K = 70, 100  # neither a multiple of the blocks nor of 32


def assert_close(out, ref, dtype):
    atol, rtol = TOL[dtype]
    out, ref = out.float(), ref.float()
    assert not torch.isnan(out).any(), "output has NaN"
    err = (out - ref).abs()
    bad = err > atol + rtol * ref.abs()
    assert not bad.any(), (f"{int(bad.sum())} mismatches: max abs err {err.max().item():.3g}, "
                           f"max rel err {(err / ref.abs().clamp_min(1e-12)).max().item():.3g}")


def _linear(dtype=torch.float32, bias=True):
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3)
    return lin.to(dtype)


OPTS = {"block": {"block": (32, 32), "sparsity": 0.7}, "nm": {"n": 2, "m": 4, "sparsity": 0.5},
        "unstructured": {"sparsity": 0.8}, "activation": {"threshold": 0.6}}


def _expected(lin, mod, x):
    if mod.pattern == "activation":
        return sm.activation_sparse_matmul_reference(x, lin.weight.detach(), threshold=0.6, bias=lin.bias.detach())
    return sm.masked_matmul_reference(x, mod.dense_weight(), mod.dense_weight() != 0, lin.bias.detach())


@pytest.mark.parametrize("pattern,backend", [(p, b) for p in OPTS for b in BACKENDS[p] if b != "auto"],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("M", [1, 17])
def test_backends_agree(pattern, backend, M):
    lin = _linear()
    mod = SparseLinear.from_linear(lin, pattern, backend=backend, **OPTS[pattern])
    assert mod.backend == backend
    x = torch.randn(M, K)
    ref = _expected(lin, mod, x)
    assert_close(mod(x), ref, torch.float32)
    # every backend stores the same effective weight
    auto = SparseLinear.from_linear(lin, pattern, backend="dense", **OPTS[pattern])
    assert torch.equal(mod.dense_weight(), auto.dense_weight())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", list(OPTS))
def test_triton_half_dtypes(pattern, dtype):
    lin = _linear(dtype)
    mod = SparseLinear.from_linear(lin, pattern, **OPTS[pattern])
    assert mod.backend == "triton"  # auto under TRITON_INTERPRET=1
    x = torch.randn(2, 3, K).to(dtype)
    y = mod(x)
    assert y.shape == (2, 3, N) and y.dtype == dtype
    assert_close(y, _expected(lin, mod, x), dtype)


def test_given_mask_is_used_exactly():
    lin = _linear()
    mask = torch.rand(N, K) < 0.4
    for pattern in ("block", "unstructured"):
        mod = SparseLinear.from_linear(lin, pattern, mask=mask)
        assert torch.equal(mod.dense_weight(), lin.weight.detach() * mask)
    nm_mask = sm.nm_prune(torch.randn(N, K), 2, 4)  # an n:m mask not chosen by this weight's magnitude
    mod = SparseLinear.from_linear(lin, "nm", mask=nm_mask)
    assert torch.equal(mod.dense_weight(), lin.weight.detach() * nm_mask)
    assert mod.sparsity == pytest.approx(float((lin.weight * nm_mask == 0).float().mean()))


def test_activation_target_sparsity_drops_that_fraction():
    lin = _linear()
    mod = SparseLinear.from_linear(lin, "activation", sparsity=0.5)
    x = torch.randn(3, K)
    keep = x.abs() >= x.abs().topk(K // 2, dim=-1).values[..., -1:]
    assert torch.equal(mod._activation_mask(x), keep)
    ref = sm.activation_sparse_matmul_reference(x, lin.weight.detach(), mask=keep, bias=lin.bias.detach())
    assert_close(mod(x), ref, torch.float32)


def test_memory_accounting():
    lin = _linear(torch.float16, bias=False)
    nm = SparseLinear.from_linear(lin, "nm", n=2, m=4, sparsity=0.5)
    # K=100: 50 fp16 values per row (8 bits/weight) + 50 2-bit indices in 4 int32 words per row
    assert nm.memory_bytes() == N * 50 * 2 + N * 4 * 4
    assert nm.bits_per_weight() == pytest.approx(8 * nm.memory_bytes() / (N * K))
    blk = SparseLinear.from_linear(lin, "block", block=(16, 16), sparsity=0.9)
    nnzb = blk.values.shape[0]
    assert nnzb == round((1 - 0.9) * 5 * 7)
    assert blk.memory_bytes() == nnzb * 16 * 16 * 2 + (5 + 1) * 4 + nnzb * 4
    assert blk.memory_bytes() < N * K * 2 / 4
    with_bias = SparseLinear.from_linear(_linear(torch.float16), "block", block=(16, 16), sparsity=0.9)
    assert with_bias.memory_bytes(include_bias=True) == with_bias.memory_bytes() + N * 2
    assert with_bias.resident_bytes() == with_bias.memory_bytes(include_bias=True)  # fp16 Triton storage
    assert "pattern='block'" in repr(blk) and "bits_per_weight" in repr(blk)


def _triton_storage_bytes(mod):
    """Bytes of a backend='triton' module's buffers with floats at 16 bits: the format, measured."""
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size())
               for name, t in mod.named_buffers() if name != "bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern,backend", [(p, b) for p in OPTS for b in BACKENDS[p]], ids=str)
def test_memory_bytes_is_the_format_on_every_backend(pattern, backend, dtype, monkeypatch):
    """Issue 8: 2:4 on CPU reported 32 bits/weight (the dense fp32 backend's storage) where the format
    (and the README, and the harness) say 9. Every backend and dtype now reports the Triton format
    with 16-bit floats; resident_bytes() reports what the backend holds."""
    if backend in ("torch_bsr", "torch_csr") and dtype != torch.float32:
        pytest.skip("torch's sparse CPU matmuls exist for float32 only")
    lin = _linear(dtype)
    opts = dict(OPTS[pattern])
    if pattern == "block" and backend == "torch_bsr":
        opts["sparsity"] = 0.9  # below the density where auto would pick it anyway; any works when forced
    ref = SparseLinear.from_linear(lin, pattern, backend="triton", **opts)  # TRITON_INTERPRET=1 here
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = SparseLinear.from_linear(lin, pattern, backend=backend, **opts)
    assert mod.memory_bytes() == _triton_storage_bytes(ref), mod.backend
    assert mod.bits_per_weight() == pytest.approx(8 * mod.memory_bytes() / (N * K))
    assert mod.resident_bytes() == sum(t.numel() * t.element_size() for t in mod.buffers())
    if pattern == "nm":
        # 16-bit values for half the weights + 2-bit indices: 9 bits/weight (K=100: 25 groups, 2 words per row)
        assert mod.memory_bytes() == N * 50 * 2 + N * 4 * 4
        assert mod.bits_per_weight() == pytest.approx(8 * (N * 50 * 2 + N * 16) / (N * K))
    if mod.backend == "dense":  # the masked (or, for activation sparsity, transposed) dense weight as held
        assert mod.resident_bytes() == N * K * dtype.itemsize + N * lin.bias.element_size()


def test_nm_2_4_reports_9_bits_per_weight_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lin = nn.Linear(256, 64)
    mod = SparseLinear.from_linear(lin, "nm", n=2, m=4, sparsity=0.5)
    assert mod.backend == "dense" and mod.weight.dtype == torch.float32
    assert mod.bits_per_weight() == 9.0
    assert mod.resident_bytes() == 64 * 256 * 4 + 64 * 4


@pytest.mark.parametrize("backend", ["dense", "torch_csr", "triton"])
def test_state_dict_load_keeps_the_format_size(backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if backend == "triton" else "0")
    a = SparseLinear.from_linear(_linear(), "unstructured", sparsity=0.8, backend=backend)
    b = SparseLinear.from_linear(_linear(), "unstructured", sparsity=0.3, backend=backend)
    b.load_state_dict(a.state_dict())
    assert b.memory_bytes() == a.memory_bytes()


@pytest.mark.parametrize("pattern,backend", [(p, b) for p in OPTS for b in BACKENDS[p] if b != "auto"], ids=str)
def test_forward_bad_input_names_the_argument(pattern, backend, monkeypatch):
    """Issue 8: a wrong K or dtype gave raw torch RuntimeErrors (from F.linear, CSR matmul, the
    kernels); SparseLinear now checks x like QuantLinear and LowRankLinear, on every backend."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if backend == "triton" else "0")
    mod = SparseLinear.from_linear(_linear(), pattern, backend=backend, **OPTS[pattern])
    with pytest.raises(ValueError, match=rf"x must have shape \(\.\.\., {K}\) \(last dim = in_features = {K}\), got \(3, {K + 1}\)"):
        mod(torch.randn(3, K + 1))
    with pytest.raises(TypeError, match=r"x.dtype \(torch.float16\) must equal the layer's dtype \(torch.float32\)"):
        mod(torch.randn(3, K).half())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mod([[0.0] * K])
    with pytest.raises(ValueError, match="x is on meta but the layer's weights are on cpu"):
        mod(torch.randn(3, K, device="meta"))


@pytest.mark.parametrize("pattern,backend", [("block", "triton"), ("block", "torch_bsr"), ("nm", "triton"),
                                             ("unstructured", "triton"), ("unstructured", "torch_csr"),
                                             ("activation", "triton")], ids=str)
def test_state_dict_round_trip(pattern, backend):
    src = SparseLinear.from_linear(_linear(), pattern, backend=backend, **OPTS[pattern])
    opts = dict(OPTS[pattern])
    if "sparsity" in opts and pattern != "nm":
        opts["sparsity"] = 0.3  # a different number of stored blocks/values than src
    dst = SparseLinear.from_linear(_linear(), pattern, backend=backend, **opts)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, K)
    assert torch.equal(dst(x), src(x))
    assert dst.memory_bytes() == src.memory_bytes()


def test_cpu_candidates():
    assert cpu_candidates("block", torch.float32) == ("dense", "torch_bsr")
    assert cpu_candidates("block", torch.bfloat16) == ("dense",)           # torch BSR is fp32-only
    assert cpu_candidates("block", torch.float32, (32, 16)) == ("dense",)  # MKL: square blocks only
    assert cpu_candidates("unstructured", torch.float32) == ("dense", "torch_csr")
    assert cpu_candidates("unstructured", torch.float16) == ("dense",)
    assert cpu_candidates("nm", torch.float32) == ("dense",)
    assert cpu_candidates("activation", torch.bfloat16) == ("dense", "torch_gather")


@pytest.fixture
def cpu_auto(monkeypatch):
    """auto on CPU (no interpreter) with an injected timer and no cached choices before or after."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("TKR_CPU_AUTOTUNE", raising=False)
    _backend.clear_choices()
    calls = []
    times = {}

    def timer(name, fn):
        fn()
        calls.append(name)
        return times[name]
    _backend.set_timer(timer)
    yield times, calls
    _backend.set_timer(None)
    _backend.clear_choices()


@pytest.mark.parametrize("pattern,fast", [("block", "torch_bsr"), ("block", "dense"),
                                          ("unstructured", "torch_csr"), ("activation", "torch_gather")])
def test_auto_cpu_choice_is_measured(pattern, fast, cpu_auto):
    times, calls = cpu_auto
    times.update({c: (1.0 if c == fast else 2.0) for c in cpu_candidates(pattern, torch.float32)})
    lin = _linear()
    mod = SparseLinear.from_linear(lin, pattern, **OPTS[pattern])
    assert mod.backend == fast and sorted(calls) == sorted(times)
    x = torch.randn(3, K)
    assert_close(mod(x), _expected(lin, mod, x), torch.float32)
    # Same key (pattern, shape, density, dtype, M bucket): the cached choice, no timing.
    again = SparseLinear.from_linear(_linear(), pattern, **OPTS[pattern])
    assert again.backend == fast and len(calls) == len(times)
    # Another M bucket is measured on its own.
    SparseLinear.from_linear(lin, pattern, tune_m=16, **OPTS[pattern])
    assert len(calls) == 2 * len(times)


def test_auto_cpu_without_measuring_and_single_candidates(cpu_auto, monkeypatch):
    times, calls = cpu_auto
    mod = SparseLinear.from_linear(_linear(), "nm", **OPTS["nm"])   # one candidate: nothing to time
    assert mod.backend == "dense" and calls == []
    monkeypatch.setenv("TKR_CPU_AUTOTUNE", "0")
    mod = SparseLinear.from_linear(_linear(), "block", **OPTS["block"])
    assert mod.backend == "dense" and calls == []                   # the static first candidate
    with pytest.raises(ValueError, match="tune_m"):
        SparseLinear.from_linear(_linear(), "block", tune_m=0, **OPTS["block"])


def test_bad_arguments():
    lin = _linear()
    with pytest.raises(ValueError, match="pattern must be one of"):
        SparseLinear.from_linear(lin, "diagonal")
    with pytest.raises(ValueError, match="backend='torch_csr' is not one of"):
        SparseLinear.from_linear(lin, "block", backend="torch_csr")
    with pytest.raises(ValueError, match="needs a float32 CPU weight"):
        SparseLinear.from_linear(_linear(torch.bfloat16), "block", sparsity=0.9, backend="torch_bsr")
    with pytest.raises(ValueError, match="needs square blocks"):
        SparseLinear.from_linear(lin, "block", block=(32, 16), sparsity=0.9, backend="torch_bsr")
    with pytest.raises(ValueError, match="weight is not 2:4"):
        SparseLinear.from_linear(lin, "nm", mask=torch.rand(N, K) < 0.9)
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        SparseLinear.from_linear(lin, "unstructured", mask=torch.ones(N, K + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="not both"):
        SparseLinear.from_linear(lin, "unstructured", mask=torch.ones(N, K, dtype=torch.bool), sparsity=0.5)
    with pytest.raises(ValueError, match="exactly one of threshold"):
        SparseLinear.from_linear(lin, "activation")
    with pytest.raises(TypeError, match="float32"):
        SparseLinear.from_linear(lin, "unstructured", sparsity=0.9, backend="torch_csr")(torch.randn(2, K).double())


# ---------------------------------------------------------------------------------------------
# Activation sparsity: NaN inputs propagate, the threshold must be a finite number >= 0
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [{"threshold": 0.6}, {"sparsity": 0.7}], ids=["threshold", "sparsity"])
@pytest.mark.parametrize("backend", BACKENDS["activation"])
def test_activation_nan_input_propagates_like_nn_linear(backend, mode, monkeypatch):
    """A NaN input feature makes its row NaN, as in nn.Linear; it used to be dropped (|NaN| >= t is
    False), so the row came out finite, computed without it."""
    monkeypatch.setenv("TKR_CPU_AUTOTUNE", "0")
    lin = _linear()
    mod = SparseLinear.from_linear(lin, "activation", backend=backend, **mode)
    x = torch.randn(3, K)
    x[1, 7] = float("nan")
    want = lin(x).detach()
    y = mod(x)
    assert torch.equal(torch.isnan(y), torch.isnan(want)) and bool(torch.isnan(y[1]).all())
    assert_close(y[[0, 2]], mod(x[[0, 2]]), torch.float32)  # the other rows as without the NaN row


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_activation_threshold_must_be_finite_and_nonnegative(bad):
    lin = _linear()
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        SparseLinear.from_linear(lin, "activation", threshold=bad)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        SparseLinear(K, N, "activation", "dense", threshold=bad)  # how saved layers are rebuilt
    w = lin.weight.detach()
    for fn in (sm.activation_sparse_matmul, sm.activation_sparse_matmul_reference):
        with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
            fn(torch.randn(2, K), w, threshold=bad)
        with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
            fn(torch.randn(2, K), w, threshold=torch.tensor(bad))
    with pytest.raises(TypeError, match="threshold must be a finite number"):
        SparseLinear.from_linear(lin, "activation", threshold="0.5")
    assert SparseLinear.from_linear(lin, "activation", threshold=0)(torch.randn(2, K)).isfinite().all()


def test_activation_sparse_matmul_keeps_nan_features():
    """The kernel file's own entry points with a threshold: a NaN feature is kept (its row is NaN).
    (A given mask is the caller's explicit choice and is used as it is.)"""
    w = torch.randn(N, K)
    x = torch.randn(2, K)
    x[0, 3] = float("nan")
    for fn in (sm.activation_sparse_matmul, sm.activation_sparse_matmul_reference):
        y = fn(x, w, threshold=0.5)
        assert bool(torch.isnan(y[0]).all()) and bool(torch.isfinite(y[1]).all())
