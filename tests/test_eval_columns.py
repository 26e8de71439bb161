"""The evaluation columns of a sweep row (issue 24): perplexity intervals, per-window NLL, the paired
metrics against the dense model (cached once per run directory), the second evaluation text; and the
committed tables, which lack these columns, still read, resume and summarise.

The sweeps run in this process on the tiny random Llama of test_cli, whose --text-file has no second
text: the tests give it one by replacing ``data.second_evaluation_text``.
"""
import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import pytest

from experiments.core import results, runs
from experiments.core.results import ContextMismatch
from experiments.lm.evaluate import REFERENCE_TOPK
from tests.test_cli import WORDS, rows, tiny  # noqa: F401  (tiny is a fixture)

REPO = Path(__file__).resolve().parent.parent

SWEEP = """\
name: ev
settings: {{seqlen: 32, eval_tokens: 128, eval2_windows: {eval2}, calib_samples: 2, calib_seqlen: 32, seed: 0}}
points: [{points}]
"""
POINTS = "{method: dense}, {method: rtn, bits: 3, group_size: 32}"
SECOND = "\n".join(" ".join(random.Random(1).choices(WORDS[::-1], k=12)) for _ in range(200))


@pytest.fixture()
def second_text(monkeypatch):
    from experiments.lm import data
    monkeypatch.setattr(data, "second_evaluation_text", lambda source="austen", text_file=None, cache_dir=None:
                        ("Tiny second text", SECOND))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # the modules' CPU backends, as a user runs them


def _run(tiny, tmp_path, eval2=2, points=POINTS, **kw):  # noqa: F811
    from experiments.run.sweep import run_sweeps
    from experiments.run.sweep_config import load_sweep
    model, text, _ = tiny
    f = tmp_path / "ev.yaml"
    f.write_text(SWEEP.format(eval2=eval2, points=points))
    (table,) = run_sweeps([load_sweep(f)], model=str(model), text_file=str(text), out_dir=tmp_path / "run",
                          progress=False, log=kw.pop("log", lambda s: None), **kw)
    return table


def test_a_sweep_row_carries_intervals_paired_metrics_and_the_second_text(tiny, tmp_path, second_text,  # noqa: F811
                                                                           monkeypatch):
    log = []
    table = _run(tiny, tmp_path, log=log.append)
    dense, rtn = rows(table)
    for r in (dense, rtn):
        nll = json.loads(r["window_nll"])
        assert len(nll) == 4 and sum(nll) / 4 == pytest.approx(float(r["nll"]), rel=1e-5)
        assert float(r["ppl_lo"]) <= float(r["ppl"]) <= float(r["ppl_hi"])
        assert len(json.loads(r["window_nll2"])) == 2 and int(r["eval2_tokens"]) == 2 * 31
        assert float(r["ppl2_lo"]) <= float(r["ppl2"]) <= float(r["ppl2_hi"]) and float(r["ppl2"]) != float(r["ppl"])
        assert r["evaluation_text2"] == "Tiny second text" and r["eval2_windows"] == "2"
        assert r["kl_topk"] == str(REFERENCE_TOPK) and r["bootstrap"].startswith("percentile 95%, 2000 resamples")
    # The dense point against its own reference: exactly KL 0, top-1 1, ΔNLL 0.
    assert [float(dense[c]) for c in ("kl", "kl_lo", "kl_hi", "dnll", "dnll_lo", "dnll_hi")] == [0.0] * 6
    assert [float(dense[c]) for c in ("top1", "top1_lo", "top1_hi")] == [1.0] * 3
    assert float(rtn["kl_lo"]) <= float(rtn["kl"]) <= float(rtn["kl_hi"]) and float(rtn["kl"]) > 0
    assert float(rtn["top1"]) <= 1 and float(rtn["dnll_lo"]) <= float(rtn["dnll"]) <= float(rtn["dnll_hi"])
    assert float(rtn["dnll"]) == pytest.approx(float(rtn["nll"]) - float(dense["nll"]), abs=2e-5)
    # The reference is computed once, in the run directory, and loaded by a resumed run.
    (ref,) = (tmp_path / "run" / "dense_reference").glob("*.pt")
    assert sum("dense reference" in s and "computed" in s for s in log) == 1

    from experiments.lm import evaluate
    monkeypatch.setattr(evaluate, "dense_reference",
                        lambda *a, **k: pytest.fail("a resumed run loads the run directory's dense reference"))
    log.clear()
    _run(tiny, tmp_path, points=POINTS + ", {method: rtn, bits: 4, group_size: 32}", log=log.append)
    assert any(f"dense reference loaded from {ref}" in s for s in log), log
    third = rows(table)[2]
    assert third["point"] == "rtn-w4-g32-asym" and float(third["kl"]) < float(rtn["kl"])
    assert evaluate.load_reference(ref).k == min(REFERENCE_TOPK, len(set(WORDS)) + 1)   # k <= the vocabulary


