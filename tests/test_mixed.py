"""Mixed precision under a bit budget (experiments/methods/algorithms/allocate.py, families/mixed.py): the
allocation is the exact optimum of the multiple-choice knapsack (checked against enumeration), the family
keeps the budget, puts each layer in its allocated format, beats every uniform format of the same size on
its own objective, and saves/reloads; bad specs and budgets name themselves."""
from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from experiments.methods.algorithms.allocate import BudgetError, allocate
from experiments.methods.compress import compress_model, parse_spec
from experiments.methods.families import FAMILIES
from experiments.methods.families import mixed


def _brute(cost, size, budget):
    best = None
    for pick in itertools.product(*(range(len(r)) for r in cost)):
        if sum(size[l][c] for l, c in enumerate(pick)) <= budget:
            total = sum(cost[l][c] for l, c in enumerate(pick))
            if best is None or total < best:
                best = total
    return best


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 4), st.floats(0.0, 1.0))
def test_allocation_is_the_exact_optimum(seed, layers, choices, slack):
    rng = random.Random(seed)
    size = [[rng.randint(1, 50) for _ in range(choices)] for _ in range(layers)]
    # Costs that mostly fall with size (as errors do with bits), with noise, so dominated candidates occur.
    cost = [[max(0.0, 100.0 / s + rng.uniform(-5, 5)) for s in row] for row in size]
    lo = sum(min(r) for r in size)
    hi = sum(max(r) for r in size)
    budget = lo + round(slack * (hi - lo))
    pick = allocate(cost, size, budget)
    assert len(pick) == layers
    assert sum(size[l][c] for l, c in enumerate(pick)) <= budget
    assert sum(cost[l][c] for l, c in enumerate(pick)) == pytest.approx(_brute(cost, size, budget), rel=1e-9)


def test_a_greedy_ratio_rule_would_miss_the_optimum_the_program_finds():
    """Two layers, budget 10: the best cost-per-byte move is not the optimum (a knapsack, not a ranking)."""
    cost = [[10.0, 0.0], [10.0, 9.0]]
    size = [[1, 9], [1, 2]]
    assert allocate(cost, size, 10) == [1, 0]
    assert allocate(cost, size, 11) == [1, 1]
    assert allocate(cost, size, 3) == [0, 1]


def test_allocation_errors_name_the_problem():
    with pytest.raises(BudgetError, match=r"budget=2 is below the smallest allocation \(3"):
        allocate([[1.0], [1.0, 2.0]], [[1], [2, 3]], 2)
    with pytest.raises(ValueError, match="layer 0: 1 costs for 2 sizes"):
        allocate([[1.0]], [[1, 2]], 5)
    with pytest.raises(ValueError, match="costs must be finite and >= 0"):
        allocate([[float("nan")]], [[1]], 5)
    with pytest.raises(ValueError, match="sizes must be positive integers"):
        allocate([[1.0]], [[1.5]], 5)


def test_spec_parsing_and_labels():
    s = parse_spec({"method": "mixed", "budget": 3.25})
    assert (s.bit_choices, s.group_choices, s.sensitivity, s.gptq) == ("2,3,4,8", "64,128", "fisher", False)
    assert s.label() == "mixed-b3.25"
    s2 = parse_spec({"method": "mixed", "budget": 2.5, "bit_choices": [4, 2, 2], "group_choices": "128,32",
                     "gptq": True})
    assert (s2.bit_choices, s2.group_choices) == ("2,4", "32,128")
    assert s2.label() == "mixed-b2.5-w24-g32_128+gptq"
    assert parse_spec(s2.to_dict()) == s2  # the plain data round-trips (saved points compare it)
    assert mixed.candidates(s2) == [(2, 32), (2, 128), (4, 32), (4, 128)]
    for bad, match in [({"budget": None}, "budget=None must be a number"),
                       ({"budget": 0}, "budget=0 must be a number"),
                       ({"budget": 3, "bit_choices": [3, 9]}, "bit_choices: 9 is not a code width"),
                       ({"budget": 3, "group_choices": [48]}, "group_choices: 48 is not a power of two"),
                       ({"budget": 3, "bit_choices": "x"}, "bit_choices='x' must be a list of integers"),
                       ({"budget": 3, "sensitivity": "hessian"}, "sensitivity='hessian' must be one of fisher"),
                       ({"budget": 3, "damp": 0.1}, "apply only with gptq: true"),
                       ({"budget": 3, "bits": 3}, r"unknown option\(s\) \['bits'\]")]:
        with pytest.raises(ValueError, match=match):
            parse_spec({"method": "mixed", **bad})


