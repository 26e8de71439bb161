"""Structured pruning (experiments/methods/algorithms/structured.py) on tiny random Llama / Mistral / Qwen2 models.

The pruned model is physically smaller and must compute exactly what the original computes with the
removed rows/columns zeroed (removed blocks: the identity), except where FLAP's bias compensation
deliberately changes it; generate() with the KV cache must agree with a cache-free greedy decode.
"""
import copy
import math
import inspect
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from experiments.methods.algorithms import structured as S  # noqa: E402

VOCAB = 101
ARCHS = ["llama", "mistral", "qwen2"]
# fp32 forward of the same ops on smaller matrices: only summation order differs.
ATOL, RTOL = 2e-5, 1e-5


def _config(arch, layers=4, **over):
    # 8 query heads / 2 k/v heads: GQA with groups of 4; head_dim 8.
    common = dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=128, num_hidden_layers=layers)
    common.update(over)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "mistral":  # seq 24 > window 16: the sliding-window mask matters
        return transformers.MistralConfig(sliding_window=16, **common)
    # Qwen2: q/k/v biases; layer 0 full attention, the others sliding
    return transformers.Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=1, **common)


def _tiny(arch, seed=0, **over):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch, **over)).eval()
    # random init gives near-zero-variance weights; make scales differ so criteria disagree
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if p.dim() == 2:
                p.mul_(1 + 3 * torch.rand(p.shape[0], 1))
    model.requires_grad_(False)
    return model


def _smol_shaped(layers=3, kv_heads=3, seed=0):
    """Random weights in the default model's shapes (SmolLM2-135M: hidden 576, 9 query heads of 64,
    3 k/v heads, MLP 1536; ``kv_heads=9`` gives the multi-head attention FLAP's code is written for)."""
    return _tiny("llama", seed=seed, layers=layers, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                 num_key_value_heads=kv_heads, head_dim=64)


def _ids(n=6, seq=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _close(a, b, what):
    err = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=ATOL, rtol=RTOL), f"{what}: max abs error {err:.3g}"


def _mask_channels(model, keep_channels):
    with torch.no_grad():
        for i, keep in keep_channels.items():
            mlp = model.model.layers[i].mlp
            drop = torch.ones(mlp.gate_proj.weight.shape[0], dtype=torch.bool)
            drop[keep] = False
            mlp.gate_proj.weight[drop] = 0
            mlp.up_proj.weight[drop] = 0
            mlp.down_proj.weight[:, drop] = 0


def _mask_heads(model, keep_q):
    with torch.no_grad():
        for i, keep in keep_q.items():
            a = model.model.layers[i].self_attn
            hd = a.head_dim
            nq = a.q_proj.weight.shape[0] // hd
            drop = torch.ones(nq, dtype=torch.bool)
            drop[keep] = False
            cols = drop.repeat_interleave(hd)
            a.q_proj.weight[cols] = 0
            if a.q_proj.bias is not None:
                a.q_proj.bias[cols] = 0
            a.o_proj.weight[:, cols] = 0


def _check_shapes(model):
    for b in model.model.layers:
        geo = S.block_geometry(b)
        a, m = b.self_attn, b.mlp
        assert a.num_key_value_groups * geo["kv_heads"] == geo["q_heads"]
        assert a.o_proj.weight.shape[1] == a.q_proj.weight.shape[0]
        assert m.down_proj.weight.shape[1] == m.gate_proj.weight.shape[0] == m.up_proj.weight.shape[0]
        assert m.gate_proj.in_features == m.gate_proj.weight.shape[1]
        assert m.down_proj.in_features == m.down_proj.weight.shape[1]


def _check_generate(model):
    """generate() runs, and the KV-cache path (the one generate takes) gives the cache-free logits."""
    ids = _ids(1, 12, seed=5)
    with torch.no_grad():
        got = model.generate(input_ids=ids[:, :7], attention_mask=torch.ones_like(ids[:, :7]), max_new_tokens=5,
                             min_new_tokens=5, do_sample=False, pad_token_id=0)
        assert got.shape == (1, 12)
        full = _logits(model, ids)
        out = model(input_ids=ids[:, :7], use_cache=True)
        steps = [out.logits[:, -1]]
        cache = out.past_key_values
        # transformers 5.x renamed the argument (past_key_values is deprecated)
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        for t in range(7, 12):
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{kw: cache})
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    _close(torch.stack(steps, 1), full[:, 6:], "logits through the KV cache")


