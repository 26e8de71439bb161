"""Method specs, and sequential compression of a tiny random Llama through the real modules.

The key check ("module path vs dense simulation"): after ``compress_model`` every linear of every
block is a compressed module; putting each layer's dequantized W_hat into a dense copy of the
original model must give the same logits as the compressed model's real forward.
"""
import copy

import pytest
import torch
from torch import nn

from experiments.methods.compress import (CompressionReport, MethodSpec, aliases_source_grid, check_spec_fits,
                                  compress_model, parse_spec)

# ------------------------------------------------------------------ spec validation

Q4_1 = {"qtype": "Q4_1", "bits": 4, "group_size": 32, "symmetric": False}
SHAPES = {"block0.q_proj": (96, 96), "block0.k_proj": (48, 96), "block0.down_proj": (96, 160)}


@pytest.mark.parametrize("spec, match", [
    ({"method": "quip", "bits": 4}, r"unknown method='quip'; choose one of dense, rtn, gptq"),
    ({"method": "rtn", "bits": 4, "groupsize": 64}, r"unknown option\(s\) \['groupsize'\] for method='rtn'; it accepts"),
    ({"method": "rtn", "bits": 9}, r"bits=9 must be an integer in 1\.\.8"),
    ({"method": "gptq", "bits": 0}, r"bits=0 must be an integer in 1\.\.8"),
    ({"method": "rtn", "bits": 2.5}, r"bits=2\.5 must be an integer in 1\.\.8"),
    ({"method": "rtn", "bits": 1, "symmetric": True}, r"bits=1 with symmetric=true cannot work: .* every weight rounds to 0; use symmetric=false"),
    ({"method": "magnitude", "sparsity": 0.5, "scope": "column"}, r"scope='column' must be 'row' .* or 'layer'"),
    ({"method": "magnitude", "pattern": "2:4", "scope": "layer"}, r"scope='layer' applies to pattern='unstructured' only"),
    ({"method": "sparsegpt", "sparsity": 0.5, "scope": "layer"}, r"unknown option\(s\) \['scope'\] for method='sparsegpt'"),
    ({"method": "rtn", "bits": 4, "group_size": 0}, r"group_size=0 must be a positive integer or -1"),
    ({"method": "rtn", "bits": 4, "group_size": 192}, r"group_size=192 is not a power of two .* use e\.g\. 128 or 256"),
    ({"method": "gptq", "bits": 4, "act_order": "yes"}, r"act_order='yes' must be true or false"),
    ({"method": "wanda", "pattern": "unstructured"}, r"sparsity=None must be a fraction in \(0, 1\)"),
    ({"method": "wanda", "sparsity": 0.3, "pattern": "2:4"}, r"sparsity=0\.3 contradicts pattern='2:4'"),
    ({"method": "magnitude", "pattern": "4:2"}, r"N:M needs 0 < N < M"),
    ({"method": "magnitude", "sparsity": 0.5, "pattern": "diagonal"}, r"pattern='diagonal' is not one of"),
    ({"method": "svd"}, r"give exactly one of ratio .*rank or energy; got none"),
    ({"method": "svd", "ratio": 0.5, "rank": 8}, r"give exactly one of .*got \['ratio', 'rank'\]"),
    ({"method": "svd", "ratio": 1.2}, r"ratio=1\.2 must be in \(0, 1\)"),
    ({"method": "combo", "steps": [{"method": "rtn", "bits": 4}, {"method": "wanda", "pattern": "2:4"}]},
     r"supported combination is a pruning step .* followed by a quantization step"),
    ({"method": "combo", "steps": [{"method": "wanda", "pattern": "2:4"}, {"method": "rtn", "bits": 11}]},
     r"step 2: bits=11"),
], ids=["method", "option", "bits9", "bits0", "bits-float", "bits1-sym", "scope", "scope-nm", "scope-sparsegpt", "group0", "group-pow2", "act_order", "no-sparsity", "nm-sparsity", "nm-order",
        "pattern", "lowrank-none", "lowrank-two", "ratio", "combo-order", "combo-step"])
def test_parse_spec_rejects_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec)


