"""Rotations (experiments/methods/algorithms/rotate.py, families/rotate.py): the Hadamard constructions are
orthogonal Hadamards, the rotated dense model equals the original (tiny models of Hadamard and non-Hadamard
widths, and the default model), and the family quantizes, saves and reloads a rotated model."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from experiments.methods.algorithms import rotate
from experiments.methods.compress import compress_model, parse_spec
from experiments.methods.families import FAMILIES


def test_paley_12_is_a_hadamard_matrix():
    h = rotate.paley_hadamard_12()
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, 12 * torch.eye(12, dtype=torch.float64), atol=0, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 24, 48, 64, 144, 576, 1536])
def test_hadamard_is_orthogonal_with_equal_magnitudes(n):
    h = rotate.hadamard(n)
    assert h.shape == (n, n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64), atol=1e-15, rtol=0)


@pytest.mark.parametrize("n", [3, 9, 10, 36, 96 * 5])
def test_widths_without_a_construction_get_none_then_a_random_orthogonal(n):
    assert rotate.hadamard(n) is None
    q, what = rotate.rotation_matrix(n, "hadamard", seed=3)
    assert what == "random orthogonal (seed 3)"
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, rotate.random_orthogonal(n, 3)) and not torch.equal(q, rotate.random_orthogonal(n, 4))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="n must be a positive integer"):
        rotate.hadamard(0)
    with pytest.raises(ValueError, match="rotation='givens' must be 'hadamard' or 'random'"):
        rotate.rotation_matrix(8, "givens")
    with pytest.raises(ValueError, match="rotation='givens' must be one of hadamard, random"):
        parse_spec({"method": "quarot", "bits": 3, "rotation": "givens"})
    with pytest.raises(ValueError, match="rotation_seed=-1 must be a non-negative integer"):
        parse_spec({"method": "quarot", "bits": 3, "rotation_seed": -1})


def _llama(hidden: int, heads: int, kv: int, inter: int, tie: bool = True) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
            if "norm" in name:   # norms that are not 1, so folding them matters
                p.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("hidden, heads, kv, inter, rotation", [
    (96, 4, 2, 192, "hadamard"),     # 96 = 12 * 8, head_dim 24 = 12 * 2, 192 = 12 * 16
    (80, 4, 2, 160, "hadamard"),     # 80: no construction -> random orthogonal; head_dim 20: random too
    (96, 4, 4, 192, "random"),
], ids=["hadamard-widths", "other-widths", "random"])
def test_the_rotated_dense_model_equals_the_original(hidden, heads, kv, inter, rotation):
    model = _llama(hidden, heads, kv, inter)
    orig = copy.deepcopy(model)
    used = rotate.rotate_model(model, rotation=rotation)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for name, n in model.named_modules()
               if name.endswith("norm"))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, orig.get_parameter(n))]
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight",
            "model.layers.1.mlp.down_proj.weight", "lm_head.weight"} <= set(changed)
    if rotation == "hadamard" and hidden == 96:
        assert used == {"residual": "hadamard 12^1 x 2^3", "head": "hadamard 12^1 x 2^1"}
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = orig(ids).logits, model(ids).logits
    torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5)


def test_rotation_spreads_an_outlier_input_channel():
    """Why rotate: a weight column 50x the others (an outlier input channel) is spread over every column,
    so the per-group absmax that sets a quantization step shrinks towards the typical magnitude."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 576, generator=g, dtype=torch.float64)
    w[:, 7] *= 50
    h = rotate.hadamard(576)
    ratio = lambda m: float(m.abs().amax() / m.abs().mean())   # noqa: E731
    assert ratio(w @ h) < ratio(w) / 10


@pytest.fixture
def _cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("gptq", [False, True], ids=["rtn", "gptq"])
def test_a_rotated_model_is_quantized_end_to_end(gptq, _cpu):
    from triton_kernels.nn.quant import QuantLinear
    model = _llama(96, 4, 2, 192)
    orig = copy.deepcopy(model)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = parse_spec({"method": "quarot", "bits": 4, "group_size": 32, "gptq": gptq})
    assert spec.label() == ("quarot-w4-g32-asym+gptq" if gptq else "quarot-w4-g32-asym")
    report = compress_model(model, spec, calib if gptq else None, progress=False, keep_weights=True)
    linears = [m for n, m in model.named_modules() if n.startswith("model.layers.") and
               isinstance(m, (nn.Linear, QuantLinear))]
    assert len(linears) == 14 and all(isinstance(m, QuantLinear) for m in linears)
    base = compress_model(copy.deepcopy(orig), {"method": "gptq" if gptq else "rtn", "bits": 4, "group_size": 32},
                          calib, progress=False)
    assert report.bytes == base.bytes and len(report.layers) == len(base.layers)
    assert 0 < report.weight_rel_error < 0.2
    cols = FAMILIES["rotate"].method_columns(report.spec)
    assert cols["quant_method"] == "quarot" and cols["rotation"] == "hadamard" and cols["gptq"] is gptq
    # The quantized model is the rotated dense model with each block linear's weight replaced by what was
    # quantized from it (report.weights: the dequantized W_hat the QuantLinear computes with).
    ref = copy.deepcopy(orig)
    rotate.rotate_model(ref)
    with torch.no_grad():
        for name, w_hat in report.weights.items():
            block, path = name.split(".", 1)
            ref.get_submodule(f"model.layers.{int(block[len('block'):])}.{path}").weight.copy_(w_hat)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert torch.isfinite(b).all()
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_a_saved_rotated_model_reloads_untied(tmp_path, _cpu):
    from experiments.run.saving import BASE_FILE, load_compressed, save_compressed
    model = _llama(96, 4, 2, 192)
    report = compress_model(model, {"method": "quarot", "bits": 4, "group_size": 32}, None, progress=False)
    out = save_compressed(model, report, tmp_path / "m", include_base=False)
    assert (out / BASE_FILE).exists()  # included although not asked for: embeddings, norms and lm_head changed
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    for base in (None, _llama(96, 4, 2, 192)):   # rebuilt from the carried tensors, or over a tied base model
        loaded = load_compressed(out, base=base)
        assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_storage_format_and_fit_checks():
    from experiments.measure import formats
    assert formats.format_of({"method": "quarot", "bits": 3}) == {"kind": "quant", "bits": 3, "group_size": 128,
                                                                  "symmetric": False}
    assert FAMILIES["rotate"].uniform_grid(parse_spec({"method": "quarot", "bits": 4})) is None
    assert parse_spec({"method": "quarot", "bits": 3, "rotation": "random"}).label() == "quarot-w3-g128-asym-random0"
    with pytest.raises(ValueError, match="rotations merge into Llama-family blocks"):
        FAMILIES["rotate"].check_fits(parse_spec({"method": "quarot", "bits": 3}), {"block0.fc1": (64, 64)})


@pytest.mark.slow
@torch.no_grad()
def test_the_rotated_default_model_equals_the_original():
    """The exactness claim on the real model: SmolLM2-135M (residual 576 = 12^2 * 4, head_dim 64, tied
    embeddings) rotated by Hadamards computes the same logits within fp32 rounding."""
    from experiments.lm import models
    model = models.load_model("default")[0]
    orig = copy.deepcopy(model)
    used = rotate.rotate_model(model)
    assert used == {"residual": "hadamard 12^2 x 2^2", "head": "hadamard 12^0 x 2^6"}
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    a, b = orig(ids).logits, model(ids).logits
    assert float((b - a).abs().max() / a.abs().max()) < 1e-4
    assert torch.equal(a.argmax(-1), b.argmax(-1))
