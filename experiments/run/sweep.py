"""A resumable runner that writes one long CSV per sweep.

A sweep is a YAML file in ``experiments/sweeps/`` (its format and settings: :mod:`experiments.run.sweep_config`).

Runner (:func:`run_sweeps`): the model is loaded once and deep-copied for every point (the cache
of ``experiments.lm.models.load_model``); every
point is validated against the model's layer shapes, and the evaluation/calibration tokens are cut,
*before* the first point runs, so bad input fails with no row written. Each finished point is
appended atomically (``experiments.core.results.append_row``) to ``<out>/sweep_<name>.csv``
(``<out>/quick/sweep_<name>.csv`` for ``--quick``, so quick and full results never mix). ``<out>``
is a run directory (``experiments.core.runs.run_root``: ``runs/local`` for the default model and corpus,
never the committed ``results/``). A table holds one context (``experiments.core.runs.SWEEP_CONTEXT``:
model, corpus and a hash of its text, settings, machine): a run whose context differs from a
table's rows fails before the first point with an error naming the difference, so another model,
text or machine never counts as "already done" and never mixes in. A point's id is a hash of its
spec, its settings, the model and the corpus; points whose id is already in the table are skipped,
so a run killed at any moment (even ``kill -9``) resumes where it stopped, with no duplicate, lost
or half-written row. Torch's RNG is re-seeded for every point.

Each point is measured by :func:`experiments.run.point.measure_point` (a fresh copy of the model, compression,
perplexity, the row), called by an executor (``experiments.run.executors``): the default runs the points
one after another in this process; ``--executor ray`` runs them as Ray tasks, locally or on a
cluster, and hands every row back to this process, which stays the only writer of the table.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from experiments.lm.models import layer_shapes
from experiments.methods.compress import check_spec_fits
from experiments.methods.spec import MethodSpec
from experiments.run.executors import (Executor, PointJob, PointsFailed, SerialExecutor, clear_failure, failed_path,
                                       record_failure)
from experiments.run.point import RunContext, context_row
from experiments.run.sweep_config import SWEEPS_DIR, Sweep


# ----------------------------------------------------------------------------- rows

def point_id(spec: MethodSpec, settings: Mapping[str, Any], model: str, corpus: Mapping[str, str]) -> str:
    """Stable id of a measured point: same spec + settings + model + corpus -> same id."""
    key = json.dumps({"spec": spec.to_dict(), "settings": dict(sorted(settings.items())), "model": model,
                      "corpus": dict(sorted(corpus.items()))}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def text_digest(calib_text: str, eval_text: str) -> str:
    """Hash of the calibration and evaluation texts (the ``text_sha256`` context column): a changed
    text file under the same name is another context."""
    h = hashlib.sha256(calib_text.encode("utf-8", "replace"))
    h.update(b"\0")
    h.update(eval_text.encode("utf-8", "replace"))
    return h.hexdigest()[:16]


def _where_to_set(sw: Sweep, quick: bool, key: str) -> str:
    """Where a user changes sweep setting ``key``: the sweep file's section, or the shared defaults."""
    section = "quick: settings:" if quick else "settings:"
    return (f"`{key}:` under `{section}` in {sw.path} (or in {SWEEPS_DIR / '_defaults.yaml'} "
            f"section `{'quick' if quick else 'full'}:` for every sweep)")


def _eval_windows(sw: Sweep, quick: bool, tokenizer, text: str, st: Mapping[str, int], text_file) -> torch.Tensor:
    """``data.eval_tokens`` for a sweep's settings; a too-short text names the sweep settings to change."""
    from experiments.lm import data
    n_tok = int(data.tokenize(tokenizer, text).numel())
    seqlen, budget = st["seqlen"], st["eval_tokens"]
    available = n_tok // seqlen
    if budget // seqlen > available:
        if available == 0:
            fix = f"seqlen <= {n_tok} ({_where_to_set(sw, quick, 'seqlen')})"
        else:
            fix = f"eval_tokens <= {available * seqlen} ({_where_to_set(sw, quick, 'eval_tokens')})"
        raise ValueError(f"sweep {sw.name!r}{' (--quick)' if quick else ''}: the evaluation text has {n_tok} tokens, "
                         f"{available} full window(s) of seqlen={seqlen}, but the setting eval_tokens={budget} asks for "
                         f"{budget // seqlen}; set {fix}, or give a longer "
                         f"{'--text-file' if text_file else 'text with --text-file'}")
    return data.eval_tokens(tokenizer, text, max_tokens=budget, seqlen=seqlen)