# ----------------------------------------------------------------------------- channels / heads: exact

@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "taylor"])
@pytest.mark.parametrize("arch", ARCHS)
def test_channels_equal_masked_original(arch, criterion):
    model = _tiny(arch)
    ref = copy.deepcopy(model)
    before = S.count_params(model)
    res = S.prune_model(model, method="channels", criterion=criterion, ratio=0.3, calib_ids=_ids())
    assert res.channels == [96 - round(0.3 * 96)] * 4, res.channels
    assert res.params_after == S.count_params(model) == before - 4 * 29 * 3 * 64
    assert res.params_before == before and not res.bias_compensated
    assert model.config.intermediate_size == 67
    _check_shapes(model)
    _mask_channels(ref, res.extra["keep_channels"])
    ids = _ids(2, 24, seed=3)
    _close(_logits(model, ids), _logits(ref, ids), f"{arch} channels/{criterion}")
    _check_generate(model)


@pytest.mark.parametrize("head_unit", ["group", "query"])
@pytest.mark.parametrize("arch", ARCHS)
def test_heads_equal_masked_original(arch, head_unit):
    model = _tiny(arch)
    ref = copy.deepcopy(model)
    res = S.prune_model(model, method="heads", criterion="wanda", ratio=0.4, scope="uniform",
                        head_unit=head_unit, calib_ids=_ids())
    if head_unit == "group":  # 2 groups, remove 1
        assert res.q_heads == [4] * 4 and res.kv_heads == [1] * 4
    else:  # a slot (one query head per group) is ~1/5 of the attention: 2 slots
        assert res.q_heads == [4] * 4 and res.kv_heads == [2] * 4
    for b in model.model.layers:
        assert b.self_attn.num_key_value_groups == (4 if head_unit == "group" else 2)
    _check_shapes(model)
    _mask_heads(ref, res.extra["keep_q_heads"])
    ids = _ids(2, 24, seed=3)
    _close(_logits(model, ids), _logits(ref, ids), f"{arch} heads/{head_unit}")
    _check_generate(model)


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "taylor"])
def test_channels_heads_global_per_layer_shapes_differ(criterion):
    model = _tiny("llama", layers=4)
    ref = copy.deepcopy(model)
    struct = S._struct_params(model, "channels_heads")
    res = S.prune_model(model, method="channels_heads", criterion=criterion, ratio=0.4, scope="global",
                        head_unit="query", calib_ids=_ids())
    # one threshold across layers: the removed fraction is the target within half of the largest unit
    slot = 2 * (8 * 64) * 2  # one query head per group (2 groups): q rows + o columns
    assert abs(res.removed_fraction - 0.4) <= slot / 2 / struct + 1e-9, res.removed_fraction
    assert res.target_params_before == struct
    assert len(set(res.channels)) > 1 or len(set(res.q_heads)) > 1, "global scope gave identical layers"
    assert min(res.channels) >= 10 and min(res.kv_heads) == 2  # floors: 10% of channels, every k/v head
    _check_shapes(model)
    if res.extra.get("keep_channels"):
        _mask_channels(ref, res.extra["keep_channels"])
    if res.extra.get("keep_q_heads"):
        _mask_heads(ref, res.extra["keep_q_heads"])
    ids = _ids(2, 24, seed=3)
    _close(_logits(model, ids), _logits(ref, ids), "channels_heads global")
    _check_generate(model)


def test_global_floor_keeps_every_layer():
    model = _tiny("llama")
    res = S.prune_model(model, method="channels_heads", criterion="magnitude", ratio=0.95, scope="global",
                        head_unit="group", floor=0.2)
    assert min(res.channels) == 20 and min(res.kv_heads) == 1 and min(res.q_heads) == 4
    _check_generate(model)


def test_ratio_zero_changes_nothing():
    model = _tiny("qwen2")
    ref = copy.deepcopy(model)
    res = S.prune_model(model, method="channels_heads", criterion="magnitude", ratio=0.0)
    assert res.params_after == res.params_before and res.removed_fraction == 0
    ids = _ids(2, 24, seed=3)
    assert torch.equal(_logits(model, ids), _logits(ref, ids))


