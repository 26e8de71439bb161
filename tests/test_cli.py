"""The command line on a tiny random Llama saved to a temporary directory, with generated text.

Runs ``python -m experiments`` as a subprocess, as a user would: ``list``, ``run`` (full and
--quick), bad input (exit 2, one ``error:`` line, no result row), and resumption after ``kill -9``
mid-sweep (no duplicate, lost or half-written row; the final table equals an uninterrupted run).
"""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny_model import build_tiny

REPO = Path(__file__).resolve().parent.parent
# The word list of this file's runs (with "would" twice: it weights the generated text).
WORDS = ("the a of and to in was her she he it that not be as with had for his you my at but is on "
         "have all by so which this were very no said from they or been would would there an one "
         "could much more must what will than when who any such only Elinor Emma Darcy Anne").split()

TINY_SWEEP = """\
name: tiny
description: tiny test sweep
settings: {seqlen: 32, eval_tokens: 256, calib_samples: 4, calib_seqlen: 32, seed: 0}
points:
  - {method: dense}
  - {method: rtn, bits: 4, group_size: 32}
  - {method: gptq, bits: 3, group_size: 32}
  - {method: gptq, bits: 3, group_size: 32, act_order: true}
  - {method: wanda, pattern: "2:4"}
  - {method: sparsegpt, pattern: "2:4"}
  - {method: whitened_svd, ratio: 0.5}
  - {method: combo, steps: [{method: sparsegpt, pattern: "2:4"}, {method: gptq, bits: 4, group_size: 32}]}
quick:
  settings: {seqlen: 32, eval_tokens: 64, calib_samples: 2, calib_seqlen: 32, seed: 0}
  points: [{method: dense}, {method: rtn, bits: 4, group_size: 32}]
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, text file, sweep file): a random Llama with a word-level tokenizer saved with save_pretrained."""
    return build_tiny(tmp_path_factory.mktemp("tiny"), TINY_SWEEP, words=WORDS, trailing_newline=True)


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    # The modules' CPU backends, not the Triton interpreter: the CLI runs as a user would on a CPU.
    env.pop("TRITON_INTERPRET", None)
    return env


def cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "experiments", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_args(tiny, out, *extra):
    model, text, sweep = tiny
    return ["run", sweep, "--model", model, "--text-file", text, "--out-dir", out, "--no-progress", *extra]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_list_shows_every_sweep_with_counts():
    r = cli("list")
    assert r.returncode == 0, r.stderr
    for name in ("quant", "sparsity", "lowrank", "combo"):
        line = next(line for line in r.stdout.splitlines() if line.startswith(name))
        full, quick = map(int, line.split()[1:3])
        assert full > quick > 0


def test_run_quick_writes_one_row_per_point(tiny, tmp_path):
    r = cli(*run_args(tiny, tmp_path, "--quick"))
    assert r.returncode == 0, r.stderr
    table = rows(tmp_path / "quick" / "sweep_tiny.csv")
    assert not (tmp_path / "sweep_tiny.csv").exists(), "quick results must not mix with full ones"
    assert [t["point"] for t in table] == ["dense", "rtn-w4-g32-asym"]
    dense, rtn = table
    for col in ("ppl", "nll", "bytes", "fp16_bytes", "bits_per_weight", "compression_vs_fp16", "compress_seconds",
                "eval_seconds", "aliases_source_grid", "size_is_modelled", "model", "corpus", "git_commit",
                "device", "timestamp", "seed", "seqlen", "eval_tokens", "point_id", "module_backends"):
        assert col in rtn and rtn[col] != "", col
    assert float(dense["bits_per_weight"]) == 16 and float(rtn["bits_per_weight"]) == pytest.approx(5.0)
    assert int(rtn["eval_tokens"]) == 2 * 31  # two windows of 32, first token of each is context only
    assert float(rtn["ppl"]) != float(dense["ppl"])
    assert "QuantLinear:dequant" in rtn["module_backends"]


# Budgets the tiny text holds: the texts are checked before the model (and the layer shapes) load.
SMALL = "settings: {seqlen: 32, eval_tokens: 256, calib_samples: 2, calib_seqlen: 32}\n"


