"""A resumable runner that writes one long CSV per sweep.

A sweep is a YAML file in ``experiments/sweeps/`` (its format and settings: :mod:`experiments.run.sweep_config`).

Runner (:func:`run_sweeps`): the model is loaded once and deep-copied for every point (the cache
of ``experiments.lm.models.load_model``); every
point is validated against the model's layer shapes, and the evaluation/calibration tokens are cut,
*before* the first point runs, so bad input fails with no row written. A sweep's ``name`` is a plain
name (letters, digits, ``.``, ``_``, ``-``; no path separator, no ``..``): it names the table. Each finished point is
appended atomically (``experiments.core.results.append_row``) to ``<out>/sweep_<name>.csv``
(``<out>/quick/sweep_<name>.csv`` for ``--quick``, so quick and full results never mix). ``<out>``
is a run directory (``experiments.core.runs.run_root``: ``runs/local`` for the default model and corpus,
never the committed ``results/``). A table holds one context (``experiments.core.runs.SWEEP_CONTEXT``:
model, corpus and a hash of its text, settings, machine): a run whose context differs from a
table's rows fails before the first point with an error naming the difference, so another model,
text or machine never counts as "already done" and never mixes in. A point's id is a hash of its
spec, its settings, the model and the corpus; points whose id is already in the table are skipped,
so a run killed at any moment (even ``kill -9``) resumes where it stopped, with no duplicate, lost
or half-written row. A row that is not complete (a table cut by a copy, an editor or a disk) is
reported with its line number and never counts as done: its point is measured again, and the
rewrite that leaves the line out first keeps a copy of the table (``experiments.core.results``). One
process at a time writes a run directory: it holds the directory's lock
(``experiments.core.runs.run_dir_lock``) from reading the finished points to writing the last row, and a
second run into the same directory exits with an error naming the directory and the first process
(pid, host, command); each point's table is read again right before the point is measured, and a
point id already there is never measured or appended again. Torch's RNG is re-seeded for every point.

Each point is measured by :func:`experiments.run.point.measure_point` (a fresh copy of the model, compression,
perplexity, the row), called by an executor (``experiments.run.executors``): the default runs the points
one after another in this process; ``--executor ray`` runs them as Ray tasks, locally or on a
cluster, and hands every row back to this process, which stays the only writer of the table.

The dense reference (the paired metrics KL / top-1 / ΔNLL against the dense model, issue 24) is
computed once per run directory and set of evaluation windows, by this process, holding the run
directory's lock, before the first point runs (and only when a point is left to run): one dense
forward pass over the windows, on ``device`` (on this machine's CPU when ``device`` is not here, as
for a Ray cluster whose workers hold the GPUs; the dense point's KL then shows that numeric
difference, ~1e-6 nats). It is saved atomically as ``<out>/dense_reference/<digest>.pt`` (the digest
covers the model, the windows, ``k``, the machine and torch; :func:`dense_reference_path`), so a
resumed run loads it instead of recomputing it, and it travels to the executors inside each sweep's
:class:`experiments.run.point.Evaluation` (for Ray, through the object store once per sweep, ~2 MB):
workers on other machines need no access to the run directory. The second evaluation text
(``experiments.lm.data.second_evaluation_text``, the ``eval2_windows`` setting) is cut here too.
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

from experiments.core.runs import PLAIN_NAME_RULE, is_plain_name
from experiments.lm.models import layer_shapes
from experiments.methods.compress import check_spec_fits
from experiments.methods.spec import MethodSpec
from experiments.run.executors import (Executor, PointJob, PointsFailed, SerialExecutor, clear_failure, failed_path,
                                       record_failure)
from experiments.run.point import Evaluation, RunContext, context_row
from experiments.run.sweep_config import ADDED_SETTINGS, SWEEPS_DIR, Sweep


# ----------------------------------------------------------------------------- rows

def point_id(spec: MethodSpec, settings: Mapping[str, Any], model: str, corpus: Mapping[str, str]) -> str:
    """Stable id of a measured point: same spec + settings + model + corpus -> same id. Settings added
    after the reference tables were committed (``sweep_config.ADDED_SETTINGS``) are left out, so
    committed rows keep their ids (their value is a context column instead)."""
    kept = {k: v for k, v in sorted(settings.items()) if k not in ADDED_SETTINGS}
    key = json.dumps({"spec": spec.to_dict(), "settings": kept, "model": model,
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


def _eval_windows(sw: Sweep, quick: bool, tokenizer, text: str, st: Mapping[str, int], text_file,
                  key: str = "eval_tokens", which: str = "evaluation text") -> torch.Tensor:
    """``data.eval_tokens`` for a sweep's settings (budget ``st[key]``: tokens for ``eval_tokens``, windows
    for ``eval2_windows``); a too-short text names the sweep settings to change."""
    from experiments.lm import data
    n_tok = int(data.tokenize(tokenizer, text).numel())
    seqlen = st["seqlen"]
    wanted = st[key] // seqlen if key == "eval_tokens" else st[key]
    available = n_tok // seqlen
    if wanted > available:
        if available == 0:
            fix = f"seqlen <= {n_tok} ({_where_to_set(sw, quick, 'seqlen')})"
        else:
            fits = available * seqlen if key == "eval_tokens" else available
            fix = f"{key} <= {fits} ({_where_to_set(sw, quick, key)})"
        raise ValueError(f"sweep {sw.name!r}{' (--quick)' if quick else ''}: the {which} has {n_tok} tokens, "
                         f"{available} full window(s) of seqlen={seqlen}, but the setting {key}={st[key]} asks for "
                         f"{wanted}; set {fix}, or give a longer "
                         f"{'--text-file' if text_file else 'text with --text-file'}")
    return data.eval_tokens(tokenizer, text, max_tokens=wanted * seqlen, seqlen=seqlen)


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
    windows2: torch.Tensor | None = None
    reference: Any = None           # experiments.lm.evaluate.DenseReference of ``windows`` (dense_references)
    task: Any = None                # experiments.lm.tasks.TaskItems (setting task_items; None: no task)


def _eval_key(st: Mapping[str, int]) -> tuple:
    return ("eval", st["eval_tokens"], st["seqlen"])


def _eval2_key(st: Mapping[str, int]) -> tuple:
    return ("eval2", st["eval2_windows"], st["seqlen"])


def _task_key(st: Mapping[str, int]) -> tuple:
    return ("task", st["task_items"])


def _task_items(sweeps: list[Sweep], quick: bool, tokenizer, task_text: str | None) -> dict[tuple, Any]:
    """The multiple-choice task (``experiments.lm.tasks``) of every sweep whose ``task_items`` > 0, built
    once per item count from ``task_text``; none when there is no task text (``--text-file``, WikiText-2)."""
    from experiments.lm import tasks
    out: dict[tuple, Any] = {}
    for sw in sweeps:
        st = sw.settings(quick)
        if task_text is not None and st["task_items"] > 0 and _task_key(st) not in out:
            try:
                out[_task_key(st)] = tasks.build_task(tokenizer, task_text, n_items=st["task_items"])
            except ValueError as e:
                raise ValueError(f"sweep {sw.name!r}{' (--quick)' if quick else ''}: {e}; set a smaller "
                                 f"{_where_to_set(sw, quick, 'task_items')}") from e
    return out


def _calib_key(st: Mapping[str, int]) -> tuple:
    return ("calib", st["calib_samples"], st["calib_seqlen"], st["seed"])


def _token_windows(sweeps: list[Sweep], quick: bool, tokenizer, calib_text: str, eval_text: str,
                   text_file, eval2_text: str | None = None) -> dict[tuple, Any]:
    """Every sweep's evaluation windows (and calibration windows, where a point needs them, and the
    second text's, where there is one and ``eval2_windows`` > 0), each cut once; a text too short for a
    sweep's budgets fails here, before the model loads."""
    token_cache: dict[tuple, Any] = {}
    for sw in sweeps:
        st = sw.settings(quick)
        if _eval_key(st) not in token_cache:
            token_cache[_eval_key(st)] = _eval_windows(sw, quick, tokenizer, eval_text, st, text_file)
        if eval2_text is not None and st["eval2_windows"] > 0 and _eval2_key(st) not in token_cache:
            token_cache[_eval2_key(st)] = _eval_windows(sw, quick, tokenizer, eval2_text, st, text_file,
                                                        key="eval2_windows", which="second evaluation text")
        if any(s.needs() for s in sw.points(quick)) and _calib_key(st) not in token_cache:
            token_cache[_calib_key(st)] = _calib_windows(sw, quick, tokenizer, calib_text, st, text_file)
    return token_cache


