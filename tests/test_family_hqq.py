"""The HQQ family (experiments/methods/families/hqq.py): spec parsing, labels, one layer compressed into a
plain QuantLinear with fractional fp16 zero-points, the source-grid flag, a model without calibration."""
import pytest
import torch

from experiments.methods.algorithms import hqq as alg
from experiments.methods.algorithms.quant import rtn
from experiments.methods.compress import aliases_source_grid, parse_spec
from experiments.methods.families import FAMILIES, family_of
from experiments.methods.families import hqq as fam_hqq
from alg_data import weight

pytest.importorskip("triton_kernels.nn.quant")


@pytest.mark.parametrize("spec, label", [
    ({"method": "hqq", "bits": 4}, "hqq-w4-g64"),
    ({"method": "hqq", "bits": 3, "group_size": 128}, "hqq-w3-g128"),
    ({"method": "hqq", "bits": 2, "group_size": -1}, "hqq-w2-pc"),
    ({"method": "hqq", "bits": 3, "lp_norm": 1, "iters": 5}, "hqq-w3-g64-p1-it5"),
    ({"method": "hqq", "bits": 3, "beta": 1, "kappa": 1.05}, "hqq-w3-g64-beta1-kappa1.05"),
])
def test_parse_label_needs(spec, label):
    s = parse_spec(spec)
    assert s.family == "hqq" and family_of("hqq") is FAMILIES["hqq"]
    assert s.label() == label and s.needs() == set()  # calibration-free
    assert parse_spec(s.to_dict()).to_dict() == s.to_dict()  # the canonical form is a fixed point
    d = parse_spec({"method": "hqq", "bits": 4}).to_dict()
    # the reference's defaults are written into every row's spec
    assert d == {"method": "hqq", "bits": 4, "group_size": fam_hqq.DEFAULT_GROUP_SIZE, **alg.DEFAULTS}


@pytest.mark.parametrize("spec, match", [
    ({"method": "hqq"}, "bits=None must be an integer in 1..8"),
    ({"method": "hqq", "bits": 3, "group_size": 48}, "group_size=48 is not a power of two"),
    ({"method": "hqq", "bits": 3, "symmetric": True}, r"unknown option\(s\) \['symmetric'\] for method='hqq'"),
    ({"method": "hqq", "bits": 3, "lp_norm": 0}, r"lp_norm=0 must be in \(0, 1\]"),
    ({"method": "hqq", "bits": 3, "lp_norm": 2}, r"lp_norm=2 must be in \(0, 1\]"),
    ({"method": "hqq", "bits": 3, "beta": -1}, "beta=-1 must be a positive number"),
    ({"method": "hqq", "bits": 3, "kappa": 1}, "kappa=1 must be a number > 1"),
    ({"method": "hqq", "bits": 3, "iters": 2.5}, "iters=2.5 must be a positive integer"),
])
def test_bad_specs_name_the_option(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec)


@pytest.mark.parametrize("bits, gs", [(2, 32), (3, 64), (4, -1)])
def test_compress_layer_builds_a_quant_linear_with_fractional_zeros(bits, gs):
    from triton_kernels.nn.quant import QuantLinear

    N, K = 48, 160  # groups of 64: a partial last group of 32
    w = weight(N, K, 30) * 0.05
    bias = torch.randn(N)
    s = parse_spec({"method": "hqq", "bits": bits, "group_size": gs})
    fam = FAMILIES["hqq"]
    fam.check_fits(s, {"layer": (N, K)})
    res = fam.compress_layer(s, w.clone(), bias, None)
    mod = res.module
    assert isinstance(mod, QuantLinear) and not mod.symmetric and mod.bits == bits
    # the same storage as RTN on the same grid: codes + fp16 scales + fp16 zeros
    ref = FAMILIES["quant"].compress_layer(parse_spec({"method": "rtn", "bits": bits, "group_size": gs}), w, bias, None)
    assert res.bytes == mod.memory_bytes() == ref.bytes
    # what is stored is fp16, and the zeros are not integers (HQQ's solver moved them)
    assert torch.equal(mod.scales.float(), mod.scales.half().float()) and (mod.scales > 0).all()
    assert torch.equal(mod.zeros.float(), mod.zeros.half().float())
    assert (mod.zeros.float() != mod.zeros.float().round()).any()
    torch.testing.assert_close(res.w_hat, mod.dequantize().float())
    x = torch.randn(3, K)
    torch.testing.assert_close(mod(x), x @ res.w_hat.T + bias, atol=1e-4, rtol=1e-4)
    # the stored model is the algorithm's up to fp16 rounding of its grid: same lp error within 1%
    lp = alg.DEFAULTS["lp_norm"]
    fp32 = alg.hqq(w, bits=bits, group_size=gs)
    from experiments.methods.algorithms.quant import dequantize_result
    e_store = float((w - res.w_hat).abs().pow(lp).sum())
    e_alg = float((w - dequantize_result(fp32)).abs().pow(lp).sum())
    assert abs(e_store / e_alg - 1) < 1e-2, (e_store, e_alg)
    # ... and below RTN's on the same grid
    e_rtn = float((w - dequantize_result(rtn(w, bits=bits, group_size=gs, symmetric=False))).abs().pow(lp).sum())
    assert e_store < e_rtn
    cols = fam.method_columns(s)
    assert set(cols) <= set(fam.columns) and cols == {"quant_method": "hqq", "bits": bits, "group_size": gs,
                                                      "symmetric": False}


