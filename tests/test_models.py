"""Model loading, block/linear discovery and block-by-block execution on tiny random models.

Every family is built offline from a small config; the slow test loads the real default GGUF.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from experiments.lm import models  # noqa: E402

VOCAB = 97
# fp32 only: the harness runs models in fp32. Blocks run on captured inputs must reproduce the
# model's own forward up to reassociation-free identical ops, so the bound is tight.
TOL = {torch.float32: (1e-5, 1e-5)}


def _configs():
    common = dict(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=64)
    return {
        "llama": transformers.LlamaConfig(num_hidden_layers=2, **common),
        # seq 17 > window 8, so the sliding-window mask matters
        "mistral": transformers.MistralConfig(num_hidden_layers=2, sliding_window=8, **common),
        # layer 0 full attention, layers 1-2 sliding: blocks receive different masks
        "qwen2": transformers.Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
                                          max_window_layers=1, **common),
        # word_embed_proj_dim != hidden_size exercises project_in / project_out
        "opt": transformers.OPTConfig(hidden_size=48, ffn_dim=80, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=32),
        "gpt2": transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                        bos_token_id=0, eos_token_id=0),
    }


EXPECTED_LINEARS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
EXPECTED_LINEARS["mistral"] = EXPECTED_LINEARS["qwen2"] = EXPECTED_LINEARS["llama"]
FAMILIES = list(EXPECTED_LINEARS)


def _tiny(family):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_configs()[family]).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_find_blocks_and_linears(family):
    model = _tiny(family)
    blocks = models.find_blocks(model)
    assert len(blocks) == _configs()[family].num_hidden_layers
    for block in blocks:
        assert list(models.find_linears(block)) == EXPECTED_LINEARS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_weight_is_out_by_in(family):
    """F.linear with linear_weight reproduces the layer, including GPT-2's transposed Conv1D."""
    model = _tiny(family)
    for name, layer in models.find_linears(models.find_blocks(model)[0]).items():
        w = models.linear_weight(layer)
        x = torch.randn(5, w.shape[1])
        want = layer(x)
        assert want.shape[-1] == w.shape[0]
        got = F.linear(x, w, getattr(layer, "bias", None))
        err = (got - want).abs().max().item()
        assert err <= 1e-5, f"{family} {name}: max abs err {err:.3g}"


def test_linear_weight_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        models.linear_weight(nn.LayerNorm(4))


def test_find_blocks_unknown_architecture_names_class_and_fix():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ValueError, match=r"Odd.*BLOCK_PATHS"):
        models.find_blocks(Odd())


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_from_captured_inputs_reproduce_logits(family):
    model = _tiny(family)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 17), generator=gen)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    captured = models.block_prefix_forward(model, ids)
    blocks = models.find_blocks(model)
    assert len(captured.kwargs) == len(blocks)
    hidden = captured.hidden
    for block, kwargs in zip(blocks, captured.kwargs):
        # batch_size=2 over 3 rows: kwargs captured at batch 1 must broadcast to any batch
        hidden = models.run_block(block, hidden, kwargs, batch_size=2)
    got = models.final_logits(model, hidden)
    atol, rtol = TOL[torch.float32]
    err = (got - want).abs().max().item()
    rel = err / want.abs().max().item()
    assert torch.allclose(got, want, atol=atol, rtol=rtol), f"{family}: max abs {err:.3g}, rel {rel:.3g}"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_squared_gradients_are_the_per_window_fisher_of_the_dense_model(family):
    """SqueezeLLM's sensitivity: sum over windows of the squared gradient of each window's own loss
    (transformers' ``model(ids, labels=ids).loss``), not the square of the summed gradient; GPT-2's
    Conv1D gradients come back (out, in). The model is left as it was."""
    model = _tiny(family)
    for p in model.parameters():
        if p.dim() == 2:
            p.data.normal_(0, 0.1)      # random init's tiny weights would give near-zero gradients
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    params = dict(model.named_parameters())
    model.get_input_embeddings().weight.requires_grad_(False)        # a flag the call must restore
    got = models.squared_gradients(model, ids)
    assert not model.get_input_embeddings().weight.requires_grad and not model.training
    assert all(p.grad is None for p in params.values())
    layers = models.linear_layers(model)
    assert list(got) == [name for name, _ in layers]
    want = {name: 0 for name, _ in layers}
    total = {name: 0 for name, _ in layers}
    for i in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids[i:i + 1], labels=ids[i:i + 1], use_cache=False).loss.backward()
        for name, layer in layers:
            g = models.linear_weight(layer).grad if isinstance(layer, nn.Linear) else layer.weight.grad.t()
            want[name] = want[name] + g.square()
            total[name] = total[name] + g
    model.zero_grad(set_to_none=True)
    for name, layer in layers:
        assert got[name].shape == models.linear_weight(layer).shape and got[name].dtype == torch.float32
        assert want[name].abs().max() > 0
        rel = ((got[name] - want[name]).norm() / want[name].norm()).item()
        assert rel < 1e-5, f"{name}: relative error {rel:.3g} against per-window autograd"
        off = ((got[name] - total[name].square()).norm() / want[name].norm()).item()
        assert off > 0.1, f"{name}: equals the square of the batch gradient (rel diff {off:.3g})"