def _model_facts(model: str, log: Callable[[str], None], t0: float) -> tuple[dict[str, tuple[int, int]], str, Any]:
    """(layer shapes, the ``model`` column's name, the model's source grid) of ``model``, loaded once.

    ``load_model`` keeps one pristine template per process and returns a deep copy per call (~1 s), so
    every point later starts from the uncompressed model without reloading the file."""
    from experiments.lm import models
    first, _tokenizer, info = models.load_model(model)
    log(f"loaded model {model!r} in {time.perf_counter() - t0:.1f}s")
    shapes = layer_shapes(first)
    del first
    model_name = str(info.get("name", model)) if isinstance(info, Mapping) else model
    source_grid = info.get("source_grid") if isinstance(info, Mapping) else None
    return shapes, model_name, source_grid


def _check_points_fit(sweeps: list[Sweep], quick: bool, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Every point fits the model's layer shapes (ValueError naming the sweep and point otherwise)."""
    for sw in sweeps:
        for s in sw.points(quick):
            try:
                check_spec_fits(s, shapes)
            except ValueError as e:
                raise ValueError(f"sweep {sw.name!r}, point {s.label()}: {e}") from e


def _table_path(out: Path, sw: Sweep) -> Path:
    """``<out>/sweep_<name>.csv``; the name is a plain name (:func:`load_sweep`), checked again here so
    no table is ever written outside the run directory (a :class:`Sweep` may be built without it)."""
    if not is_plain_name(sw.name):
        raise ValueError(f"sweep {sw.name!r} ({sw.path}): the name must be a plain name ({PLAIN_NAME_RULE})")
    return out / f"sweep_{sw.name}.csv"


def _finished_ids(table: Path) -> set[str]:
    """Point ids of the valid rows of ``table`` (damaged rows are reported and never count)."""
    from experiments.core.results import read_rows
    from experiments.core.runs import SWEEP_NUMERIC
    return {r.get("point_id", "") for r in read_rows(table, numeric=SWEEP_NUMERIC)}


def _prepare_sweep(sw: Sweep, quick: bool, out: Path, token_cache: Mapping[tuple, Any],
                   ctx_row: Mapping[str, Any], model_name: str, corpus: Mapping[str, str]) -> _Prepared:
    """What is left to run of ``sw`` in ``out`` (call it holding the run directory's lock): its table's
    context must be this run's (an error otherwise, never "already done"), and points already there
    are skipped."""
    from experiments.core.results import check_context, read_rows
    from experiments.core.runs import SWEEP_CONTEXT, SWEEP_CONTEXT_ADDED, SWEEP_NUMERIC
    st = sw.settings(quick)
    points = sw.points(quick)
    calib = token_cache[_calib_key(st)] if any(s.needs() for s in points) else None
    path = _table_path(out, sw)
    existing = read_rows(path, numeric=SWEEP_NUMERIC)
    check_context(path, [ctx_row], SWEEP_CONTEXT, existing=existing, added=SWEEP_CONTEXT_ADDED)
    failed_before = read_rows(failed_path(path))
    check_context(failed_path(path), [ctx_row], SWEEP_CONTEXT, existing=failed_before, added=SWEEP_CONTEXT_ADDED)
    done = {r.get("point_id") for r in existing}
    ids = [(point_id(s, st, model_name, corpus), s) for s in points]
    todo = [(pid, s) for pid, s in ids if pid not in done]
    n_failed = len({r.get("point_id") for r in failed_before} & {pid for pid, _ in todo})
    return _Prepared(sw, st, path, todo, len(ids) - len(todo), n_failed, token_cache[_eval_key(st)], calib,
                     token_cache.get(_eval2_key(st)), task=token_cache.get(_task_key(st)))


REFERENCE_DIR = "dense_reference"


def dense_reference_path(directory: Path, model: str, model_name: str, windows: torch.Tensor,
                         prov: Mapping[str, str]) -> Path:
    """Where the dense reference of ``windows`` lives in ``directory`` (a run's ``<out>/dense_reference``):
    ``<digest>.pt``, the digest of the model (spec and name), the windows, the top-k and format, the
    machine and torch."""
    from experiments.core.runs import digest
    from experiments.lm.evaluate import REFERENCE_FORMAT, REFERENCE_TOPK, windows_digest
    key = digest(model, model_name, windows_digest(windows), REFERENCE_TOPK, REFERENCE_FORMAT,
                 prov.get("device", ""), prov.get("torch", ""))
    return Path(directory) / f"{key}.pt"


def _dense_references(prepared: list[_Prepared], out: Path, model: str, model_name: str, device: str,
                      prov: Mapping[str, str], *, threads: int | None = None, progress: bool,
                      log: Callable[[str], None]) -> None:
    """Fill each prepared sweep's ``reference`` (module docstring): loaded from the run directory, or
    computed with the dense model and saved there; only for sweeps with points left to run. Call it
    holding the run directory's lock. ``threads``: torch's CPU threads while computing it, those a
    point runs with (Ray's ``--cpus-per-point``), so the dense point's KL against it is exactly 0."""
    from experiments.lm import evaluate, models
    from experiments.run.point import device_of
    done: dict[Path, Any] = {}
    model_copy = None
    for p in prepared:
        if not p.todo:
            continue
        path = dense_reference_path(out / REFERENCE_DIR, model, model_name, p.windows, prov)
        if path not in done:
            ref = evaluate.load_reference(path)
            if ref is None or ref.windows_sha != evaluate.windows_digest(p.windows):
                try:
                    dev = device_of(device)
                except ValueError:
                    dev = torch.device("cpu")   # e.g. --device cuda for Ray workers, none on this machine
                    log(f"dense reference: device {device!r} is not available here; computing it on the CPU")
                if model_copy is None:
                    model_copy = models.load_model(model)[0].to(dev)
                t0 = time.perf_counter()
                before = torch.get_num_threads()
                torch.set_num_threads(threads or before)
                try:
                    ref = evaluate.dense_reference(model_copy, p.windows.to(dev), progress=progress)
                finally:
                    torch.set_num_threads(before)
                evaluate.save_reference(ref, path)
                log(f"dense reference ({tuple(p.windows.shape)} windows, top-{ref.k}, {ref.nbytes() / 1e6:.2f} MB) "
                    f"computed in {time.perf_counter() - t0:.1f}s -> {path}")
            else:
                log(f"dense reference loaded from {path}")
            done[path] = ref
        p.reference = done[path]
    del model_copy


def _log_resume(prepared: list[_Prepared], log: Callable[[str], None]) -> None:
    for p in prepared:
        if p.n_done:
            log(f"sweep {p.sweep.name}: {p.n_done} point(s) already in {p.path}, {len(p.todo)} to run")
        if p.n_failed_before:
            log(f"sweep {p.sweep.name}: {p.n_failed_before} point(s) failed in an earlier run "
                f"({failed_path(p.path)}); running them again")


class _TableWriter:
    """The executor's callbacks: this process is the only writer of the tables (it holds the run
    directory's lock). ``is_done`` checks a point's table again right before the point is measured,
    ``on_row`` appends a finished point's row atomically (never a second row of a point id) and forgets
    an earlier failure of the point, ``on_failure`` records a point given up on."""

    def __init__(self, executor: Executor, bar, log: Callable[[str], None], context_of: Callable[[Mapping], dict],
                 prov: Mapping[str, str]):
        self.executor, self.bar, self.log, self.context_of, self.prov = executor, bar, log, context_of, prov
        self.failures: list[tuple[PointJob, str]] = []

    def is_done(self, job: PointJob) -> bool:
        if job.point_id not in _finished_ids(job.table):
            return False
        self.log(f"{job.sweep}: {job.spec.label():40s} already in {job.table} (written meanwhile); not measured again")
        self.bar.update(1)
        return True

    def on_row(self, job: PointJob, row: Mapping[str, Any]) -> None:
        from experiments.core.results import append_row
        from experiments.core.runs import SWEEP_CONTEXT, SWEEP_CONTEXT_ADDED, SWEEP_NUMERIC
        if not append_row(job.table, row, context=SWEEP_CONTEXT, numeric=SWEEP_NUMERIC, unique="point_id",
                          added_context=SWEEP_CONTEXT_ADDED):
            self.log(f"{job.sweep}: {job.spec.label():40s} already in {job.table} (written meanwhile); not appended")
        else:
            clear_failure(job.table, job.point_id)
            kl = f"  KL {row['kl']:.3g}" if isinstance(row.get("kl"), float) else ""
            self.log(f"{job.sweep}: {job.spec.label():40s} ppl {row['ppl']:>10.4g}{kl}  {row['bits_per_weight']:.3g} "
                     f"bits/w  compress {row['compress_seconds']:.1f}s eval {row['eval_seconds']:.1f}s")
        self.bar.update(1)

    def on_failure(self, job: PointJob, error: str, attempts: int) -> None:
        record_failure(job, error, attempts, executor=self.executor.name, context=self.context_of(job.settings),
                       prov=self.prov)
        self.failures.append((job, error))
        self.log(f"{job.sweep}: {job.spec.label():40s} FAILED after {attempts} attempt(s): {error}")
        self.bar.update(1)


def _measure_points(executor: Executor, prepared: list[_Prepared], run_ctx: "RunContext", *, progress: bool,
                    log: Callable[[str], None], context_of: Callable[[Mapping], dict],
                    prov: Mapping[str, str]) -> list[tuple[PointJob, str]]:
    """Run every unfinished point on ``executor``, writing each row as it comes; returns the failures."""
    from experiments.core.progress import progress_bar
    jobs = [PointJob(p.sweep.name, pid, spec, p.settings, p.path) for p in prepared for pid, spec in p.todo]
    bar = progress_bar(total=len(jobs), desc="sweep points", unit="point", enabled=progress)
    inputs = {p.sweep.name: (Evaluation(p.windows, p.reference, p.windows2, p.task), p.calib) for p in prepared}
    writer = _TableWriter(executor, bar, log, context_of, prov)
    try:
        executor.run(jobs, run_ctx, inputs, on_row=writer.on_row, on_failure=writer.on_failure, progress=progress,
                     is_done=writer.is_done)
    finally:
        bar.close()
        executor.close()
    return writer.failures


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

    One run at a time per run directory (``<out>`` or ``<out>/quick``): the tables are read and written
    holding its lock (``experiments.core.runs.run_dir_lock``), from before the finished points are read
    until the last row is written; another process running into the same directory meanwhile exits
    with ``experiments.core.runs.RunInUse`` (one ``error:`` line naming the directory and this process), at
    the start when the lock is already held, else before it reads any table.

    ``saved_dir``: a directory of saved compressed models, one per point (``<saved_dir>/<point_id>``,
    written by ``experiments.run.saving.save_compressed``). A point found there is loaded instead of
    compressed again (its manifest's spec must be the point's); a point not found is compressed and
    saved there, so the next sweep over the same points (another evaluation text, say, with the same
    calibration) reuses it. The row is the same either way (``compress_seconds`` is the saved
    compression's). Never the reference ``results/``.
    """
    from experiments.lm import data, models
    from experiments.core.runs import check_run_dir_free, mode_dir, refuse_reference_dir, run_dir_lock, run_root

    # A seed sweep (experiments.run.sweep_config.Sweep.seed_sweeps) may have no points in this mode.
    sweeps = [sw for sw in sweeps if sw.points(quick)]
    executor = executor or SerialExecutor()
    executor.check_device(device)
    out = mode_dir(run_root(out_dir=out_dir, run=run, model=model, text_file=text_file, source=source), quick)
    if saved_dir is not None:
        refuse_reference_dir(Path(saved_dir).expanduser(), "--saved-dir")
    check_run_dir_free(out)  # fail in a second when another run holds it, not after the model load
    t0 = time.perf_counter()
    calib_text, eval_text, corpus = data.get_texts(source=source, text_file=text_file)
    text_sha = text_digest(calib_text, eval_text)
    second = (data.second_evaluation_text(source=source, text_file=text_file)
              if any(sw.settings(quick)["eval2_windows"] > 0 for sw in sweeps) else None)
    text2 = None if second is None else {"name": second[0],
                                         "sha256": hashlib.sha256(second[1].encode("utf-8", "replace")).hexdigest()[:16]}
    # The tokenizer alone first: the texts are checked against every sweep's token budgets before
    # the model load (~25 s for the default model), so a too-short text fails in seconds.
    tokenizer = models.load_tokenizer(model)
    token_cache = _token_windows(sweeps, quick, tokenizer, calib_text, eval_text, text_file,
                                 None if second is None else second[1])
    task = None
    if any(sw.settings(quick)["task_items"] > 0 for sw in sweeps) and text_file is None and source == "austen":
        from experiments.lm import tasks
        task_source, task_desc = tasks.default_task_text()
        task = (task_desc["task_text"], _task_items(sweeps, quick, tokenizer, task_source))
        token_cache.update(task[1])
    log(f"texts tokenized in {time.perf_counter() - t0:.1f}s; loading model {model!r}")
    shapes, model_name, source_grid = _model_facts(model, log, t0)
    run_ctx = RunContext(model=model, model_name=model_name, corpus=dict(corpus), text_sha=text_sha, quick=quick,
                         device=device, source_grid=source_grid,
                         saved_dir=str(Path(saved_dir).expanduser().resolve()) if saved_dir else None, text2=text2,
                         task_text=task[0] if task else None)
    # The provenance of the machine the points run on (for Ray: reported by a worker with the
    # resources of one point), so the context check compares what the rows will carry.
    prov = executor.provenance(device)

    def context_of(settings: Mapping[str, int]) -> dict[str, Any]:
        return context_row(model_name, corpus, text_sha, quick, settings, prov, text2, task[0] if task else None)

    # Everything else that can fail on bad input happens before the first point runs.
    _check_points_fit(sweeps, quick, shapes)
    with run_dir_lock(out):
        prepared = [_prepare_sweep(sw, quick, out, token_cache, context_of(sw.settings(quick)), model_name, corpus)
                    for sw in sweeps]
        _log_resume(prepared, log)
        _dense_references(prepared, out, model, model_name, device, prov, progress=progress, log=log,
                          threads=getattr(executor, "cpus_per_point", None))
        failures = _measure_points(executor, prepared, run_ctx, progress=progress, log=log, context_of=context_of,
                                   prov=prov)
    paths = [p.path for p in prepared]
    if failures:
        raise PointsFailed(paths, [(j.sweep, j.spec.label(), e) for j, e in failures],
                           sorted({str(failed_path(j.table)) for j, _ in failures}))
    return paths