def test_nothing_left_to_run_computes_no_reference(tiny, tmp_path, second_text, monkeypatch):  # noqa: F811
    _run(tiny, tmp_path)
    shutil.rmtree(tmp_path / "run" / "dense_reference")
    from experiments.lm import evaluate
    monkeypatch.setattr(evaluate, "dense_reference", lambda *a, **k: pytest.fail("no point left: no reference"))
    _run(tiny, tmp_path)
    assert not (tmp_path / "run" / "dense_reference").exists()


def test_the_second_text_budget_is_not_in_the_point_id_but_is_context(tiny, tmp_path, second_text):  # noqa: F811
    """Committed rows keep their ids (eval2_windows is a setting added later), and a table holds one
    second-text budget: a run with another is refused before measuring, naming the column."""
    from experiments.run.sweep import point_id
    from experiments.methods.spec import parse_spec
    st = {"seqlen": 32, "eval_tokens": 128, "calib_samples": 2, "calib_seqlen": 32, "seed": 0}
    spec = parse_spec({"method": "dense"})
    assert point_id(spec, {**st, "eval2_windows": 2}, "m", {}) == point_id(spec, st, "m", {})
    table = _run(tiny, tmp_path)
    before = table.read_bytes()
    with pytest.raises(ContextMismatch, match="eval2_windows: table has '2', this run has '3'"):
        _run(tiny, tmp_path, eval2=3, points=POINTS + ", {method: rtn, bits: 4, group_size: 32}")
    assert table.read_bytes() == before


