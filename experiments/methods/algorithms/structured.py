"""Structured pruning: MLP channels, attention heads and whole transformer blocks, physically removed.

Unlike unstructured or N:M sparsity, the result is an ordinary dense model with smaller matrices
(or fewer blocks): it is smaller and faster on any device with the stock ``nn.Linear`` kernels.
Works on Llama-family decoders from transformers (``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``: blocks at ``model.model.layers`` with ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj``). Pure torch on transformers model objects; no downloads.

Structures (``method``)
    ``channels``  MLP intermediate channel j: row j of gate_proj and up_proj, column j of down_proj.
    ``heads``     attention heads, aware of grouped-query attention (GQA). ``head_unit="group"``
                  removes whole KV groups (one k/v head and the g query heads that read it);
                  ``head_unit="query"`` keeps every k/v head and removes the same number r of query
                  heads from every group of a layer (a "slot" = one query head per group), so each
                  layer keeps a valid GQA layout with g - r query heads per k/v head. Layers may end
                  with different head counts: each attention module gets its own
                  ``num_key_value_groups`` (what transformers' attention reads), ``head_dim`` and
                  ``scaling`` stay.
    ``channels_heads``  both, with one ratio (of the parameters of MLP + attention).
    ``layers``    whole blocks; ``config.num_hidden_layers``, ``config.layer_types`` and every
                  attention's ``layer_idx`` (the KV cache slot) are renumbered.

Importance criteria (higher = more important)
    Scores of one unit aggregate over its weights. The first four score every weight the unit removes
    (rows of gate/up/q/k/v, columns of down/o); FLAP and its two baselines score only the unit's input
    columns of the output projection (down_proj / o_proj), as FLAP's code does.
    ``magnitude`` L2 norm of all the unit's weights (rows of gate/up/q/k/v, columns of down/o). Not a
                  paper's baseline: FLAP's is ``magnitude-sp``.
    ``wanda``     sum of |W_ij| * ||X_j|| over all the unit's weights, X_j the calibration input feature
                  of that linear, from one pass of the dense model. Not FLAP's Wanda-sp (``wanda-sp``).
    ``magnitude-sp``  FLAP's magnitude baseline (CASIA-IVA-Lab/FLAP ``prune_magnitude_sp``): the L2 norm
                  of the unit's down_proj / o_proj input column; a head sums its columns' norms.
    ``wanda-sp``  FLAP's Wanda-sp (``prune_wanda_sp``): mean over output rows of |W_ij| * ||X_j|| of the
                  down_proj / o_proj input column j (a head sums its columns), computed *sequentially*:
                  block i's statistics come from the model with blocks < i already pruned, so it runs
                  with ``scope="uniform"`` only (FLAP runs it with the same ratio in every layer).
                  No bias compensation, as in FLAP.
    ``flap``      FLAP (An et al. 2024, WIFV): fluctuation of the unit's input channels into the output
                  projection (variance over calibration tokens) times the squared column norm of
                  down_proj / o_proj; for attention that per-channel metric is squared and a head sums
                  it (``prune.py``: ``W_metric ** 2`` then per-head sum or, in the global setting, the
                  mean of the standardized values). The removed channels' mean contribution
                  ``W[:, removed] @ mean(x[removed])`` is added back as a bias of down_proj / o_proj
                  (which are rebuilt with a bias for that): bias compensation.
    ``taylor``    first-order Taylor |w * dL/dw| summed over the unit's weights, gradients of the
                  language-model loss on the calibration text (LLM-Pruner, Ma et al. 2023).
    for ``layers``: ``bi`` ShortGPT's Block Influence 1 - cos(block input, block output) averaged over
                  calibration tokens (Men et al. 2024), lowest removed; ``last`` the last blocks.

    GQA (FLAP's code is for multi-head attention): a query head is scored from its q rows / o
    columns; a k/v group adds its k and v rows for the criteria that score every weight (FLAP and its
    baselines score a group by its query heads' o_proj columns alone).

Statistics are collected in one pass of the dense model over the calibration samples (block by
block with ``experiments.lm.models.block_prefix_forward`` / ``run_block``), before anything is removed
(``wanda-sp``: the same pass, with each block pruned before its output feeds the next).

Ratios
    ``ratio`` is the fraction of the parameters of the pruned structures that is removed: of the MLP
    linears for ``channels``, of the attention linears for ``heads``, of both for ``channels_heads``.
    ``scope="uniform"``: every layer removes the number of units closest to ``ratio`` of its own
    parameters (FLAP's "UL-UM"). ``scope="global"``: FLAP's adaptive "AL-AM" search (``prune.py``,
    ``standarlization``): each layer's per-channel metric of each structure kind (MLP channels;
    attention: the o_proj input channels) is standardized with that layer's own mean and standard
    deviation; a unit's score is the mean of its channels' standardized values (for FLAP a head's is
    exactly FLAP's); then units of all layers and kinds are removed from the lowest score up until
    ``ratio`` of the parameters is removed (units weighted by their parameters, as FLAP's search).
    A layer whose metric is small throughout is therefore not drained: only how a unit stands within
    its own layer counts. What differs from FLAP: MLP-only (``channels``) and attention-only
    (``heads``) global runs (FLAP's AL-AM always mixes both), GQA units (groups, query slots), and a
    ``floor``: both scopes keep at least ``max(1, ceil(floor * units))`` units of each kind in every
    layer, so no layer is emptied (FLAP has no floor). For the criteria that also score k/v rows, a
    group's k/v channels are spread evenly over its query channels before standardizing.
    Head units are coarse (a KV group of a 3-group model is a third of the attention): the
    removed fraction is the nearest that whole units allow; :class:`PruneResult` reports what was
    actually removed, counted from the real tensors.

Exactness: without compensation, the pruned model computes exactly what the original computes with
the removed rows/columns zeroed (and removed blocks replaced by the identity) — tested.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "METHODS", "CRITERIA", "LAYER_CRITERIA", "SCOPES", "HEAD_UNITS", "CALIBRATED", "SEQUENTIAL",
    "BlockStats", "PruneResult", "collect_stats", "taylor_scores", "channel_scores", "head_scores", "unit_zscores",
    "prune_model", "prune_channels", "prune_heads", "remove_blocks", "count_params", "check_architecture",
    "block_geometry",
]

METHODS = ("channels", "heads", "channels_heads", "layers")
CRITERIA = ("magnitude", "wanda", "flap", "taylor", "magnitude-sp", "wanda-sp")
LAYER_CRITERIA = ("bi", "last")
CALIBRATED = ("wanda", "flap", "taylor", "wanda-sp", "bi")  # criteria that need calibration text
SEQUENTIAL = ("wanda-sp",)  # statistics of block i taken after blocks < i are pruned: uniform scope only
SCOPES = ("uniform", "global")
HEAD_UNITS = ("group", "query")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- architecture

def _blocks_list(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"structured pruning supports Llama-family decoders (model.model.layers: Llama, Mistral, "
                         f"Qwen2); {type(model).__name__} has no such block list")
    return layers


def check_architecture(model: nn.Module) -> None:
    """ValueError unless every block has self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj as nn.Linear."""
    for i, b in enumerate(_blocks_list(model)):
        attn, mlp = getattr(b, "self_attn", None), getattr(b, "mlp", None)
        for owner, names, what in ((attn, ATTN, "self_attn"), (mlp, MLP, "mlp")):
            missing = [n for n in names if not isinstance(getattr(owner, n, None), nn.Linear)]
            if owner is None or missing:
                raise ValueError(f"structured pruning supports Llama-family blocks (self_attn.q/k/v/o_proj, "
                                 f"mlp.gate/up/down_proj as nn.Linear); block {i} of {type(model).__name__} lacks "
                                 f"{what}.{', '.join(missing) or '*'}")
        if not hasattr(attn, "head_dim") or not hasattr(attn, "num_key_value_groups"):
            raise ValueError(f"block {i}: attention {type(attn).__name__} has no head_dim / num_key_value_groups "
                             f"attributes; this transformers attention is not supported")


def block_geometry(block: nn.Module) -> dict[str, int]:
    """Current head_dim, query heads, k/v heads, group size g and MLP width of one block (from the tensors)."""
    a = block.self_attn
    hd = int(a.head_dim)
    nq = a.q_proj.weight.shape[0] // hd
    nkv = a.k_proj.weight.shape[0] // hd
    return {"head_dim": hd, "q_heads": nq, "kv_heads": nkv, "group": nq // nkv,
            "channels": block.mlp.gate_proj.weight.shape[0], "hidden": a.q_proj.weight.shape[1]}


def count_params(model: nn.Module) -> int:
    """Parameters of the model from its real tensors (shared tensors, e.g. tied embeddings, once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _nparams(lin: nn.Linear) -> int:
    return lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)