@pytest.mark.parametrize("spec, option, match", [
    ({"method": "rtn", "bits": 4, "group_size": 128}, "group_size",
     r"group_size=128 is larger than the layer's in_features K=96 .* use a group size <= 96"),
    ({"method": "magnitude", "pattern": "2:5"}, "pattern", r"m=5 does not divide K=96.*m values that fit: \[2, 3, 4"),
    ({"method": "wanda", "sparsity": 0.5, "pattern": "block:32x32"}, "pattern",
     r"block0\.k_proj \(48x96\).*'block:32x32' does not tile"),
    ({"method": "svd", "rank": 60}, "rank", r"rank=60 is larger than min\(out_features, in_features\)=48 of layer block0\.k_proj"),
    ({"method": "svd", "rank": 40}, "rank", r"rank=40 stores at least as many parameters as the dense layer block0\.k_proj"),
    ({"method": "combo", "steps": [{"method": "sparsegpt", "pattern": "2:4"},
                                   {"method": "gptq", "bits": 4, "group_size": 256}]}, "group_size", r"group_size=256"),
], ids=["group-size", "nm", "block", "rank-too-large", "rank-no-saving", "combo-group"])
def test_check_spec_fits_names_the_option(spec, option, match):
    with pytest.raises(ValueError, match=rf"^{option}: .*{match}"):
        check_spec_fits(parse_spec(spec), SHAPES)


def test_partial_last_group_and_per_channel_fit():
    # 96 = 64 + a partial group of 32: the kernel format supports it, so it is not an error.
    for g in (64, -1):
        check_spec_fits(parse_spec({"method": "gptq", "bits": 3, "group_size": g}), SHAPES)


def test_spec_roundtrip_and_defaults():
    s = parse_spec({"method": "gptq", "bits": 3})
    assert s == MethodSpec("gptq", bits=3, group_size=128, symmetric=False, act_order=False, damp=0.01)
    assert parse_spec(s.to_dict()) == s
    assert parse_spec({"method": "sparsegpt", "pattern": "4:8"}).sparsity == pytest.approx(0.5)
    one = parse_spec({"method": "gptq", "bits": 1, "group_size": 64})
    assert (one.bits, one.symmetric, one.label()) == (1, False, "gptq-w1-g64-asym")


def test_prune_scope_canonical_form_and_labels():
    """A spec without ``scope`` keeps meaning per-row (what every committed magnitude row used); an
    explicit "row" is the same point; "layer" is a different point with its own label and id."""
    from experiments.run.point import method_columns
    from experiments.run.sweep import point_id
    plain = parse_spec({"method": "magnitude", "sparsity": 0.5})
    row = parse_spec({"method": "magnitude", "sparsity": 0.5, "scope": "row"})
    layer = parse_spec({"method": "magnitude", "sparsity": 0.5, "scope": "layer"})
    assert plain == row and "scope" not in row.to_dict() and row.label() == "magnitude-unstructured-0.5"
    assert layer.to_dict()["scope"] == "layer" and layer.label() == "magnitude-unstructured-0.5-layer"
    assert (method_columns(row)["scope"], method_columns(layer)["scope"]) == ("row", "layer")
    assert method_columns(parse_spec({"method": "wanda", "pattern": "2:4"}))["scope"] == ""
    settings, corpus = {"seqlen": 8}, {"corpus": "x"}
    assert point_id(plain, settings, "m", corpus) == point_id(row, settings, "m", corpus)
    assert point_id(layer, settings, "m", corpus) != point_id(row, settings, "m", corpus)


def test_damp_is_recorded_and_named_when_not_the_former_default():
    from experiments.methods.compress import DEFAULT_WHITENING_DAMP
    from experiments.run.point import method_columns
    w = parse_spec({"method": "whitened_svd", "ratio": 0.8})
    assert w.damp == DEFAULT_WHITENING_DAMP and w.to_dict()["damp"] == DEFAULT_WHITENING_DAMP
    assert method_columns(w)["damp"] == DEFAULT_WHITENING_DAMP
    old = parse_spec({"method": "whitened_svd", "ratio": 0.8, "damp": 0.01})
    assert old.label() == "whitened_svd-ratio0.8"  # the label of the whitened_svd rows measured before 1e-3 became the default
    assert parse_spec({"method": "whitened_svd", "ratio": 0.8, "damp": 0.001}).label() == "whitened_svd-ratio0.8-damp0.001"
    assert parse_spec({"method": "gptq", "bits": 4, "damp": 0.1}).label() == "gptq-w4-g128-asym-damp0.1"
    combo = parse_spec({"method": "combo", "steps": [{"method": "sparsegpt", "pattern": "2:4", "damp": 0.05},
                                                     {"method": "gptq", "bits": 4}]})
    assert method_columns(combo)["damp"] == "sparsegpt=0.05; gptq=0.01"


