"""The zero-shot multiple-choice task (``experiments.lm.tasks``): construction is deterministic and stays in
held-out text, the cached batched scoring equals a plain per-candidate loop on a tiny random Llama, the
accuracy and its Wilson interval are computed as stated, and bad arguments fail naming themselves."""
import math
import random
import re

import pytest
import torch

from experiments.lm import data, tasks
from tests.tiny_model import WORDS, build_tiny

NAMES = ("Elinor", "Emma", "Darcy", "Anne")


def synthetic_text(paragraphs: int = 120, seed: int = 0) -> str:
    """Paragraphs of 2-4 sentences, each a name then 5-13 words from the tiny vocabulary and a full
    stop, lines wrapped at 60 characters as the novels are."""
    rng = random.Random(seed)
    lower = [w for w in WORDS if w.islower()]
    paras = []
    for _ in range(paragraphs):
        sents = [" ".join([rng.choice(NAMES)] + [rng.choice(lower) for _ in range(rng.randint(5, 13))]) + "."
                 for _ in range(rng.randint(2, 4))]
        words, lines, line = " ".join(sents).split(), [], ""
        for w in words:
            if len(line) + len(w) > 60:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        paras.append("\n".join(lines + [line]))
    return "\n\n".join(paras)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir, _, _ = build_tiny(tmp_path_factory.mktemp("tiny"), "name: unused\npoints: [{method: dense}]\n")
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


# ------------------------------------------------------------------------------------ construction

def test_sentences_and_normalise():
    norm = tasks.normalise('First line\nwrapped.  Mr. Knightley came "Yes!" she said. _Why_ not?\n\n\n'
                           'Second para. "Quoted," he said.\n')
    assert norm == 'First line wrapped. Mr. Knightley came "Yes!" she said. _Why_ not?\n\nSecond para. "Quoted," he said.'
    got = [(norm[s:e], p) for s, e, p in tasks.sentences(norm)]
    assert got == [("First line wrapped.", 0), ('Mr. Knightley came "Yes!" she said.', 0), ("_Why_ not?", 0),
                   ("Second para.", 1), ('"Quoted," he said.', 1)]