def test_squared_gradients_rejects_short_windows():
    with pytest.raises(ValueError, match="input_ids must be \\(n_windows, seq\\) with seq >= 2"):
        models.squared_gradients(_tiny("llama"), torch.zeros(2, 1, dtype=torch.long))


def test_capture_keeps_per_block_masks():
    """Qwen2 with sliding layers passes block 0 a full-attention mask and the others a sliding one."""
    model = _tiny("qwen2")
    captured = models.block_prefix_forward(model, torch.randint(0, VOCAB, (2, 17)))
    masks = [k["attention_mask"] for k in captured.kwargs]
    assert masks[1] is not None and masks[2] is not None
    assert masks[0] is None or not torch.equal(masks[0], masks[1])


def test_block_prefix_forward_runs_no_block_and_restores_forward():
    model = _tiny("llama")
    calls = []
    for layer in models.find_linears(models.find_blocks(model)[0]).values():
        layer.register_forward_hook(lambda *a: calls.append(1))
    models.block_prefix_forward(model, torch.randint(0, VOCAB, (2, 9)))
    assert calls == []
    assert all("forward" not in vars(b) for b in models.find_blocks(model))


def test_block_prefix_forward_rejects_1d_ids():
    with pytest.raises(ValueError, match="input_ids must be"):
        models.block_prefix_forward(_tiny("llama"), torch.zeros(5, dtype=torch.long))


# --- GGUF source grid --------------------------------------------------------------------

def _types(qtype, n=7, other=None):
    types = {f"blk.0.w{i}.weight": qtype for i in range(n)}
    types["blk.0.attn_norm.weight"] = "F32"
    types["token_embd.weight"] = "Q8_0"
    if other:
        types.update({f"blk.1.w{i}.weight": other for i in range(n - 1)})
    return types


def test_source_grid_from_tensor_types():
    grid = models.gguf_source_grid(_types("Q4_1"))
    assert grid == {"qtype": "Q4_1", "bits": 4, "group_size": 32, "symmetric": False, "fraction": 1.0}
    assert models.gguf_source_grid(_types("F16")) is None
    mixed = models.gguf_source_grid(_types("Q4_K", n=7, other="Q6_K"))
    assert mixed["qtype"] == "Q4_K" and mixed["fraction"] == pytest.approx(7 / 13)


ALIAS_CASES = [
    # (source qtype, bits, group_size, symmetric, integer_zero, expected)
    ("Q4_1", 4, 32, False, False, True),
    ("Q4_1", 4, 16, False, False, True),
    ("Q4_1", 8, 32, False, False, True),
    ("Q4_1", 6, 32, False, False, False),
    ("Q4_1", 4, 64, False, False, False),
    ("Q4_1", 4, -1, False, False, False),
    ("Q4_1", 4, 32, True, False, False),
    ("Q4_1", 4, 32, False, True, False),
    ("Q4_0", 4, 32, True, True, True),
    ("Q4_0", 4, 32, False, True, True),
    ("Q4_0", 3, 32, False, True, False),
    ("Q8_0", 4, 32, True, True, False),
]