def _committed_sweep_rows():
    import csv
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "results"
    tables = sorted(root.rglob("sweep_*.csv"))
    assert tables, f"no committed sweep tables under {root}"
    for path in tables:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                yield path, r


def test_committed_rows_keep_their_meaning():
    """Every committed sweep row's spec parses back to exactly itself (so its point id, a hash of the
    canonical spec, is unchanged) with the same label: new options (scope, the whitened-SVD damping
    default) never relabel an existing number."""
    import json

    from experiments.methods.families.sparse import prune_scope
    n = 0
    for path, r in _committed_sweep_rows():
        spec = parse_spec(json.loads(r["spec"]))
        assert json.dumps(spec.to_dict(), sort_keys=True) == r["spec"], (path, r["point"])
        assert spec.label() == r["point"], (path, r["spec"])
        if spec.method == "magnitude" and spec.pattern == "unstructured":
            # rows labelled without a scope suffix (all rows before the option existed) stay row-scope;
            # the per-layer rows say so in their label and their scope column
            expected = "layer" if r["point"].endswith("-layer") else "row"
            assert prune_scope(spec) == expected and r.get("scope", "row") == expected, (path, r["point"])
        n += 1
    assert n > 0


Q4_0 = {"qtype": "Q4_0", "bits": 4, "group_size": 32, "symmetric": True}