@pytest.mark.parametrize("extra, sweep_body, match", [
    (["--model", "/nonexistent/dir"], None, r"model spec '/nonexistent/dir'"),
    (["--text-file", "/nonexistent.txt"], None, r"--text-file '/nonexistent.txt' does not exist"),
    ([], "name: bad\n" + SMALL + "points: [{method: rtn, bits: 4, group_size: 128}]\n",
     r"group_size=128 is larger than the layer's in_features K=96 .* use a group size <= 96"),
    ([], "name: bad\n" + SMALL + "points: [{method: wanda, pattern: '3:5'}]\n", r"m=5 does not divide K=96"),
    ([], "name: bad\n" + SMALL + "points: [{method: svd, rank: 80}]\n", r"rank=80 is larger than min"),
    ([], "name: bad\nsettings: {eval_tokens: 1000000}\npoints: [{method: dense}]\n",
     r"sweep 'bad': the evaluation text has \d+ tokens, \d+ full window\(s\) of seqlen=512, but the setting "
     r"eval_tokens=1000000 asks for 1953; set eval_tokens <= \d+ \(`eval_tokens:` under `settings:` in .*bad\.yaml"),
    ([], "name: bad\nsettings: {seqlen: 100000, eval_tokens: 100000}\npoints: [{method: dense}]\n",
     r"the evaluation text has \d+ tokens, 0 full window\(s\) of seqlen=100000.* set seqlen <= \d+ \(`seqlen:`"),
    ([], "name: bad\nsettings: {seqlen: 32, eval_tokens: 256, calib_seqlen: 100000}\npoints: [{method: gptq, bits: 4, group_size: 32}]\n",
     r"the calibration text has \d+ tokens, fewer than the setting calib_seqlen=100000; set calib_seqlen <= \d+"),
    ([], "name: bad\nsettings: {eval_tokens: 100, seqlen: 256}\npoints: [{method: dense}]\n",
     r"eval_tokens=100 is smaller than seqlen=256"),
    ([], "name: bad\npoints: [{method: rtn, bits: 1, symmetric: true}]\n", r"bits=1 with symmetric=true cannot work"),
], ids=["model", "text-file", "group-size", "nm", "rank", "corpus-too-short", "seqlen-too-long", "calib-too-short",
        "budget-below-seqlen", "1bit-sym"])