# ----------------------------------------------------------------------------- criteria

def test_scores_match_definitions():
    model = _tiny("llama", layers=2)
    stats = S.collect_stats(model, _ids())
    b, st = model.model.layers[0], stats[0]
    g, u, d = (getattr(b.mlp, n).weight.double() for n in S.MLP)
    j = 17
    xin, xh = st.mlp_in_sq.sqrt(), st.down_in_sq.sqrt()
    wanda_j = sum((w[j].abs() * xin).sum() for w in (g, u)) + (d[:, j].abs() * xh[j]).sum()
    assert torch.isclose(S.channel_scores(b, "wanda", st)[j], wanda_j, rtol=1e-12)
    mag_j = torch.cat([g[j], u[j], d[:, j]]).norm()
    assert torch.isclose(S.channel_scores(b, "magnitude")[j], mag_j, rtol=1e-12)
    flap_j = st.var("down_in")[j] * d[:, j].square().sum()
    assert torch.isclose(S.channel_scores(b, "flap", st)[j], flap_j, rtol=1e-12)
    # FLAP's baselines: the down_proj column only (magnitude-sp: its L2 norm; wanda-sp: mean |W| * RMS(x))
    assert torch.isclose(S.channel_scores(b, "magnitude-sp")[j], d[:, j].norm(), rtol=1e-12)
    wsp_j = d[:, j].abs().mean() * (st.down_in_sq[j] / st.n).sqrt()
    assert torch.isclose(S.channel_scores(b, "wanda-sp", st)[j], wsp_j, rtol=1e-12)
    # head group 1 = query heads 4..7 (rows 32..63 of q, columns 32..63 of o) + k/v head 1 (rows 8..15)
    q, k, v, o = (getattr(b.self_attn, n).weight.double() for n in S.ATTN)
    mag_g1 = torch.cat([q[32:64].flatten(), o[:, 32:64].flatten(), k[8:16].flatten(), v[8:16].flatten()]).norm()
    assert torch.isclose(S.head_scores(b, "magnitude", head_unit="group")[1], mag_g1, rtol=1e-12)
    # FLAP scores a head by the sum of its o_proj channels' *squared* metric (prune.py: W_metric ** 2)
    flap_g1 = (st.var("o_in")[32:64] * o[:, 32:64].square().sum(0)).square().sum()
    assert torch.isclose(S.head_scores(b, "flap", st, head_unit="group")[1], flap_g1, rtol=1e-12)
    assert torch.isclose(S.head_scores(b, "magnitude-sp", head_unit="group")[1], o[:, 32:64].norm(dim=0).sum(),
                         rtol=1e-12)
    # query slots: slot r sums the r-th weakest query head of each group
    per_head = (q.square().sum(1).reshape(8, 8).sum(1) + o.square().sum(0).reshape(8, 8).sum(1))
    srt = per_head.reshape(2, 4).sort(1).values
    assert torch.allclose(S.head_scores(b, "magnitude", head_unit="query"), srt.sum(0)[:3].sqrt(), rtol=1e-12)


