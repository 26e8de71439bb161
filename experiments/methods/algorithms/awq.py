"""AWQ: activation-aware per-input-channel weight scaling, folded into the preceding op, and weight clipping.

Model-level, on Llama-family decoders from transformers (blocks at ``model.model.layers`` with
``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``).
Pure torch; the quantizer it searches with is a callable ``quantize(W) -> dequantized W`` (the harness
passes RTN on the grid the model is quantized to afterwards).

Follows Lin et al. 2024 ("AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration") and its authors' code, ``mit-han-lab/llm-awq`` (awq/quantize/pre_quant.py ``run_awq``,
auto_scale.py ``auto_scale_block`` / ``apply_scale``, auto_clip.py ``auto_clip_block``), block by block:

1. the calibration tokens run through the block (its output is the next block's input: the fp
   model's activations, as ``run_awq`` does), and the inputs of its linears are kept;
2. scales, one per input channel of a group of linears that read the same input, searched over
   ``s = mean_tokens|x|^alpha`` (normalised by ``sqrt(max s * min s)``), ``alpha`` in ``0, 1/20, ...,
   19/20``: the ``alpha`` whose ``quantize(W diag(s)) diag(s)^-1`` gives the smallest mean squared error
   of the inspected module's output. Groups, as ``auto_scale_block`` for Llama: q/k/v (inspecting the
   whole attention), o_proj (only when v_proj and o_proj have the same shape: with grouped-query
   attention an o_proj input channel is not one v_proj output, and the reference skips it; SmolLM2 is
   GQA, so this group is never scaled there), gate/up (inspecting the MLP), down_proj. All four are
   searched on the block's original weights, then applied;
3. the scales are folded exactly (``apply_scale``): ``input_layernorm.weight / s`` with q/k/v columns
   ``* s``; v_proj rows ``/ s`` with o_proj columns ``* s``; ``post_attention_layernorm.weight / s`` with
   gate/up columns ``* s``; up_proj rows ``/ s`` with down_proj columns ``* s`` (SiLU(gate) * up is linear in
   up). The model computes the same function (tested: equal to the original within fp32 rounding);
4. clipping (``auto_clip``), for every linear but q/k: per output row and quantization group, the
   weights are clamped to ``+-m`` with ``m = max|w| (1 - i/20)``, ``i < 10``, the ``m`` whose quantized
   weights give the smallest mean squared error of that group's partial output over 512 evenly spaced
   calibration tokens (inputs already divided by the scales).

What differs from the reference, and why:

- The search quantizes with the quantizer the model is then stored with (this toolkit's RTN: its
  asymmetric grid keeps 0 representable, as ``pseudo_quantize_tensor`` does not); partial last groups
  (K = 576 with groups of 128) are supported, where the reference asserts that groups divide K.
- The block's linears are searched in fp32 on the sweep's calibration windows (the reference: fp16
  on 128 x 512 tokens of the Pile).
- Scaling a group whose inspected module is a single linear (o_proj, down_proj) runs the linear alone,
  as the reference does; the attention is run with the block's own keyword arguments (rotary
  embeddings, mask).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = ["N_GRID", "MAX_SHRINK", "N_SAMPLE_TOKENS", "AwqLayer", "AwqResult", "check_architecture", "act_scale",
           "search_scale", "search_clip", "fold_norm", "fold_linear", "awq_block", "awq_model"]

N_GRID = 20  # alpha grid of the scale search and step count of the clip search (auto_scale / auto_clip)
MAX_SHRINK = 0.5  # the clip search shrinks max|w| by at most this fraction
N_SAMPLE_TOKENS = 512  # tokens the clip search evaluates

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # "due to qk bmm, it is hard to clip precisely"


@dataclass
class AwqLayer:
    """How one linear was transformed: ``W' = diag(1 / out_scale) clip(W) diag(in_scale)`` (``None``: 1)."""
    in_scale: torch.Tensor | None = None
    out_scale: torch.Tensor | None = None
    clipped: bool = False


@dataclass
class AwqResult:
    """Per block: the chosen ``alpha`` of each scaled group; per linear ("block{i}.<name>"): its scales."""
    alphas: list[dict[str, float]] = field(default_factory=list)
    layers: dict[str, AwqLayer] = field(default_factory=dict)


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"AWQ supports Llama-family decoders (model.model.layers: Llama, Mistral, Qwen2); "
                         f"{type(model).__name__} has no such block list")
    return layers