# ----------------------------------------------------------------------------- statistics

@dataclass
class BlockStats:
    """Calibration statistics of one block (float64 sums over ``n`` tokens)."""
    n: int
    attn_in_sq: torch.Tensor   # (hidden,) sum of x^2 of the attention input (q/k/v input)
    o_in_sum: torch.Tensor     # (q_heads*head_dim,) sum of the o_proj input
    o_in_sq: torch.Tensor      # (q_heads*head_dim,) sum of its squares
    mlp_in_sq: torch.Tensor    # (hidden,) sum of x^2 of the MLP input (gate/up input)
    down_in_sum: torch.Tensor  # (channels,) sum of the down_proj input
    down_in_sq: torch.Tensor   # (channels,)
    bi: float                  # 1 - mean over tokens of cos(block input, block output)

    def mean(self, which: str) -> torch.Tensor:
        return getattr(self, f"{which}_sum") / self.n

    def var(self, which: str) -> torch.Tensor:
        m = self.mean(which)
        return (getattr(self, f"{which}_sq") / self.n - m * m).clamp_min(0)


def _sum_hook(acc: dict[str, Any], key: str, with_sum: bool):
    def hook(_mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        acc[key + "_sq"] = acc.get(key + "_sq", 0) + x.square().sum(0)
        if with_sum:
            acc[key + "_sum"] = acc.get(key + "_sum", 0) + x.sum(0)
    return hook


@torch.no_grad()
def collect_stats(model: nn.Module, calib_ids: torch.Tensor, *, chunk: int = 8, progress: bool = False,
                  after_block: Callable[[int, nn.Module, BlockStats], None] | None = None) -> list[BlockStats]:
    """One pass of the (unpruned) model over ``calib_ids`` (LongTensor (samples, seqlen)), block by block.

    ``after_block(i, block, stats_i)``, when given, runs once block ``i``'s statistics are taken (it may
    prune the block); block ``i`` is then run again, and that output feeds block ``i + 1``: the
    sequential scheme of FLAP's Wanda-sp (statistics of block i from the already pruned blocks < i).
    """
    from experiments.lm.models import block_prefix_forward, run_block  # noqa: PLC0415
    from experiments.core.progress import progress_bar  # noqa: PLC0415

    check_architecture(model)
    _check_calib(calib_ids)
    got = block_prefix_forward(model, calib_ids)
    hidden, kwargs = got.hidden, got.kwargs
    out: list[BlockStats] = []
    for i, block in enumerate(progress_bar(list(_blocks_list(model)), desc="structured stats", unit="block",
                                           leave=False, enabled=progress)):
        acc: dict[str, Any] = {}
        handles = [block.self_attn.q_proj.register_forward_pre_hook(_sum_hook(acc, "attn_in", False)),
                   block.self_attn.o_proj.register_forward_pre_hook(_sum_hook(acc, "o_in", True)),
                   block.mlp.gate_proj.register_forward_pre_hook(_sum_hook(acc, "mlp_in", False)),
                   block.mlp.down_proj.register_forward_pre_hook(_sum_hook(acc, "down_in", True))]
        try:
            new = run_block(block, hidden, kwargs[i], batch_size=chunk)
        finally:
            for h in handles:
                h.remove()
        cos = torch.nn.functional.cosine_similarity(hidden.double(), new.double(), dim=-1)
        n = hidden.shape[0] * hidden.shape[1]
        out.append(BlockStats(n=n, bi=float(1 - cos.mean()), **acc))
        if after_block is not None:
            after_block(i, block, out[-1])
            new = run_block(block, hidden, kwargs[i], batch_size=chunk)
        hidden = new
    return out


def _check_calib(calib_ids) -> None:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise ValueError(f"calib_ids must be a LongTensor (samples, seqlen), got "
                         f"{getattr(calib_ids, 'shape', type(calib_ids).__name__)}")


def taylor_scores(model: nn.Module, calib_ids: torch.Tensor, *, chunk: int = 4,
                  progress: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """|w * dL/dw| (float32, weight-shaped) for every block linear; L = mean LM loss over ``calib_ids``.

    Gradients are accumulated over all samples first (``chunk`` at a time), then multiplied by the
    weights (LLM-Pruner's first-order element-wise importance). The model is left without gradients
    and with its previous ``requires_grad`` flags.
    """
    from experiments.core.progress import progress_bar  # noqa: PLC0415

    check_architecture(model)
    _check_calib(calib_ids)
    blocks = _blocks_list(model)
    lins = {(i, n): getattr(b.self_attn if n in ATTN else b.mlp, n) for i, b in enumerate(blocks)
            for n in ATTN + MLP}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    for lin in lins.values():
        lin.weight.requires_grad_(True)
        lin.weight.grad = None
    device = next(model.parameters()).device
    n_samples = calib_ids.shape[0]
    try:
        with torch.enable_grad():
            for s in progress_bar(range(0, n_samples, chunk), desc="taylor gradients", unit="chunk", leave=False,
                                  enabled=progress):
                ids = calib_ids[s:s + chunk].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                (loss * ids.shape[0] / n_samples).backward()
        scores: dict[int, dict[str, torch.Tensor]] = {}
        for (i, n), lin in lins.items():
            g = lin.weight.grad
            scores.setdefault(i, {})[n] = (lin.weight.detach() * g).abs().float() if g is not None \
                else torch.zeros_like(lin.weight, dtype=torch.float32)
    finally:
        for lin in lins.values():
            lin.weight.grad = None
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))
        model.train(was_training)
    return scores