def test_stats_are_the_block_inputs():
    """collect_stats sees exactly the inputs the model's own forward gives each linear."""
    model = _tiny("mistral", layers=2)
    ids = _ids(3, 24)
    seen = {}

    def hook(name):
        def h(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            seen[name] = (x.square().sum(0), x.sum(0))
        return h
    b1 = model.model.layers[1]
    hs = [b1.mlp.down_proj.register_forward_pre_hook(hook("down")), b1.self_attn.o_proj.register_forward_pre_hook(hook("o"))]
    _logits(model, ids)
    for h in hs:
        h.remove()
    st = S.collect_stats(model, ids, chunk=2)[1]
    assert st.n == 3 * 24
    assert torch.allclose(st.down_in_sq, seen["down"][0], rtol=1e-5)
    assert torch.allclose(st.o_in_sum, seen["o"][1], rtol=1e-4, atol=1e-6)


def test_taylor_is_weight_times_gradient():
    model = _tiny("llama", layers=2)
    ids = _ids(4, 16)
    flags = [p.requires_grad for p in model.parameters()]
    t = S.taylor_scores(model, ids, chunk=3)  # chunks of 3 + 1: the accumulation must weight them
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    ref = copy.deepcopy(model)
    w = ref.model.layers[1].mlp.down_proj.weight
    w.requires_grad_(True)
    ref(input_ids=ids, labels=ids).loss.backward()
    assert torch.allclose(t[1]["down_proj"], (w * w.grad).abs(), rtol=1e-4, atol=1e-9)


def test_criteria_disagree():
    """Different criteria must be able to pick different channels (a criterion that ignores its input
    would pass the exactness tests)."""
    model = _tiny("llama", layers=2)
    stats = S.collect_stats(model, _ids())
    tl = S.taylor_scores(model, _ids())
    b = model.model.layers[0]
    picks = {c: set(S.channel_scores(b, c, stats[0], tl[0]).argsort()[:20].tolist()) for c in S.CRITERIA}
    assert len({frozenset(p) for p in picks.values()}) == len(S.CRITERIA), picks


# ----------------------------------------------------------------------------- FLAP compensation

def test_flap_bias_compensation_keeps_the_mean_output():
    """On a 1-block model the MLP input is unchanged by pruning MLP channels, so with FLAP's bias the
    MLP output's mean over the calibration tokens is exactly the dense one; without it, it is not."""
    model = _tiny("llama", layers=1)
    ids = _ids(8, 24)

    def mlp_out(m):
        got = []
        h = m.model.layers[0].mlp.register_forward_hook(lambda _m, _a, out: got.append(out.detach()))
        _logits(m, ids)
        h.remove()
        return got[0].double().reshape(-1, 64)

    dense = mlp_out(model)
    flap = copy.deepcopy(model)
    res = S.prune_model(flap, method="channels", criterion="flap", ratio=0.5, calib_ids=ids)
    assert res.bias_compensated and flap.model.layers[0].mlp.down_proj.bias is not None
    plain = copy.deepcopy(model)
    S.prune_channels(plain.model.layers[0], res.extra["keep_channels"][0])
    assert plain.model.layers[0].mlp.down_proj.bias is None
    gap_flap = (dense.mean(0) - mlp_out(flap).mean(0)).abs().max().item()
    gap_plain = (dense.mean(0) - mlp_out(plain).mean(0)).abs().max().item()
    assert gap_flap < 1e-5 < gap_plain / 100, (gap_flap, gap_plain)
    # and it is the same selection plus a bias: masked original + bias = compensated model
    _close(mlp_out(flap) - flap.model.layers[0].mlp.down_proj.bias.double(), mlp_out(plain), "flap minus bias")


def test_flap_heads_compensation_on_o_proj():
    model = _tiny("qwen2", layers=2)
    res = S.prune_model(model, method="heads", criterion="flap", ratio=0.5, head_unit="group", calib_ids=_ids())
    for b in model.model.layers:
        assert b.self_attn.o_proj.bias is not None and b.self_attn.o_proj.bias.abs().sum() > 0
    assert res.params_after == S.count_params(model)
    _check_generate(model)


# ----------------------------------------------------------------------------- layers

@pytest.mark.parametrize("arch", ARCHS)
def test_layers_last_and_bi_equal_identity_blocks(arch):
    ids = _ids()
    model = _tiny(arch, layers=5)
    stats = S.collect_stats(model, ids)
    # BI from the model's own hidden states (hidden_states[-1] is after the final norm: skip the last)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(4):
        cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1).mean()
        assert abs(stats[i].bi - float(1 - cos)) < 1e-6
    for criterion in ("bi", "last"):
        pruned, ref = copy.deepcopy(model), copy.deepcopy(model)
        res = S.prune_model(pruned, method="layers", criterion=criterion, blocks=2, calib_ids=ids, stats=stats)
        drop = res.extra["removed_blocks"]
        if criterion == "last":
            assert drop == [3, 4]
        else:
            bis = [s.bi for s in stats]
            assert sorted(bis[i] for i in drop) == sorted(bis)[:2]
        assert res.kept_blocks == [i for i in range(5) if i not in drop]
        assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
        assert [b.self_attn.layer_idx for b in pruned.model.layers] == [0, 1, 2]
        if getattr(pruned.config, "layer_types", None) is not None:
            assert pruned.config.layer_types == [model.config.layer_types[i] for i in res.kept_blocks]
            assert [b.self_attn.sliding_window for b in pruned.model.layers] == \
                [model.model.layers[i].self_attn.sliding_window for i in res.kept_blocks]
        for i in drop:
            ref.model.layers[i].forward = types.MethodType(lambda self, hidden_states, *a, **k: hidden_states,
                                                           ref.model.layers[i])
        _close(_logits(pruned, ids[:2]), _logits(ref, ids[:2]), f"{arch} layers/{criterion}")
        assert res.params_after == S.count_params(pruned) < res.params_before
        _check_generate(pruned)


