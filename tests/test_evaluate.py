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


# --- per-window NLL and the paired metrics against a dense reference (issue 24) -----------------------

def _perturbed(model, scale=0.02, seed=0):
    import copy
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


def _exact_kl_per_window(dense, other, windows):
    with torch.no_grad():
        lp = torch.log_softmax(dense(windows, use_cache=False).logits[:, :-1].double(), -1)
        lq = torch.log_softmax(other(windows, use_cache=False).logits[:, :-1].double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean(1)


@pytest.mark.parametrize("batch_size", [1, 2], ids=lambda b: f"batch{b}")
def test_window_nll_is_each_windows_transformers_loss(tiny_llama, batch_size):
    windows = torch.randint(0, VOCAB, (5, 23), generator=torch.Generator().manual_seed(1))
    got = perplexity(tiny_llama, windows, batch_size=batch_size, progress=False)
    with torch.no_grad():
        want = [tiny_llama(w[None], labels=w[None], use_cache=False).loss.item() for w in windows]
    assert got["window_nll"] == pytest.approx(want, rel=1e-5)
    assert sum(got["window_nll"]) / 5 == pytest.approx(got["nll"], rel=1e-12)
    assert "window_kl" not in got, "no reference: no paired metrics"


def test_kl_over_every_token_equals_the_exact_kl(tiny_llama):
    """With k = vocabulary size the top-k + rest bins are every token: the exact KL(dense || other)."""
    from experiments.lm.evaluate import dense_reference
    windows = torch.randint(0, VOCAB, (4, 19), generator=torch.Generator().manual_seed(2))
    other = _perturbed(tiny_llama)
    ref = dense_reference(tiny_llama, windows, k=1000, progress=False)    # clipped to the vocabulary
    assert ref.k == VOCAB and torch.isinf(ref.rest_logprob).all()
    got = perplexity(other, windows, reference=ref, progress=False)["window_kl"]
    want = _exact_kl_per_window(tiny_llama, other, windows)
    assert got == pytest.approx(want.tolist(), rel=1e-4, abs=1e-9)
    assert min(got) > 0


@pytest.mark.parametrize("k", [1, 5, 30])
def test_kl_over_top_k_is_a_lower_bound_that_grows_with_k(tiny_llama, k):
    from experiments.lm.evaluate import dense_reference
    windows = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(3))
    other = _perturbed(tiny_llama)
    exact = _exact_kl_per_window(tiny_llama, other, windows)
    got = torch.tensor(perplexity(other, windows, reference=dense_reference(tiny_llama, windows, k=k, progress=False),
                                  progress=False)["window_kl"], dtype=torch.float64)
    more = torch.tensor(perplexity(other, windows, reference=dense_reference(tiny_llama, windows, k=k + 20,
                                                                             progress=False),
                                   progress=False)["window_kl"], dtype=torch.float64)
    assert (got >= 0).all() and (got <= exact * (1 + 1e-5)).all(), (got, exact)
    assert (more >= got * (1 - 1e-5)).all(), "merging fewer tokens into the rest bin cannot lower the bound"


def test_the_dense_model_against_itself_is_kl_0_top1_1_dnll_0(tiny_llama):
    from experiments.lm.evaluate import dense_reference, interval_columns
    windows = torch.randint(0, VOCAB, (4, 21), generator=torch.Generator().manual_seed(4))
    ref = dense_reference(tiny_llama, windows, progress=False)
    ev = perplexity(tiny_llama, windows, reference=ref, progress=False)
    assert ev["window_kl"] == [0.0] * 4 and ev["window_top1"] == [1.0] * 4
    assert ref.window_nll.tolist() == ev["window_nll"]
    cols = interval_columns(ev, ref)
    assert (cols["kl"], cols["kl_lo"], cols["kl_hi"]) == (0, 0, 0)
    assert (cols["top1"], cols["top1_lo"], cols["top1_hi"]) == (1, 1, 1)
    assert (cols["dnll"], cols["dnll_lo"], cols["dnll_hi"]) == (0, 0, 0)
    assert cols["ppl_lo"] < ev["ppl"] < cols["ppl_hi"]


def test_top1_is_agreement_with_the_dense_argmax(tiny_llama):
    from experiments.lm.evaluate import dense_reference, interval_columns
    windows = torch.randint(0, VOCAB, (3, 25), generator=torch.Generator().manual_seed(5))
    other = _perturbed(tiny_llama, scale=0.003)
    ev = perplexity(other, windows, reference=dense_reference(tiny_llama, windows, k=4, progress=False),
                    progress=False)
    with torch.no_grad():
        same = (tiny_llama(windows).logits[:, :-1].argmax(-1) == other(windows).logits[:, :-1].argmax(-1))
    assert ev["window_top1"] == pytest.approx(same.double().mean(1).tolist())
    assert 0 < min(ev["window_top1"]) and max(ev["window_top1"]) < 1
    dense = perplexity(tiny_llama, windows, progress=False)
    cols = interval_columns(ev, dense_reference(tiny_llama, windows, k=4, progress=False))
    assert cols["dnll"] == pytest.approx(ev["nll"] - dense["nll"], rel=1e-5)
    assert cols["dnll_lo"] <= cols["dnll"] <= cols["dnll_hi"]


def test_a_reference_of_other_windows_is_refused(tiny_llama):
    from experiments.lm.evaluate import dense_reference
    windows = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    ref = dense_reference(tiny_llama, windows, progress=False)
    with pytest.raises(ValueError, match="reference was computed on other windows"):
        perplexity(tiny_llama, windows.flip(0), reference=ref, progress=False)
    with pytest.raises(ValueError, match="k .* must be a positive integer"):
        dense_reference(tiny_llama, windows, k=0, progress=False)


def test_reference_file_round_trip_size_and_damage(tiny_llama, tmp_path):
    from experiments.lm.evaluate import dense_reference, load_reference, save_reference
    windows = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(7))
    ref = dense_reference(tiny_llama, windows, k=8, progress=False)
    # The stated size: 8 k + 8 bytes per predicted token (+ 8 bytes of NLL per window).
    assert ref.nbytes() == (8 * 8 + 8) * 3 * 10 + 8 * 3
    path = save_reference(ref, tmp_path / "refs" / "r.pt")
    assert [p.name for p in path.parent.iterdir()] == ["r.pt"], "no temporary file left beside it"
    back = load_reference(path)
    assert back.windows_sha == ref.windows_sha
    for f in ("topk_ids", "topk_logprobs", "rest_logprob", "lse", "window_nll"):
        assert torch.equal(getattr(back, f), getattr(ref, f)), f
    assert back.topk_ids.dtype == torch.int32 and back.topk_logprobs.dtype == torch.float32
    assert load_reference(tmp_path / "missing.pt") is None
    torch.save({"format": -1}, tmp_path / "old.pt")
    assert load_reference(tmp_path / "old.pt") is None, "an older format is recomputed, not misread"
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt: not a dense reference"):
        load_reference(tmp_path / "junk.pt")
