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
