"""The codebook family (experiments/methods/families/codebook.py): spec parsing, labels, statistics, and one
layer compressed into a real CodebookLinear."""
import pytest
import torch

from experiments.methods.compress import parse_spec
from experiments.methods.families import FAMILIES, family_of
from alg_data import calibration, weight

pytest.importorskip("triton_kernels.nn.codebook")


class _Stats:
    """What the driver's calibration statistics offer a family: ``hessian()``, ``sq`` and ``fisher``
    (here a stand-in (N, K) per-weight sensitivity: the input's sum of squares times a per-row factor)."""

    def __init__(self, X, N=None):
        self.n = X.shape[0]
        self.H = (X.T @ X).double()
        self.sq = X.double().square().sum(0)
        self.fisher = None if N is None else (torch.linspace(0.5, 2.0, N)[:, None] * self.sq.float()[None, :])

    def hessian(self):
        return (self.H / self.n).float()


@pytest.mark.parametrize("spec, label, needs", [
    ({"method": "nf"}, "nf-w4-g64", set()),
    ({"method": "nf", "bits": 3, "group_size": -1}, "nf-w3-pc", set()),
    ({"method": "fp4", "group_size": 16}, "fp4-w4-g16", set()),
    ({"method": "piecewise", "bits": 2}, "piecewise-w2-pc", set()),
    ({"method": "piecewise", "bits": 3, "segments": 2, "group_size": 128}, "piecewise-w3-g128-s2", set()),
    ({"method": "piecewise", "bits": 3, "group_size": 128, "zero_level": False}, "piecewise-w3-g128-nozero", set()),
    ({"method": "kmeans", "bits": 3}, "kmeans-w3-pc", set()),
    ({"method": "kmeans", "bits": 3, "zero_level": True}, "kmeans-w3-pc", set()),
    ({"method": "kmeans", "bits": 3, "zero_level": False}, "kmeans-w3-pc-nozero", set()),
    ({"method": "squeezellm", "bits": 3}, "squeezellm-w3-pc", {"fisher"}),
    ({"method": "squeezellm", "bits": 3, "sensitivity": "diag_h"}, "squeezellm-w3-pc-diagh", {"sq"}),
    ({"method": "squeezellm", "bits": 3, "zero_level": True}, "squeezellm-w3-pc-zero", {"fisher"}),
    ({"method": "squeezellm", "bits": 3, "gptq": True}, "squeezellm-w3-pc-gptq", {"H", "fisher"}),
    ({"method": "squeezellm", "bits": 3, "gptq": True, "sensitivity": "diag_h"}, "squeezellm-w3-pc-diagh-gptq",
     {"H"}),
    ({"method": "nf", "bits": 4, "group_size": 128, "gptq": True, "act_order": True, "damp": 0.05},
     "nf-w4-g128-gptq-act-damp0.05", {"H"}),
])
def test_parse_label_needs(spec, label, needs):
    s = parse_spec(spec)
    assert s.family == "codebook" and family_of(spec["method"]) is FAMILIES["codebook"]
    assert s.label() == label and s.needs() == needs
    assert parse_spec(s.to_dict()).to_dict() == s.to_dict()     # the canonical form is a fixed point
    cols = FAMILIES["codebook"].method_columns(s)
    if spec["method"] in ("piecewise", "kmeans", "squeezellm"):
        # The zero level is always in the canonical spec (its default changed: new point ids) and a column.
        assert s.to_dict()["zero_level"] == cols["zero_level"] == spec.get("zero_level", spec["method"] != "squeezellm")
    else:
        assert "zero_level" not in s.to_dict() and cols["zero_level"] == ""
    assert cols["sensitivity"] == (spec.get("sensitivity", "fisher") if spec["method"] == "squeezellm" else "")


@pytest.mark.parametrize("spec, match", [
    ({"method": "fp4", "bits": 3}, "bits=3 must be 4"),
    ({"method": "kmeans"}, "bits=None must be an integer in 1..8"),
    ({"method": "nf", "bits": 1}, "bits=1 must be an integer in 2..8"),
    ({"method": "nf", "group_size": 48}, "group_size=48 is not a power of two"),
    ({"method": "nf", "damp": 0.1}, "damp= applies only with gptq: true"),
    ({"method": "nf", "gptq": "yes"}, "gptq='yes' must be true"),
    ({"method": "piecewise", "bits": 3, "segments": 0}, "segments=0 must be a positive integer"),
    ({"method": "kmeans", "bits": 3, "segments": 2}, "segments"),
    ({"method": "kmeans", "bits": 3, "zero_level": "yes"}, "zero_level='yes' must be true"),
    ({"method": "nf", "zero_level": False}, "unknown option.*zero_level"),
    ({"method": "squeezellm", "bits": 3, "sensitivity": "hessian"}, "sensitivity='hessian' must be 'fisher'"),
    ({"method": "kmeans", "bits": 3, "sensitivity": "fisher"}, "unknown option.*sensitivity"),
])
def test_bad_specs_name_the_option(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec)


