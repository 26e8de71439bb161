"""The structured family (experiments/methods/families/structured.py) through the driver on a tiny Llama:
spec parsing and errors, labels, sizes against the original shapes, removed blocks, decode columns,
structured + quantization steps, and the sweep file."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from experiments.methods.compress import compress_model, parse_spec  # noqa: E402
from experiments.methods.families import family_of  # noqa: E402

VOCAB = 97


def tiny(layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
    model.requires_grad_(False)
    return model


def calib():
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("spec, label", [
    ({"method": "channels", "criterion": "flap", "sparsity": 0.2}, "channels-flap-s0.2"),
    ({"method": "heads", "criterion": "wanda", "sparsity": 0.3, "scope": "global", "head_unit": "query"},
     "heads-wanda-s0.3-global-query"),
    ({"method": "layers", "criterion": "bi", "blocks": 4}, "layers-bi-b4"),
    ({"method": "channels", "criterion": "taylor", "sparsity": 0.5, "steps": [{"method": "gptq", "bits": 4,
                                                                                 "group_size": 64}]},
     "channels-taylor-s0.5+gptq-w4-g64"),
    ({"method": "channels_heads", "criterion": "wanda-sp", "sparsity": 0.2, "head_unit": "query"},
     "channels_heads-wanda-sp-s0.2-query"),
], ids=["channels", "heads", "layers", "steps", "wanda-sp"])
def test_parse_label_roundtrip(spec, label):
    s = parse_spec(spec)
    assert s.family == "structured" and family_of(s.method).level == "model"
    assert s.label().startswith(label), s.label()
    assert parse_spec(s.to_dict()) == s
    json.dumps(s.to_dict())  # plain data: point ids hash it
    assert s.decode_tokens == 32


@pytest.mark.parametrize("spec, msg", [
    ({"method": "channels", "criterion": "bi", "sparsity": 0.2}, "criterion='bi'"),
    ({"method": "channels", "criterion": "flap"}, "sparsity=None"),
    ({"method": "channels", "criterion": "flap", "sparsity": 1.2}, "sparsity=1.2"),
    ({"method": "heads", "criterion": "flap", "sparsity": 0.2, "head_unit": "kv"}, "head_unit='kv'"),
    ({"method": "heads", "criterion": "flap", "sparsity": 0.2, "scope": "row"}, "scope='row'"),
    ({"method": "channels", "criterion": "wanda-sp", "sparsity": 0.2, "scope": "global"},
     "scope='global' does not fit criterion='wanda-sp'"),
    ({"method": "layers", "criterion": "last"}, "blocks=None"),
    ({"method": "layers", "criterion": "last", "blocks": 2, "sparsity": 0.2}, "unknown option"),
    ({"method": "channels", "criterion": "flap", "sparsity": 0.2, "decode_tokens": -1}, "decode_tokens=-1"),
    ({"method": "channels", "criterion": "flap", "sparsity": 0.2, "steps": [{"method": "wanda", "pattern": "2:4"}]},
     "not a quantization method"),
])
def test_bad_specs_name_the_option(spec, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        parse_spec(spec)


def test_needs_calibration_only_for_calibrated_criteria():
    assert parse_spec({"method": "channels", "criterion": "magnitude", "sparsity": 0.2}).needs() == set()
    assert parse_spec({"method": "layers", "criterion": "last", "blocks": 1}).needs() == set()
    assert parse_spec({"method": "channels", "criterion": "magnitude-sp", "sparsity": 0.2}).needs() == set()
    for c in ("wanda", "flap", "taylor", "wanda-sp"):
        assert parse_spec({"method": "channels", "criterion": c, "sparsity": 0.2}).needs()
    assert parse_spec({"method": "layers", "criterion": "bi", "blocks": 1}).needs()


def test_channels_report_sizes_against_the_original():
    model = tiny()
    spec = {"method": "channels", "criterion": "wanda", "sparsity": 0.25, "decode_tokens": 4}
    report = compress_model(model, spec, calib(), progress=False)
    assert len(report.layers) == 4 * 7
    for r in report.layers:
        n, k = r.shape
        assert r.fp16_bytes == 2 * n * k  # the ORIGINAL shape
        if "mlp" in r.name:
            assert r.nnz == (n * 72 if "down" in r.name else 72 * k) and r.bytes == 2 * r.nnz
            assert r.weight_sq_error > 0
        else:
            assert r.bytes == r.fp16_bytes and r.weight_sq_error == 0
    s = report.summary()
    mlp = 3 * 96 * 64
    attn = 2 * 64 * 64 + 2 * 16 * 64
    assert s["bytes"] == 4 * 2 * (attn + mlp * 72 // 96)
    assert s["compression_vs_fp16"] == pytest.approx((attn + mlp) / (attn + 0.75 * mlp), rel=1e-3)
    assert s["bits_per_weight"] == pytest.approx(16 * (attn + 0.75 * mlp) / (attn + mlp), rel=1e-3)
    assert s["params"] == sum(p.numel() for p in model.parameters())
    assert s["params_dense"] - s["params"] == 4 * 24 * 3 * 64
    assert s["structure_removed"] == pytest.approx(0.25)
    assert s["decode_tokens_per_s"] > 0 and s["dense_decode_tokens_per_s"] > 0
    assert s["decode_speedup"] > 0 and "interleaved" in s["decode_timer"] and s["decode_new_tokens"] == 4
    # timed as bf16 copies; the model the sweep evaluates keeps its dtype
    assert s["decode_dtype"] == "bf16" and next(model.parameters()).dtype == torch.float32
    assert s["linears_m1_ms"] > 0 and s["dense_linears_m1_ms"] > 0
    assert s["linears_m1_speedup"] == pytest.approx(s["dense_linears_m1_ms"] / s["linears_m1_ms"], rel=1e-2)
    assert s["compress_seconds"] <= report.seconds
    assert json.loads(s["layer_widths"])["channels"] == [72] * 4


def test_layers_report_removed_blocks_with_zero_bytes():
    model = tiny(layers=5)
    report = compress_model(model, {"method": "layers", "criterion": "last", "blocks": 2, "decode_tokens": 0},
                            None, progress=False)
    removed = [r for r in report.layers if r.module == "removed"]
    assert {r.name.split(".")[0] for r in removed} == {"block3", "block4"}
    assert all(r.bytes == 0 and r.fp16_bytes > 0 and r.weight_sq_error == r.weight_sq_norm for r in removed)
    s = report.summary()
    assert report.compression_vs_fp16 == pytest.approx(5 / 3) and s["n_blocks"] == 3
    assert s["decode_tokens_per_s"] == "" and json.loads(s["kept_blocks"]) == [0, 1, 2]


def test_structured_then_quantized():
    model = tiny()
    spec = {"method": "heads", "criterion": "magnitude", "sparsity": 0.5, "decode_tokens": 2,
            "steps": [{"method": "rtn", "bits": 4, "group_size": 32}]}
    report = compress_model(model, spec, calib(), progress=False)
    from triton_kernels.nn import QuantLinear
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(mods) == 4 * 7
    # speed measured on a bf16 copy, the QuantLinears included; the evaluated model keeps fp32 scales
    s = report.summary()
    assert s["decode_dtype"] == "bf16" and s["decode_tokens_per_s"] > 0 and s["linears_m1_ms"] > 0
    assert next(model.parameters()).dtype == torch.float32 and all(m.scales.dtype != torch.bfloat16 for m in mods)
    q = [r for r in report.layers if r.name.endswith("q_proj")]
    # 4-bit codes + an fp16 scale and zero per group of 32: 5 bits per kept weight
    assert all(r.module == "QuantLinear" and r.nnz == 32 * 64 and r.bytes == r.nnz * 5 // 8 for r in q)
    # pruned away + quantization error on the kept part: more than either alone
    plain = compress_model(tiny(), {k: v for k, v in spec.items() if k != "steps"} | {"decode_tokens": 0}, calib(),
                           progress=False)
    assert report.weight_rel_error > plain.weight_rel_error > 0
    with torch.no_grad():
        out = model(input_ids=calib()[:1]).logits
    assert torch.isfinite(out).all()


def test_quantizes_with_the_driver_it_is_handed_and_its_report_pickles():
    """A model-level family gets the driver from its caller (it imports nothing above experiments.methods.spec),
    and its report is an ordinary module-level dataclass: it pickles, as executors need."""
    import pickle

    from experiments.methods.families.structured import FAMILY
    calls = []

    def driver(model, spec, calib_ids, *, progress=True):
        calls.append(spec.label())
        return compress_model(model, spec, calib_ids, progress=progress)

    spec = parse_spec({"method": "layers", "criterion": "last", "blocks": 1, "decode_tokens": 0,
                       "steps": [{"method": "rtn", "bits": 4, "group_size": 32}]})
    report = FAMILY.compress_model(tiny(layers=3), spec, None, driver=driver, progress=False)
    assert calls == [spec.steps[0].label()]
    assert sum(r.module == "QuantLinear" for r in report.layers) == 2 * 7
    back = pickle.loads(pickle.dumps(report))
    assert type(back) is type(report) and back.summary() == report.summary()


def test_check_fits_rejects_too_many_blocks():
    from experiments.lm.models import layer_shapes
    from experiments.methods.compress import check_spec_fits
    shapes = layer_shapes(tiny(layers=3))
    with pytest.raises(ValueError, match="blocks=3 must be smaller than the model's 3 blocks"):
        check_spec_fits(parse_spec({"method": "layers", "criterion": "last", "blocks": 3}), shapes)


def test_sweep_file_expands():
    from experiments.run.sweep_config import resolve_sweeps
    sw, *seed_sweeps = resolve_sweeps("structured")
    assert [s.base for s in seed_sweeps] == ["structured"] * len(seed_sweeps)
    full = sw.points(False)
    assert len(full) == 1 + 4 + 24 + 4 + 32 + 4 + 6 + 8
    sp = [p for p in full if p.criterion in ("magnitude-sp", "wanda-sp")]
    assert len(sp) == 18 and {p.scope for p in sp} == {"uniform"}  # as FLAP runs its baselines
    assert any(p.method == "channels" and p.criterion == "flap" and p.scope == "global" for p in full)
    assert {p.method for p in full} == {"dense", "channels", "heads", "channels_heads", "layers"}
    assert any(p.steps for p in full)
    assert 2 <= len(sw.points(True)) <= 6


def test_linear_latency_times_each_distinct_shape_once_and_sums_over_the_model(monkeypatch):
    import experiments.core.timing as timing
    from experiments.methods.algorithms.structured import prune_model
    from experiments.methods.families.structured import linear_latency
    model = tiny(layers=3)
    prune_model(model, method="channels", criterion="magnitude", ratio=0.25, scope="global", floor=0.1)
    calls = []

    def fake_time_fn(fn, device, *, min_run_time=None):
        out = fn()  # the module really runs on an input of its shape
        calls.append(tuple(out.shape))
        return {"median_ms": float(out.shape[-1])}

    monkeypatch.setattr(timing, "time_fn", fake_time_fn)
    from experiments.lm.models import linear_layers
    from experiments.lm.models import linear_weight
    shapes = [tuple(linear_weight(lin).shape) for _, lin in linear_layers(model)]
    assert linear_latency(model) == sum(n for n, _ in shapes)  # every linear counted, at its own shape
    assert len(calls) == len(set(shapes)) < len(shapes)  # each distinct shape timed once