@pytest.mark.parametrize("spec, grid, expected", [
    ({"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}, Q4_0, True),
    ({"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}, Q4_0, True),
    ({"method": "combo", "steps": [{"method": "wanda", "pattern": "2:4"},
                                   {"method": "rtn", "bits": 4, "group_size": 32}]}, Q4_0, True),
    ({"method": "rtn", "bits": 8, "group_size": 16}, Q4_0, True),
    ({"method": "rtn", "bits": 4, "group_size": 64}, Q4_0, False),
    ({"method": "rtn", "bits": 3, "group_size": 32}, Q4_0, False),
    ({"method": "rtn", "bits": 8, "group_size": -1}, Q4_0, False),
    # Q4_1's zero-point m/d is fractional: integer-zero grids never contain it (models.py).
    ({"method": "rtn", "bits": 4, "group_size": 32}, Q4_1, False),
    ({"method": "wanda", "pattern": "2:4"}, Q4_0, False),
    ({"method": "dense"}, Q4_0, False),
], ids=["rtn-q4_0", "gptq-q4_0", "combo-q4_0", "w8-g16", "g64", "w3", "w8-pc", "rtn-q4_1", "prune", "dense"])
def test_aliases_source_grid(spec, grid, expected):
    assert aliases_source_grid(parse_spec(spec), grid) is expected
    assert aliases_source_grid(parse_spec(spec), None) is False


# ------------------------------------------------------------------ tiny model

def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    # Random init has std 0.02 everywhere; widen it so the blocks do real work on the residual stream
    # and a compression error shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
    return model


@pytest.fixture(scope="module")
def model_and_data():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 128, (4, 16), generator=g)
    ids = torch.randint(0, 128, (1, 20), generator=g)
    return model, calib, ids


_COMPRESSED: dict[str, tuple] = {}


def compressed(model_and_data, spec):
    """(model, report) for ``spec``, computed once per test session (the interpreter is slow)."""
    spec = parse_spec(spec)
    if spec.label() not in _COMPRESSED:
        base, calib, _ = model_and_data
        model = copy.deepcopy(base)
        _COMPRESSED[spec.label()] = model, compress_model(model, spec, calib, progress=False, keep_weights=True)
    return _COMPRESSED[spec.label()]


def _module_type(family: str) -> type:
    import importlib
    mod, cls = {"quant": ("quant", "QuantLinear"), "sparse": ("sparse", "SparseLinear"),
                "lowrank": ("lowrank", "LowRankLinear"), "combo": ("sparse", "SparseLinear")}[family]
    return getattr(importlib.import_module(f"triton_kernels.nn.{mod}"), cls)


def _dense_simulation(model: nn.Module, report: CompressionReport) -> nn.Module:
    from experiments.lm.models import find_blocks, find_linears
    sim = copy.deepcopy(model)
    for i, block in enumerate(find_blocks(sim)):
        for name, layer in find_linears(block).items():
            with torch.no_grad():
                layer.weight.copy_(report.weights[f"block{i}.{name}"])
    return sim


# Tolerances of the module path against the dense simulation (fp32 model, fp32 activations).
# The sparse/low-rank/quant kernels accumulate in a different order than F.linear.
ATOL, RTOL = 2e-4, 2e-4

SPECS = [
    {"method": "rtn", "bits": 4, "group_size": 32},
    {"method": "gptq", "bits": 3, "group_size": 32, "act_order": True},
    {"method": "magnitude", "sparsity": 0.5, "pattern": "unstructured"},
    {"method": "wanda", "pattern": "2:4"},
    {"method": "sparsegpt", "sparsity": 0.5, "pattern": "block:16x16"},
    {"method": "svd", "ratio": 0.5},
    {"method": "whitened_svd", "ratio": 0.5},
    {"method": "combo", "steps": [{"method": "sparsegpt", "pattern": "2:4"}, {"method": "gptq", "bits": 4, "group_size": 32}]},
    {"method": "rtn", "bits": 1, "group_size": 32},  # 1-bit asymmetric: accepted by the harness since issue 8
    {"method": "magnitude", "sparsity": 0.5, "scope": "layer"},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: parse_spec(s).label())
def test_module_path_matches_dense_simulation(model_and_data, spec):
    from experiments.lm.models import find_blocks, find_linears
    base, calib, ids = model_and_data
    spec = parse_spec(spec)
    model, report = compressed(model_and_data, spec)

    expected_type = _module_type(spec.family)
    blocks = find_blocks(model)
    n_layers = 0
    for block in blocks:
        for name, mod in block.named_modules():
            assert not isinstance(mod, nn.Linear), f"{name} is still a dense nn.Linear"
        n_layers += sum(isinstance(m, expected_type) for m in block.modules())
    assert n_layers == len(report.layers) == 14
    # Embedding and (tied) lm_head are untouched.
    assert torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert isinstance(model.lm_head, nn.Linear)

    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = _dense_simulation(base, report)(input_ids=ids).logits
        orig = base(input_ids=ids).logits
    err = (got - want).abs().max().item()
    rel = err / want.abs().max().item()
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max abs err {err:.3g}, rel {rel:.3g}"
    # The test could fail: compression really changed the model.
    assert (orig - want).abs().max().item() > 50 * ATOL

    # Sizes come from the modules; every family saves memory against fp16 here.
    assert report.bytes > 0 and report.fp16_bytes == sum(2 * n * k for n, k in (r.shape for r in report.layers))
    if not (spec.family == "sparse" and spec.pattern == "unstructured"):
        assert report.bits_per_weight < 16
    else:
        # The unstructured kernel stores the masked weight plus a 1-bit mask: no saving, by design.
        assert report.bits_per_weight >= 17
    assert report.size_is_modelled is (spec.method == "combo")
    mods = [m for b in blocks for m in b.modules() if isinstance(m, expected_type)]
    if spec.family == "quant":
        # fp16 scale + fp16 zero per group of 32: bits + 1 (K=96 and 160 pack without padding).
        assert report.bytes == sum(m.memory_bytes() for m in mods)
        assert report.bits_per_weight == pytest.approx(spec.bits + 1, abs=1e-12)
    elif spec.family == "lowrank":
        # fp16 factors: 2 bytes x r x (N + K), r = floor(ratio N K / (N + K)).
        assert report.bytes == sum(2 * m.rank * (m.in_features + m.out_features) for m in mods)
        assert report.bits_per_weight == pytest.approx(16 * spec.ratio, rel=0.05)
    elif spec.family == "sparse":
        assert report.bytes == sum(m.memory_bytes() for m in mods)  # the format, whatever the backend
    assert 0 < report.weight_rel_error < float("inf")


def test_combo_kept_values_lie_on_the_quant_grid(model_and_data):
    base, calib, _ = model_and_data
    spec = {"method": "combo", "steps": [{"method": "wanda", "sparsity": 0.5, "pattern": "unstructured"},
                                         {"method": "rtn", "bits": 3, "group_size": 32}]}
    model = copy.deepcopy(base)
    report = compress_model(model, spec, calib, progress=False, keep_weights=True)
    for w_hat in report.weights.values():
        zeros = (w_hat == 0).float().mean().item()
        assert zeros >= 0.5
        # 3-bit groups of 32 hold at most 8 distinct values (plus the structural zeros).
        groups = w_hat.reshape(w_hat.shape[0], -1, 32)
        for row in groups[:4].reshape(-1, 32):
            assert torch.unique(row[row != 0]).numel() <= 8
    # Modelled size: below the unquantized sparse format of the same mask.
    sparse_only = compress_model(copy.deepcopy(base), spec["steps"][0], calib, progress=False)
    assert report.bytes < sparse_only.bytes


def test_dense_baseline_changes_nothing(model_and_data):
    base, calib, ids = model_and_data
    model = copy.deepcopy(base)
    report = compress_model(model, {"method": "dense"}, None, progress=False)
    assert report.bits_per_weight == 16 and report.compression_vs_fp16 == 1
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_calibrated_method_without_data_fails_before_work(model_and_data):
    base, _, _ = model_and_data
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="needs calibration data"):
        compress_model(model, {"method": "gptq", "bits": 4, "group_size": 32}, None, progress=False)
    with pytest.raises(ValueError, match="group_size=256 is larger"):
        compress_model(model, {"method": "rtn", "bits": 4, "group_size": 256}, None, progress=False)
    from experiments.lm.models import find_linears
    assert all(isinstance(m, nn.Linear) for b in model.model.layers for m in find_linears(b).values())


def test_sequential_calibration_sees_compressed_upstream(model_and_data):
    """Block 1 is calibrated on the outputs of the *compressed* block 0 (GPTQ's sequential scheme).

    Recompute block 1's q_proj by hand twice, from the compressed block 0's outputs and from the
    dense block 0's outputs: compress_model's result must be (much) closer to the former.
    """
    from experiments.methods.algorithms.quant import gptq
    from experiments.methods.families.quant import quant_module as _quant_module
    from experiments.lm.models import block_prefix_forward, find_blocks, run_block
    base, calib, _ = model_and_data
    model, report = compressed(model_and_data, SPECS[1])
    assert report.spec.method == "gptq"
    got = report.weights["block1.self_attn.q_proj"]
    w = base.model.layers[1].self_attn.q_proj.weight.detach().float()

    def by_hand(model):
        inp = block_prefix_forward(model, calib)
        with torch.no_grad():
            h1 = run_block(find_blocks(model)[0], inp.hidden, inp.kwargs[0])
            x = base.model.layers[1].input_layernorm(h1).reshape(-1, 96).double()
        H = (x.T @ x / x.shape[0]).float()
        return _quant_module(gptq(w, H, bits=3, group_size=32, symmetric=False, act_order=True), None).dequantize()

    d_seq = (got - by_hand(model)).norm().item()
    d_dense = (got - by_hand(base)).norm().item()
    assert d_seq < 0.1 * d_dense, f"||got - sequential|| {d_seq:.3g} vs ||got - dense-fed|| {d_dense:.3g}"


def test_magnitude_scope_reaches_the_algorithm(model_and_data):
    """scope=layer: one threshold per layer (per-row counts vary); default/row: exactly half of every row."""
    _, layer_report = compressed(model_and_data, {"method": "magnitude", "sparsity": 0.5, "scope": "layer"})
    _, row_report = compressed(model_and_data, {"method": "magnitude", "sparsity": 0.5, "pattern": "unstructured"})
    uneven = 0
    for name, w in layer_report.weights.items():
        n, k = w.shape
        per_row = (w == 0).sum(1)
        assert int(per_row.sum()) == (n * k) // 2, name
        uneven += int(per_row.min() != per_row.max())
        assert torch.equal((row_report.weights[name] == 0).sum(1), torch.full((n,), k // 2)), name
    assert uneven == len(layer_report.weights), "a per-layer threshold left every row of some layer at exactly 50%"