def _source_weights(qtype, n_rows, gen):
    """Random weights exactly on a GGUF grid (groups of 32 along K, 64 columns)."""
    bits, gs, sym = models.GGUF_GRIDS[qtype]
    k = torch.randint(0, 2 ** bits, (n_rows, 64), generator=gen).double()
    # Both extreme levels in every 16 columns, so a min/max quantizer with groups >= 16 sees
    # the full source range in each of its groups.
    k[:, ::16] = 0
    k[:, 1::16] = 2 ** bits - 1
    d = (torch.rand(n_rows, 64 // gs, generator=gen, dtype=torch.float64) + 0.5).repeat_interleave(gs, 1) / 16
    if sym:
        return (k - 2 ** (bits - 1)) * d
    m = -(torch.rand(n_rows, 64 // gs, generator=gen, dtype=torch.float64) * 0.6 + 0.2).repeat_interleave(gs, 1)
    return m + k * d


def _best_grid_error(w, bits, group_size, symmetric, integer_zero):
    """Max error of round-to-nearest on the grid spanned by each group's own min and max."""
    n, kdim = w.shape
    gs = kdim if group_size == -1 else group_size
    g = w.view(n, kdim // gs, gs)
    qmax = 2 ** bits - 1
    if symmetric:
        s = torch.maximum(-g.amin(-1, keepdim=True) / 2 ** (bits - 1),
                          g.amax(-1, keepdim=True) / (2 ** (bits - 1) - 1))
        q = torch.clamp(torch.round(g / s) + 2 ** (bits - 1), 0, qmax)
        return ((q - 2 ** (bits - 1)) * s - g).abs().max().item()
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    if not integer_zero:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo) / qmax
    z = -lo / s
    if integer_zero:
        z = torch.round(z)
    q = torch.clamp(torch.round(g / s + z), 0, qmax)
    return ((q - z) * s - g).abs().max().item()


@pytest.mark.parametrize("qtype,bits,group_size,symmetric,integer_zero,expected", ALIAS_CASES,
                         ids=[f"{c[0]}-b{c[1]}-g{c[2]}-{'sym' if c[3] else 'asym'}-{'intz' if c[4] else 'floatz'}"
                              for c in ALIAS_CASES])
def test_aliases_source_grid_matches_requantization(qtype, bits, group_size, symmetric, integer_zero, expected):
    """The flag is True exactly when min/max round-to-nearest reproduces grid weights exactly."""
    bits_src, gs_src, sym_src = models.GGUF_GRIDS[qtype]
    grid = {"qtype": qtype, "bits": bits_src, "group_size": gs_src, "symmetric": sym_src}
    flag = models.aliases_source_grid(grid, bits=bits, group_size=group_size, symmetric=symmetric,
                                      integer_zero=integer_zero)
    assert flag is expected
    w = _source_weights(qtype, 8, torch.Generator().manual_seed(3))
    err = _best_grid_error(w, bits, group_size, symmetric, integer_zero)
    if expected:
        assert err < 1e-12, f"flagged as aliasing but requantization error {err:.3g}"
    else:
        assert err > 1e-6, f"not flagged but requantization reproduces the weights (err {err:.3g})"


def test_aliases_source_grid_float_model():
    assert models.aliases_source_grid(None, bits=4, group_size=32, symmetric=False) is False


# --- Loading -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    ("./missing/model.gguf", "no such file"),
    ("not a model!", "not known"),
    ("", "non-empty string"),
], ids=["missing-gguf", "garbage", "empty"])
def test_load_model_bad_spec_lists_accepted(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        models.load_model(spec)
    assert '"default"' in str(e.value) and ".gguf" in str(e.value)


def test_load_model_dir_without_config(tmp_path):
    with pytest.raises(ValueError, match="without config.json"):
        models.load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        models.load_model(str(tmp_path / "weights.bin"))


@pytest.fixture
def tiny_llama_dir(tmp_path):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    _tiny("llama").save_pretrained(tmp_path)
    return tmp_path


def test_load_model_local_dir_and_cache_returns_independent_copies(tiny_llama_dir):
    spec = str(tiny_llama_dir)
    models.clear_model_cache()
    try:
        m1, tok, info = models.load_model(spec)
        assert info["source"] == "hf-local" and info["source_grid"] is None
        assert info["n_blocks"] == 2 and info["n_linears"] == 14
        assert info["n_params"] == sum(p.numel() for p in m1.parameters())
        assert tok("w1 w5", add_special_tokens=False)["input_ids"] == [1, 5]
        w1 = models.linear_weight(models.find_linears(models.find_blocks(m1)[0])["mlp.up_proj"])
        before = w1.clone()
        with torch.no_grad():
            w1.zero_()
        m2, _, _ = models.load_model(spec)
        w2 = models.linear_weight(models.find_linears(models.find_blocks(m2)[0])["mlp.up_proj"])
        assert torch.equal(w2, before), "the cached template was modified through a returned copy"
        assert not m2.training
    finally:
        models.clear_model_cache()


@pytest.mark.slow
def test_default_model_loads_with_source_grid_from_file():
    m, tok, info = models.load_model("default", cache=False)
    assert info["gguf_qtype"] == "Q4_1"
    assert info["source_grid"] == {"qtype": "Q4_1", "bits": 4, "group_size": 32, "symmetric": False,
                                   "fraction": 1.0}
    assert info["n_blocks"] == 30 and info["n_linears"] == 30 * 7
    assert m.config.hidden_size == 576
    # Dequantized Q4_1: each group of 32 weights along K holds at most 16 distinct values.
    w = models.linear_weight(models.find_linears(models.find_blocks(m)[0])["self_attn.q_proj"])
    distinct = max(len(torch.unique(g)) for g in w[:4].reshape(-1, 32))
    assert distinct <= 16


# --- Hub ids: fail fast offline ----------------------------------------------------------------

def test_unknown_hub_id_fails_in_seconds_with_a_clear_message(monkeypatch):
    """Issue 8: an unknown hub id spent 52 s in HTTP retries offline before its error. Online the Hub
    answers 404 at once; offline the reachability probe gives up after HUB_PROBE_TIMEOUT_S."""
    import time
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    models.clear_model_cache()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"model spec 'tkr-no-such-org/no-such-model-8'") as e:
        models.load_model("tkr-no-such-org/no-such-model-8")
    elapsed = time.perf_counter() - t0
    assert elapsed < 3 * models.HUB_PROBE_TIMEOUT_S + 5, f"took {elapsed:.1f}s"
    assert "does not answer" in str(e.value) or "could not load model spec" in str(e.value)
    assert '"default"' in str(e.value)  # the accepted specs are listed


def test_hub_unreachable_and_not_cached_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    models.clear_model_cache()
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=0: (False, "https://huggingface.co: ConnectError: x"))
    monkeypatch.setattr(models, "_hub_cached", lambda repo_id: False)
    with pytest.raises(ValueError, match=r"'org/model' is not a local path and not in the local Hugging Face "
                                         r"cache, and the Hub does not answer within 3 s \(https://huggingface.co"):
        models.load_tokenizer("org/model")


def test_hub_cached_model_loads_offline_when_the_hub_is_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    models.clear_model_cache()
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=0: (False, "down"))
    monkeypatch.setattr(models, "_hub_cached", lambda repo_id: True)
    assert models._hub_local_only("org/model") is True
    models.clear_model_cache()
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=0: (True, "up"))
    assert models._hub_local_only("org/model") is False
    models.clear_model_cache()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=0: pytest.fail("no probe when HF_HUB_OFFLINE is set"))
    assert models._hub_local_only("org/model") is True
    monkeypatch.setattr(models, "_hub_cached", lambda repo_id: False)
    models.clear_model_cache()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set and the model is not in the local"):
        models._hub_local_only("org/model")
    models.clear_model_cache()


