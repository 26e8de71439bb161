"""Fused projections for decoding: each attention block's q/k/v and each MLP's gate/up as one layer.

At decode (one token) the default model's linears are tiny (576 x 576 ... 1536 x 576) and a step costs
about as much per call as per weight read, so one call instead of three (q, k, v) and one instead of two
(gate, up) cuts 3 of the 7 linear calls of a block. :func:`fuse_projections` does it in place on a Llama-
family model from transformers, for ``nn.Linear`` (weights concatenated) and ``QuantLinear``
(``QuantLinear.concat``, same format required) alike, so a dense baseline is fused the same way as a
compressed model. The fused forwards are those of transformers' ``LlamaAttention``/``LlamaMLP`` with the
projections taken from one call (same operations, same order: bit-exact on the quantized CPU ops and
for dense bf16; a dense fp32 GEMM of the wider weight may sum in another order, a few ulp, 3e-8 measured);
modules of any other class are left alone (counted in the return value), and a block whose projections
are of different formats (mixed precision) stays unfused. Used by the decode-speed measurements
(:class:`experiments.measure.decode_speed.StepDecoder`, ``fuse=True``); not by accuracy measurements.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from triton_kernels.nn.quant import QuantLinear


def _concat(layers: list[nn.Module]) -> nn.Module | None:
    """One module computing ``torch.cat([m(x) for m in layers], -1)``, or None when they cannot fuse."""
    if all(type(m) is nn.Linear for m in layers):
        w = [m.weight for m in layers]
        if len({(t.dtype, t.device, t.shape[1]) for t in w}) != 1:
            return None
        out = nn.Linear(w[0].shape[1], sum(t.shape[0] for t in w), bias=any(m.bias is not None for m in layers),
                        device=w[0].device, dtype=w[0].dtype)
        with torch.no_grad():
            out.weight.copy_(torch.cat(w))
            if out.bias is not None:
                out.bias.copy_(torch.cat([m.bias if m.bias is not None else w[0].new_zeros(m.out_features)
                                          for m in layers]))
        return out.requires_grad_(False)
    if all(isinstance(m, QuantLinear) for m in layers):
        try:
            return QuantLinear.concat(layers)
        except ValueError:
            return None
    return None


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    # transformers' LlamaAttention.forward, q/k/v from one call of the fused layer.
    from transformers.models.llama.modeling_llama import (ALL_ATTENTION_FUNCTIONS, apply_rotary_pos_emb,
                                                          eager_attention_forward)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)
    query_states = q.view(hidden_shape).transpose(1, 2)
    key_states = k.view(hidden_shape).transpose(1, 2)
    value_states = v.view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                eager_attention_forward)
    attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, attention_mask,
                                                    dropout=0.0 if not self.training else self.attention_dropout,
                                                    scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _mlp_forward(self, x):
    gate, up = self.gate_up_proj(x).split(self.gate_up_sizes, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def fuse_projections(model: nn.Module) -> dict[str, int]:
    """Fuse q/k/v and gate/up of every ``LlamaAttention``/``LlamaMLP`` of ``model`` in place (module
    docstring). Returns ``{"attention": fused, "mlp": fused, "left": blocks left unfused}``."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP
    # class -> (count key, projections fused, name of the fused layer, forward using it)
    kinds = {LlamaAttention: ("attention", ("q_proj", "k_proj", "v_proj"), "qkv", _attention_forward),
             LlamaMLP: ("mlp", ("gate_proj", "up_proj"), "gate_up", _mlp_forward)}
    done = {"attention": 0, "mlp": 0, "left": 0}
    for mod in model.modules():
        kind = kinds.get(type(mod))
        if kind is None or not hasattr(mod, kind[1][0]):     # another class, or fused already
            continue
        key, names, fused_name, forward = kind
        parts = [getattr(mod, n) for n in names]
        fused = _concat(parts)
        if fused is None:
            done["left"] += 1
            continue
        setattr(mod, f"{fused_name}_sizes", [p.out_features for p in parts])
        setattr(mod, f"{fused_name}_proj", fused)
        for n in names:
            delattr(mod, n)
        mod.forward = types.MethodType(forward, mod)
        done[key] += 1
    return done
