"""Runs write only where they should, one run per run directory, and a damaged table is never trusted.

On the tiny random Llama of test_cli (the model saved to a temporary directory): a sweep, run or
point name is a plain name (a name with ``../`` wrote ``sweep_<name>.csv`` anywhere, a committed
reference table included); only ``promote`` writes under the reference ``results/`` (here a stand-in
directory: ``runs.REFERENCE`` is pointed at a temporary one, so a failing check never touches the
checkout); two real processes running the same sweep into one run directory (the second exits with
one ``error:`` line naming the directory and the first process, the table has every point once);
a point measured by another writer meanwhile is not measured again; a table whose rows were cut
(after the point id, inside it, inside a quoted cell) or written back as junk (empty numbers) is
read with a warning naming the file and line, the damaged rows do not count as finished, and the
next rewrite leaves them out after keeping a copy of the damaged table beside it.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from experiments.core import results, runs
from tests.test_cli import REPO, _env, rows, tiny  # noqa: F401  (tiny is a fixture)

QUICK_SWEEP = """\
name: {name}
settings: {{seqlen: 32, eval_tokens: 64, calib_samples: 2, calib_seqlen: 32, seed: 0}}
points: [{{method: dense}}, {{method: rtn, bits: 4, group_size: 32}}, {{method: rtn, bits: 3, group_size: 32}}]
"""


def _main(*args):
    from experiments.__main__ import main
    return main([str(a) for a in args])


def _last_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error line"
    return err[-1]


# ------------------------------------------------------------------------------------- plain names

@pytest.mark.parametrize("name", ["../../results/quick/quant", "sub/quant", "..", "a..b", "quant\\x", "", " x",
                                  "x y", 12])
def test_a_sweep_name_must_be_a_plain_name(tmp_path, name):
    from experiments.run.sweep_config import load_sweep
    f = tmp_path / "s.yaml"
    f.write_text(f"name: {json.dumps(name)}\npoints: [{{method: dense}}]\n")
    with pytest.raises(ValueError, match=r"s\.yaml: name .* must be a plain name \(letters, digits, '\.', '_', "
                                         r"'-'; no path separator, no '\.\.'\)"):
        load_sweep(f)


def test_a_sweep_file_name_that_is_not_a_plain_name_needs_a_name_key(tmp_path):
    from experiments.run.sweep_config import load_sweep
    f = tmp_path / "my sweep.yaml"
    f.write_text("points: [{method: dense}]\n")
    with pytest.raises(ValueError, match=r"name 'my sweep' \(from the file name\) must be a plain name"):
        load_sweep(f)
    f.write_text("name: my-sweep\npoints: [{method: dense}]\n")
    assert load_sweep(f).name == "my-sweep"


def test_a_sweep_named_with_dot_dot_writes_nothing_outside_the_run(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Issue 21.1: `name: ../../results/quick/quant` replaced a committed reference table."""
    model, text, _ = tiny
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the modules' CPU backends, as a user runs them
    victim = tmp_path / "ref" / "quick" / "sweep_quant.csv"
    results.write_rows(victim, [{"point": "reference"}])
    before = victim.read_bytes()
    sweep = tmp_path / "evil.yaml"
    sweep.write_text(QUICK_SWEEP.format(name="../../ref/quick/quant"))
    out = tmp_path / "runs" / "mine"
    assert _main("run", sweep, "--model", model, "--text-file", text, "--out-dir", out, "--quick",
                 "--no-progress") == 2
    last = _last_error(capsys)
    assert last.startswith("error: sweep file ") and "must be a plain name" in last, last
    assert victim.read_bytes() == before
    assert [p for p in tmp_path.rglob("*.csv") if p != victim] == []


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "a..b"])
def test_a_run_name_must_be_a_plain_name(runs_dir, name):
    with pytest.raises(ValueError, match=r"--run .* must be a plain (directory )?name"):
        runs.run_root(run=name)