def test_bad_input_exits_2_without_rows(tiny, tmp_path, capsys, extra, sweep_body, match):
    """In-process (``main(argv)``, what ``python -m experiments`` calls): no interpreter start-up per case."""
    import re
    from experiments.__main__ import main
    model, text, sweep = tiny
    if sweep_body is not None:
        sweep = tmp_path / "bad.yaml"
        sweep.write_text(sweep_body)
    args = ["run", sweep, "--model", model, "--text-file", text, "--out-dir", tmp_path / "out", "--no-progress"]
    # Later options win in argparse, so `extra` overrides the defaults above.
    assert main([str(a) for a in (*args, *extra)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and re.search(match, err), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.csv"))


def test_too_short_text_fails_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch):
    """Issue 8: the too-short-text check ran only after the (~25 s) model load. Now only the
    tokenizer is loaded first; a model load here would fail the test."""
    from experiments.lm import models
    from experiments.__main__ import main
    model, text, _ = tiny
    sweep = tmp_path / "short.yaml"
    sweep.write_text("name: short\nsettings: {eval_tokens: 1000000}\npoints: [{method: dense}]\n")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the texts were checked")
    monkeypatch.setattr(models, "load_model", no_model)
    models.clear_model_cache()
    assert main(["run", str(sweep), "--model", str(model), "--text-file", str(text), "--out-dir", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: sweep 'short': the evaluation text has"), err
    assert "eval_tokens <=" in err and "--text-file" in err and "max_tokens" not in err


def test_wikitext2_without_datasets_is_one_error_line(tiny, tmp_path, capsys, monkeypatch):
    """Issue 8: `--source wikitext2` without the `datasets` package printed a traceback."""
    from experiments.__main__ import main
    model, _, sweep = tiny
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError, installed or not
    code = main(["run", str(sweep), "--model", str(model), "--source", "wikitext2", "--out-dir", str(tmp_path / "o"),
                 "--no-progress"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 1, captured.err
    assert lines[0].startswith("error: --source wikitext2 needs the `datasets` package (pip install datasets)"), lines
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "o").exists()


def test_unknown_sweep_name():
    r = cli("run", "nope")
    assert r.returncode == 2
    assert "sweep='nope' is not known; choose one of" in r.stderr


def test_kill_9_mid_sweep_then_resume_equals_uninterrupted_run(tiny, tmp_path):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    table_a = out_a / "sweep_tiny.csv"
    proc = subprocess.Popen([sys.executable, "-m", "experiments", *map(str, run_args(tiny, out_a))], cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if table_a.exists() and len(rows(table_a)) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep finished before it could be killed; make it longer"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    n_killed = len(rows(table_a))
    assert 3 <= n_killed < 8
    assert not list(out_a.glob(".*.tmp")) or True  # a leftover temp file is harmless: never read

    r = cli(*run_args(tiny, out_a))
    assert r.returncode == 0, r.stderr
    assert f"{n_killed} point(s) already in" in r.stderr
    r = cli(*run_args(tiny, out_b))
    assert r.returncode == 0, r.stderr

    resumed, fresh = rows(table_a), rows(out_b / "sweep_tiny.csv")
    ids = [t["point_id"] for t in resumed]
    assert len(ids) == len(set(ids)) == 8, "duplicate or lost rows"
    assert sorted(ids) == sorted(t["point_id"] for t in fresh)
    by_id = {t["point_id"]: t for t in fresh}
    for t in resumed:
        # Deterministic: same seeds, same windows, same algorithms -> the same numbers.
        for col in ("ppl", "bytes", "bits_per_weight", "weight_rel_error"):
            assert t[col] == by_id[t["point_id"]][col], (t["point"], col)


# ------------------------------------------------------------------------------ runs never mix

def _rows_or_empty(path):
    return rows(path) if Path(path).exists() else []


def test_runs_go_to_the_repository_run_dir_from_any_directory_and_another_text_to_another_run(tiny, tmp_path):
    """No --out-dir: the run directory is resolved from the repository's runs/ ($TKR_RUNS_DIR here, to keep
    the test out of the checkout), whatever the current directory; another text file gets its own run."""
    model, text, sweep = tiny
    other = tmp_path / "other.txt"
    other.write_text(Path(text).read_text()[::-1] + "\n")
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    env = dict(_env(), TKR_RUNS_DIR=str(tmp_path / "runs"))
    for t in (text, other):
        r = subprocess.run([sys.executable, "-m", "experiments", "run", str(sweep), "--model", str(model),
                            "--text-file", str(t), "--quick", "--no-progress"], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr
    assert not list(cwd.rglob("*")), "a run wrote into the current directory"
    a = rows(tmp_path / "runs" / "local-model-text" / "quick" / "sweep_tiny.csv")
    b = rows(tmp_path / "runs" / "local-model-other" / "quick" / "sweep_tiny.csv")
    assert len(a) == len(b) == 2
    assert {r["corpus"] for r in a} == {f"file:{Path(text).resolve()}"}
    assert {r["corpus"] for r in b} == {f"file:{other.resolve()}"}
    assert a[0]["text_sha256"] != b[0]["text_sha256"] and a[0]["ppl"] != b[0]["ppl"]


def _device_of_rows(path, device):
    table = rows(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows([{**r, "device": device} for r in table])


@pytest.mark.parametrize("change", ["text-file", "text-content", "machine", "model"])
def test_a_table_of_another_context_is_never_resumed_or_appended_to(tiny, tmp_path, capsys, change):
    """The fresh-clone case and the README's --text-file case: a table measured with another text, text
    content, machine or model is an error naming the difference (exit 2), not "already done", not appended to."""
    import re
    from experiments.__main__ import main
    model, text, sweep = tiny
    out = tmp_path / "run"
    base = ["run", str(sweep), "--model", str(model), "--text-file", str(tmp_path / "t.txt"), "--out-dir", str(out),
            "--quick", "--no-progress"]
    (tmp_path / "t.txt").write_text(Path(text).read_text())
    assert main(base) == 0
    table = out / "quick" / "sweep_tiny.csv"
    args = list(base)
    if change == "text-file":
        (tmp_path / "mytext.txt").write_text(Path(text).read_text())
        args[args.index("--text-file") + 1] = str(tmp_path / "mytext.txt")
        match = r"corpus: table has 'file:.*t\.txt', this run has 'file:.*mytext\.txt'"
    elif change == "text-content":
        (tmp_path / "t.txt").write_text(Path(text).read_text()[::-1])
        match = r"text_sha256: table has '[0-9a-f]{16}', this run has '[0-9a-f]{16}'"
    elif change == "machine":
        _device_of_rows(table, "CPU Intel(R) Xeon(R) Platinum 8480+ (2 threads)")
        match = r"device: table has 'CPU Intel\(R\) Xeon\(R\) Platinum 8480\+ \(2 threads\)', this run has 'CPU "
    else:
        import shutil
        shutil.copytree(model, tmp_path / "model2")
        args[args.index("--model") + 1] = str(tmp_path / "model2")
        match = r"model: table has '.*/model', this run has '.*/model2'"
    before = table.read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already in" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(match, last) and "--run NAME or --out-dir" in last, last
    assert table.read_bytes() == before