# ----------------------------------------------------------------------------- scores

def _need_stats(criterion: str, stats: BlockStats | None, taylor: dict[str, torch.Tensor] | None) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is not one of {', '.join(CRITERIA)} for channels/heads")
    if criterion in CALIBRATED and criterion != "taylor" and stats is None:
        raise ValueError(f"criterion={criterion!r} needs calibration statistics (collect_stats)")
    if criterion == "taylor" and taylor is None:
        raise ValueError("criterion='taylor' needs gradient scores (taylor_scores)")


def _rms(sq_sum: torch.Tensor, n: int) -> torch.Tensor:
    """sqrt(E[x^2]) per input feature: Wanda's ||X_j|| up to the constant sqrt(n)."""
    return (sq_sum / n).sqrt()


def channel_scores(block: nn.Module, criterion: str, stats: BlockStats | None = None,
                   taylor: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Importance (float64, (channels,)) of each MLP intermediate channel of ``block``."""
    _need_stats(criterion, stats, taylor)
    g, u, d = (getattr(block.mlp, n).weight.detach().double() for n in MLP)
    if criterion == "magnitude":
        return (g.square().sum(1) + u.square().sum(1) + d.square().sum(0)).sqrt()
    if criterion == "wanda":
        xin = stats.mlp_in_sq.sqrt()
        xh = stats.down_in_sq.sqrt()
        return (g.abs() @ xin) + (u.abs() @ xin) + d.abs().sum(0) * xh
    if criterion == "flap":
        return stats.var("down_in") * d.square().sum(0)
    if criterion == "magnitude-sp":  # FLAP: torch.norm(down_proj.weight, dim=0)
        return d.square().sum(0).sqrt()
    if criterion == "wanda-sp":      # FLAP: (|W| * sqrt(scaler_row)).mean(axis=0) of down_proj
        return d.abs().mean(0) * _rms(stats.down_in_sq, stats.n)
    t = taylor
    return (t["gate_proj"].double().sum(1) + t["up_proj"].double().sum(1) + t["down_proj"].double().sum(0))


def _head_channels(block: nn.Module, criterion: str, stats: BlockStats | None,
                   taylor: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel attention metric: (one value per o_proj input channel = q row, (q_heads*head_dim,);
    one per k/v channel, (kv_heads*head_dim,), zero for the criteria that score o_proj alone). A query
    head's score is the sum of its head_dim channels; magnitude's values are squared weights."""
    a = block.self_attn
    q, k, v, o = (getattr(a, n).weight.detach().double() for n in ATTN)
    none = torch.zeros(k.shape[0], dtype=torch.float64)
    if criterion == "magnitude":
        return q.square().sum(1) + o.square().sum(0), k.square().sum(1) + v.square().sum(1)
    if criterion == "wanda":
        xin = stats.attn_in_sq.sqrt()
        return q.abs() @ xin + o.abs().sum(0) * stats.o_in_sq.sqrt(), k.abs() @ xin + v.abs() @ xin
    if criterion == "flap":  # FLAP squares the attention metric (prune.py: W_metric ** 2 for o_proj)
        return (stats.var("o_in") * o.square().sum(0)).square(), none
    if criterion == "magnitude-sp":
        return o.square().sum(0).sqrt(), none
    if criterion == "wanda-sp":
        return o.abs().mean(0) * _rms(stats.o_in_sq, stats.n), none
    t = {n: taylor[n].double() for n in ATTN}
    return t["q_proj"].sum(1) + t["o_proj"].sum(0), t["k_proj"].sum(1) + t["v_proj"].sum(1)


def _per_q_head(block: nn.Module, criterion: str, stats: BlockStats | None,
                taylor: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(score of each query head from its q rows and o columns, score of each k/v head from k and v rows)."""
    geo = block_geometry(block)
    qc, kvc = _head_channels(block, criterion, stats, taylor)
    return qc.reshape(geo["q_heads"], -1).sum(1), kvc.reshape(geo["kv_heads"], -1).sum(1)


def head_scores(block: nn.Module, criterion: str, stats: BlockStats | None = None,
                taylor: dict[str, torch.Tensor] | None = None, *, head_unit: str = "group") -> torch.Tensor:
    """Importance (float64) of each head unit of ``block``.

    ``head_unit="group"``: one score per k/v group (its query heads + its k/v head), shape (kv_heads,).
    ``head_unit="query"``: one score per removable slot r = 1 .. g-1, shape (g - 1,): slot r's score
    is the sum over groups of the r-th least important query head of each group, so slot scores are
    non-decreasing and removing the first r slots drops the r weakest query heads of every group.
    """
    _need_stats(criterion, stats, taylor)
    if head_unit not in HEAD_UNITS:
        raise ValueError(f"head_unit={head_unit!r} is not one of {', '.join(HEAD_UNITS)}")
    geo = block_geometry(block)
    qs, kvs = _per_q_head(block, criterion, stats, taylor)
    per_group = qs.reshape(geo["kv_heads"], geo["group"])
    if head_unit == "group":
        s = per_group.sum(1) + kvs
    else:
        s = per_group.sort(dim=1).values.sum(0)[:-1]  # ascending per group; the strongest always stays
    return s.sqrt() if criterion == "magnitude" else s


def _standardize(units: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """(units - mean) / std with the mean and (unbiased, as torch.std in FLAP) std of ``channels``."""
    sd = float(channels.std()) if channels.numel() > 1 else 0.0
    return (units - channels.mean()) / (sd if sd > 0 and math.isfinite(sd) else 1.0)


def unit_zscores(block: nn.Module, kind: str, criterion: str, stats: BlockStats | None = None,
                 taylor: dict[str, torch.Tensor] | None = None, *, head_unit: str = "group") -> torch.Tensor:
    """FLAP's per-layer standardized score of each unit of ``kind`` ("channels" or "heads") of ``block``,
    in the order of :func:`channel_scores` / :func:`head_scores`: the mean over the unit's channels of
    (channel metric - this layer's mean) / this layer's std (FLAP ``prune.py``: ``standarlization``
    per layer, then ``.mean`` over a head's channels). The order within the layer is that of the raw
    scores; only comparisons across layers change."""
    _need_stats(criterion, stats, taylor)
    if kind == "channels":
        s = channel_scores(block, criterion, stats, taylor)
        return _standardize(s, s)
    if kind != "heads":
        raise ValueError(f"kind={kind!r} is not one of channels, heads")
    geo = block_geometry(block)
    nkv, g, hd = geo["kv_heads"], geo["group"], geo["head_dim"]
    qc, kvc = _head_channels(block, criterion, stats, taylor)
    if head_unit == "group":  # a group's k/v channels spread over its query channels (sums unchanged)
        ch = (qc.reshape(nkv, g, hd) + kvc.reshape(nkv, 1, hd) / g).reshape(-1)
        return _standardize(ch.reshape(nkv, g * hd).mean(1), ch)
    if head_unit != "query":
        raise ValueError(f"head_unit={head_unit!r} is not one of {', '.join(HEAD_UNITS)}")
    head_mean = qc.reshape(nkv, g, hd).mean(2)
    slots = head_mean.sort(dim=1).values.mean(0)[:-1]  # slot r: the r-th weakest head of every group
    return _standardize(slots, qc)


# ----------------------------------------------------------------------------- physical pruning

def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.requires_grad_(like.weight.requires_grad)
    return lin


def _compensated_bias(out: nn.Linear, removed_cols: torch.Tensor, mean_in: torch.Tensor) -> torch.Tensor | None:
    """Bias of the rebuilt output projection: old bias + W[:, removed] @ mean(x[removed]) (FLAP)."""
    w = out.weight.detach()
    extra = (w[:, removed_cols].double() @ mean_in[removed_cols].to(w.device)).to(w.dtype)
    return extra if out.bias is None else out.bias.detach() + extra


@torch.no_grad()
def prune_channels(block: nn.Module, keep: torch.Tensor, *, mean_in: torch.Tensor | None = None) -> None:
    """Keep MLP channels ``keep`` (sorted indices) of ``block``; with ``mean_in`` (mean down_proj input
    per channel) the removed channels' mean contribution becomes a bias of down_proj."""
    mlp = block.mlp
    width = mlp.gate_proj.weight.shape[0]
    keep = _check_keep(keep, width, "channels")
    removed = torch.ones(width, dtype=torch.bool)
    removed[keep] = False
    down_bias = mlp.down_proj.bias.detach() if mlp.down_proj.bias is not None else None
    if mean_in is not None and removed.any():
        down_bias = _compensated_bias(mlp.down_proj, removed.nonzero().flatten(), mean_in)
    for n in ("gate_proj", "up_proj"):
        lin = getattr(mlp, n)
        setattr(mlp, n, _linear(lin.weight[keep], lin.bias[keep] if lin.bias is not None else None, lin))
    mlp.down_proj = _linear(mlp.down_proj.weight[:, keep], down_bias, mlp.down_proj)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def _check_keep(keep, n: int, what: str) -> torch.Tensor:
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().cpu()
    if keep.numel() == 0:
        raise ValueError(f"cannot remove every {what} of a layer (keep at least one)")
    if bool((keep < 0).any()) or bool((keep >= n).any()) or keep.unique().numel() != keep.numel():
        raise ValueError(f"keep indices of {what} must be distinct and in [0, {n}), got {keep.tolist()}")
    return keep.sort().values


@torch.no_grad()
def prune_heads(block: nn.Module, keep_q: torch.Tensor, *, mean_in: torch.Tensor | None = None) -> None:
    """Keep query heads ``keep_q`` (indices into the current query heads) of ``block``'s attention.

    The kept heads must form a valid GQA layout: every k/v group that keeps any query head keeps the
    same number of them (a group keeping none is removed with its k/v head). With ``mean_in`` (mean
    o_proj input per channel) the removed heads' mean contribution becomes a bias of o_proj.
    """
    a = block.self_attn
    geo = block_geometry(block)
    hd, nq, g = geo["head_dim"], geo["q_heads"], geo["group"]
    keep_q = _check_keep(keep_q, nq, "query heads")
    per_group = torch.bincount(keep_q // g, minlength=geo["kv_heads"])
    kept_groups = (per_group > 0).nonzero().flatten()
    counts = per_group[kept_groups].unique()
    if counts.numel() != 1:
        raise ValueError(f"kept query heads {keep_q.tolist()} leave groups of unequal size "
                         f"{per_group.tolist()} (group size {g}); GQA needs the same count in every kept group")
    new_g = int(counts.item())
    q_rows = (keep_q[:, None] * hd + torch.arange(hd)).flatten()
    kv_rows = (kept_groups[:, None] * hd + torch.arange(hd)).flatten()
    removed = torch.ones(nq * hd, dtype=torch.bool)
    removed[q_rows] = False
    o_bias = a.o_proj.bias.detach() if a.o_proj.bias is not None else None
    if mean_in is not None and removed.any():
        o_bias = _compensated_bias(a.o_proj, removed.nonzero().flatten(), mean_in)
    a.q_proj = _linear(a.q_proj.weight[q_rows], a.q_proj.bias[q_rows] if a.q_proj.bias is not None else None,
                       a.q_proj)
    for n in ("k_proj", "v_proj"):
        lin = getattr(a, n)
        setattr(a, n, _linear(lin.weight[kv_rows], lin.bias[kv_rows] if lin.bias is not None else None, lin))
    a.o_proj = _linear(a.o_proj.weight[:, q_rows], o_bias, a.o_proj)
    # What transformers' attention forward reads per module (checked on transformers 5.x: the
    # projections are viewed as (..., -1, head_dim) and repeat_kv uses num_key_value_groups).
    a.num_key_value_groups = new_g
    for attr, val in (("num_heads", len(keep_q)), ("num_key_value_heads", len(kept_groups))):
        setattr(a, attr, val)


@torch.no_grad()
def remove_blocks(model: nn.Module, drop: list[int]) -> list[int]:
    """Remove blocks ``drop`` (indices); renumber layer_idx and the config. Returns the kept original indices."""
    blocks = _blocks_list(model)
    n = len(blocks)
    drop = sorted(set(int(i) for i in drop))
    if any(i < 0 or i >= n for i in drop):
        raise ValueError(f"block indices to remove must be in [0, {n}), got {drop}")
    if len(drop) >= n:
        raise ValueError(f"cannot remove all {n} blocks (blocks must be < {n})")
    kept = [i for i in range(n) if i not in drop]
    model.model.layers = nn.ModuleList([blocks[i] for i in kept])
    for new_idx, block in enumerate(model.model.layers):
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n:
        cfg.layer_types = [types[i] for i in kept]
    cfg.num_hidden_layers = len(kept)
    return kept


# ----------------------------------------------------------------------------- selection

@dataclass
class _Kind:
    """Units of one kind ("channels" or "heads") in one layer, ascending removal order."""
    layer: int
    kind: str
    scores: torch.Tensor      # (units,) float64
    unit_params: int
    floor: int                # units that must stay
    total_params: int         # parameters of the structure in this layer (MLP or attention linears)
    ordered: bool = False     # query slots: must be removed in index order
    z: torch.Tensor | None = None  # per-layer standardized scores (unit_zscores), for scope="global"


def _mlp_unit_params(block) -> int:
    m = block.mlp
    return (m.gate_proj.weight.shape[1] * 2 + m.down_proj.weight.shape[0]
            + sum(int(getattr(m, n).bias is not None) for n in ("gate_proj", "up_proj")))


def _head_unit_params(block, head_unit: str) -> int:
    a = block.self_attn
    geo = block_geometry(block)
    hd, h = geo["head_dim"], geo["hidden"]
    qb = int(a.q_proj.bias is not None)
    q_head = hd * (h + qb) + a.o_proj.weight.shape[0] * hd  # q rows (+bias) and o columns
    if head_unit == "group":
        kvb = int(a.k_proj.bias is not None)
        return geo["group"] * q_head + 2 * hd * (h + kvb)
    return geo["kv_heads"] * q_head


def _floor_units(units: int, floor: float) -> int:
    return min(units, max(1, math.ceil(floor * units - 1e-9)))


def _select(kinds: list[_Kind], ratio: float, scope: str) -> dict[tuple[int, str], int]:
    """Number of units removed per (layer, kind); the units are the lowest-scoring ones."""
    removed: dict[tuple[int, str], int] = {}
    if scope == "uniform":
        for k in kinds:
            units = k.scores.numel()
            # equal-sized units: the count nearest to ratio of the layer's structure parameters (query
            # slots do not cover the k/v heads, so this is not ratio * units)
            n = math.floor(ratio * k.total_params / k.unit_params + 0.5)
            removed[(k.layer, k.kind)] = max(0, min(n, units - k.floor))
        return removed
    total = sum(k.total_params for k in kinds)
    target = ratio * total
    entries = []
    for ki, k in enumerate(kinds):
        s, z = k.scores, k.z  # z: FLAP's per-layer standardized scores (unit_zscores)
        order = range(s.numel()) if k.ordered else s.argsort(stable=True).tolist()
        # rank within the kind: a unit can only go after the lower-ranked ones of its kind
        for rank, idx in enumerate(order):
            entries.append((float(z[idx]), ki, rank))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    count = [0] * len(kinds)
    done = 0.0
    for _, ki, rank in entries:
        k = kinds[ki]
        if rank != count[ki] or count[ki] >= k.scores.numel() - k.floor:
            continue
        if done + k.unit_params > target + k.unit_params / 2:
            continue
        count[ki] += 1
        done += k.unit_params
    return {(k.layer, k.kind): count[ki] for ki, k in enumerate(kinds)}


# ----------------------------------------------------------------------------- the model

@dataclass
class PruneResult:
    """What :func:`prune_model` did. Parameter counts come from the real tensors."""
    method: str
    criterion: str
    scope: str
    params_before: int
    params_after: int
    target_params_before: int      # parameters of the pruned structures before (MLP/attention linears or blocks)
    target_params_after: int
    kept_blocks: list[int]          # original indices of the blocks that remain
    channels: list[int]             # MLP width per remaining block
    q_heads: list[int]
    kv_heads: list[int]
    bias_compensated: bool = False
    block_scores: list[float] | None = None   # per original block, for layers (bi)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def removed_fraction(self) -> float:
        """Fraction of the pruned structures' parameters that was removed."""
        return 1 - self.target_params_after / self.target_params_before

    @property
    def params_kept(self) -> float:
        return self.params_after / self.params_before


def _struct_params(model: nn.Module, method: str) -> int:
    n = 0
    for b in _blocks_list(model):
        if method in ("channels", "channels_heads"):
            n += sum(_nparams(getattr(b.mlp, x)) for x in MLP)
        if method in ("heads", "channels_heads"):
            n += sum(_nparams(getattr(b.self_attn, x)) for x in ATTN)
        if method == "layers":
            n += sum(p.numel() for p in b.parameters())
    return n


def _check_options(method, criterion, ratio, blocks, scope, head_unit, floor):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if method == "layers":
        if criterion not in LAYER_CRITERIA:
            raise ValueError(f"criterion={criterion!r} for method='layers' must be one of {', '.join(LAYER_CRITERIA)}")
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks={blocks!r} must be a positive int (number of blocks removed)")
        return
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} for method={method!r} must be one of {', '.join(CRITERIA)}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio={ratio!r} must be a float in [0, 1) (fraction of the structures' parameters removed)")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {', '.join(SCOPES)}")
    if criterion in SEQUENTIAL and scope != "uniform":
        raise ValueError(f"criterion={criterion!r} prunes block by block (each block's statistics come from the "
                         f"pruned blocks before it), so it needs scope='uniform', got scope={scope!r}")
    if head_unit not in HEAD_UNITS:
        raise ValueError(f"head_unit={head_unit!r} is not one of {', '.join(HEAD_UNITS)}")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < 1:
        raise ValueError(f"floor={floor!r} must be a float in [0, 1) (fraction of each layer's units always kept)")


def _block_kinds(i: int, b: nn.Module, st: BlockStats | None, tl: dict[str, torch.Tensor] | None, *,
                 method: str, criterion: str, head_unit: str, floor: float, scope: str) -> list[_Kind]:
    """The unit kinds of block ``i`` that ``method`` prunes, with their scores (and per-layer z-scores)."""
    kinds = []
    z = scope == "global"  # uniform scope compares units within a layer only: raw scores suffice
    if method in ("channels", "channels_heads"):
        s = channel_scores(b, criterion, st, tl)
        kinds.append(_Kind(i, "channels", s, _mlp_unit_params(b), _floor_units(s.numel(), floor),
                           sum(_nparams(getattr(b.mlp, x)) for x in MLP),
                           z=unit_zscores(b, "channels", criterion, st, tl) if z else None))
    if method in ("heads", "channels_heads"):
        geo = block_geometry(b)
        s = head_scores(b, criterion, st, tl, head_unit=head_unit)
        fl = _floor_units(geo["kv_heads"], floor) if head_unit == "group" else 0
        kinds.append(_Kind(i, "heads", s, _head_unit_params(b, head_unit), fl,
                           sum(_nparams(getattr(b.self_attn, x)) for x in ATTN), ordered=head_unit == "query",
                           z=unit_zscores(b, "heads", criterion, st, tl, head_unit=head_unit) if z else None))
    return kinds


def _prune_units(b: nn.Module, k: _Kind, r: int, st: BlockStats | None, tl: dict[str, torch.Tensor] | None,
                 criterion: str, head_unit: str, extra: dict[str, Any]) -> None:
    """Remove the ``r`` lowest-scoring units of ``k`` from block ``b`` (FLAP: with bias compensation)."""
    if r == 0:
        return
    comp = criterion == "flap"
    if k.kind == "channels":
        keep = k.scores.argsort(descending=True, stable=True)[: k.scores.numel() - r].sort().values
        extra.setdefault("keep_channels", {})[k.layer] = keep.tolist()
        prune_channels(b, keep, mean_in=st.mean("down_in") if comp else None)
        return
    geo = block_geometry(b)
    g = geo["group"]
    if head_unit == "group":
        keep_groups = k.scores.argsort(descending=True, stable=True)[: k.scores.numel() - r].sort().values
        keep_q = (keep_groups[:, None] * g + torch.arange(g)).flatten()
    else:
        qs, _ = _per_q_head(b, criterion, st, tl)
        order = qs.reshape(geo["kv_heads"], g).argsort(dim=1, descending=True, stable=True)[:, : g - r]
        keep_q = (torch.arange(geo["kv_heads"])[:, None] * g + order).flatten()
    keep_q = keep_q.sort().values
    extra.setdefault("keep_q_heads", {})[k.layer] = keep_q.tolist()
    prune_heads(b, keep_q, mean_in=st.mean("o_in") if comp else None)


def prune_model(model: nn.Module, *, method: str, criterion: str, ratio: float | None = None,
                blocks: int | None = None, scope: str = "uniform", head_unit: str = "group", floor: float = 0.1,
                calib_ids: torch.Tensor | None = None, chunk: int = 8, progress: bool = False,
                stats: list[BlockStats] | None = None) -> PruneResult:
    """Prune ``model`` in place (see module docstring) and return what was done.

    ``calib_ids`` (LongTensor (samples, seqlen)) is needed by the :data:`CALIBRATED` criteria; ``stats``
    may pass statistics already collected by :func:`collect_stats` on this (unpruned) model (not for
    the :data:`SEQUENTIAL` ones, which collect theirs while pruning).
    """
    import time  # noqa: PLC0415

    t0 = time.perf_counter()
    _check_options(method, criterion, ratio, blocks, scope, head_unit, floor)
    check_architecture(model)
    params_before = count_params(model)
    struct_before = _struct_params(model, method)
    blist = _blocks_list(model)
    if criterion in SEQUENTIAL and stats is not None:
        raise ValueError(f"criterion={criterion!r} takes each block's statistics after the blocks before it are "
                         f"pruned; it cannot use precomputed stats (pass calib_ids only)")
    needs_stats = criterion in CALIBRATED and criterion != "taylor"
    if criterion in CALIBRATED and calib_ids is None and not (needs_stats and stats is not None):
        raise ValueError(f"criterion={criterion!r} needs calibration data: pass calib_ids")
    if head_unit == "query" and method in ("heads", "channels_heads"):
        for i, b in enumerate(blist):
            geo = block_geometry(b)
            if geo["group"] < 2:
                raise ValueError(f"head_unit='query' needs grouped-query attention with >= 2 query heads per "
                                 f"k/v head; block {i} has {geo['q_heads']} query / {geo['kv_heads']} k/v heads: "
                                 f"use head_unit='group'")
    if needs_stats and stats is None and criterion not in SEQUENTIAL:
        stats = collect_stats(model, calib_ids, chunk=chunk, progress=progress)
    if stats is not None and len(stats) != len(blist):
        raise ValueError(f"stats has {len(stats)} blocks, the model {len(blist)}")
    result_extra: dict[str, Any] = {}
    block_scores = None
    if method == "layers":
        n = len(blist)
        if blocks >= n:
            raise ValueError(f"blocks={blocks} must be < the model's {n} blocks")
        if criterion == "last":
            drop = list(range(n - blocks, n))
        else:
            block_scores = [s.bi for s in stats]
            drop = torch.tensor(block_scores).argsort(stable=True)[:blocks].tolist()
        kept = remove_blocks(model, drop)
        result_extra["removed_blocks"] = sorted(drop)
    else:
        taylor = taylor_scores(model, calib_ids, chunk=max(1, chunk // 2), progress=progress) \
            if criterion == "taylor" else None
        opts = dict(method=method, criterion=criterion, head_unit=head_unit, floor=floor, scope=scope)
        if criterion in SEQUENTIAL:  # FLAP's Wanda-sp: score, prune, then feed the pruned block forward
            def prune_now(i: int, b: nn.Module, st: BlockStats) -> None:
                ks = _block_kinds(i, b, st, None, **opts)
                n = _select(ks, float(ratio), "uniform")
                for k in ks:
                    _prune_units(b, k, n[(k.layer, k.kind)], st, None, criterion, head_unit, result_extra)
            collect_stats(model, calib_ids, chunk=chunk, progress=progress, after_block=prune_now)
        else:
            kinds = [k for i, b in enumerate(blist) for k in
                     _block_kinds(i, b, stats[i] if stats is not None else None,
                                  taylor[i] if taylor is not None else None, **opts)]
            n_removed = _select(kinds, float(ratio), scope)
            for k in kinds:
                _prune_units(blist[k.layer], k, n_removed[(k.layer, k.kind)],
                             stats[k.layer] if stats is not None else None,
                             taylor[k.layer] if taylor is not None else None, criterion, head_unit, result_extra)
        kept = list(range(len(blist)))
    _update_config(model)
    geos = [block_geometry(b) for b in _blocks_list(model)]
    return PruneResult(
        method=method, criterion=criterion, scope=scope if method != "layers" else "",
        params_before=params_before, params_after=count_params(model),
        target_params_before=struct_before, target_params_after=_struct_params(model, method) if method != "layers"
        else struct_before - (params_before - count_params(model)),
        kept_blocks=kept, channels=[g["channels"] for g in geos], q_heads=[g["q_heads"] for g in geos],
        kv_heads=[g["kv_heads"] for g in geos], bias_compensated=criterion == "flap" and method != "layers",
        block_scores=block_scores, seconds=time.perf_counter() - t0, extra=result_extra)


def _update_config(model: nn.Module) -> None:
    """Where every block has the same new shape, the config says so (a uniform model can be saved and
    reloaded); per-layer sizes that differ stay on the modules (``config`` keeps the original)."""
    geos = [block_geometry(b) for b in _blocks_list(model)]
    cfg = model.config
    widths = {g["channels"] for g in geos}
    if len(widths) == 1:
        cfg.intermediate_size = widths.pop()
    heads = {(g["q_heads"], g["kv_heads"]) for g in geos}
    if len(heads) == 1:
        nq, nkv = heads.pop()
        cfg.head_dim = geos[0]["head_dim"]  # pinned: it would otherwise follow hidden_size // num_attention_heads
        cfg.num_attention_heads, cfg.num_key_value_heads = nq, nkv