# ----------------------------------------------------------------------------- errors

def test_bad_options_are_named():
    model = _tiny("llama", layers=2)
    cases = [
        (dict(method="rows", criterion="magnitude", ratio=0.2), "method='rows'"),
        (dict(method="channels", criterion="bi", ratio=0.2), "criterion='bi'"),
        (dict(method="layers", criterion="wanda", blocks=1), "criterion='wanda'"),
        (dict(method="channels", criterion="magnitude", ratio=1.0), "ratio=1.0"),
        (dict(method="channels", criterion="magnitude", ratio=0.2, scope="local"), "scope='local'"),
        (dict(method="heads", criterion="magnitude", ratio=0.2, head_unit="kv"), "head_unit='kv'"),
        (dict(method="layers", criterion="last", blocks=2), "blocks=2 must be <"),
        (dict(method="layers", criterion="last", blocks=0), "blocks=0"),
        (dict(method="channels", criterion="wanda", ratio=0.2), "needs calibration data"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("[", r"\[")):
            S.prune_model(copy.deepcopy(model), **kw)


def test_query_unit_needs_gqa_and_unsupported_architecture():
    mha = _tiny("llama", layers=2, num_key_value_heads=8)
    with pytest.raises(ValueError, match="head_unit='query' needs grouped-query attention"):
        S.prune_model(mha, method="heads", criterion="magnitude", ratio=0.3, head_unit="query")
    res = S.prune_model(mha, method="heads", criterion="magnitude", ratio=0.25, head_unit="group")
    assert res.q_heads == res.kv_heads == [6, 6]
    _check_generate(mha)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="Llama-family"):
        S.prune_model(gpt2, method="channels", criterion="magnitude", ratio=0.2)


def test_prune_heads_rejects_invalid_gqa_layout():
    block = _tiny("llama", layers=1).model.layers[0]
    with pytest.raises(ValueError, match="unequal size"):
        S.prune_heads(block, [0, 1, 4])
    with pytest.raises(ValueError, match="cannot remove every"):
        S.prune_channels(block, [])


def test_count_params_counts_tied_once():
    model = _tiny("llama", layers=1, tie_word_embeddings=True)
    assert S.count_params(model) == sum(p.numel() for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)


def test_remove_middle_blocks_renumbers_the_cache():
    """Qwen2 with layer 0 full attention and the rest sliding (window 16): removing blocks 0 and 2 must
    renumber layer_idx and layer_types, or the KV cache mixes layers / window kinds (seq 26 > window)."""
    model = _tiny("qwen2", layers=5)
    ref = copy.deepcopy(model)
    kept = S.remove_blocks(model, [0, 2])
    assert kept == [1, 3, 4] and model.config.layer_types == ["sliding_attention"] * 3
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    for i in (0, 2):
        ref.model.layers[i].forward = types.MethodType(lambda self, hidden_states, *a, **k: hidden_states,
                                                       ref.model.layers[i])
    ids = _ids(1, 26, seed=7)
    _close(_logits(model, ids), _logits(ref, ids), "blocks 0 and 2 removed")
    with torch.no_grad():
        full = _logits(model, ids)
        out = model(input_ids=ids[:, :20], use_cache=True)
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        steps = [out.logits[:, -1]]
        for t in range(20, 26):
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{kw: out.past_key_values})
            steps.append(out.logits[:, -1])
    _close(torch.stack(steps, 1), full[:, 19:], "logits through the KV cache")


