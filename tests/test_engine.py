"""llama.cpp as the engine (experiments/io/engine.py): the perplexity it reads from the engine's logits, the
interleaved decode timing, the speedup columns, the missing-binding error; and, where llama-cpp-python is
installed (the `engines` extra, `make engines`), an exported 4-bit point of the default model scored in the
engine on the toolkit's windows, agreeing with the toolkit's perplexity."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from experiments.core.errors import SetupError
from experiments.io import engine


class FakeLlama:
    """What engine.py uses of llama_cpp.Llama: reset, eval (appending positions), scores, n_tokens."""

    def __init__(self, vocab: int = 11, seed: int = 0, log: list | None = None, name: str = ""):
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)).numpy()
        self.scores = np.zeros((256, vocab), dtype=np.float32)
        self.n_tokens = 0
        self.log, self.name = log, name

    def reset(self):
        self.n_tokens = 0

    def eval(self, tokens):
        for t in tokens:
            self.scores[self.n_tokens] = self.table[t]   # logits depend on the last token only
            self.n_tokens += 1
        if self.log is not None:
            self.log.append((self.name, len(tokens)))


def test_engine_perplexity_is_the_mean_next_token_nll_of_its_logits():
    llm = FakeLlama()
    windows = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(1))
    got = engine.engine_perplexity(llm, windows)
    lp = torch.log_softmax(torch.from_numpy(llm.table).double(), dim=-1)
    want = [float(-lp[w[:-1], w[1:]].mean()) for w in windows]
    # The engine's logits are fp32 and their log-sum-exp is taken in fp32: ~1e-7 relative of the fp64 reference.
    assert got["window_nll"] == pytest.approx(want, rel=1e-6)
    assert got["nll"] == pytest.approx(sum(want) / 3, rel=1e-6) and got["ppl"] == pytest.approx(np.exp(got["nll"]))
    with pytest.raises(ValueError, match="windows must be"):
        engine.engine_perplexity(llm, torch.zeros(5, dtype=torch.long))


def test_decode_is_greedy_warmed_up_and_interleaved():
    log: list = []
    models = {"a": FakeLlama(seed=0, log=log, name="a"), "b": FakeLlama(seed=1, log=log, name="b")}
    decoders = {k: engine.llama_decoder(m, [1, 2, 3], 4) for k, m in models.items()}
    out = engine.interleaved_decode(decoders, new_tokens=4, repeats=2, progress=False)
    # Per model and run: the prompt (3 tokens), then 4 one-token steps; warm-ups a, b, then rounds a, b, a, b.
    prompts = [name for name, n in log if n == 3]
    assert prompts == ["a", "b", "a", "b", "a", "b"]
    assert sum(1 for _, n in log if n == 1) == 6 * 4
    table = models["a"].table
    tok, want = 3, []
    for _ in range(4):
        tok = int(table[tok].argmax())
        want.append(tok)
    assert out["a"]["tokens"] == want
    assert out["a"]["tokens_per_s"] == pytest.approx(4 / out["a"]["seconds_median"])


def test_speedups_are_ratios_of_the_same_run():
    """Each engine's rows against that engine's dense rows; the toolkit's rows also against llama.cpp's
    file of the same point and its Q4_0 file."""
    tk = engine.TOOLKIT_ENGINE
    rows = [{"label": "dense F16", "dense": True, "tokens_per_s": 50.0, "point": "dense 16-bit"},
            {"label": "dense F32", "dense": True, "tokens_per_s": 40.0, "point": "dense 32-bit"},
            {"label": "rtn-w4-g64-asym", "dense": False, "tokens_per_s": 250.0, "point": "rtn-w4-g64-asym",
             "gguf_types": "Q4_1:210 F32:61"},
            {"label": "rtn-w4-g32-sym", "dense": False, "tokens_per_s": 300.0, "point": "rtn-w4-g32-sym",
             "gguf_types": "Q4_0:210 F32:61"},
            {"label": "toolkit dense bf16", "engine": tk, "dense": True, "tokens_per_s": 20.0, "point": "dense 16-bit"},
            {"label": "toolkit dense fp32", "engine": tk, "dense": True, "tokens_per_s": 25.0, "point": "dense 32-bit"},
            {"label": "toolkit rtn-w4-g64-asym bf16", "engine": tk, "dense": False, "tokens_per_s": 100.0,
             "point": "rtn-w4-g64-asym"}]
    engine.with_speedups(rows)
    assert [r["speedup_vs_f16"] for r in rows[:4]] == [1.0, 0.8, 5.0, 6.0]
    assert rows[2]["speedup_vs_fastest_dense"] == 5.0 and rows[2]["fastest_dense_label"] == "dense F16"
    assert [r["speedup_vs_fastest_dense"] for r in rows[4:]] == [0.8, 1.0, 4.0]
    assert rows[6]["fastest_dense_label"] == "toolkit dense fp32" and rows[6]["speedup_vs_f16"] == ""
    assert rows[6]["fraction_of_engine"] == pytest.approx(0.4) and rows[6]["fraction_of_engine_q4_0"] == pytest.approx(1 / 3)
    assert rows[4]["fraction_of_engine"] == pytest.approx(0.4) and "fraction_of_engine" not in rows[0]


def test_spec_text_is_the_json_of_a_parsed_spec_or_the_string_given():
    from experiments.methods.compress import parse_spec
    assert engine.spec_text('{"method": "dense"}') == '{"method": "dense"}'
    text = engine.spec_text(parse_spec({"method": "rtn", "bits": 4, "group_size": 64}))
    assert json.loads(text)["bits"] == 4 and text == json.dumps(json.loads(text), sort_keys=True)


def test_same_prefix_counts_leading_equal_tokens():
    assert engine.same_prefix([1, 2, 3, 4], [1, 2, 5, 4]) == 2
    assert engine.same_prefix([1, 2], [1, 2, 3]) == 2 and engine.same_prefix([], [1]) == 0


def test_gguf_types_count_the_tensor_types():
    assert engine.gguf_types({"a": "Q4_1", "b": "Q4_1", "c": "F32"}) == "Q4_1:2 F32:1"


def test_a_missing_binding_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(SetupError, match="make engines"):
        engine.load_engine()


def test_bad_counts_are_refused(monkeypatch):
    fake = types.SimpleNamespace(__version__="0", llama_print_system_info=lambda: b"AVX = 1")
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    with pytest.raises(ValueError, match="repeats=0 must be a positive integer"):
        engine.run_engine([], repeats=0)


def _have_engine() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _have_engine(), reason="llama-cpp-python is not installed (the engines extra: make engines)")
def test_an_exported_point_scores_in_the_engine_as_in_the_toolkit(tmp_path, monkeypatch):
    """RTN 4-bit g32 asymmetric exports as Q4_1 (zeros rounded to fp16) and llama.cpp quantizes activations
    to 8 bits in its dot products: its perplexity on the same windows must agree with the toolkit's within
    1% (measured on the default model: see results/engine_cpu.csv), and the engine must decode the file."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from experiments.io.export_gguf import export_gguf
    from experiments.lm import data, evaluate, models
    from experiments.methods.compress import compress_model
    model, tokenizer, _ = models.load_model("default")
    compress_model(model, {"method": "rtn", "bits": 4, "group_size": 32}, None, progress=False)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, source=models.default_gguf_path())
    _, text, _ = data.get_texts()
    windows = data.eval_tokens(tokenizer, text, max_tokens=2 * 128, seqlen=128)
    ours = evaluate.perplexity(model, windows, progress=False)
    llm = engine.open_model(path, threads=torch.get_num_threads(), n_ctx=128)
    theirs = engine.engine_perplexity(llm, windows)
    assert abs(theirs["nll"] - ours["nll"]) < 0.01, (theirs["ppl"], ours["ppl"])
    out = engine.interleaved_decode({"m": engine.llama_decoder(llm, tokenizer("It is a truth")["input_ids"], 4)},
                                    new_tokens=4, repeats=1, progress=False)
    assert out["m"]["tokens_per_s"] > 0 and len(out["m"]["tokens"]) == 4