def test_a_budget_below_every_allocation_is_refused_before_any_work():
    shapes = {"block0.self_attn.q_proj": (64, 64), "block0.mlp.down_proj": (64, 128)}
    # q_proj (K=64) takes groups of 64 only (2.5 bits at 2-bit), down_proj 2-bit g128 (2.25): 2.3333 overall.
    with pytest.raises(ValueError, match=r"budget=2: below the smallest allocation .*\(2.3333 bits per weight"):
        FAMILIES["mixed"].check_fits(parse_spec({"method": "mixed", "budget": 2}), shapes)
    FAMILIES["mixed"].check_fits(parse_spec({"method": "mixed", "budget": 2.34}), shapes)
    with pytest.raises(ValueError, match=r"no group fits layer block0.self_attn.q_proj \(in_features K=64\)"):
        FAMILIES["mixed"].check_fits(parse_spec({"method": "mixed", "budget": 3, "group_choices": [128]}), shapes)


def test_format_bytes_is_the_modules_size():
    # 2-bit, groups of 64: codes 2 bits + fp16 scale and zero per 64 weights = 2.5 bits per weight.
    assert mixed.format_bytes(64, 128, 2, 64, False) * 8 == 2.5 * 64 * 128
    assert mixed.format_bytes(64, 128, 3, 128, False) * 8 == 3.25 * 64 * 128


def test_allocation_column_round_trips():
    alloc = {"block0.self_attn.q_proj": (4, 128), "block12.mlp.down_proj": (2, 64)}
    text = mixed.format_allocation(alloc)
    assert text == "0.q=4/128;12.down=2/64"
    assert mixed.parse_allocation(text) == [(0, "q", 4, 128), (12, "down", 2, 64)]


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
    return model


@pytest.fixture
def _cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _layer_cost(model, calib, bits, group):
    """The family's objective for one uniform format: sum over layers of sum F (W - RTN(W))^2."""
    from experiments.lm.models import linear_layers, linear_weight, squared_gradients
    from experiments.methods.families import quant
    fisher = squared_gradients(model, calib)
    total = 0.0
    for name, layer in linear_layers(model):
        w = linear_weight(layer).detach().float()
        step = parse_spec({"method": "rtn", "bits": bits, "group_size": group})
        w_hat = quant.quant_module(quant.quantize(step, w, None), None).dequantize().float()
        total += float((fisher[name] * (w - w_hat).square()).sum())
    return total


@pytest.mark.parametrize("gptq", [False, True], ids=["rtn", "gptq"])
def test_mixed_keeps_the_budget_allocates_per_layer_and_beats_the_uniform_format(gptq, _cpu):
    from triton_kernels.nn.quant import QuantLinear
    model = _llama()
    orig = copy.deepcopy(model)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    # Budget = the size of uniform 3-bit groups of 64 (3.5 bits per weight): uniform is feasible, so the
    # exact allocation's predicted cost can be no larger than uniform's, and here is smaller.
    spec = parse_spec({"method": "mixed", "budget": 3.5, "gptq": gptq})
    report = compress_model(model, spec, calib, progress=False)
    assert report.spec == spec and report.bits_per_weight <= 3.5
    alloc = mixed.parse_allocation(report.extra["allocation"])
    assert len(alloc) == len(report.layers) == 14
    assert len({(b, g) for *_, b, g in alloc}) > 1, "a mixed allocation, not one format"
    for (block, leaf, bits, group), rec in zip(alloc, report.layers):
        assert rec.name.startswith(f"block{block}.") and rec.name.split(".")[-1].removesuffix("_proj") == leaf
        mod = model.get_submodule(f"model.layers.{block}.{rec.name.split('.', 1)[1]}")
        assert isinstance(mod, QuantLinear) and (mod.bits, mod.group_size) == (bits, group)
    uniform = _layer_cost(orig, calib, 3, 64)
    assert report.extra["allocation_cost"] < uniform
    assert report.summary()["allocation"] == report.extra["allocation"]
    cols = FAMILIES["mixed"].method_columns(spec)
    assert cols["quant_method"] == "mixed" and cols["gptq"] is gptq
    if not gptq:
        # RTN's layers are exactly RTN of the original weights in the allocated formats.
        ref = copy.deepcopy(orig)
        ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
        from experiments.lm.models import linear_layers
        from experiments.methods.families import quant
        with torch.no_grad():
            for (name, layer), (*_, bits, group) in zip(linear_layers(ref), alloc):
                step = parse_spec({"method": "rtn", "bits": bits, "group_size": group})
                layer.weight.copy_(quant.quant_module(quant.quantize(step, layer.weight.float(), None),
                                                      None).dequantize().float())
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_budget_extremes_take_the_smallest_and_the_best_formats(_cpu):
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model = _llama()
    report = compress_model(model, {"method": "mixed", "budget": 2.5, "group_choices": [32, 64]}, calib,
                            progress=False)   # 2.5: every layer 2-bit with groups of 64, the smallest candidate
    assert {(b, g) for *_, b, g in mixed.parse_allocation(report.extra["allocation"])} == {(2, 64)}
    model = _llama()
    report = compress_model(model, {"method": "mixed", "budget": 16}, calib, progress=False)
    assert {b for *_, b, _ in mixed.parse_allocation(report.extra["allocation"])} == {8}


