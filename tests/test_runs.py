"""Runs never mix, and a rerun of reproduce recomputes into its own run and resumes only that run.

Unit level, on small synthetic tables in temporary directories (nothing heavy runs): where results
go (the repository's ``runs/``, never the reference ``results/``, never the current directory), file
modes, one context per table (writers refuse another one, readers refuse or separate mixed tables),
the diff against the reference, ``promote``, and ``reproduce``'s step resume.
"""
import argparse
import csv
import json
import os
import stat
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from experiments.analysis import compare, plots, promote, reproduce, summary
from experiments.core import atomic, results, runs
from experiments.core.results import ContextMismatch

REPO = Path(__file__).resolve().parent.parent
REF_QUICK = REPO / "results" / "quick"
AMD, INTEL = "CPU AMD EPYC (2 threads)", "CPU Intel Xeon (2 threads)"


@pytest.fixture()
def runs_dir(tmp_path, monkeypatch):
    d = tmp_path / "runs"
    monkeypatch.setenv(runs.RUNS_ENV, str(d))
    return d


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write(path, rows):
    results.write_rows(path, rows)
    return path


# --------------------------------------------------------------------------------- where results go

def test_default_run_dir_is_in_the_repository_not_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(runs.RUNS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert runs.run_root() == REPO / "runs" / "local"
    assert runs.mode_dir(runs.run_root(), True) == REPO / "runs" / "local" / "quick"
    # ... and runs/ is ignored by git, so a run never modifies tracked files (no "+dirty" commits later).
    r = subprocess.run(["git", "check-ignore", "-q", "runs/local/quick/sweep_quant.csv"], cwd=REPO)
    assert r.returncode == 0, "runs/ must be in .gitignore"


def test_runs_dir_env_and_explicit_out_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(runs.RUNS_ENV, str(tmp_path / "elsewhere"))
    assert runs.run_root(run="intel") == tmp_path / "elsewhere" / "intel"
    monkeypatch.chdir(tmp_path)
    assert runs.run_root(out_dir="mine") == tmp_path / "mine"  # an explicit path is the user's own


@pytest.mark.parametrize("out_dir", [REPO / "results", REPO / "results" / "quick", "results"])
def test_runs_never_write_into_the_reference(out_dir, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match=r"reference results directory .* promote"):
        runs.run_root(out_dir=out_dir)


@pytest.mark.parametrize("kw, name", [
    ({}, "local"),
    ({"text_file": "/data/mytext.txt"}, "local-mytext"),
    ({"model": "HuggingFaceTB/SmolLM2-360M"}, "local-SmolLM2-360M"),
    ({"model": "/m/tiny.Q8_0.gguf", "text_file": "b.txt"}, "local-tiny.Q8_0-b"),
    ({"source": "wikitext2"}, "local-wikitext2"),
])
def test_default_run_name_separates_models_and_texts(kw, name):
    assert runs.default_run_name(**kw) == name


def test_bad_run_name_is_an_error():
    with pytest.raises(ValueError, match=r"--run '\.\./x' must be a plain directory name"):
        runs.run_root(run="../x")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_tables_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        p = tmp_path / "t.csv"
        results.write_rows(p, [{"a": 1}])
        results.append_row(p, {"a": 2})
        steps = runs.Steps(tmp_path)
        steps.record("x", "d", 1.0)
        atomic.copy_file(p, tmp_path / "copy.csv")  # what promote copies tables with
    finally:
        os.umask(old)
    for f in (p, steps.path, tmp_path / "copy.csv"):
        assert stat.S_IMODE(f.stat().st_mode) == mode, (f.name, oct(f.stat().st_mode))


# --------------------------------------------------------------------------------- one context per table

def test_writer_refuses_another_machine_and_leaves_the_table_alone(tmp_path):
    p = tmp_path / "latency_cpu.csv"
    results.append_row(p, {"device_type": "cpu", "device": AMD, "torch": "2.13.0", "ms": 5.27},
                       context=runs.MEASURE_CONTEXT)
    before = p.read_bytes()
    with pytest.raises(ContextMismatch, match=r"device: table has 'CPU AMD EPYC \(2 threads\)', this run has 'CPU Intel"):
        results.append_row(p, {"device_type": "cpu", "device": INTEL, "torch": "2.13.0", "ms": 13.22},
                           context=runs.MEASURE_CONTEXT)
    with pytest.raises(ContextMismatch, match="--run NAME or --out-dir"):
        results.replace_rows(p, [{"device_type": "cpu", "device": INTEL, "torch": "2.13.0", "ms": 1}], ["ms"],
                             context=runs.MEASURE_CONTEXT)
    assert p.read_bytes() == before
    results.append_row(p, {"device_type": "cpu", "device": AMD, "torch": "2.13.0", "ms": 5.3}, context=runs.MEASURE_CONTEXT)
    assert len(_read(p)) == 2


def test_check_single_context_names_what_differs():
    rows = [{"model": "m", "evaluation_text": "Pride and Prejudice"}] * 2 + [{"model": "m", "evaluation_text": "mytext"}]
    with pytest.raises(ContextMismatch, match=r"mixes 2 contexts \(2 row\(s\) with evaluation_text='Pride and "
                                              r"Prejudice'; 1 row\(s\) with evaluation_text='mytext'\)"):
        results.check_single_context(rows, runs.SWEEP_CONTEXT, "t.csv")
    assert results.check_single_context(rows[:2], runs.SWEEP_CONTEXT, "t.csv")["model"] == "m"


def test_committed_reference_tables_each_hold_one_context():
    for p in sorted((REPO / "results").rglob("*.csv")):
        cols = runs.SWEEP_CONTEXT if p.name.startswith("sweep_") else runs.MEASURE_CONTEXT
        results.check_single_context(results.read_rows(p), cols, str(p))


# --------------------------------------------------------------------------------- readers never merge

def _latency_rows(device, dense_ms, comp_ms):
    """Two model layers at M=1: a dense fp32 row and an RTN row each, measured on ``device``."""
    rows = []
    for layer, d, c in zip(("q_proj", "up_proj"), dense_ms, comp_ms):
        base = {"device_type": "cpu", "device": device, "torch": "2.13.0", "status": "ok", "M": 1, "layer": layer,
                "backend": "torch_int4"}
        rows.append({**base, "spec": '{"dtype": "fp32", "method": "dense"}', "method": "dense", "median_ms": d})
        rows.append({**base, "spec": '{"bits": 4, "method": "rtn"}', "method": "rtn", "median_ms": c})
    return rows


def test_model_layer_speedup_never_sums_two_machines():
    lat = pd.DataFrame(_latency_rows(AMD, (3.0, 4.0), (2.0, 3.27)) + _latency_rows(INTEL, (6.0, 8.0), (5.0, 8.22)))
    sp = plots.model_layer_speedup(lat).set_index("latency_device")
    assert sorted(sp.index) == [AMD, INTEL]
    assert sp.loc[AMD, "ms"] == pytest.approx(5.27) and sp.loc[INTEL, "ms"] == pytest.approx(13.22)
    assert sp.loc[AMD, "dense_ms"] == pytest.approx(7.0) and sp.loc[INTEL, "dense_ms"] == pytest.approx(14.0)


def test_model_layer_speedup_refuses_two_timings_of_one_layer_on_one_machine():
    lat = pd.DataFrame(_latency_rows(AMD, (3.0, 4.0), (2.0, 3.0)) * 2)
    with pytest.raises(ContextMismatch, match="two dense fp32 timings"):
        plots.model_layer_speedup(lat)


def test_pareto_figure_refuses_latency_of_two_machines():
    tables = {n: plots.sweep_table(n, quick=True, root=REPO / "results") for n in plots.SWEEPS}
    lat = pd.DataFrame(_latency_rows(AMD, (3.0, 4.0), (2.0, 3.0)) + _latency_rows(INTEL, (6.0, 8.0), (5.0, 8.0)))
    with pytest.raises(ContextMismatch, match="latency table of the Pareto figure mixes 2 contexts"):
        plots.pareto_figure(tables, lat)


def test_summary_separates_and_flags_mixed_tables(tmp_path):
    (tmp_path / "quick").mkdir()
    lat = _read(REF_QUICK / "latency_cpu.csv")
    _write(tmp_path / "quick" / "latency_cpu.csv", lat + [{**r, "device": INTEL} for r in lat])
    text = summary.latency_summary(True, root=tmp_path)
    assert "Warning" in text and "mixes 2 contexts" in text and "device" in text
    assert text.count("Layer latency, CPU AMD EPYC") == 1 and text.count("Layer latency, CPU Intel Xeon") == 1
    # Each section sums only its own machine's rows.
    assert text.count("against dense fp32 in the same run (CPU Intel Xeon") == 1

    sp = _read(REF_QUICK / "sweep_sparsity.csv")
    other = [{**r, "evaluation_text": "remaining 90%", "corpus": "file:/home/u/mytext.txt", "ppl": "999"} for r in sp]
    _write(tmp_path / "quick" / "sweep_sparsity.csv", sp + other)
    text = summary.sweep_summary(True, root=tmp_path)
    assert "mixes 2 contexts" in text and "2 different contexts" in text
    assert text.count("evaluation text Pride and Prejudice") == 1 and text.count("evaluation text remaining 90%") == 1


def test_sweep_summary_joins_a_table_older_than_a_context_column(tmp_path):
    """A table written before text_sha256 existed shares the section of the tables that agree with it on
    every other context column; one that differs in a shared column (the machine) gets its own."""
    (tmp_path / "quick").mkdir()
    q = _read(REF_QUICK / "sweep_quant.csv")
    _write(tmp_path / "quick" / "sweep_quant.csv", [{**r, "text_sha256": "ab12"} for r in q])
    sp = [{k: v for k, v in r.items() if k != "text_sha256"} for r in _read(REF_QUICK / "sweep_sparsity.csv")]
    _write(tmp_path / "quick" / "sweep_sparsity.csv", sp)
    text = summary.sweep_summary(True, root=tmp_path)
    assert "different contexts" not in text and "| quant |" in text and "| sparsity |" in text
    _write(tmp_path / "quick" / "sweep_sparsity.csv", [{**r, "device": INTEL} for r in sp])
    assert "2 different contexts" in summary.sweep_summary(True, root=tmp_path)


def test_sweep_table_of_another_model_is_refused(tmp_path):
    with pytest.raises(plots.NoResults, match=r"holds results for model 'SmolLM2-135M.*', not '/x/tiny'"):
        plots.sweep_table("quant", quick=True, model="/x/tiny", root=REPO / "results")
    with pytest.raises(plots.NoResults, match="no quant results for model '/x/tiny'"):
        plots.sweep_table("quant", quick=True, model="/x/tiny", root=tmp_path, run_missing=False)
    # The reference is never written by a reader, even with run_missing.
    with pytest.raises(plots.NoResults):
        plots.sweep_table("nosuchsweep", quick=True, run_missing=True, root=REPO / "results")


def test_sweep_table_refuses_a_mixed_table(tmp_path):
    rows = _read(REF_QUICK / "sweep_quant.csv")
    _write(tmp_path / "quick" / "sweep_quant.csv", rows + [{**rows[0], "device": INTEL}])
    with pytest.raises(ContextMismatch, match="mixes 2 contexts"):
        plots.sweep_table("quant", quick=True, root=tmp_path)


def test_notebook_root_follows_the_model(runs_dir):
    assert plots.notebook_root() == REPO / "results"
    assert plots.notebook_root("/m/tiny") == runs_dir / "local-tiny"
    assert plots.notebook_root("default", "runs/local") == REPO / "runs" / "local"
    # Reading the reference never writes into it: its figures go to build/ (ignored).
    assert plots.figures_dir_for(REPO / "results", True) == REPO / "build" / "figures" / "quick"
    assert plots.figures_dir_for(runs_dir / "local", True) == runs_dir / "local" / "quick" / "figures"


# --------------------------------------------------------------------------------- diff vs the reference

def _fake_run(tmp_path, change=None):
    """A run directory holding copies of the quick reference tables, measured "on another machine"."""
    run = tmp_path / "run" / "quick"
    for name in ("sweep_quant.csv", "sweep_sparsity.csv", "latency_cpu.csv"):
        rows = [{**r, "device": INTEL} for r in _read(REF_QUICK / name)]
        if change:
            rows = [change(name, r) for r in rows]
        _write(run / name, rows)
    return run


def test_compare_reports_per_point_differences(tmp_path):
    def change(name, r):
        if name == "sweep_sparsity.csv" and r["point"] == "wanda-2:4":
            return {**r, "ppl": str(float(r["ppl"]) * 1.02)}
        if name == "latency_cpu.csv":
            return {**r, "median_ms": str(float(r["median_ms"]) * 2)}
        return r
    run = _fake_run(tmp_path, change)
    rows, text = compare.compare(run, REF_QUICK, run / compare.OUT_NAME)
    ppl = {r["point"]: r for r in rows if r.get("metric") == "ppl"}
    assert set(ppl) == {"dense", "rtn-w3-g64-asym", "rtn-w4-g64-asym", "magnitude-2:4", "wanda-2:4"}
    assert ppl["wanda-2:4"]["rel_diff"] == pytest.approx(0.02) and ppl["wanda-2:4"]["calibrated"] is True
    assert all(ppl[p]["rel_diff"] == 0 and ppl[p]["status"] == "identical" for p in ppl if p != "wanda-2:4")
    assert ppl["wanda-2:4"]["reference"] == float(next(r["ppl"] for r in _read(REF_QUICK / "sweep_sparsity.csv")
                                                        if r["point"] == "wanda-2:4"))
    assert all(r["rel_diff"] == 0 for r in rows if r.get("kind") == "size")
    lat = [r for r in rows if r.get("kind", "").startswith("latency")]
    assert lat and all(r["status"] == "info" and r["new"] == pytest.approx(2 * r["reference"]) for r in lat)
    assert "| sparsity | wanda-2:4 | yes |" in text and "+2.00%" in text
    assert "calibrated points: 1 compared, 0 identical, largest perplexity difference 2.00%" in text
    assert "sizes: all identical" in text and "latency (information only" in text
    assert len(_read(run / compare.OUT_NAME)) == len(rows)


def test_compare_refuses_another_context(tmp_path):
    run = _fake_run(tmp_path, lambda name, r: {**r, "evaluation_text": "remaining 90%"} if name.startswith("sweep") else r)
    rows, _ = compare.compare(run, REF_QUICK)
    sweep_rows = [r for r in rows if r["sweep"] in ("quant", "sparsity")]
    assert sweep_rows and all(r["status"].startswith("not comparable, reference is another context (evaluation_text")
                              for r in sweep_rows)


def test_promote_replaces_whole_tables_only_for_a_finished_run(tmp_path):
    run = _fake_run(tmp_path)
    (run / "figures").mkdir()
    (run / "figures" / "pareto.png").write_bytes(b"png")
    ref = tmp_path / "ref"
    _write(ref / "sweep_quant.csv", [{"point": "old"}])
    _write(ref / "bench_dequant_cpu.csv", [{"x": 1}])
    with pytest.raises(ValueError, match="have not finished"):
        promote.promote(run, ref)
    runs.Steps(run).record("sweeps", "d", 1.0)
    written = promote.promote(run, ref)
    assert {p.name for p in written} == {"sweep_quant.csv", "sweep_sparsity.csv", "latency_cpu.csv", "pareto.png"}
    assert _read(ref / "sweep_quant.csv") == _read(run / "sweep_quant.csv")  # replaced, not merged
    assert (ref / "bench_dequant_cpu.csv").exists() and not (ref / "steps.json").exists()


# --------------------------------------------------------------------------------- reproduce resumes its own run

def test_reproduce_recomputes_into_its_run_then_a_rerun_skips_every_step(runs_dir, monkeypatch, capsys):
    """Fresh clone: the committed reference tables must not count as done; every step writes into the
    run directory. Rerun: every finished step is skipped without loading anything."""
    from experiments.measure import decode_speed, latency, roofline
    from experiments.run import sweep
    import papermill

    calls = []

    def fake_sweeps(sweeps, *, quick, out_dir, device, **kw):
        calls.append("sweeps")
        assert not runs.is_reference(out_dir)
        for sw in sweeps:  # the reference tables, "recomputed" on another machine with one point 1% off
            if not sw.points(quick):
                continue  # as run_sweeps: a seed sweep with no point in this mode makes no table
            rows = [{**r, "device": INTEL} for r in _read(runs.reference_dir(quick) / f"sweep_{sw.name}.csv")]
            if sw.name == "combo":
                rows[-1]["ppl"] = str(float(rows[-1]["ppl"]) * 1.01)
            _write(runs.mode_dir(out_dir, quick) / f"sweep_{sw.name}.csv", rows)
        return []

    def fake_latency(args):
        calls.append("latency")
        _write(args.out, [{**r, "device": INTEL} for r in _read(REF_QUICK / "latency_cpu.csv")])

    def fake_decode(specs, *, device, new_tokens, out, resume):
        calls.append("decode")
        assert resume
        _write(out, [{**r, "device": INTEL} for r in _read(REF_QUICK / "decode_cpu.csv")])

    def fake_roofline(args):
        calls.append("roofline")
        _write(args.out, [{"gpu": "H100 SXM"}])

    def fake_notebook(inp, out, *, parameters, **kw):
        calls.append("notebook")
        assert parameters["results_dir"] == str(runs_dir / "local") and parameters["quick"] is True
        Path(out).write_text("{}")

    monkeypatch.setattr(sweep, "run_sweeps", fake_sweeps)
    monkeypatch.setattr(latency, "main", fake_latency)
    monkeypatch.setattr(decode_speed, "run_decode", fake_decode)
    monkeypatch.setattr(roofline, "main", fake_roofline)
    monkeypatch.setattr(papermill, "execute_notebook", fake_notebook)
    args = argparse.Namespace(quick=True, device="cpu", run=None, out_dir=None, skip_notebooks=False,
                              no_decode=False, no_bench=False, no_engine=True)
    ref_before = {p: p.read_bytes() for p in REF_QUICK.glob("*.csv")}

    assert reproduce.main(args) == 0
    assert calls == ["sweeps", "latency", "decode", "roofline"] + ["notebook"] * len(reproduce.NOTEBOOKS)
    out = capsys.readouterr().out
    run = runs_dir / "local" / "quick"
    n_cal = sum(float(r.get("calib_samples") or 0) > 0
                for f in REF_QUICK.glob("sweep_*.csv") for r in _read(f))  # the fake run recomputes every point
    assert n_cal >= 4
    assert f"calibrated points: {n_cal} compared, {n_cal - 1} identical, largest perplexity difference 1.00%" in out
    assert "| combo | wanda-unstructured-0.5+rtn-w4-g64-asym | yes |" in out and "+1.00%" in out
    assert (run / compare.OUT_NAME).exists() and (run / "steps.json").exists()
    assert {p: p.read_bytes() for p in REF_QUICK.glob("*.csv")} == ref_before, "the reference was modified"

    calls.clear()
    assert reproduce.main(args) == 0
    assert calls == [], f"a rerun with nothing left to do ran {calls}"
    err = capsys.readouterr().err
    assert err.count("already done in this run") == 5

    # A step whose output vanished runs again (here it rewrites the same table: the notebooks stay done) ...
    (run / "latency_cpu.csv").unlink()
    assert reproduce.main(args) == 0
    assert calls == ["latency"]
    # ... and a step whose inputs changed too: new table contents -> the notebooks run again, nothing else.
    calls.clear()
    rows = _read(run / "sweep_quant.csv")
    _write(run / "sweep_quant.csv", rows[:-1])
    assert reproduce.main(args) == 0
    assert calls == ["notebook"] * len(reproduce.NOTEBOOKS)


def test_migration_splits_a_mixed_table_without_editing_a_value(tmp_path):
    from experiments.analysis import migrate

    rows = [{"device_type": "cpu", "device": AMD, "torch": "2.13.0", "ms": str(i)} for i in range(3)]
    rows.insert(1, {"device_type": "cpu", "device": "CPU AMD EPYC (1 threads)", "torch": "2.13.0", "ms": "9"})
    p = _write(tmp_path / "bench_dequant_cpu.csv", rows)
    written = migrate.split_by_context(p)
    assert [w.name for w in written] == ["bench_dequant_cpu.csv", "bench_dequant_cpu.CPU-AMD-EPYC-1-threads.csv"]
    assert _read(p) == [rows[0], rows[2], rows[3]] and _read(written[1]) == [rows[1]]
    assert migrate.split_by_context(p) == []  # idempotent


def test_step_digest_reads_the_files(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("x\n1\n")
    b.write_text("y\n")
    d = runs.digest(1, [a, b])
    assert runs.digest(1, [a, b]) == d
    a.write_text("x\n2\n")
    assert runs.digest(1, [a, b]) != d


@pytest.mark.parametrize("command", ["latency", "roofline", "bench_dequant", "bench_sparse_lowrank"])
def test_explicit_outputs_into_the_reference_are_refused(command):
    from experiments.measure import latency, roofline

    target = str(REPO / "results" / "quick" / "x.csv")
    if command == "latency":
        with pytest.raises(ValueError, match="reference results directory .* promote"):
            latency.main(argparse.Namespace(quick=True, sweep=None, device="cpu", out=target))
    elif command == "roofline":
        with pytest.raises(ValueError, match="reference results directory .* promote"):
            roofline.main(argparse.Namespace(out=target))
    else:
        import importlib
        bench = importlib.import_module(f"benchmarks.{command}")
        with pytest.raises(SystemExit, match="reference results directory .* promote"):
            bench.main(["--device", "cpu", "--out", target])
    assert not (REPO / "results" / "quick" / "x.csv").exists()