def test_codes_are_re_chosen_on_the_stored_grid():
    """Each stored code is the nearest level of the fp16 grid the module holds (not the fp32 one)."""
    N, K = 32, 128
    w = weight(N, K, 31) * 0.05
    spec = parse_spec({"method": "hqq", "bits": 3, "group_size": 32})
    mod = FAMILIES["hqq"].compress_layer(spec, w, None, None).module
    from triton_kernels import dequant_matmul as dq
    q = dq.unpack(mod.packed, 3, K).float()
    s = mod.scales.float().repeat_interleave(32, 1)
    z = mod.zeros.float().repeat_interleave(32, 1)
    assert torch.equal(q, torch.clamp(torch.round(w / s + z), 0, 7))


def test_a_tiny_scale_stays_positive_in_fp16():
    w = weight(4, 64, 32) * 0.05
    w[0, :32] = torch.linspace(-1e-9, 1e-9, 32)  # the step underflows fp16
    res = FAMILIES["hqq"].compress_layer(parse_spec({"method": "hqq", "bits": 4, "group_size": 32}), w, None, None)
    assert bool((res.module.scales.float() > 0).all()) and torch.isfinite(res.w_hat).all()
    assert res.w_hat[0, :32].abs().max().item() < 1e-7


@pytest.mark.parametrize("spec, aliases", [
    ({"method": "hqq", "bits": 4, "group_size": 32}, True),   # fractional zeros: Q4_1's grid fits
    ({"method": "hqq", "bits": 4, "group_size": 16}, True),
    ({"method": "hqq", "bits": 8, "group_size": 32}, True),
    ({"method": "hqq", "bits": 4, "group_size": 64}, False),  # a group spans two source blocks
    ({"method": "hqq", "bits": 3, "group_size": 32}, False),
    ({"method": "rtn", "bits": 4, "group_size": 32}, False),  # integer zeros (as before)
    ({"method": "combo", "steps": [{"method": "magnitude", "sparsity": 0.5}, {"method": "rtn", "bits": 4,
                                                                              "group_size": 32}]}, False),
    ({"method": "nf", "bits": 4, "group_size": 32}, False),   # no uniform grid
    ({"method": "layers", "criterion": "last", "blocks": 1,    # kept original weights, then the step's grid
      "steps": [{"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True}]}, False),
])
def test_source_grid_flag_asks_the_family(spec, aliases):
    q4_1 = {"bits": 4, "group_size": 32, "symmetric": False}
    assert aliases_source_grid(parse_spec(spec), q4_1) is aliases
    # a symmetric source: any grid of as many bits holds it, integer zeros included (also as a step)
    if spec["method"] in ("rtn", "layers"):
        assert aliases_source_grid(parse_spec(spec), {"bits": 4, "group_size": 32, "symmetric": True})


def test_latency_times_the_quant_format():
    from experiments.measure import formats
    fmt = formats.format_of({"method": "hqq", "bits": 3})
    assert fmt == {"kind": "quant", "bits": 3, "group_size": 64, "symmetric": False}
    assert formats.format_label(fmt) == "quant int3 g64 asym"


def test_a_model_compresses_without_calibration(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from experiments.methods.compress import compress_model, module_backends
    from triton_kernels.nn.quant import QuantLinear
    from tests.test_compress import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
    report = compress_model(model, {"method": "hqq", "bits": 4, "group_size": 32}, None, progress=False)
    linears = [m for n, m in model.named_modules() if n.startswith("model.layers.") and
               isinstance(m, (torch.nn.Linear, QuantLinear))]
    assert linears and all(isinstance(m, QuantLinear) for m in linears)
    assert 0 < report.bytes < report.fp16_bytes
    rtn_model = tiny_llama()
    rtn_report = compress_model(rtn_model, {"method": "rtn", "bits": 4, "group_size": 32}, None, progress=False)
    assert report.bytes == rtn_report.bytes
    with torch.no_grad():
        got = model(ids).logits
    assert torch.isfinite(got).all() and module_backends(model).startswith("QuantLinear:")
    assert 0 < (got - dense).norm() < (dense.norm())


def test_compressed_tensors_export_refuses_fractional_zeros(tmp_path, monkeypatch):
    pytest.importorskip("compressed_tensors")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from experiments.io.export_ct import export_compressed_tensors
    from experiments.methods.compress import compress_model
    from tests.test_compress import tiny_llama

    model = tiny_llama()
    compress_model(model, {"method": "hqq", "bits": 4, "group_size": 32}, None, progress=False)
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\..*compressed-tensors dequantizes it to other "
                                         r"weights"):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