@pytest.mark.parametrize("spec", [
    {"method": "nf", "bits": 4, "group_size": 32},
    {"method": "fp4", "group_size": 32},
    {"method": "piecewise", "bits": 3, "group_size": -1},
    {"method": "kmeans", "bits": 2, "group_size": 64},
    {"method": "squeezellm", "bits": 3},
    {"method": "squeezellm", "bits": 3, "sensitivity": "diag_h"},
    {"method": "squeezellm", "bits": 3, "gptq": True},
    {"method": "nf", "bits": 3, "group_size": 64, "gptq": True, "act_order": True},
], ids=lambda s: parse_spec(s).label())
def test_compress_layer_builds_a_codebook_linear(spec):
    from triton_kernels.nn.codebook import CodebookLinear

    N, K = 48, 160
    w, X = weight(N, K, 20) * 0.05, calibration(512, K, 20)
    bias = torch.randn(N)
    s = parse_spec(spec)
    fam = FAMILIES["codebook"]
    fam.check_fits(s, {"layer": (N, K)})
    res = fam.compress_layer(s, w.clone(), bias, _Stats(X, N))
    mod = res.module
    assert isinstance(mod, CodebookLinear)
    assert res.bytes == mod.memory_bytes()
    # packed codes (dequant_matmul's layout) + one table (shared or per row) + scales, floats at 16 bits
    from triton_kernels.dequant_matmul import pack
    L = 2 ** s.bits
    rows = 1 if s.method in ("nf", "fp4") else N
    G = 0 if (s.group_size == -1 and rows == N) else (-(-K // (K if s.group_size == -1 else s.group_size)))
    codes = pack(torch.zeros(N, K, dtype=torch.uint8), s.bits).numel() * 4
    assert res.bytes == codes + 2 * rows * L + 2 * N * G, (res.bytes, codes, rows * L, N * G)
    torch.testing.assert_close(res.w_hat, mod.dequantize().float())
    x = torch.randn(3, K)
    torch.testing.assert_close(mod(x), x @ res.w_hat.T + bias, atol=1e-4, rtol=1e-4)
    if not s.gptq:   # nearest rounding: a weight error in line with the bits (GPTQ trades it for output error)
        rel = ((res.w_hat - w).norm() / w.norm()).item()
        assert rel < {2: 0.6, 3: 0.35, 4: 0.2}[s.bits], f"relative weight error {rel:.3f}"
    cols = fam.method_columns(s)
    assert set(cols) <= set(fam.columns) and cols["gptq"] == bool(spec.get("gptq", False))


def test_gptq_option_lowers_the_output_error():
    N, K = 48, 160
    w, X = weight(N, K, 21), calibration(768, K, 21)
    fam, st = FAMILIES["codebook"], _Stats(X, N)
    errs = {}
    for g in (False, True):
        res = fam.compress_layer(parse_spec({"method": "squeezellm", "bits": 3, "gptq": g}), w.clone(), None, st)
        errs[g] = ((res.w_hat - w) @ X.T).norm().item()
    assert errs[True] < errs[False], errs


def test_group_size_larger_than_a_layer_is_refused():
    fam = FAMILIES["codebook"]
    with pytest.raises(ValueError, match="group_size=256 is larger than the layer's in_features K=192"):
        fam.check_fits(parse_spec({"method": "nf", "group_size": 256}), {"a": (64, 192), "b": (64, 576)})


@pytest.mark.parametrize("spec, fmt, label", [
    ({"method": "nf"}, {"kind": "codebook", "bits": 4, "group_size": 64, "table": "shared", "scales": True},
     "codebook 4-bit g64 shared table"),
    ({"method": "squeezellm", "bits": 3, "gptq": True},
     {"kind": "codebook", "bits": 3, "group_size": -1, "table": "per_row", "scales": False},
     "codebook 3-bit per-channel per-row table"),
    ({"method": "kmeans", "bits": 2, "group_size": 32},
     {"kind": "codebook", "bits": 2, "group_size": 32, "table": "per_row", "scales": True},
     "codebook 2-bit g32 per-row table"),
])
def test_latency_times_the_codebook_format(spec, fmt, label):
    """Latency rows of codebook specs time a CodebookLinear of the same storage (never QuantLinear)."""
    from experiments.measure import formats, roofline
    from triton_kernels.nn.codebook import CodebookLinear

    assert formats.format_of(spec) == fmt and formats.format_label(fmt) == label
    kw = {k: v for k, v in fmt.items() if k != "kind"}
    N, K = 40, 96
    layer = formats.build_layer("codebook", N, K, **kw)
    assert isinstance(layer, CodebookLinear)
    rows = 1 if fmt["table"] == "shared" else N
    G = (1 if fmt["group_size"] == -1 else -(-K // fmt["group_size"])) if fmt["scales"] else 0
    from triton_kernels.dequant_matmul import pack
    codes = pack(torch.zeros(N, K, dtype=torch.uint8), fmt["bits"]).numel() * 4
    assert layer.memory_bytes() == codes + 2 * rows * 2 ** fmt["bits"] + 2 * N * G
    assert roofline.weight_bytes("codebook", N, K, **kw) == layer.memory_bytes()
    assert roofline.kernel_flops("codebook", N, K, 3) == 2.0 * 3 * N * K


def test_a_group_below_float16_range_keeps_a_positive_scale():
    w = weight(8, 64, 22) * 0.05
    w[0, :32] = 1e-9          # absmax underflows float16: the stored scale must not become 0
    res = FAMILIES["codebook"].compress_layer(parse_spec({"method": "nf", "group_size": 32}), w, None, None)
    assert bool((res.module.scales.float() > 0).all()) and torch.isfinite(res.w_hat).all()
    assert res.w_hat[0, :32].abs().max().item() < 1e-7


@pytest.mark.parametrize("spec", [{"method": "squeezellm", "bits": 3},
                                  {"method": "squeezellm", "bits": 3, "sensitivity": "diag_h"},
                                  {"method": "nf", "bits": 4, "group_size": 32, "gptq": True}],
                         ids=["squeezellm-fisher-stats", "squeezellm-sq-stats", "nf-gptq-H-stats"])
def test_a_model_compresses_end_to_end(spec, monkeypatch):
    """The driver collects the statistics the family asks for, replaces every block linear with a
    CodebookLinear, and the sweep's backend column names it."""
    # The modules choose their backend at call time: without the interpreter, the CPU path (the
    # Triton interpreter made the calibration forwards through compressed blocks take minutes).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from experiments.methods.compress import compress_model, module_backends
    from triton_kernels.nn.codebook import CodebookLinear
    from tests.test_compress import tiny_llama

    model = tiny_llama()
    calib = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    report = compress_model(model, spec, calib, progress=False)
    linears = [m for n, m in model.named_modules() if n.startswith("model.layers.") and
               isinstance(m, (torch.nn.Linear, CodebookLinear))]
    assert linears and all(isinstance(m, CodebookLinear) for m in linears)
    assert 0 < report.bytes < report.fp16_bytes
    with torch.no_grad():
        model(calib)
    assert module_backends(model).startswith("CodebookLinear:")


def test_squeezellm_weights_each_layer_by_the_dense_models_fisher(monkeypatch):
    """SqueezeLLM's Fisher comes from the dense model, once, before any layer is quantized: the
    sensitivity every layer (block 1's too, after block 0 was quantized) is clustered with equals
    ``squared_gradients`` of the uncompressed model on the calibration windows."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from experiments.lm import models
    from experiments.methods.algorithms import codebook as alg
    from experiments.methods.compress import compress_model
    from tests.test_compress import tiny_llama

    calib = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    want = models.squared_gradients(tiny_llama(), calib)
    seen = []
    real = alg.squeezellm

    def spy(W, sensitivity, **kw):
        seen.append(sensitivity.clone())
        return real(W, sensitivity, **kw)
    monkeypatch.setattr(alg, "squeezellm", spy)
    compress_model(tiny_llama(), {"method": "squeezellm", "bits": 3}, calib, progress=False)
    assert len(seen) == len(want)
    for (name, f), got in zip(want.items(), seen):
        torch.testing.assert_close(got, f, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