def test_without_a_second_text_its_columns_are_empty(tiny, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    table = _run(tiny, tmp_path, points="{method: dense}")
    (r,) = rows(table)
    assert all(r[c] == "" for c in ("ppl2", "ppl2_lo", "window_nll2", "evaluation_text2", "eval2_windows"))
    assert r["kl"] == "0.0" and r["ppl_lo"] != ""


# --------------------------------------------------------------------- committed tables lack the columns

def _new_style(old: dict, point: str, window_nll: list[float], **extra) -> dict:
    """A row as the new code writes it, in the committed table's context (its machine and settings)."""
    mean = sum(window_nll) / len(window_nll)
    return {**old, "point_id": hashlib.sha1(point.encode()).hexdigest()[:16], "point": point, "nll": mean,
            "ppl": math.exp(mean), "ppl_lo": math.exp(mean) * 0.99, "ppl_hi": math.exp(mean) * 1.01,
            "window_nll": json.dumps(window_nll), "kl": 0.01, "kl_lo": 0.009, "kl_hi": 0.011, "top1": 0.9,
            "top1_lo": 0.89, "top1_hi": 0.91, "dnll": 0.02, "dnll_lo": 0.01, "dnll_hi": 0.03,
            "evaluation_text2": "Emma", "text2_sha256": "abc", "eval2_windows": 4, "kl_topk": 32,
            "bootstrap": "percentile 95%, 2000 resamples of the windows, numpy default_rng seed 0", **extra}


# The columns of a sweep table as the code before issue 24 wrote them (the committed full quant table's
# header until its claimed points were rerun on 2026-12-08; commit 87c039e).
OLD_SWEEP_COLUMNS = (
    "sweep point_id point method prune_method quant_method bits group_size symmetric act_order pattern sparsity "
    "ratio rank energy spec ppl nll eval_tokens seqlen eval_token_budget calib_samples calib_seqlen seed "
    "n_layers n_weights bytes fp16_bytes bits_per_weight compression_vs_fp16 weight_rel_error compress_seconds "
    "size_is_modelled eval_seconds module_backends aliases_source_grid source_grid model corpus "
    "calibration_text evaluation_text quick device_type device torch triton transformers python git_commit "
    "timestamp host_threads").split()


def _old_style_copy(dst: Path) -> None:
    """The committed quick quant table as the code before issue 24 wrote it: only
    :data:`OLD_SWEEP_COLUMNS`."""
    import csv
    with open(REPO / "results" / "quick" / "sweep_quant.csv", newline="") as f:
        quick = list(csv.DictReader(f))
    assert "kl" in quick[0] and "kl" not in OLD_SWEEP_COLUMNS, "the fixture's premise: a new quick table"
    results.write_rows(dst, [{c: r.get(c, "") for c in OLD_SWEEP_COLUMNS} for r in quick])


@pytest.fixture()
def old_table(tmp_path):
    """The committed quick quant table, as an old-style table (:func:`_old_style_copy`), in a results
    directory of its own."""
    root = tmp_path / "results"
    (root / "quick").mkdir(parents=True)
    path = root / "quick" / "sweep_quant.csv"
    _old_style_copy(path)
    return root, path


def test_new_columns_join_a_committed_table_and_old_rows_read_them_empty(old_table):
    root, path = old_table
    old = results.read_rows(path, numeric=runs.SWEEP_NUMERIC)
    assert old and "kl" not in old[0]
    dense = next(r for r in old if r["point"] == "dense")
    kw = {"context": runs.SWEEP_CONTEXT, "numeric": runs.SWEEP_NUMERIC, "unique": "point_id",
          "added_context": runs.SWEEP_CONTEXT_ADDED}
    for i, point in enumerate(("rtn-w4-g32-asym-new", "rtn-w3-g32-asym-new")):
        assert results.append_row(path, _new_style(dense, point, [3.2 + i * 0.1, 3.3 + i * 0.1]), **kw)
    got = results.read_rows(path, numeric=runs.SWEEP_NUMERIC)
    assert [r["point_id"] for r in got[:len(old)]] == [r["point_id"] for r in old], "no committed row is lost"
    for r, o in zip(got, old):
        assert {k: r[k] for k in o} == o and r["kl"] == "" and r["window_nll"] == "" and r["evaluation_text2"] == ""
    assert got[-1]["evaluation_text2"] == "Emma"
    # A new row of another second-text context is refused, naming the column ...
    with pytest.raises(ContextMismatch, match="evaluation_text2: table has 'Emma', this run has 'Persuasion'"):
        results.append_row(path, _new_style(dense, "x", [3.0, 3.1], evaluation_text2="Persuasion"), **kw)
    # ... which passing the added columns as ordinary context could not do without breaking the old rows:
    # the second append then compares with the old rows' empty cells.
    plain = path.with_name("plain.csv")
    _old_style_copy(plain)
    strict = {**kw, "context": (*runs.SWEEP_CONTEXT, *runs.SWEEP_CONTEXT_ADDED), "added_context": ()}
    assert results.append_row(plain, _new_style(dense, "a", [3.0, 3.1]), **strict)
    with pytest.raises(ContextMismatch, match="evaluation_text2: table has '', this run has 'Emma'"):
        results.append_row(plain, _new_style(dense, "b", [3.0, 3.1]), **strict)


def test_every_reader_handles_a_table_with_and_without_the_new_columns(old_table):
    from experiments.analysis import compare, plots, summary
    root, path = old_table
    old = results.read_rows(path)
    dense = next(r for r in old if r["point"] == "dense")
    kw = {"context": runs.SWEEP_CONTEXT, "added_context": runs.SWEEP_CONTEXT_ADDED}
    results.append_row(path, _new_style(dense, "rtn-w4-g32-asym", [3.2, 3.3, 3.25], bits=4, method="rtn",
                                        quant_method="rtn", group_size=32), **kw)
    df = plots.sweep_table("quant", quick=True, root=root)
    assert df["kl"].isna().sum() == len(old) and df["kl"].notna().sum() == 1
    fig = plots.quant_figure(df)
    plots.plt.close(fig)
    text = summary.sweep_summary(True, root=root, names=("quant",))
    assert "| quant | rtn-w4-g32-asym |" in text and "mixes" not in text
    assert "rtn-w4-g32-asym" in summary.headline_summary(True, root)
    rows_ = compare.compare_sweeps(root / "quick", REPO / "results" / "quick")
    assert {r["point"] for r in rows_} >= {"dense", "rtn-w4-g32-asym"}
    # A table whose new rows disagree on an added context column is refused by the readers too.
    results.write_rows(path, results.read_rows(path) + [_new_style(dense, "z", [3.0, 3.1], evaluation_text2="X")])
    with pytest.raises(ContextMismatch, match="evaluation_text2"):
        plots.sweep_table("quant", quick=True, root=root)


def test_the_headline_says_when_the_best_point_is_within_noise_of_the_runner_up(old_table):
    """Only rows with window_nll: the committed tables (without it) render as before (test_docs)."""
    from experiments.analysis import summary
    root, path = old_table
    before = summary.headline_summary(True, root)
    assert "within noise" not in before
    old = results.read_rows(path)
    dense = next(r for r in old if r["point"] == "dense")
    kw = {"context": runs.SWEEP_CONTEXT, "added_context": runs.SWEEP_CONTEXT_ADDED}
    base = [2.0, 2.4, 1.8, 2.2]
    spec = {"bits": 4, "method": "rtn", "quant_method": "rtn", "group_size": 32}
    results.append_row(path, _new_style(dense, "best-4bit", base, **spec), **kw)
    results.append_row(path, _new_style(dense, "close-4bit", [v + d for v, d in zip(base, (0.01, -0.008, 0.012, -0.009))],
                                        **spec), **kw)
    text = summary.headline_summary(True, root)
    line = next(x for x in text.splitlines() if "4-bit weights, uniform grid" in x)
    assert "best-4bit (quant); within noise of close-4bit (ΔNLL" in line, line
    results.replace_rows(path, [_new_style(dense, "close-4bit", [v + 0.05 for v in base], **spec)],
                         key=("point",), **kw)
    line = next(x for x in summary.headline_summary(True, root).splitlines() if "4-bit weights, uniform grid" in x)
    assert "within noise" not in line and "best-4bit (quant)" in line


def test_a_second_text_too_short_for_its_windows_names_the_setting(tiny, tmp_path, second_text):  # noqa: F811
    with pytest.raises(ValueError, match=r"the second evaluation text has \d+ tokens, \d+ full window\(s\) of "
                                         r"seqlen=32, but the setting eval2_windows=500 asks for 500; set "
                                         r"eval2_windows <= \d+ \(`eval2_windows:` under `settings:`"):
        _run(tiny, tmp_path, eval2=500)
    assert not (tmp_path / "run" / "sweep_ev.csv").exists()


@pytest.mark.parametrize("value, match", [(-1, "eval2_windows=-1 must be a non-negative integer"),
                                          (True, "eval2_windows=True must be a non-negative integer")])
def test_bad_eval2_windows_is_one_clear_error(tmp_path, value, match):
    from experiments.run.sweep_config import load_sweep
    f = tmp_path / "s.yaml"
    f.write_text(f"name: s\nsettings: {{eval2_windows: {str(value).lower()}}}\npoints: [{{method: dense}}]\n")
    with pytest.raises(ValueError, match=match):
        load_sweep(f)


def test_defaults_without_eval2_windows_measure_no_second_text(tmp_path):
    from experiments.run.sweep_config import load_sweep
    f = tmp_path / "s.yaml"
    f.write_text("name: s\nsettings: {seqlen: 32, eval_tokens: 64}\npoints: [{method: dense}]\n")
    old_defaults = {"seqlen": 32, "eval_tokens": 64, "calib_samples": 1, "calib_seqlen": 32, "seed": 0}
    sw = load_sweep(f, defaults={"full": old_defaults, "quick": old_defaults})
    assert sw.settings(False)["eval2_windows"] == 0


def test_task_items_score_the_task_on_every_row_and_stay_out_of_the_id(tiny, tmp_path, second_text,  # noqa: F811
                                                                        monkeypatch):
    """task_items > 0: every row carries the multiple-choice task's accuracy (experiments.lm.tasks), scored
    on the point's own compressed model; the setting is context, not part of the point id."""
    import torch

    from experiments.lm import models, tasks
    from experiments.run.sweep import point_id
    from experiments.methods.spec import parse_spec
    task_text = " ".join(f"Word{i % 37} said the thing number {i} and then it ended." for i in range(400))
    monkeypatch.setattr(tasks, "default_task_text", lambda cache_dir=None: (task_text, {"task_text": "tiny task"}))
    # the default corpus (not --text-file) has a task text: the tiny model's text stands in for it
    from experiments.lm import data
    model, text, _ = tiny
    monkeypatch.setattr(data, "get_texts", lambda source="austen", text_file=None, cache_dir=None:
                        (Path(text).read_text()[:2000], Path(text).read_text()[2000:],
                         {"corpus": "tiny", "calibration": "a", "evaluation": "b"}))
    from experiments.run.sweep import run_sweeps
    from experiments.run.sweep_config import load_sweep
    f = tmp_path / "t.yaml"
    f.write_text(SWEEP.format(eval2=0, points=POINTS).replace("eval2_windows: 0", "eval2_windows: 0, task_items: 12"))
    (table,) = run_sweeps([load_sweep(f)], model=str(model), out_dir=tmp_path / "run", progress=False,
                          log=lambda s: None)
    dense, rtn = rows(table)
    items = tasks.build_task(models.load_tokenizer(str(model)), task_text, n_items=12)
    m = models.load_model(str(model))[0]
    expected = tasks.score_task(m, items)
    assert dense["task_text"] == "tiny task" and dense["task_items"] == "12" and dense["task_n"] == "12"
    assert float(dense["task_acc"]) == pytest.approx(expected["acc"], abs=1e-6) and dense["task_correct"] == expected["correct"]
    for r in (dense, rtn):
        assert float(r["task_acc_lo"]) <= float(r["task_acc"]) <= float(r["task_acc_hi"]) and r["task_k"] == "4"
    spec = parse_spec({"method": "dense"})
    st = {"seqlen": 32, "eval_tokens": 128, "calib_samples": 2, "calib_seqlen": 32, "seed": 0}
    assert point_id(spec, {**st, "task_items": 12}, "m", {}) == point_id(spec, st, "m", {})
    assert torch.is_tensor(items.label)


def test_without_task_items_the_task_columns_are_empty(tiny, tmp_path, second_text):  # noqa: F811
    dense, _ = rows(_run(tiny, tmp_path))
    assert dense["task_text"] == dense["task_items"] == dense["task_acc"] == dense["task_correct"] == ""


def test_an_old_table_without_the_text_hash_takes_new_rows_that_carry_it(old_table):
    """The committed full quant table predates ``text_sha256``: its first new row brought the column in with
    the old rows' cells empty, and the second new row was then refused against those empty cells
    (found rerunning its claimed points). An empty cell of it now matches any hash; two new rows with
    different hashes are still refused."""
    root, path = old_table
    old = results.read_rows(path)
    assert "text_sha256" not in old[0], "the fixture's premise: the old table has no text hash"
    dense = next(r for r in old if r["point"] == "dense")
    kw = {"context": runs.SWEEP_CONTEXT, "numeric": runs.SWEEP_NUMERIC, "unique": "point_id",
          "added_context": runs.SWEEP_CONTEXT_ADDED}
    for point in ("gptq-a", "gptq-b", "gptq-c"):
        assert results.append_row(path, _new_style(dense, point, [3.2, 3.3], text_sha256="37d139de"), **kw)
    with pytest.raises(ContextMismatch, match="text_sha256"):
        results.append_row(path, _new_style(dense, "other-text", [3.2, 3.3], text_sha256="ffff0000"), **kw)
    got = results.read_rows(path)
    assert len(got) == len(old) + 3 and all(r["text_sha256"] == "" for r in got[:len(old)])


def test_eval_of_a_saved_point_scores_the_task(tiny, tmp_path, second_text, monkeypatch, capsys):  # noqa: F811
    """``python -m experiments eval DIR`` prints the task columns a sweep row carries (the full settings'
    ``task_items``, or ``--task-items N``), scored on the saved model; the quick settings (``task_items`` 0)
    leave them out, and asking for the task with ``--text-file`` is one error naming the option."""
    from experiments.__main__ import main
    from experiments.lm import data, models, tasks
    from experiments.methods.compress import compress_model
    from experiments.methods.spec import parse_spec
    from experiments.run.saving import load_compressed, save_compressed
    model, text, _ = tiny
    task_text = " ".join(f"Word{i % 37} said the thing number {i} and then it ended." for i in range(400))
    monkeypatch.setattr(tasks, "default_task_text", lambda cache_dir=None: (task_text, {"task_text": "tiny task"}))
    monkeypatch.setattr(data, "get_texts", lambda source="austen", text_file=None, cache_dir=None:
                        (Path(text).read_text()[:2000], Path(text).read_text()[2000:],
                         {"corpus": "tiny", "calibration": "a", "evaluation": "b"}))
    m = models.load_model(str(model))[0]
    spec = parse_spec({"method": "rtn", "bits": 3, "group_size": 32})
    report = compress_model(m, spec, None)
    saved = save_compressed(m, report, tmp_path / "saved", base_model=str(model))

    assert main(["eval", str(saved), "--quick", "--no-progress", "--no-dense", "--task-items", "12"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = tasks.score_task(load_compressed(saved), tasks.build_task(models.load_tokenizer(str(model)), task_text,
                                                                         n_items=12))
    assert got["task_n"] == 12 and got["task_k"] == 4 and got["task_text"] == "tiny task"
    assert got["task_acc"] == pytest.approx(expected["acc"], abs=1e-6) and got["task_correct"] == expected["correct"]
    assert got["task_acc_lo"] <= got["task_acc"] <= got["task_acc_hi"]

    assert main(["eval", str(saved), "--quick", "--no-progress", "--no-dense"]) == 0   # quick: task_items 0
    assert "task_acc" not in json.loads(capsys.readouterr().out)
    assert main(["eval", str(saved), "--no-progress", "--no-dense", "--text-file", str(text), "--task-items", "5"]) == 2
    err = capsys.readouterr().err
    assert "error: --task-items" in err and "--task-items 0" in err