def test_hub_probe_gives_up_within_its_timeout(monkeypatch):
    """An endpoint that accepts the connection but never answers costs the timeout, not minutes."""
    import socket
    import time

    from huggingface_hub import constants
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # never accepted: the kernel completes the handshake, nobody ever replies
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        t0 = time.perf_counter()
        ok, why = models.hub_reachable(timeout=1.0)
        elapsed = time.perf_counter() - t0
    assert not ok and "127.0.0.1" in why and "Timeout" in why, why
    assert 0.9 < elapsed < 5, elapsed


def test_load_tokenizer_does_not_load_the_model(tiny_llama_dir, monkeypatch):
    import transformers as tf
    models.clear_model_cache()
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: pytest.fail("model loaded")))
    tok = models.load_tokenizer(str(tiny_llama_dir))
    assert tok("w1 w5", add_special_tokens=False)["input_ids"] == [1, 5]
    assert models.load_tokenizer(str(tiny_llama_dir)) is tok
    models.clear_model_cache()


@pytest.mark.slow
def test_default_model_load_draws_no_bars_in_a_log():
    """Issue 8: tqdm bars (transformers' "Converting and de-quantizing GGUF tensors", "Loading
    weights") became control-character soup in redirected logs. With stderr not a terminal the load
    prints no carriage return or escape sequence."""
    import subprocess
    import sys
    from pathlib import Path
    import os
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    r = subprocess.run([sys.executable, "-c", "from experiments.lm import models; models.load_model('default')"],
                       cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stderr and "\x1b" not in r.stderr, r.stderr[:500]