@pytest.fixture()
def runs_dir(tmp_path, monkeypatch):
    d = tmp_path / "runs"
    monkeypatch.setenv(runs.RUNS_ENV, str(d))
    return d


@pytest.fixture()
def fake_reference(tmp_path, monkeypatch):
    """A stand-in for the repository's results/: what the reference checks compare against."""
    ref = tmp_path / "results"
    (ref / "quick").mkdir(parents=True)
    monkeypatch.setattr(runs, "REFERENCE", ref)
    return ref


def test_compress_out_into_the_reference_is_refused(tiny, fake_reference, capsys):  # noqa: F811
    """Issue 21.1: `compress --out results/...` wrote a saved model into the reference directory."""
    model, _, _ = tiny
    target = fake_reference / "quick" / "saved"
    assert _main("compress", '{"method": "rtn", "bits": 4, "group_size": 32}', "--model", model, "--out", target,
                 "--no-progress") == 2
    last = _last_error(capsys)
    assert re.fullmatch(r"error: --out '.*/results/quick/saved' is in the committed reference results directory "
                        r".*: only `python -m experiments promote` writes there.*", last), last
    assert list(fake_reference.rglob("*")) == [fake_reference / "quick"]


def test_export_out_and_saved_dir_into_the_reference_are_refused(tiny, tmp_path, fake_reference, capsys,  # noqa: F811
                                                                 monkeypatch):
    model, text, sweep = tiny
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _main("export", tmp_path / "nosuchdir", "--format", "gguf", "--out", fake_reference / "m.gguf") == 2
    assert "--out " in (last := _last_error(capsys)) and "only `python -m experiments promote` writes there" in last
    assert _main("run", sweep, "--model", model, "--text-file", text, "--out-dir", tmp_path / "run", "--quick",
                 "--no-progress", "--saved-dir", fake_reference / "saved") == 2
    last = _last_error(capsys)
    assert "--saved-dir " in last and "only `python -m experiments promote` writes there" in last, last
    assert list(fake_reference.rglob("*")) == [fake_reference / "quick"]
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.csv"))


# ------------------------------------------------------------------------------- one run at a time

LONG_SWEEP = """\
name: tiny
settings: {seqlen: 32, eval_tokens: 512, calib_samples: 4, calib_seqlen: 32, seed: 0}
points:
  - {method: dense}
  - {method: rtn, bits: 4, group_size: 32}
  - {method: rtn, bits: 3, group_size: 32}
  - {method: gptq, bits: 3, group_size: 32}
  - {method: gptq, bits: 4, group_size: 32, act_order: true}
  - {method: wanda, pattern: "2:4"}
  - {method: sparsegpt, pattern: "2:4"}
  - {method: whitened_svd, ratio: 0.5}
  - {method: combo, steps: [{method: sparsegpt, pattern: "2:4"}, {method: gptq, bits: 4, group_size: 32}]}
  - {method: combo, steps: [{method: wanda, pattern: "2:4"}, {method: gptq, bits: 3, group_size: 32}]}
"""