def test_a_mixed_model_saves_and_reloads_exactly(tmp_path, _cpu):
    from experiments.run.saving import load_compressed, save_compressed
    model = _llama()
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    report = compress_model(model, {"method": "mixed", "budget": 3.0}, calib, progress=False)
    out = save_compressed(model, report, tmp_path / "m", include_base=False)
    loaded = load_compressed(out, base=_llama())
    assert loaded.compressed_manifest["report"]["allocation"] == report.extra["allocation"]
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_the_driver_takes_per_layer_specs_and_refuses_bad_ones(_cpu):
    from triton_kernels.nn.quant import QuantLinear
    model = _llama()
    specs = {"block1.mlp.down_proj": {"method": "rtn", "bits": 8, "group_size": 32}}
    compress_model(model, {"method": "rtn", "bits": 2, "group_size": 32}, None, progress=False, layer_specs=specs)
    assert model.model.layers[1].mlp.down_proj.bits == 8 and model.model.layers[0].mlp.down_proj.bits == 2
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    with pytest.raises(ValueError, match="layer_specs names layers the model does not have"):
        compress_model(_llama(), {"method": "rtn", "bits": 2, "group_size": 32}, None, progress=False,
                       layer_specs={"block9.mlp.down_proj": {"method": "rtn", "bits": 8, "group_size": 32}})
    with pytest.raises(ValueError, match="does not compress single layers"):
        compress_model(_llama(), {"method": "rtn", "bits": 2, "group_size": 32}, None, progress=False,
                       layer_specs={"block1.mlp.down_proj": {"method": "awq", "bits": 4, "group_size": 32}})


def test_figures_show_mixed_rows():
    """The modern figure places mixed rows by their effective bits (they have no single bits/group), and
    the allocation figure draws one panel per mixed row with each layer's bits."""
    import matplotlib
    matplotlib.use("Agg")
    import pandas as pd
    from experiments.analysis import plots
    alloc = mixed.format_allocation({f"block{b}.{p}": (bits, g) for b in range(3)
                                     for p, bits, g in (("self_attn.q_proj", 4, 128), ("mlp.down_proj", 2 + b, 64))})
    base = {"device": "cpu", "model": "m", "corpus": "c", "quick": True, "ppl_lo": "", "ppl_hi": "", "gptq": "",
            "compress_seconds": 1.0}
    df = pd.DataFrame([
        {**base, "method": "dense", "point": "dense", "bits": "", "group_size": "", "bits_per_weight": 16, "ppl": 20},
        {**base, "method": "rtn", "point": "rtn-w3-g128-asym", "bits": 3, "group_size": 128, "bits_per_weight": 3.25,
         "ppl": 80},
        {**base, "method": "mixed", "point": "mixed-b3.25", "bits": "", "group_size": "", "bits_per_weight": 3.2,
         "ppl": 60, "allocation": alloc},
        {**base, "method": "mixed", "point": "mixed-b3.25+gptq", "bits": "", "group_size": "", "gptq": True,
         "bits_per_weight": 3.2, "ppl": 50, "allocation": alloc}])
    fig = plots.modern_figure(df)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"RTN g128", "MIXED", "MIXED+GPTQ"} <= set(labels)
    line = next(l for l in fig.axes[0].get_lines() if l.get_label() == "MIXED")
    assert list(line.get_xdata()) == [3.2] and list(line.get_ydata()) == [60]
    fig = plots.allocation_figure(df)
    assert fig is not None and len(fig.axes) == 3   # two panels and the colour bar
    img = fig.axes[0].get_images()[0].get_array()
    assert img.shape == (2, 3) and img[0].tolist() == [4, 4, 4] and img[1].tolist() == [2, 3, 4]
    assert plots.allocation_figure(df[df["method"] != "mixed"]) is None
