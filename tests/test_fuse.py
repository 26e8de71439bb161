"""Fused q/k/v and gate/up projections (experiments/lm/fuse.py): the fused model computes what the unfused
one does, dense and quantized; blocks whose projections differ in format stay unfused."""
from __future__ import annotations

import copy

import torch

from experiments.lm.fuse import fuse_projections
from experiments.methods.compress import compress_model, parse_spec
from tests.test_latency import _tiny_llama
from triton_kernels.nn.quant import QuantLinear


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fused_dense_model_gives_the_same_logits():
    model, cfg = _tiny_llama()
    ids = torch.arange(3, 12).unsqueeze(0)
    want = _logits(model, ids)
    fused = copy.deepcopy(model)
    counts = fuse_projections(fused)
    n = cfg.num_hidden_layers
    assert counts == {"attention": n, "mlp": n, "left": 0}
    attn = fused.model.layers[0].self_attn
    assert not hasattr(attn, "q_proj") and attn.qkv_proj.out_features == sum(attn.qkv_sizes)
    # fp32 GEMM of a wider weight may sum in another order: a few ulp (bf16 below is exact).
    torch.testing.assert_close(_logits(fused, ids), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(_logits(fused.bfloat16(), ids), _logits(model.bfloat16(), ids))
    assert fuse_projections(fused) == {"attention": 0, "mlp": 0, "left": 0}   # already fused: nothing to do


def test_fused_quantized_model_is_exact_on_the_cpu_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, cfg = _tiny_llama()
    compress_model(model, parse_spec({"method": "rtn", "bits": 4, "group_size": 32}), None, progress=False)
    model.to(torch.bfloat16)
    ids = torch.arange(3, 12).unsqueeze(0)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = "torch_int4"
    want = _logits(model, ids)
    fused = copy.deepcopy(model)
    assert fuse_projections(fused)["left"] == 0
    assert isinstance(fused.model.layers[0].mlp.gate_up_proj, QuantLinear)
    assert torch.equal(_logits(fused, ids), want)


def test_projections_of_different_formats_stay_unfused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, cfg = _tiny_llama()
    attn = model.model.layers[0].self_attn
    attn.q_proj = QuantLinear.from_linear(attn.q_proj, bits=4, group_size=32)
    attn.k_proj = QuantLinear.from_linear(attn.k_proj, bits=3, group_size=32)
    ids = torch.arange(3, 12).unsqueeze(0)
    want = _logits(model, ids)
    counts = fuse_projections(model)
    assert counts["left"] == 1 and counts["attention"] == cfg.num_hidden_layers - 1
    assert hasattr(model.model.layers[0].self_attn, "q_proj")
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-6, atol=1e-6)