def _calib_windows(sw: Sweep, quick: bool, tokenizer, text: str, st: Mapping[str, int], text_file) -> torch.Tensor:
    """``data.calibration_batches`` for a sweep's settings; a too-short text names the setting to change."""
    from experiments.lm import data
    n_tok = int(data.tokenize(tokenizer, text).numel())
    if n_tok < st["calib_seqlen"]:
        raise ValueError(f"sweep {sw.name!r}{' (--quick)' if quick else ''}: the calibration text has {n_tok} tokens, "
                         f"fewer than the setting calib_seqlen={st['calib_seqlen']}; set calib_seqlen <= {n_tok} "
                         f"({_where_to_set(sw, quick, 'calib_seqlen')}), or give a longer "
                         f"{'--text-file (its first 10% is the calibration text)' if text_file else 'text with --text-file'}")
    return data.calibration_batches(tokenizer, text, n_samples=st["calib_samples"], seqlen=st["calib_seqlen"],
                                    seed=st["seed"])


@dataclass
class _Prepared:
    sweep: Sweep
    settings: dict[str, int]
    path: Path
    todo: list[tuple[str, MethodSpec]]
    n_done: int
    n_failed_before: int
    windows: torch.Tensor
    calib: torch.Tensor | None


def run_sweeps(sweeps: list[Sweep], *, quick: bool = False, model: str = "default", text_file: str | None = None,
               source: str = "austen", out_dir: str | Path | None = None, run: str | None = None,
               device: str = "cpu", progress: bool = True, executor: Executor | None = None,
               saved_dir: str | Path | None = None,
               log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> list[Path]:
    """Run (or resume) ``sweeps``; returns the CSV paths. See the module docstring.

    ``out_dir``/``run`` choose the run directory (``experiments.core.runs.run_root``; default
    ``runs/local`` or ``runs/local-<model>-<text>``). ``executor`` measures the points
    (``experiments.run.executors``: one after another in this process by default, or as Ray tasks);
    this process stays the only writer of the tables. Points that failed on a fault-tolerant
    executor are recorded in ``failed/`` beside the table and raise :class:`PointsFailed` once every
    other point has finished; the next run retries them.

    ``saved_dir``: a directory of saved compressed models, one per point (``<saved_dir>/<point_id>``,
    written by ``experiments.run.saving.save_compressed``). A point found there is loaded instead of
    compressed again (its manifest's spec must be the point's); a point not found is compressed and
    saved there, so the next sweep over the same points (another evaluation text, say, with the same
    calibration) reuses it. The row is the same either way (``compress_seconds`` is the saved
    compression's).
    """
    from experiments.lm import data, models
    from experiments.core.results import append_row, check_context, read_rows
    from experiments.core.runs import SWEEP_CONTEXT, mode_dir, run_root

    executor = executor or SerialExecutor()
    executor.check_device(device)
    out = mode_dir(run_root(out_dir=out_dir, run=run, model=model, text_file=text_file, source=source), quick)
    t0 = time.perf_counter()
    calib_text, eval_text, corpus = data.get_texts(source=source, text_file=text_file)
    text_sha = text_digest(calib_text, eval_text)
    # The tokenizer alone first: the texts are checked against every sweep's token budgets before
    # the model load (~25 s for the default model), so a too-short text fails in seconds.
    tokenizer = models.load_tokenizer(model)
    token_cache: dict[tuple, torch.Tensor] = {}
    for sw in sweeps:
        st = sw.settings(quick)
        key = ("eval", st["eval_tokens"], st["seqlen"])
        if key not in token_cache:
            token_cache[key] = _eval_windows(sw, quick, tokenizer, eval_text, st, text_file)
        if any(s.needs() for s in sw.points(quick)):
            ckey = ("calib", st["calib_samples"], st["calib_seqlen"], st["seed"])
            if ckey not in token_cache:
                token_cache[ckey] = _calib_windows(sw, quick, tokenizer, calib_text, st, text_file)
    log(f"texts tokenized in {time.perf_counter() - t0:.1f}s; loading model {model!r}")
    # load_model keeps one pristine template per process and returns a deep copy per call (~1 s),
    # so every point starts from the uncompressed model without reloading the file.
    first, tokenizer, info = models.load_model(model)
    log(f"loaded model {model!r} in {time.perf_counter() - t0:.1f}s")
    shapes = layer_shapes(first)
    del first
    model_name = str(info.get("name", model)) if isinstance(info, Mapping) else model
    source_grid = info.get("source_grid") if isinstance(info, Mapping) else None
    run_ctx = RunContext(model=model, model_name=model_name, corpus=dict(corpus), text_sha=text_sha, quick=quick,
                         device=device, source_grid=source_grid,
                         saved_dir=str(Path(saved_dir).expanduser().resolve()) if saved_dir else None)
    # The provenance of the machine the points run on (for Ray: reported by a worker with the
    # resources of one point), so the context check below compares what the rows will carry.
    prov = executor.provenance(device)

    # Everything else that can fail on bad input happens here, before the first point runs.
    prepared: list[_Prepared] = []
    for sw in sweeps:
        st = sw.settings(quick)
        points = sw.points(quick)
        for s in points:
            try:
                check_spec_fits(s, shapes)
            except ValueError as e:
                raise ValueError(f"sweep {sw.name!r}, point {s.label()}: {e}") from e
        key = ("eval", st["eval_tokens"], st["seqlen"])
        calib = None
        if any(s.needs() for s in points):
            calib = token_cache[("calib", st["calib_samples"], st["calib_seqlen"], st["seed"])]
        path = out / f"sweep_{sw.name}.csv"
        existing = read_rows(path)
        # The context this run writes; a table of another context is an error, never "already done".
        ctx_row = context_row(model_name, corpus, text_sha, quick, st, prov)
        check_context(path, [ctx_row], SWEEP_CONTEXT, existing=existing)
        failed_before = read_rows(failed_path(path))
        check_context(failed_path(path), [ctx_row], SWEEP_CONTEXT, existing=failed_before)
        done = {r.get("point_id") for r in existing}
        ids = [(point_id(s, st, model_name, corpus), s) for s in points]
        todo = [(pid, s) for pid, s in ids if pid not in done]
        n_failed = len({r.get("point_id") for r in failed_before} & {pid for pid, _ in todo})
        prepared.append(_Prepared(sw, st, path, todo, len(ids) - len(todo), n_failed, token_cache[key], calib))

    jobs = [PointJob(p.sweep.name, pid, spec, p.settings, p.path) for p in prepared for pid, spec in p.todo]
    for p in prepared:
        if p.n_done:
            log(f"sweep {p.sweep.name}: {p.n_done} point(s) already in {p.path}, {len(p.todo)} to run")
        if p.n_failed_before:
            log(f"sweep {p.sweep.name}: {p.n_failed_before} point(s) failed in an earlier run "
                f"({failed_path(p.path)}); running them again")
    from experiments.core.progress import progress_bar
    bar = progress_bar(total=len(jobs), desc="sweep points", unit="point", enabled=progress)
    inputs = {p.sweep.name: (p.windows, p.calib) for p in prepared}

    def on_row(job: PointJob, row: Mapping[str, Any]) -> None:
        # The driver is the only writer: a row is appended atomically once its point has finished,
        # whichever executor measured it, and an earlier failure of the point is forgotten.
        append_row(job.table, row, context=SWEEP_CONTEXT)
        clear_failure(job.table, job.point_id)
        log(f"{job.sweep}: {job.spec.label():40s} ppl {row['ppl']:>10.4g}  {row['bits_per_weight']:.3g} bits/w  "
            f"compress {row['compress_seconds']:.1f}s eval {row['eval_seconds']:.1f}s")
        bar.update(1)

    def on_failure(job: PointJob, error: str, attempts: int) -> None:
        record_failure(job, error, attempts, executor=executor.name,
                       context=context_row(model_name, corpus, text_sha, quick, job.settings, prov), prov=prov)
        failures.append((job, error))
        log(f"{job.sweep}: {job.spec.label():40s} FAILED after {attempts} attempt(s): {error}")
        bar.update(1)

    failures: list[tuple[PointJob, str]] = []
    try:
        executor.run(jobs, run_ctx, inputs, on_row=on_row, on_failure=on_failure, progress=progress)
    finally:
        bar.close()
        executor.close()
    paths = [p.path for p in prepared]
    if failures:
        raise PointsFailed(paths, [(j.sweep, j.spec.label(), e) for j, e in failures],
                           sorted({str(failed_path(j.table)) for j, _ in failures}))
    return paths
