"""experiments.measure.roofline: arithmetic of both regimes, bytes from the modules' memory_bytes(), the table, the join."""
import math

import pytest
import torch

from experiments.core import results
from experiments.measure import roofline


@pytest.mark.parametrize("gpu", sorted(roofline.GPUS))
def test_dense_decode_is_memory_bound_and_exact(gpu):
    N, K, M = 4096, 4096, 1
    spec = roofline.GPUS[gpu]
    r = roofline.ideal("dense", N, K, M, gpu)
    expected_bytes = 2 * N * K + 2 * M * K + 2 * M * N
    assert r["bytes"] == expected_bytes
    assert r["flops"] == 2 * M * N * K
    assert r["regime"] == "memory"
    assert r["ideal_s"] == pytest.approx(expected_bytes / spec["bandwidth"], rel=1e-12)
    assert roofline.ideal_time("dense", N, K, M, gpu) == r["ideal_s"]


@pytest.mark.parametrize("gpu", sorted(roofline.GPUS))
def test_large_batch_is_compute_bound(gpu):
    N, K, M = 4096, 4096, 8192
    spec = roofline.GPUS[gpu]
    r = roofline.ideal("dense", N, K, M, gpu)
    assert r["regime"] == "compute"
    assert r["ideal_s"] == pytest.approx(2 * M * N * K / spec["fp16_flops"], rel=1e-12)
    # The crossover: arithmetic intensity above the machine balance point.
    assert r["flops"] / r["bytes"] > spec["fp16_flops"] / spec["bandwidth"]


def test_h100_dense_4096_decode_in_microseconds():
    # 33.6 MB at 3.35 TB/s: an independent hand computation of the number the table will show.
    t = roofline.ideal_time("dense", 4096, 4096, 1, "H100 SXM")
    assert t * 1e6 == pytest.approx((2 * 4096 * 4096 + 4 * 4096) / 3.35e12 * 1e6, rel=1e-12)
    assert 10.0 < t * 1e6 < 10.1


@pytest.mark.parametrize("kind, fmt, fraction", [
    ("quant", dict(bits=4, group_size=64, symmetric=False), 1.0),
    ("sparse", dict(pattern="nm", n=2, m=4), 0.5),
    ("sparse", dict(pattern="unstructured", sparsity=0.9), 0.1),
    ("sparse", dict(pattern="activation", act_sparsity=0.4), 0.6),
], ids=["quant-does-all-flops", "2:4-half", "unstructured-90", "activation-40"])
def test_flops_of_formats(kind, fmt, fraction):
    N, K, M = 96, 160, 7
    assert roofline.kernel_flops(kind, N, K, M, **fmt) == pytest.approx(2 * M * N * K * fraction, rel=1e-12)


def test_lowrank_flops():
    N, K, M, r = 4096, 11008, 16, 256
    assert roofline.kernel_flops("lowrank", N, K, M, rank=r) == 2 * M * r * (N + K)


@pytest.mark.parametrize("bad, words", [
    (dict(kind="dense", N=64, K=64, M=1, gpu="V100"), "gpu"),
    (dict(kind="dense", N=0, K=64, M=1, gpu="H100 SXM"), "N"),
    (dict(kind="dense", N=64, K=64, M=1.5, gpu="H100 SXM"), "M"),
    (dict(kind="blocky", N=64, K=64, M=1, gpu="H100 SXM"), "kind"),
], ids=["unknown-gpu", "zero-N", "float-M", "unknown-kind"])
def test_bad_arguments_raise(bad, words):
    with pytest.raises(ValueError, match=words):
        roofline.ideal_time(**bad)


def test_sparsity_of_formats():
    assert roofline.sparsity_of({"pattern": "nm", "n": 2, "m": 4}) == 0.5
    assert roofline.sparsity_of({"pattern": "nm", "n": 1, "m": 4}) == 0.75
    assert roofline.sparsity_of({"pattern": "unstructured", "sparsity": 0.9}) == 0.9
    assert roofline.sparsity_of({"pattern": "activation", "act_sparsity": 0.4}) == 0.4


# ----------------------------------------------------------------- bytes from the real modules