def check_architecture(model: nn.Module) -> None:
    """ValueError unless every block has the norms and linears AWQ folds its scales into."""
    for i, b in enumerate(_blocks(model)):
        attn, mlp = getattr(b, "self_attn", None), getattr(b, "mlp", None)
        missing = [f"self_attn.{n}" for n in ATTN if not isinstance(getattr(attn, n, None), nn.Linear)]
        missing += [f"mlp.{n}" for n in MLP if not isinstance(getattr(mlp, n, None), nn.Linear)]
        missing += [n for n in ("input_layernorm", "post_attention_layernorm")
                    if not isinstance(getattr(getattr(b, n, None), "weight", None), torch.Tensor)]
        if missing:
            raise ValueError(f"AWQ supports Llama-family blocks (input_layernorm, self_attn.q/k/v/o_proj, "
                             f"post_attention_layernorm, mlp.gate/up/down_proj as nn.Linear); block {i} of "
                             f"{type(model).__name__} lacks {', '.join(missing)}")
        for n in ("input_layernorm", "post_attention_layernorm"):
            if getattr(getattr(b, n), "bias", None) is not None:
                raise ValueError(f"block {i}: {n} has a bias; AWQ's fold here is for RMSNorm (weight only)")


def act_scale(x: torch.Tensor) -> torch.Tensor:
    """Mean |x| per input channel over all tokens (``get_act_scale``)."""
    return x.reshape(-1, x.shape[-1]).abs().float().mean(0)


