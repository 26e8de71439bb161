"""experiments.core.progress: tqdm on a terminal, plain lines in a redirected log; stdout carries only products.

Issue 8: tqdm bars turned into control-character soup in redirected logs, long steps were silent,
and status lines and paths went to different streams in no fixed order.
"""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.core.progress import LineProgress, progress_bar

REPO = Path(__file__).resolve().parent.parent


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _progress_env(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("TKR_PROGRESS_INTERVAL", raising=False)


def test_redirected_stream_gets_plain_lines_without_control_characters(monkeypatch):
    monkeypatch.setenv("TKR_PROGRESS_INTERVAL", "0")  # a line at every update
    out = io.StringIO()
    bar = progress_bar(range(5), desc="compress x", unit="block", stream=out)
    assert isinstance(bar, LineProgress)
    assert list(bar) == [0, 1, 2, 3, 4]
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "[compress x] 0/5 block"
    assert lines[1].startswith("[compress x] 1/5 block, ") and "left" in lines[1]
    assert lines[-1].startswith("[compress x] done: 5/5 block, ")
    assert len(lines) == 1 + 4 + 1  # start, updates 1..4 (the last update is the done line), done


def test_lines_are_rate_limited_by_the_interval():
    out = io.StringIO()
    bar = LineProgress(total=1000, desc="p", unit="it", stream=out, interval=3600)
    for _ in range(1000):
        bar.update()
    bar.close()
    assert out.getvalue().splitlines() == ["[p] 0/1000 it", out.getvalue().splitlines()[1]]
    assert out.getvalue().splitlines()[1].startswith("[p] done: 1000/1000 it")


def test_inner_bars_without_leave_only_print_periodic_lines(monkeypatch):
    monkeypatch.setenv("TKR_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    for _ in progress_bar(range(3), desc="perplexity", unit="batch", leave=False, stream=out):
        pass
    assert out.getvalue().splitlines() == ["[perplexity] 1/3 batch, 0 s, ~0 s left",
                                           "[perplexity] 2/3 batch, 0 s, ~0 s left"]


def test_disabled_and_tqdm_disable_print_nothing(monkeypatch):
    out = io.StringIO()
    list(progress_bar(range(3), desc="x", stream=out, enabled=False))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    list(progress_bar(range(3), desc="x", stream=_Tty()))
    list(progress_bar(range(3), desc="x", stream=out))
    assert out.getvalue() == ""


def test_terminal_gets_a_tqdm_bar():
    from tqdm import tqdm
    tty = _Tty()
    bar = progress_bar(total=3, desc="sweep points", unit="point", stream=tty)
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.close()
    assert "sweep points" in tty.getvalue()


def test_cli_run_redirected_log_is_plain_and_stdout_holds_only_paths(tmp_path):
    """`python -m experiments run ... > paths 2> log`: stdout is exactly the tables written, stderr has
    status and plain progress lines (no carriage returns or escape sequences, also none from the
    transformers/huggingface_hub bars shown while loading)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "model")
    cfg = LlamaConfig(vocab_size=41, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text("\n".join(" ".join(words[(i * 7 + j) % 40] for j in range(10))
                                                  for i in range(300)))
    (tmp_path / "s.yaml").write_text(
        "name: s\nsettings: {seqlen: 32, eval_tokens: 128, calib_samples: 2, calib_seqlen: 32, seed: 0}\n"
        "points: [{method: dense}, {method: rtn, bits: 4, group_size: 32}, {method: wanda, pattern: '2:4'}]\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TKR_PROGRESS_INTERVAL="0")
    env.pop("TQDM_DISABLE", None)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "experiments", "run", str(tmp_path / "s.yaml"), "--model",
                        str(tmp_path / "model"), "--text-file", str(tmp_path / "text.txt"), "--out-dir",
                        str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(tmp_path / "out" / "sweep_s.csv")]
    assert "\r" not in r.stderr and "\x1b" not in r.stderr, r.stderr[:2000]
    err = r.stderr.splitlines()
    assert "[sweep points] 0/3 point" in err
    assert any(line.startswith("[sweep points] done: 3/3 point") for line in err)
    assert any(line.startswith("[compress wanda-2:4] 1/2 block") for line in err)
    assert any(line.startswith("[perplexity] 1/4 batch") for line in err)