def test_global_scope_compares_each_unit_within_its_own_layer():
    """FLAP's standardization: a layer's overall scale does not count (a layer with 4x larger MLP weights
    gives the same selection), how a unit stands within its layer does: 5 down_proj columns 100x
    smaller than the rest of their layer are the first 5 channels removed, and a layer with one weak
    query head per group gives the first query slot. Uniform scope removes the same count everywhere."""
    model = _tiny("llama", layers=4)
    kw = dict(method="channels_heads", criterion="magnitude-sp", ratio=0.3, scope="global", head_unit="query")
    ref = S.prune_model(copy.deepcopy(model), **kw)
    big = copy.deepcopy(model)
    with torch.no_grad():
        for n in S.MLP:
            getattr(big.model.layers[1].mlp, n).weight.mul_(4)
    got = S.prune_model(big, **kw)
    assert got.channels == ref.channels and got.extra == ref.extra
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[:, 40:45] *= 0.01
        model.model.layers[1].self_attn.o_proj.weight.view(64, 2, 4, 8)[:, :, 3] *= 0.05  # query head 3 of each group
    res = S.prune_model(copy.deepcopy(model), method="channels", criterion="magnitude-sp", ratio=5 / 384,
                        scope="global")
    assert res.channels == [96, 96, 91, 96] and res.extra["keep_channels"][2] == [j for j in range(96)
                                                                                 if not 40 <= j < 45]
    res = S.prune_model(copy.deepcopy(model), method="heads", criterion="magnitude-sp", ratio=0.05, scope="global",
                        head_unit="query")  # one slot of the 4 layers' attention parameters
    assert res.q_heads == [8, 6, 8, 8] and res.extra["keep_q_heads"][1] == [0, 1, 2, 4, 5, 6], res.q_heads
    uni = S.prune_model(copy.deepcopy(model), method="channels", criterion="magnitude-sp", ratio=0.3)
    assert len(set(uni.channels)) == 1


def _scaled_inputs(stats, blocks, factor):
    """Statistics as if the down_proj and o_proj inputs of ``blocks`` were ``factor`` times as large."""
    out = copy.deepcopy(stats)
    for i in blocks:
        for name in ("down_in", "o_in"):
            setattr(out[i], f"{name}_sum", getattr(out[i], f"{name}_sum") * factor)
            setattr(out[i], f"{name}_sq", getattr(out[i], f"{name}_sq") * factor ** 2)
    return out


@pytest.mark.parametrize("method", ["channels", "channels_heads"])
def test_global_scope_does_not_drain_low_scale_layers(method):
    """The default model's FLAP metric is orders of magnitude smaller in its first blocks; one z-score
    across all layers drained them (20% of the MLP channels: blocks 0-4 lost the most, block 1 went to
    its floor, perplexity 47.15 against uniform's 29.64). FLAP standardizes each layer's metric first:
    on layers of the default model's shapes, making blocks 0-1's inputs 100x smaller changes no
    removed channel or head, and those blocks stay well above their floor."""
    model = _smol_shaped(layers=4)
    stats = S.collect_stats(model, _ids(4, 32))
    kw = dict(method=method, criterion="flap", ratio=0.2, scope="global", head_unit="query")
    ref = S.prune_model(copy.deepcopy(model), stats=stats, **kw)
    got = S.prune_model(copy.deepcopy(model), stats=_scaled_inputs(stats, [0, 1], 0.01), **kw)
    assert got.channels == ref.channels and got.q_heads == ref.q_heads, (got.channels, ref.channels)
    assert got.extra["keep_channels"] == ref.extra["keep_channels"]
    assert got.extra.get("keep_q_heads") == ref.extra.get("keep_q_heads")
    assert min(got.channels) > 5 * math.ceil(0.1 * 1536), got.channels  # far from the floor
    assert len(set(ref.channels)) > 1, "global scope gave the uniform result"


def test_unit_zscores_are_flaps_standardized_means():
    """FLAP prune.py (AL-AM): the per-channel metric of each layer is standardized with its own mean and
    (unbiased) std; a head's score is the mean of its channels' values. The attention metric is the
    squared WIFV. GQA: a group averages its query heads' channels, a query slot the r-th weakest
    head of every group."""
    model = _smol_shaped(layers=2)
    st = S.collect_stats(model, _ids(4, 32))[1]
    b = model.model.layers[1]
    d, o = b.mlp.down_proj.weight.double(), b.self_attn.o_proj.weight.double()
    std = lambda x: (x - x.mean()) / x.std()  # noqa: E731  (FLAP's standarlization, one layer)
    mlp = st.var("down_in") * d.square().sum(0)
    assert torch.allclose(S.unit_zscores(b, "channels", "flap", st), std(mlp), rtol=1e-10, atol=1e-12)
    attn = std((st.var("o_in") * o.square().sum(0)) ** 2).reshape(9, 64).mean(1)  # per query head
    groups = S.unit_zscores(b, "heads", "flap", st, head_unit="group")
    assert torch.allclose(groups, attn.reshape(3, 3).mean(1), rtol=1e-10, atol=1e-12)
    slots = S.unit_zscores(b, "heads", "flap", st, head_unit="query")
    assert torch.allclose(slots, attn.reshape(3, 3).sort(1).values.mean(0)[:2], rtol=1e-10, atol=1e-12)
    # the uniform scores order the units as the z-scores do
    assert torch.equal(S.head_scores(b, "flap", st, head_unit="group").argsort(), groups.argsort())


