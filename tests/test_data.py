"""Corpus sources, text splits and token windows.

Token-window tests use a character tokenizer, so they need no model; the corpus tests that run
apt-get/dpkg (first call only) are marked slow.
"""
import sys

import pytest
import torch

from experiments.lm import data


class CharTokenizer:
    """Byte-level stand-in for a HF tokenizer; prepends BOS (id 1) unless told not to, like HF."""

    name_or_path = "char-test"

    def __len__(self):
        return 256

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = list(text.encode("utf-8"))
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(40))


@pytest.fixture
def tok():
    return CharTokenizer()


# --- token windows --------------------------------------------------------------------------

def test_eval_tokens_are_consecutive_windows_without_bos(tok):
    windows = data.eval_tokens(tok, TEXT, max_tokens=3 * 37 + 5, seqlen=37)
    expected = torch.tensor(list(TEXT.encode()))[:3 * 37].view(3, 37)
    assert windows.dtype == torch.long and windows.shape == (3, 37)
    assert torch.equal(windows, expected)


def test_eval_tokens_all_windows(tok):
    windows = data.eval_tokens(tok, TEXT, max_tokens=None, seqlen=100)
    assert windows.shape == (len(TEXT.encode()) // 100, 100)


@pytest.mark.parametrize("max_tokens,seqlen,match", [
    (10 ** 6, 64, r"only \d+ tokens.*max_tokens <= \d+"),
    (50, 64, "max_tokens=50 is smaller than seqlen=64"),
    (0, 64, "max_tokens must be a positive integer"),
    (128, 0, "seqlen must be a positive integer"),
], ids=["too-short", "budget-below-seqlen", "zero-budget", "zero-seqlen"])
def test_eval_tokens_errors_name_the_option(tok, max_tokens, seqlen, match):
    with pytest.raises(ValueError, match=match):
        data.eval_tokens(tok, TEXT, max_tokens=max_tokens, seqlen=seqlen)


def test_eval_tokens_too_short_reports_what_fits(tok):
    n = len(TEXT.encode())
    with pytest.raises(ValueError) as e:
        data.eval_tokens(tok, TEXT, max_tokens=n + 64, seqlen=64)
    assert f"has only {n} tokens" in str(e.value) and f"max_tokens <= {n // 64 * 64}" in str(e.value)


def test_calibration_batches_are_seeded_slices(tok):
    tokens = torch.tensor(list(TEXT.encode()))
    a = data.calibration_batches(tok, TEXT, n_samples=7, seqlen=33, seed=5)
    b = data.calibration_batches(tok, TEXT, n_samples=7, seqlen=33, seed=5)
    c = data.calibration_batches(tok, TEXT, n_samples=7, seqlen=33, seed=6)
    assert a.shape == (7, 33) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    windows = tokens.unfold(0, 33, 1)
    for row in a:
        assert (windows == row).all(dim=1).any(), "a calibration row is not a contiguous slice of the text"


def test_calibration_batches_too_short(tok):
    with pytest.raises(ValueError, match=r"fewer than seqlen=5000; use seqlen <= \d+"):
        data.calibration_batches(tok, TEXT, n_samples=2, seqlen=5000, seed=0)
    with pytest.raises(ValueError, match="n_samples"):
        data.calibration_batches(tok, TEXT, n_samples=0, seqlen=8, seed=0)


# --- text files ------------------------------------------------------------------------------

def test_text_file_split_is_disjoint_and_complete(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    calib, evaluation, desc = data.get_texts(text_file=str(path))
    assert calib + evaluation == TEXT
    assert calib.endswith("\n")
    assert 0.10 * len(TEXT) <= len(calib) < 0.10 * len(TEXT) + 60
    assert desc["corpus"].startswith("file:") and "10%" in desc["calibration"]


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    ("", "is empty"),
    ("   \n\n  ", "is empty"),
    ("ab", "too short"),
    ("one line\n", "too short"),
], ids=["missing", "empty", "whitespace", "two-chars", "one-line"])
def test_text_file_errors(tmp_path, content, match):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"--text-file.*{match}"):
        data.get_texts(text_file=str(path))


def test_unknown_source_lists_accepted():
    with pytest.raises(ValueError, match="austen, wikitext2"):
        data.get_texts("ptb")
    with pytest.raises(ValueError, match="only bundled corpus is 'austen'"):
        data.load_corpus("ptb")


def test_wikitext_without_datasets_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(RuntimeError, match="pip install datasets"):
        data.get_texts("wikitext2")