def test_two_processes_into_one_run_directory(tiny, tmp_path):  # noqa: F811
    """Issue 21.2: two runs of one sweep into one run directory duplicated and lost rows, both exit 0.
    Two real processes started together: the one that takes the run directory first completes the
    table, each point once; the other exits (status 2, while the first still runs) with one `error:`
    line naming the run directory and the first process's pid and host."""
    model, text, _ = tiny
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(LONG_SWEEP)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "experiments", "run", str(sweep), "--model", str(model), "--text-file", str(text),
            "--out-dir", str(out), "--no-progress"]
    procs = [subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        deadline = time.time() + 400
        while time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        ended = [p for p in procs if p.poll() is not None]
        other_still_running = len(ended) == 1
        errs = [p.communicate(timeout=400)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ids = [r["point_id"] for r in rows(out / "sweep_tiny.csv")]
    assert len(ids) == len(set(ids)) == 10, f"{len(ids)} rows, {len(set(ids))} distinct points: duplicated or lost"
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], f"exit statuses {codes}: both runs went ahead" + "".join(errs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert ended == [procs[loser]] and other_still_running, "the second run did not end while the first ran"
    assert "Traceback" not in errs[loser], errs[loser]
    last = errs[loser].strip().splitlines()[-1]
    assert last.startswith(f"error: run directory {out} is in use by another run (pid {procs[winner].pid} on "
                           f"{socket.gethostname()}, since "), last
    assert last.endswith("wait for it to finish, or write this run elsewhere with --run NAME or --out-dir DIR"), last
    # The holder's record is gone with it; the lock file itself stays (empty, harmless).
    assert not (out / runs.LOCK_INFO).exists()


def test_a_killed_run_leaves_no_lock_behind(tmp_path):
    """kill -9 of the lock holder (no cleanup runs) frees the run directory for the next run."""
    d = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from experiments.core.runs import run_dir_lock\n"
                               "with run_dir_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)",
                               str(d)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runs.RunInUse, match=rf"run directory {re.escape(str(d))} is in use by another run "
                                                rf"\(pid {holder.pid} on {re.escape(socket.gethostname())}, since "):
            with runs.run_dir_lock(d):
                pass
        holder.kill()
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    with runs.run_dir_lock(d):
        info = json.loads((d / runs.LOCK_INFO).read_text())
        assert info["pid"] == os.getpid()
    assert not (d / runs.LOCK_INFO).exists()


def test_a_point_finished_meanwhile_is_not_measured_again(tiny, tmp_path, monkeypatch):  # noqa: F811
    """"Finished" is checked again before each point (and before its row is appended): a row that another
    writer added meanwhile is neither measured again nor duplicated."""
    from experiments.run import point as point_mod
    from experiments.run.sweep import point_id, run_sweeps
    from experiments.run.sweep_config import load_sweep
    model, text, _ = tiny
    f = tmp_path / "q.yaml"
    f.write_text(QUICK_SWEEP.format(name="q"))
    sw = load_sweep(f)
    real = point_mod.measure_point
    measured = []

    def measure(run, sweep, pid, spec, settings, windows, calib, *, progress=True):
        measured.append(spec.label())
        row = real(run, sweep, pid, spec, settings, windows, calib, progress=progress)
        if len(measured) == 1:
            # Another writer appends the rows of the 2nd and 3rd points while the first is measured.
            others = [(point_id(s, settings, run.model_name, run.corpus), s) for s in sw.full_points[1:]]
            for opid, s in others:
                results.append_row(table, {**row, "point_id": opid, "point": s.label()})
        return row

    table = tmp_path / "run" / "sweep_q.csv"
    monkeypatch.setattr(point_mod, "measure_point", measure)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    run_sweeps([sw], model=str(model), text_file=str(text), out_dir=tmp_path / "run", progress=False,
               log=lambda s: None)
    assert measured == ["dense"]
    ids = [r["point_id"] for r in rows(table)]
    assert len(ids) == len(set(ids)) == 3


# ------------------------------------------------------------------------------------ damaged rows

def _table(tmp_path, n=3):
    p = tmp_path / "sweep_t.csv"
    results.write_rows(p, [{"sweep": "t", "point_id": f"{i:016x}", "point": f"p{i}",
                            "spec": json.dumps({"method": "rtn", "bits": i}), "ppl": 10.5 + i, "nll": 2.25,
                            "timestamp": "2026-01-01T00:00:00"} for i in range(n)])
    return p


@pytest.mark.parametrize("cut, n_good, line, reason", [
    (lambda t: t[:t.rindex("0000000000000002") + 16], 2, 4, r"2 of 7 columns"),      # after the point id
    (lambda t: t[:t.rindex("0000000000000002") + 9], 2, 4, r"2 of 7 columns"),       # inside the point id
    (lambda t: t[:t.rindex('""bits"": 2') + 5], 2, 4, r"4 of 7 columns"),           # inside the quoted spec
    (lambda t: t[:-3], 2, 4, r"cut: the line has no end"),                         # inside the last cell
    (lambda t: t + "t,3fa2,,,,,\r\n", 3, 5, r"column ppl='' is not a number"),      # junk written back
], ids=["after-point-id", "inside-point-id", "inside-quoted-cell", "inside-last-cell", "junk-row"])
def test_a_damaged_row_is_reported_and_not_read(tmp_path, capsys, cut, n_good, line, reason):
    p = _table(tmp_path)
    p.write_bytes(cut(p.read_bytes().decode()).encode())
    t = results.read_table(p, numeric=runs.SWEEP_NUMERIC)
    assert [r["point_id"] for r in t.rows] == [f"{i:016x}" for i in range(n_good)]
    (bad,) = t.damaged
    assert bad.line == line and re.search(reason, bad.reason), bad
    assert results.read_rows(p, numeric=runs.SWEEP_NUMERIC) == t.rows
    err = capsys.readouterr().err
    assert re.search(rf"warning: {re.escape(str(p))} line {line}: damaged row \(", err), err


def test_a_cut_header_is_damaged_line_1(tmp_path, capsys):
    p = tmp_path / "sweep_t.csv"
    p.write_text("sweep,point_i")
    t = results.read_table(p)
    assert t.rows == [] and [d.line for d in t.damaged] == [1]


def test_a_rewrite_drops_damaged_rows_only_after_keeping_a_copy(tmp_path, capsys):
    p = _table(tmp_path)
    damaged = p.read_bytes().decode()[:-40]
    p.write_bytes((damaged).encode())
    results.append_row(p, {"sweep": "t", "point_id": "0000000000000009", "point": "p9", "spec": "{}", "ppl": 1,
                           "nll": 0, "timestamp": "x"}, numeric=runs.SWEEP_NUMERIC)
    assert [r["point"] for r in rows(p)] == ["p0", "p1", "p9"]
    (copy,) = tmp_path.glob("sweep_t.csv.damaged-*")
    assert copy.read_bytes().decode() == damaged
    err = capsys.readouterr().err
    assert f"kept a copy of {p} with its damaged line(s) in {copy}" in err, err


def test_resume_measures_a_cut_row_again(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Issue 21.3: a table whose last line was cut after the point id counted that point as finished (an
    empty perplexity, never measured again); cut inside the point id, a junk row was written back."""
    model, text, _ = tiny
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the modules' CPU backends, as a user runs them
    sweep = tmp_path / "q.yaml"
    sweep.write_text(QUICK_SWEEP.format(name="q"))
    args = ["run", sweep, "--model", model, "--text-file", text, "--out-dir", tmp_path / "run", "--no-progress"]
    assert _main(*args) == 0
    table = tmp_path / "run" / "sweep_q.csv"
    full = table.read_bytes().decode()
    want = rows(table)
    for cut_at in (2 + 16, 8):   # after the point id ("q," + 16 hex digits), inside it
        start = full.rindex("\r\n", 0, len(full) - 2) + 2
        table.write_bytes((full[:start + cut_at]).encode())
        capsys.readouterr()
        assert _main(*args) == 0
        err = capsys.readouterr().err
        assert f"warning: {table} line 4: damaged row (" in err, err
        assert "2 point(s) already in" in err, err
        got = rows(table)
        assert [r["point_id"] for r in got] == [r["point_id"] for r in want]
        assert all(r["ppl"] not in ("", None) for r in got)
        for c in ("ppl", "bytes", "bits_per_weight"):
            assert got[-1][c] == want[-1][c]
    copies = sorted(table.parent.glob("sweep_q.csv.damaged-*"))
    assert len(copies) == 2 and all(c.read_bytes().decode().endswith("\n") is False for c in copies)