# Odd shapes (not multiples of the group/block) so partial groups and padding count.
MODULE_FORMATS = [
    pytest.param("quant", dict(bits=4, group_size=64, symmetric=False), id="int4-g64-asym"),
    pytest.param("quant", dict(bits=3, group_size=32, symmetric=True), id="int3-g32-sym"),
    pytest.param("quant", dict(bits=8, group_size=-1, symmetric=True), id="int8-per-channel"),
    pytest.param("sparse", dict(pattern="nm", n=2, m=4), id="2:4"),
    pytest.param("sparse", dict(pattern="unstructured", sparsity=0.7), id="unstructured-70"),
    pytest.param("sparse", dict(pattern="block", sparsity=0.5, block=(16, 32)), id="block16x32-50"),
    pytest.param("lowrank", dict(rank=12), id="rank12"),
]


@pytest.mark.parametrize("kind, fmt", MODULE_FORMATS)
def test_weight_bytes_equal_the_modules_memory_bytes(kind, fmt):
    N, K = 80, 160
    mod_name = {"quant": "triton_kernels.nn.quant", "sparse": "triton_kernels.nn.sparse",
                "lowrank": "triton_kernels.nn.lowrank"}[kind]
    nn_mod = pytest.importorskip(mod_name)
    # Built here independently of experiments.measure.formats.build_layer, from an fp16 linear.
    torch.manual_seed(1)
    lin = torch.nn.Linear(K, N, bias=False).half()
    # backend="triton": the GPU storage format (conftest sets TRITON_INTERPRET=1, so it can be built here).
    if kind == "quant":
        m = nn_mod.QuantLinear.from_linear(lin, fmt["bits"], fmt["group_size"], fmt["symmetric"], backend="triton")
    elif kind == "sparse":
        kw = dict(fmt)
        if kw["pattern"] == "nm":
            kw["sparsity"] = 1 - kw["n"] / kw["m"]
        m = nn_mod.SparseLinear.from_linear(lin, backend="triton", **kw)
    else:
        r = fmt["rank"]
        m = nn_mod.LowRankLinear(torch.randn(N, r).half(), torch.randn(r, K).half(), backend="triton")
        assert m.memory_bytes() == 2 * r * (N + K)  # two fp16 factors, nothing else
    assert roofline.weight_bytes(kind, N, K, **fmt) == m.memory_bytes()
    r = roofline.ideal(kind, N, K, 1, "H100 SXM", **fmt)
    assert r["bytes"] == m.memory_bytes() + 2 * K + 2 * N


def test_quant_weight_bytes_count_16_bit_scales_like_the_harness():
    """Issue 8: the roofline counted RTN's fp32 scales and zeros (4.5 bits/weight at 4-bit g128) while the
    harness counts fp16 ones (4.25). Both now use the format: codes + 16-bit scales and zeros."""
    N = K = 4096
    assert roofline.weight_bytes("quant", N, K, bits=4, group_size=128, symmetric=False) == N * K // 2 + 2 * 2 * N * 32
    assert roofline.weight_bytes("quant", N, K, bits=8, group_size=-1, symmetric=True) == N * K + 2 * N


def test_table_and_main_report_progress_on_stderr_and_return_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TKR_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    rows = roofline.table(gpus=["H100 SXM"], formats=[{"kind": "dense"}], shapes=[(64, 64), (128, 64)], Ms=[1],
                          progress=True)
    assert len(rows) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[roofline: weight bytes per format] 0/2 shape"
    assert err[-1].startswith("[roofline: weight bytes per format] done: 2/2 shape")
    monkeypatch.setattr(roofline, "table", lambda progress=False: rows)
    import argparse
    paths = roofline.main(argparse.Namespace(out=str(tmp_path / "r.csv"), latency_csv=str(tmp_path / "none.csv")))
    cap = capsys.readouterr()
    assert paths == [tmp_path / "r.csv"] and cap.out == "" and "wrote 2 roofline rows" in cap.err


def test_dense_weight_bytes_are_fp16():
    assert roofline.weight_bytes("dense", 33, 17) == 2 * 33 * 17


# ----------------------------------------------------------------- the table and the join

