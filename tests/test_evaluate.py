"""Perplexity over non-overlapping windows against transformers' own loss on the same windows."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from experiments.lm.evaluate import perplexity  # noqa: E402

VOCAB = 101


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _hf_perplexity(model, windows):
    """transformers' mean loss per window, weighted by its seqlen-1 predicted tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            loss = model(w[None], labels=w[None], use_cache=False).loss
            total += loss.item() * (w.numel() - 1)
            count += w.numel() - 1
    return math.exp(total / count), count


@pytest.mark.parametrize("batch_size", [1, 2, 5], ids=lambda b: f"batch{b}")
def test_perplexity_matches_transformers_loss(tiny_llama, batch_size):
    windows = torch.randint(0, VOCAB, (5, 23), generator=torch.Generator().manual_seed(1))
    want, count = _hf_perplexity(tiny_llama, windows)
    got = perplexity(tiny_llama, windows, batch_size=batch_size, progress=False)
    assert got["n_tokens"] == count == 5 * 22
    rel = abs(got["ppl"] - want) / want
    assert rel < 1e-5, f"ppl {got['ppl']:.8g} vs transformers {want:.8g} (rel {rel:.3g})"
    assert got["nll"] == pytest.approx(math.log(got["ppl"]))
    assert got["seconds"] > 0


def test_perplexity_random_model_is_near_vocab_size(tiny_llama):
    """A random init predicts roughly uniformly: ppl within a factor 2 of the vocabulary size."""
    windows = torch.randint(0, VOCAB, (2, 31), generator=torch.Generator().manual_seed(2))
    ppl = perplexity(tiny_llama, windows, progress=False)["ppl"]
    assert VOCAB / 2 < ppl < VOCAB * 2


def test_perplexity_restores_training_mode(tiny_llama):
    tiny_llama.train()
    try:
        perplexity(tiny_llama, torch.randint(0, VOCAB, (1, 8)), progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


@pytest.mark.parametrize("windows,kwargs,exc,match", [
    (torch.zeros(8, dtype=torch.long), {}, TypeError, "2-D LongTensor"),
    (torch.zeros(2, 8), {}, TypeError, "2-D LongTensor"),
    (torch.zeros(2, 1, dtype=torch.long), {}, ValueError, "at least 2 tokens"),
    (torch.zeros(2, 8, dtype=torch.long), {"batch_size": 0}, ValueError, "batch_size"),
], ids=["1d", "float", "seqlen1", "batch0"])
def test_perplexity_bad_input(tiny_llama, windows, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        perplexity(tiny_llama, windows, progress=False, **kwargs)


@pytest.mark.slow
def test_default_model_baseline_perplexity_is_sane():
    """Real model, 4 windows of 512 tokens of Pride and Prejudice: far better than shuffled text."""
    from experiments.lm import data, models

    model, tok, _ = models.load_model("default", cache=False)
    _, evaluation, _ = data.get_texts("austen")
    windows = data.eval_tokens(tok, evaluation, max_tokens=2048, seqlen=512)
    real = perplexity(model, windows, progress=False)
    head = windows[:2].flatten()  # two windows are enough to see the gap and halve the cost
    shuffled = head[torch.randperm(head.numel(), generator=torch.Generator().manual_seed(0))]
    scrambled = perplexity(model, shuffled.view(2, -1), progress=False)
    assert real["n_tokens"] == 4 * 511
    # English prose with a 135M model: tens, not hundreds; shuffled tokens cost an order of magnitude.
    assert 5 < real["ppl"] < 100, real
    assert scrambled["ppl"] > 10 * real["ppl"], (real, scrambled)


def test_nonfinite_outputs_are_located(tiny_llama):
    """A NaN weight in one layer: the perplexity is NaN, the batch is reported, and nonfinite_origin
    names that layer (the first module whose output is not finite, its inputs finite)."""
    import copy

    from experiments.lm.evaluate import nonfinite_origin
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    windows = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    got = perplexity(model, windows, progress=False)
    assert math.isnan(got["ppl"]) and got["nonfinite_batch"] == 0
    assert nonfinite_origin(model, windows[:1]) == "model.layers.1.self_attn.o_proj (Linear), from finite inputs"
    assert not any(m._forward_hooks for m in model.modules())   # the hooks are removed
    assert perplexity(tiny_llama, windows, progress=False)["nonfinite_batch"] is None
    assert nonfinite_origin(tiny_llama, windows[:1]) is None


def test_a_loss_too_large_for_exp_is_an_infinite_perplexity():
    """A finite mean NLL beyond exp's range (about 709.8) gives ppl = inf, not an OverflowError."""
    class Huge(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            logits = torch.zeros(*input_ids.shape, 4)
            logits[..., 0] = 1e4   # every target is another token: NLL 1e4 per token
            return type("Out", (), {"logits": logits})()
    got = perplexity(Huge(), torch.full((2, 5), 1, dtype=torch.long), progress=False)
    assert got["nll"] == pytest.approx(1e4) and got["ppl"] == math.inf and got["nonfinite_batch"] is None