# ----------------------------------------------------------------------------- FLAP's Wanda-sp / magnitude-sp

class _Stop(Exception):
    pass


def _flap_sp_reference(model, ids, ratio, criterion, *, sequential=True, heads=True):
    """FLAP's prune_wanda_sp / prune_magnitude_sp (CASIA-IVA-Lab/FLAP lib/prune.py, lib/layerwrapper.py
    WrappedGPT) written out, removal done by zeroing: the blocks run one calibration sample at a time
    from the captured inputs of block 0; per block the o_proj / down_proj input statistics (FLAP's
    running average), metric |W| * sqrt(scaler_row) averaged over rows (magnitude-sp: torch.norm(W,
    dim=0)), a head sums its columns, threshold = sorted metric[int(ratio * count)], keep metric >=
    threshold; Wanda-sp's next block sees the pruned block's outputs. Heads as FLAP's code: multi-head
    attention only (``heads=False`` prunes MLP channels alone). Returns {block: (removed heads,
    removed channels)}."""
    model = copy.deepcopy(model)
    layers = model.model.layers
    inps, kws = [], []

    def grab(_m, args, kwargs):
        inps.append(args[0] if args else kwargs["hidden_states"])
        kws.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop
    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    for j in range(ids.shape[0]):
        with pytest.raises(_Stop):
            model(input_ids=ids[j:j + 1], use_cache=False)
    h.remove()

    def run(layer):
        with torch.no_grad():
            outs = [layer(x, **kw) for x, kw in zip(inps, kws)]
        return [o[0] if isinstance(o, tuple) else o for o in outs]
    removed = {}
    for i, b in enumerate(layers):
        hd = b.self_attn.head_dim
        subset = {"o": b.self_attn.o_proj, "down": b.mlp.down_proj}
        acc = {k: [torch.zeros(lin.weight.shape[1]), 0] for k, lin in subset.items()}

        def hook(key):
            def f(_m, args):
                inp = args[0].reshape(-1, args[0].shape[-1]).t().float()  # (dim, tokens) of one sample
                a = acc[key]
                a[0] *= a[1] / (a[1] + 1)
                a[1] += 1
                a[0] += torch.norm(inp, p=2, dim=1) ** 2 / a[1]
            return f
        hs = [lin.register_forward_pre_hook(hook(k)) for k, lin in subset.items()]
        outs = run(b)
        for h in hs:
            h.remove()
        masks = {}
        for key, lin in subset.items():
            w = lin.weight.data
            if criterion == "wanda-sp":
                m = (torch.abs(w) * torch.sqrt(acc[key][0].reshape((1, -1)))).mean(axis=0)
            else:
                m = torch.norm(w, dim=0)
            if key == "o":
                m = m.reshape(-1, hd).sum(dim=1)
                masks[key] = m >= torch.sort(m)[0][int(ratio * m.numel())] if heads else torch.ones_like(m, dtype=bool)
            else:
                masks[key] = m >= torch.sort(m)[0][int(m.numel() * ratio)]
        with torch.no_grad():
            if heads:
                cols = (~masks["o"]).repeat_interleave(hd)
                for n in ("q_proj", "k_proj", "v_proj"):
                    getattr(b.self_attn, n).weight[cols] = 0
                b.self_attn.o_proj.weight[:, cols] = 0
            for n in ("gate_proj", "up_proj"):
                getattr(b.mlp, n).weight[~masks["down"]] = 0
            b.mlp.down_proj.weight[:, ~masks["down"]] = 0
        removed[i] = tuple(set((~masks[key]).nonzero().flatten().tolist()) for key in ("o", "down"))
        inps = run(b) if sequential else outs
    return removed