def test_table_rows(tmp_path):
    pytest.importorskip("triton_kernels.nn.lowrank")
    formats = [{"kind": "dense"}, {"kind": "lowrank", "rank": 64}, {"kind": "lowrank", "rank": 5000}]
    rows = roofline.table(gpus=["H100 SXM", "RTX 4090"], formats=formats, shapes=[(4096, 4096)], Ms=[1, 128])
    # rank 5000 > min(N, K) is skipped: it is not a compression of a 4096x4096 layer
    assert len(rows) == 2 * 1 * 2 * 2
    for r in rows:
        assert r["model"] == "roofline (not a measurement)"
        assert r["ideal_speedup_vs_dense_fp16"] == pytest.approx(r["dense_fp16_ideal_us"] / r["ideal_us"])
        if r["kind"] == "dense":
            assert r["ideal_speedup_vs_dense_fp16"] == 1.0
    lr = next(r for r in rows if r["kind"] == "lowrank" and r["M"] == 1 and r["gpu"] == "H100 SXM")
    dense_bytes = 2 * 4096 * 4096 + 4 * 4096
    lr_bytes = 2 * 64 * 8192 + 4 * 4096
    assert lr["ideal_speedup_vs_dense_fp16"] == pytest.approx(dense_bytes / lr_bytes)
    results.write_rows(tmp_path / "r.csv", rows)
    assert len(results.read_rows(tmp_path / "r.csv")) == len(rows)


def test_measured_vs_ideal_joins_only_gpu_rows(tmp_path):
    pytest.importorskip("triton_kernels.nn.lowrank")
    csv = tmp_path / "latency_cuda.csv"
    base = {"device_type": "cuda", "N": "4096", "K": "4096", "M": "1", "rank": ""}
    results.write_rows(csv, [
        {**base, "device": "NVIDIA H100 80GB HBM3", "spec": '{"dtype": "fp16", "method": "dense"}',
         "median_ms": "0.020"},
        {**base, "device": "NVIDIA H100 80GB HBM3", "spec": '{"dtype": "bf16", "method": "dense"}',
         "median_ms": "0.021"},  # only fp16 dense has a roofline line
        {**base, "device": "NVIDIA A100-SXM4-80GB", "spec": '{"method": "svd", "ratio": 0.5}', "rank": "64",
         "median_ms": "0.010"},
        {**base, "device": "Some Other GPU", "spec": '{"dtype": "fp16", "method": "dense"}', "median_ms": "1"},
        {**base, "device_type": "cpu", "device": "CPU", "spec": '{"dtype": "fp16", "method": "dense"}',
         "median_ms": "1"},
    ])
    joined = roofline.measured_vs_ideal(csv)
    assert [(j["roofline_gpu"], j["spec"]) for j in joined] == [
        ("H100 SXM", '{"dtype": "fp16", "method": "dense"}'), ("A100 80GB", '{"method": "svd", "ratio": 0.5}')]
    h = joined[0]
    ideal_us = roofline.ideal_time("dense", 4096, 4096, 1, "H100 SXM") * 1e6
    assert h["ideal_us"] == pytest.approx(ideal_us)
    assert h["fraction_of_roofline"] == pytest.approx(ideal_us / 20.0)
    a = joined[1]
    assert a["ideal_us"] == pytest.approx(roofline.ideal_time("lowrank", 4096, 4096, 1, "A100 80GB", rank=64) * 1e6)
    assert math.isfinite(a["fraction_of_roofline"])


@pytest.mark.parametrize("fmt", roofline.DEFAULT_FORMATS, ids=roofline.format_label)
def test_every_default_format_builds_and_counts(fmt):
    """Each format of the default table builds a real module at a small shape (the table would fail
    late, after minutes of building large modules, otherwise)."""
    N, K = 128, 256
    kind = fmt["kind"]
    rest = {k: v for k, v in fmt.items() if k != "kind"}
    if kind == "lowrank" and rest["rank"] > min(N, K):
        rest["rank"] = min(N, K) // 2
    b = roofline.weight_bytes(kind, N, K, **rest)
    assert 0 < b
    if kind == "quant":
        assert b > N * K * rest["bits"] / 8  # the codes plus scales (and zeros)
    if kind == "dense":
        assert b == 2 * N * K