def test_same_seed_same_items_other_seed_other_items(tiny):
    tok, text = tiny[1], synthetic_text()
    kw = dict(n_items=30, k=4, context_tokens=40)
    a = tasks.build_task(tok, text, seed=0, **kw)
    tasks.clear_cache()
    b = tasks.build_task(tok, text, seed=0, **kw)
    assert a is not b
    for name in ("context", "candidates", "cand_len", "cand_chars", "label"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.texts == b.texts and a.target_spans == b.target_spans
    c = tasks.build_task(tok, text, seed=1, **kw)
    assert c.target_spans != a.target_spans
    assert tasks.build_task(tok, text, seed=0, **kw) is b       # the in-memory cache answers a repeat
    # Fewer items are the first items of more (so n_items can be cut without changing the items kept).
    d = tasks.build_task(tok, text, seed=0, **{**kw, "n_items": 12})
    assert d.texts == a.texts[:12] and torch.equal(d.label, a.label[:12]) and torch.equal(d.context, a.context[:12])


def test_items_are_built_as_documented(tiny):
    _, tok = tiny
    text = synthetic_text()
    norm = tasks.normalise(text)
    items = tasks.build_task(tok, text, n_items=40, k=3, seed=2, context_tokens=30)
    assert items.context.shape == (40, 30) and items.candidates.shape[:2] == (40, 3) and items.k == 3
    assert items.settings == {"task": "sentence-ending", "n_items": 40, "k": 3, "seed": 2, "context_tokens": 30}
    sents = tasks.sentences(norm)
    for i, ((ctx, options), (s, e)) in enumerate(zip(items.texts, items.target_spans)):
        true = options[int(items.label[i])]
        assert true == norm[s:e] and norm[:s].rstrip().endswith(ctx)   # the true ending follows its context
        assert norm[s - 1] == " "                                      # ... after one space, as every candidate
        # It is the second half (by words) of the sentence the context stops in.
        ss, se, _ = next(x for x in sents if x[0] < s < x[1])
        assert e == se and len(norm[s:se].split()) == len(norm[ss:se].split()) // 2
        assert re.fullmatch(r"[a-z ]+\.", true)
        assert len(set(options)) == 3 and all(o in norm for o in options)
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        assert items.context[i].tolist() == ctx_ids[-30:]
        true_len = int(items.cand_len[i, int(items.label[i])])
        assert tasks.MIN_CANDIDATE_TOKENS <= true_len <= tasks.MAX_CANDIDATE_TOKENS
        for j, o in enumerate(options):
            n = int(items.cand_len[i, j])
            whole = tok(ctx + " " + o, add_special_tokens=False)["input_ids"]
            assert items.candidates[i, j, :n].tolist() == whole[len(ctx_ids):]          # lm-eval's pair encoding
            assert not items.candidates[i, j, n:].any() and int(items.cand_chars[i, j]) == len(o)
            assert abs(n - true_len) <= max(2, math.ceil(tasks.LENGTH_TOLERANCE * true_len))   # similar lengths
    assert sorted(set(items.label.tolist())) == [0, 1, 2]


def test_task_text_is_the_second_half_of_emma_never_calibration_or_evaluation(monkeypatch):
    novels = {title: synthetic_text(60, seed=i) for i, title in enumerate(data.AUSTEN_NOVELS.values())}
    monkeypatch.setattr(data, "load_corpus", lambda name="austen", cache_dir=None: novels)
    text, desc = tasks.default_task_text()
    emma = novels["Emma"]
    start = tasks.task_held_out_start(emma)
    assert text == emma[start:] and start >= len(emma) // 2 and emma[start - 2:start] == "\n\n"
    assert f"characters {start}..{len(emma)}" in desc["task_text"]
    split = data.default_split()
    assert "Emma" not in split["calibration"] + split["evaluation"]


@pytest.mark.slow
def test_real_items_never_overlap_calibration_or_evaluation_text():
    """Every item of the default task (real corpus and tokenizer) is Emma's second half: its context end
    and its true candidate occur there and nowhere in the calibration or evaluation text."""
    text, _ = tasks.default_task_text()
    calib, evaluation, _ = data.get_texts("austen")
    emma = data.load_corpus()["Emma"]
    first_half = tasks.normalise(emma[:tasks.task_held_out_start(emma)])
    others = [tasks.normalise(calib), tasks.normalise(evaluation), first_half]
    norm = tasks.normalise(text)
    from experiments.lm.models import load_tokenizer
    items = tasks.build_task(load_tokenizer("default"), text, n_items=4 * tasks.TASK_N_ITEMS, k=tasks.TASK_K,
                             context_tokens=tasks.TASK_CONTEXT_TOKENS)
    for i, (ctx, options) in enumerate(items.texts):
        passage = ctx[-80:] + " " + options[int(items.label[i])]
        assert passage in norm
        assert not any(passage in o for o in others), passage


# ---------------------------------------------------------------------------------------- scoring

def test_cached_batched_scoring_equals_the_plain_loop(tiny):
    model, tok = tiny
    items = tasks.build_task(tok, synthetic_text(), n_items=12, k=4, seed=0, context_tokens=24)
    ref = tasks.candidate_loglik_reference(model, items)
    for batch_size in (1, 5, 12):
        got, forwarded = tasks.candidate_loglik(model, items, batch_size=batch_size)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
        assert forwarded >= items.context.numel() + int(items.cand_len.sum())
    assert forwarded == items.context.numel() + 4 * int(items.cand_len.max(1).values.max()) * 12  # one batch


def test_scoring_a_model_with_dropped_blocks(tiny):
    """The KV cache of a model whose blocks were removed (layer_idx renumbered) still scores correctly."""
    import copy

    from experiments.methods.compress import compress_model
    model, tok = tiny
    pruned = copy.deepcopy(model)
    compress_model(pruned, {"method": "layers", "criterion": "last", "blocks": 1}, None, progress=False)
    assert pruned.config.num_hidden_layers == 1
    items = tasks.build_task(tok, synthetic_text(), n_items=6, k=3, seed=0, context_tokens=16)
    torch.testing.assert_close(tasks.candidate_loglik(pruned, items, batch_size=4)[0],
                               tasks.candidate_loglik_reference(pruned, items), rtol=1e-5, atol=1e-4)


def test_score_task_reports_accuracy_with_wilson_intervals(tiny):
    model, tok = tiny
    items = tasks.build_task(tok, synthetic_text(), n_items=10, k=2, seed=0, context_tokens=16)
    model.train()
    r = tasks.score_task(model, items, batch_size=4)
    assert model.training                      # restored
    ll = tasks.candidate_loglik_reference(model, items)
    hits = int((ll.argmax(-1) == items.label).sum())
    assert r["acc"] == hits / 10 and (r["acc_lo"], r["acc_hi"]) == tasks.wilson_interval(hits, 10)
    norm_hits = int(((ll / items.cand_chars.double()).argmax(-1) == items.label).sum())
    assert r["acc_norm"] == norm_hits / 10
    assert (r["n"], r["k"], r["chance"]) == (10, 2, 0.5) and r["tokens_forwarded"] > 0 and r["seconds"] >= 0
    assert torch.equal(tasks.decode_correct(r["correct"], 10), ll.argmax(-1) == items.label)
    assert int(tasks.decode_correct(r["correct_norm"], 10).sum()) == norm_hits
    cols = tasks.task_columns(r)
    assert cols["task_acc"] == r["acc"] and cols["task_n"] == 10 and cols["task_correct"] == r["correct"]
    assert "task_acc_norm_hi" in cols and "task_seconds" in cols


def test_per_item_answers_round_trip():
    for n in (1, 3, 4, 5, 17):
        for seed in range(3):
            right = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
            code = tasks.encode_correct(right)
            assert len(code) == -(-n // 4) and torch.equal(tasks.decode_correct(code, n), right)
    assert tasks.encode_correct(torch.tensor([True, False, False, False, True])) == "11"
    with pytest.raises(ValueError, match=r"code must be a hex string of 2 digits for n=5 items, got 'f'"):
        tasks.decode_correct("f", 5)
    with pytest.raises(ValueError, match=r"sets bits beyond n=5"):
        tasks.decode_correct("f3", 5)


def test_acc_norm_divides_by_characters(tiny):
    items = tasks.build_task(tiny[1], synthetic_text(), n_items=4, k=2, seed=0, context_tokens=20)
    chars = items.cand_chars.double()
    # Log-likelihoods proportional to length, the true one slightly better per character: acc_norm is
    # right everywhere; raw acc picks the longer candidate.
    per_char = torch.full((4, 2), -2.0, dtype=torch.float64)
    per_char[torch.arange(4), items.label] = -1.9
    r = tasks.accuracy(per_char * chars, items)
    assert r["acc_norm"] == 1.0
    # Raw acc compares summed log-likelihoods: the true candidate wins only where it is not much longer.
    assert r["acc"] == float(((per_char * chars).argmax(-1) == items.label).double().mean())
    flat = tasks.accuracy(torch.where(torch.nn.functional.one_hot(items.label, 2).bool(), -1.0, -2.0).double(), items)
    assert flat["acc"] == 1.0 and flat["acc_norm"] == float(
        ((torch.where(torch.nn.functional.one_hot(items.label, 2).bool(), -1.0, -2.0) / chars).argmax(-1)
         == items.label).double().mean())


def test_wilson_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for hits, n in ((0, 10), (3, 10), (10, 10), (57, 200), (150, 200)):
        ci = stats.binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert tasks.wilson_interval(hits, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


# ------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kw, match", [
    ({"n_items": 0}, r"n_items must be an integer >= 1, got 0"),
    ({"k": 1}, r"k must be an integer >= 2, got 1"),
    ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
    ({"context_tokens": 0}, r"context_tokens must be an integer >= 1, got 0"),
    ({"n_items": True}, r"n_items must be an integer >= 1, got True"),
    ({"n_items": 100000}, r"n_items=100000: the text holds only \d+ eligible items .* use n_items <= \d+"),
    ({"context_tokens": 10 ** 6}, r"n_items=10: the text holds only 0 eligible items"),
    ({"k": 5000}, r"k=5000: the candidate at characters \d+\.\.\d+ of the text has only \d+ distractor"),
], ids=["n_items", "k", "seed", "context", "bool", "too-many", "context-too-long", "k-too-large"])
def test_bad_build_arguments_name_themselves(tiny, kw, match):
    args = {"n_items": 10, "k": 4, "seed": 0, "context_tokens": 20, **kw}
    with pytest.raises(ValueError, match=match):
        tasks.build_task(tiny[1], synthetic_text(), **args)


def test_bad_text_and_scoring_arguments(tiny):
    with pytest.raises(ValueError, match=r"text must be a non-empty string"):
        tasks.build_task(tiny[1], "  \n")
    model, tok = tiny
    items = tasks.build_task(tok, synthetic_text(), n_items=2, k=2, seed=0, context_tokens=8)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        tasks.score_task(model, items, batch_size=0)
    with pytest.raises(TypeError, match=r"items must be TaskItems from build_task, got dict"):
        tasks.score_task(model, {"context": None})
    with pytest.raises(ValueError, match=r"successes must lie in 0\.\.n=3, got 4"):
        tasks.wilson_interval(4, 3)