def _jaccard(a, b):
    return len(a & b) / len(a | b) if a | b else 1.0


@pytest.mark.parametrize("criterion", ["wanda-sp", "magnitude-sp"])
def test_sp_baselines_remove_what_flaps_code_removes(criterion):
    """On layers of the default model's shapes (multi-head attention, as FLAP's code), 25% of the heads
    (2 of 9) and of the MLP channels (384 of 1536) per block: the removed sets equal those of FLAP's
    formula (Jaccard 1.0 in every block). For Wanda-sp the statistics must be sequential: a reference
    fed by the dense model's statistics removes a different set."""
    model = _smol_shaped(layers=3, kv_heads=9)
    ids = _ids(4, 32)
    res = S.prune_model(copy.deepcopy(model), method="channels_heads", criterion=criterion, ratio=0.25,
                        head_unit="group", calib_ids=ids)
    ref = _flap_sp_reference(model, ids, 0.25, criterion)
    for i in range(3):
        heads = set(range(9)) - set(res.extra["keep_q_heads"][i])
        chans = set(range(1536)) - set(res.extra["keep_channels"][i])
        assert len(heads) == 2 and len(chans) == 384
        assert _jaccard(heads, ref[i][0]) == 1.0 and _jaccard(chans, ref[i][1]) == 1.0, \
            (i, _jaccard(heads, ref[i][0]), _jaccard(chans, ref[i][1]))
    assert not res.bias_compensated
    if criterion == "wanda-sp":
        dense = _flap_sp_reference(model, ids, 0.25, criterion, sequential=False)
        assert any(dense[i][1] != ref[i][1] for i in (1, 2)), "the test cannot tell sequential from dense statistics"


def test_wanda_sp_is_uniform_and_sequential_only():
    model = _tiny("llama", layers=2)
    with pytest.raises(ValueError, match="criterion='wanda-sp' .* needs scope='uniform'"):
        S.prune_model(model, method="channels", criterion="wanda-sp", ratio=0.2, scope="global", calib_ids=_ids())
    with pytest.raises(ValueError, match="cannot use precomputed stats"):
        S.prune_model(model, method="channels", criterion="wanda-sp", ratio=0.2, stats=S.collect_stats(model, _ids()))
    with pytest.raises(ValueError, match="criterion='wanda-sp' needs calibration data"):
        S.prune_model(model, method="channels", criterion="wanda-sp", ratio=0.2)
    assert S.count_params(model) == S.count_params(_tiny("llama", layers=2))  # nothing half-done


@pytest.mark.slow
def test_on_the_default_model():
    """The default model's real weights and activations, the quick sweep's calibration windows.

    FLAP's global scope at 20% of the MLP channels: the first blocks' fluctuation is orders of
    magnitude below the late blocks', and one z-score across all layers drained blocks 0-4 (block 1
    to its floor); standardized per layer, blocks 0-2 lose fewer channels than uniform's 307 and no
    block nears its floor. FLAP's Wanda-sp and magnitude-sp: the removed MLP channels equal those of
    FLAP's formula in all 30 blocks (Jaccard 1.0)."""
    from experiments.lm import data, models

    model, tok, _ = models.load_model("default")
    ids = data.calibration_batches(tok, data.get_texts("austen")[0], n_samples=4, seqlen=256, seed=0)
    stats = S.collect_stats(model, ids)
    res = S.prune_model(copy.deepcopy(model), method="channels", criterion="flap", ratio=0.2, scope="global",
                        stats=stats)
    assert abs(res.removed_fraction - 0.2) < 1e-3
    assert max(1536 - c for c in res.channels[:3]) < 307 and min(res.channels) > 2 * 154, res.channels
    for criterion in ("wanda-sp", "magnitude-sp"):
        got = S.prune_model(copy.deepcopy(model), method="channels", criterion=criterion, ratio=0.2, calib_ids=ids)
        ref = _flap_sp_reference(model, ids, 0.2, criterion, heads=False)
        for i in range(30):
            chans = set(range(1536)) - set(got.extra["keep_channels"][i])
            assert len(chans) == 307 and _jaccard(chans, ref[i][1]) == 1.0, (criterion, i, _jaccard(chans, ref[i][1]))