@torch.no_grad()
def search_scale(run: Callable[[], torch.Tensor], linears: list[nn.Linear], x: torch.Tensor,
                 quantize: Callable[[torch.Tensor], torch.Tensor], n_grid: int = N_GRID
                 ) -> tuple[torch.Tensor, float, list[float]]:
    """``(scales, alpha, losses)``: the grid search of ``auto_scale_block._search_module_scale``.

    ``run()`` returns the inspected module's output on ``x`` with the linears' current weights;
    ``linears`` all read ``x``. Their weights are restored before returning. ``alpha = 0`` (scales of 1)
    is plain quantization, so the chosen loss is never above it.
    """
    ref = run()
    x_max = act_scale(x)
    orig = [lin.weight.data.clone() for lin in linears]
    best, best_alpha, best_s, losses = math.inf, -1.0, None, []
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = x_max.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w in zip(linears, orig):
                lin.weight.data = quantize(w * s) / s
            loss = float((ref - run()).float().pow(2).mean())
            losses.append(loss)
            if loss < best:
                best, best_alpha, best_s = loss, alpha, s
    finally:
        for lin, w in zip(linears, orig):
            lin.weight.data = w
    if best_s is None:
        raise ValueError(f"AWQ scale search found no finite loss (losses {losses}); the inputs or weights "
                         f"hold NaN/Inf")
    return best_s, best_alpha, losses


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor], *,
                group_size: int, n_grid: int = N_GRID, max_shrink: float = MAX_SHRINK,
                n_sample_token: int = N_SAMPLE_TOKENS) -> torch.Tensor:
    """Per (row, group) clip value ``m`` (N, G) of ``auto_clip_layer``; a partial last group is one group."""
    N, K = w.shape
    gs = K if group_size == -1 else group_size
    G = -(-K // gs)
    x = x.reshape(-1, K).float()
    x = x[::max(1, x.shape[0] // n_sample_token)]
    w = w.float()
    cols = [slice(g * gs, min((g + 1) * gs, K)) for g in range(G)]
    org_max = torch.stack([w[:, c].abs().amax(1) for c in cols], 1)  # (N, G)
    best = org_max.clone()
    min_err = torch.full_like(org_max, math.inf)
    for i in range(int(max_shrink * n_grid)):
        m = org_max * (1 - i / n_grid)
        mx = m.repeat_interleave(gs, 1)[:, :K]
        d = quantize(torch.clamp(w, -mx, mx)) - w
        err = torch.stack([(x[:, c] @ d[:, c].T).pow(2).mean(0) for c in cols], 1)  # (N, G)
        better = err < min_err
        min_err[better], best[better] = err[better], m[better]
    return best


@torch.no_grad()
def fold_norm(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """``norm.weight / s`` and the linears' columns ``* s`` (``scale_ln_fcs``): the same function."""
    norm.weight.div_(s.to(norm.weight.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype).view(1, -1))


@torch.no_grad()
def fold_linear(prev: nn.Linear, nxt: nn.Linear, s: torch.Tensor) -> None:
    """``prev``'s rows (and bias) ``/ s``, ``nxt``'s columns ``* s`` (``scale_fc_fc``)."""
    prev.weight.div_(s.to(prev.weight.dtype).view(-1, 1))
    if prev.bias is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    nxt.weight.mul_(s.to(nxt.weight.dtype).view(1, -1))


def _attn_kwargs(kwargs: dict) -> dict:
    # The block's keyword arguments that the attention itself takes (no cache during calibration).
    return {k: v for k, v in kwargs.items() if k not in ("use_cache", "cache", "past_key_values", "past_key_value")}


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    outs = []
    for i in range(0, x.shape[0], chunk):
        o = fn(x[i:i + chunk])
        outs.append(o[0] if isinstance(o, (tuple, list)) else o)
    return torch.cat(outs)


@torch.no_grad()
def awq_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, *,
              quantize: Callable[[torch.Tensor], torch.Tensor], group_size: int, clip: bool = True,
              n_grid: int = N_GRID, chunk: int = 8) -> tuple[torch.Tensor, dict[str, float], dict[str, AwqLayer]]:
    """AWQ on one block in place; returns (the block's output on ``hidden`` before any change, the chosen
    alphas, the per-linear transforms)."""
    attn, mlp = block.self_attn, block.mlp
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in ("q", "o", "gate", "down")}
    mods = {"q": attn.q_proj, "o": attn.o_proj, "gate": mlp.gate_proj, "down": mlp.down_proj}
    handles = [m.register_forward_pre_hook(lambda _m, a, k=k: feats[k].append(a[0].detach()))
               for k, m in mods.items()]
    try:
        out = _chunked(lambda h: block(h, **kwargs), hidden, chunk)
    finally:
        for h in handles:
            h.remove()
    x = {k: torch.cat(v) for k, v in feats.items()}
    akw = _attn_kwargs(kwargs)
    q, k_, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    searches = [("qkv", [q, k_, v], x["q"], lambda: _chunked(lambda h: attn(h, **akw), x["q"], chunk))]
    if v.weight.shape == o.weight.shape:
        searches.append(("o", [o], x["o"], lambda: o(x["o"])))
    searches += [("gate_up", [gate, up], x["gate"], lambda: _chunked(mlp, x["gate"], chunk)),
                 ("down", [down], x["down"], lambda: down(x["down"]))]
    scales, alphas = {}, {}
    for name, lins, inp, run in searches:
        scales[name], alphas[name], _ = search_scale(run, lins, inp, quantize, n_grid)

    info = {n: AwqLayer() for n in ("self_attn." + a for a in ATTN)}
    info.update({n: AwqLayer() for n in ("mlp." + m for m in MLP)})
    fold_norm(block.input_layernorm, [q, k_, v], scales["qkv"])
    for n in ("q_proj", "k_proj", "v_proj"):
        info[f"self_attn.{n}"].in_scale = scales["qkv"]
    x["q"] = x["q"] / scales["qkv"]
    if "o" in scales:
        fold_linear(v, o, scales["o"])
        info["self_attn.v_proj"].out_scale = scales["o"]
        info["self_attn.o_proj"].in_scale = scales["o"]
        x["o"] = x["o"] / scales["o"]
    fold_norm(block.post_attention_layernorm, [gate, up], scales["gate_up"])
    info["mlp.gate_proj"].in_scale = info["mlp.up_proj"].in_scale = scales["gate_up"]
    x["gate"] = x["gate"] / scales["gate_up"]
    fold_linear(up, down, scales["down"])
    info["mlp.up_proj"].out_scale = scales["down"]
    info["mlp.down_proj"].in_scale = scales["down"]
    x["down"] = x["down"] / scales["down"]

    if clip:
        inputs = {"self_attn.v_proj": x["q"], "self_attn.o_proj": x["o"], "mlp.gate_proj": x["gate"],
                  "mlp.up_proj": x["gate"], "mlp.down_proj": x["down"]}
        for name, inp in inputs.items():
            lin = block.get_submodule(name)
            m = search_clip(lin.weight.data, inp, quantize, group_size=group_size, n_grid=n_grid)
            K = lin.weight.shape[1]
            mx = m.repeat_interleave(K if group_size == -1 else group_size, 1)[:, :K].to(lin.weight.dtype)
            lin.weight.data = torch.clamp(lin.weight.data, -mx, mx)
            info[name].clipped = True
    return out, alphas, info


@torch.no_grad()
def awq_model(model: nn.Module, calib_ids: torch.Tensor, *, quantize: Callable[[torch.Tensor], torch.Tensor],
              group_size: int, clip: bool = True, n_grid: int = N_GRID, chunk: int = 8,
              progress: bool = False) -> AwqResult:
    """AWQ on every block of ``model`` in place (scales folded, weights clipped; nothing quantized)."""
    from experiments.core.progress import progress_bar
    from experiments.lm.models import block_prefix_forward

    check_architecture(model)
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise ValueError(f"calib_ids must be a LongTensor (samples, seqlen), got "
                         f"{getattr(calib_ids, 'shape', type(calib_ids).__name__)}")
    got = block_prefix_forward(model, calib_ids)
    hidden, kwargs = got.hidden, got.kwargs
    res = AwqResult()
    blocks = list(_blocks(model))
    for i, block in enumerate(progress_bar(blocks, desc="awq", unit="block", leave=False, enabled=progress)):
        hidden, alphas, info = awq_block(block, hidden, kwargs[i], quantize=quantize, group_size=group_size,
                                         clip=clip, n_grid=n_grid, chunk=chunk)
        res.alphas.append(alphas)
        res.layers.update({f"block{i}.{n}": v for n, v in info.items()})
    return res