def test_missing_apt_gives_manual_command(tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get download r-cran-janeaustenr"):
        data.load_corpus(cache_dir=tmp_path)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TKR_CACHE", str(tmp_path))
    assert data.cache_root() == tmp_path
    monkeypatch.delenv("TKR_CACHE")
    assert data.cache_root().name == "triton-kernels-research"


def test_default_split_is_disjoint():
    split = data.default_split()
    titles = set(data.AUSTEN_NOVELS.values())
    assert set(split) == {"calibration", "evaluation", "evaluation2"}
    for a in split:
        assert set(split[a]) <= titles and split[a]
        for b in split:
            assert a == b or not set(split[a]) & set(split[b]), (a, b)
    assert split["evaluation2"] == ["Emma"]


def test_text_file_and_wikitext_have_no_second_text(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    assert data.second_evaluation_text(text_file=f) is None
    assert data.second_evaluation_text(source="wikitext2") is None
    with pytest.raises(ValueError, match="source='ptb' is not known"):
        data.second_evaluation_text(source="ptb")


# --- the real corpus (apt-get + dpkg on first use) --------------------------------------------

@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tkr-cache")


@pytest.mark.slow
def test_austen_corpus_extracts_and_caches(corpus_dir, monkeypatch):
    novels = data.load_corpus(cache_dir=corpus_dir)
    assert list(novels) == list(data.AUSTEN_NOVELS.values())
    words = {title: len(text.split()) for title, text in novels.items()}
    # Word counts as published for the package (PLATFORM.md): 717k in total, Emma 157k.
    assert 715_000 < sum(words.values()) < 720_000, words
    assert 156_000 < words["Emma"] < 158_000, words
    assert novels["Pride and Prejudice"].startswith("PRIDE AND PREJUDICE\n")
    assert "It is a truth universally acknowledged" in novels["Pride and Prejudice"][:400]

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a cached corpus must not run apt-get or dpkg")

    monkeypatch.setattr(data.subprocess, "run", no_subprocess)
    assert data.load_corpus(cache_dir=corpus_dir) == novels
    assert sorted(p.name for p in (corpus_dir / "austen").iterdir()) == sorted(
        f"{k}.txt" for k in data.AUSTEN_NOVELS)


@pytest.mark.slow
def test_austen_texts_follow_default_split(corpus_dir):
    calib, evaluation, desc = data.get_texts("austen", cache_dir=corpus_dir)
    novels = data.load_corpus(cache_dir=corpus_dir)
    assert evaluation == novels["Pride and Prejudice"]
    assert novels["Sense and Sensibility"] in calib and novels["Pride and Prejudice"] not in calib
    assert novels["Emma"] not in calib
    assert desc["evaluation"] == "Pride and Prejudice"


@pytest.mark.slow
def test_calibration_windows_never_overlap_either_evaluation_text(corpus_dir):
    """By novel (the texts share none) and by token windows: no calibration window of the default
    settings (full and quick: 16 x 512 and 4 x 256 tokens, seed 0; here bytes, as the char tokenizer
    makes them) occurs in the evaluation text or the second one, and no evaluation window in the
    calibration text."""
    calib, evaluation, desc = data.get_texts("austen", cache_dir=corpus_dir)
    name2, evaluation2 = data.second_evaluation_text("austen", cache_dir=corpus_dir)
    novels = data.load_corpus(cache_dir=corpus_dir)
    assert name2 == "Emma" and evaluation2 == novels["Emma"]
    assert name2 not in desc["calibration"] and name2 not in desc["evaluation"]
    for title in data.default_split()["calibration"]:
        assert novels[title] in calib and novels[title] not in evaluation + evaluation2
    tok = CharTokenizer()

    def text(ids):
        return bytes(ids.tolist()).decode("utf-8", errors="strict")

    for n, seqlen in ((16, 512), (4, 256)):
        for w in data.calibration_batches(tok, calib, n_samples=n, seqlen=seqlen, seed=0):
            piece = bytes(w.tolist())
            assert piece not in evaluation.encode() and piece not in evaluation2.encode()
        for ev in (evaluation, evaluation2):
            for w in data.eval_tokens(tok, ev, max_tokens=8192, seqlen=seqlen):
                assert bytes(w.tolist()) not in calib.encode()
    assert text(data.eval_tokens(tok, evaluation2, max_tokens=256, seqlen=256)[0]).startswith(evaluation2[:200])
