"""Sweeps as data, and a resumable runner that writes one long CSV per sweep.

A sweep is a YAML file in ``experiments/sweeps/`` (files starting with ``_`` are shared settings,
not sweeps)::

    name: quant
    description: ...
    settings: {eval_tokens: 16384}         # overrides _defaults.yaml "full" for this sweep
    points:                                # explicit method specs (see experiments.methods.compress)
      - {method: dense}
    grid:                                  # each entry: cartesian product of its lists
      - {method: [rtn, gptq], bits: [3, 4], group_size: [64, -1]}
    quick:                                 # the --quick subset: its own points and settings
      settings: {eval_tokens: 2048}
      points: [...]

Settings (``_defaults.yaml``, sections ``full`` and ``quick``, overridden per sweep): ``seqlen``
(evaluation window), ``eval_tokens`` (evaluation budget), ``calib_samples`` and ``calib_seqlen``
(calibration windows), ``seed``.

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

Each point is measured by :func:`measure_point` (a fresh copy of the model, compression,
perplexity, the row), called by an executor (``experiments.run.executors``): the default runs the points
one after another in this process; ``--executor ray`` runs them as Ray tasks, locally or on a
cluster, and hands every row back to this process, which stays the only writer of the table.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from experiments.methods import families
from experiments.lm.models import layer_shapes
from experiments.methods.compress import (MethodSpec, aliases_source_grid, check_spec_fits, compress_model,
                                          module_backends, parse_spec)
from experiments.run.executors import (Executor, PointJob, PointsFailed, SerialExecutor, clear_failure, failed_path,
                                   record_failure)

SWEEPS_DIR = Path(__file__).resolve().parents[1] / "sweeps"
SETTING_KEYS = ("seqlen", "eval_tokens", "calib_samples", "calib_seqlen", "seed")


@dataclass
class Sweep:
    name: str
    description: str
    full_points: list[MethodSpec]
    quick_points: list[MethodSpec]
    full_settings: dict[str, int]
    quick_settings: dict[str, int]
    path: Path

    def points(self, quick: bool) -> list[MethodSpec]:
        return self.quick_points if quick else self.full_points

    def settings(self, quick: bool) -> dict[str, int]:
        return self.quick_settings if quick else self.full_settings


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"sweep file {path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"sweep file {path}: expected a mapping at the top level")
    return data


def _settings(base: Mapping[str, Any], override: Mapping[str, Any] | None, where: str) -> dict[str, int]:
    out = dict(base)
    for k, v in (override or {}).items():
        if k not in SETTING_KEYS:
            raise ValueError(f"{where}: unknown setting {k!r}; settings are {', '.join(SETTING_KEYS)}")
        out[k] = v
    for k in SETTING_KEYS:
        v = out.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "seed" else 1):
            raise ValueError(f"{where}: setting {k}={v!r} must be a {'non-negative' if k == 'seed' else 'positive'} integer")
    if out["eval_tokens"] < out["seqlen"]:
        raise ValueError(f"{where}: setting eval_tokens={out['eval_tokens']} is smaller than seqlen={out['seqlen']}, "
                         f"so no evaluation window fits; use eval_tokens >= {out['seqlen']} (a multiple of seqlen)")
    return out


def _expand(section: Mapping[str, Any], where: str) -> list[MethodSpec]:
    specs: list[MethodSpec] = []
    for i, p in enumerate(section.get("points") or []):
        specs.append(parse_spec(p, where=f"{where} points[{i}]"))
    for i, g in enumerate(section.get("grid") or []):
        if not isinstance(g, Mapping):
            raise ValueError(f"{where} grid[{i}]: expected a mapping of option -> list of values")
        keys = list(g)
        values = [v if isinstance(v, list) else [v] for v in g.values()]
        for combo in itertools.product(*values):
            specs.append(parse_spec(dict(zip(keys, combo)), where=f"{where} grid[{i}]"))
    seen: dict[str, int] = {}
    unique = []
    for s in specs:
        key = json.dumps(s.to_dict(), sort_keys=True)
        if key not in seen:
            seen[key] = 1
            unique.append(s)
    return unique


def load_sweep(path: str | Path, defaults: Mapping[str, Any] | None = None) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep file {str(path)!r} does not exist")
    if defaults is None:
        defaults = _load_yaml(SWEEPS_DIR / "_defaults.yaml")
    data = _load_yaml(path)
    known = {"name", "description", "settings", "points", "grid", "quick"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"sweep file {path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
    name = data.get("name", path.stem)
    quick = data.get("quick") or {}
    full_settings = _settings(defaults.get("full", {}), data.get("settings"), f"{path.name} settings")
    quick_settings = _settings(defaults.get("quick", {}), quick.get("settings"), f"{path.name} quick.settings")
    full_points = _expand(data, f"{path.name}")
    quick_points = _expand(quick, f"{path.name} quick")
    if not full_points:
        raise ValueError(f"sweep file {path}: no points (give `points:` and/or `grid:`)")
    return Sweep(name=name, description=str(data.get("description", "")).strip(), full_points=full_points,
                 quick_points=quick_points or full_points[:2], full_settings=full_settings,
                 quick_settings=quick_settings, path=path)


def available_sweeps(sweeps_dir: Path = SWEEPS_DIR) -> dict[str, Path]:
    return {p.stem: p for p in sorted(sweeps_dir.glob("*.yaml")) if not p.name.startswith("_")}


def resolve_sweeps(name: str, sweeps_dir: Path = SWEEPS_DIR) -> list[Sweep]:
    """``name`` is a sweep name, ``all``, or a path to a sweep YAML file."""
    avail = available_sweeps(sweeps_dir)
    if name == "all":
        return [load_sweep(p) for p in avail.values()]
    if name in avail:
        return [load_sweep(avail[name])]
    if name.endswith((".yaml", ".yml")):
        return [load_sweep(name)]
    raise ValueError(f"sweep={name!r} is not known; choose one of {', '.join(avail)}, 'all', "
                     f"or a path to a sweep .yaml file")


# ----------------------------------------------------------------------------- rows

def point_id(spec: MethodSpec, settings: Mapping[str, Any], model: str, corpus: Mapping[str, str]) -> str:
    """Stable id of a measured point: same spec + settings + model + corpus -> same id."""
    key = json.dumps({"spec": spec.to_dict(), "settings": dict(sorted(settings.items())), "model": model,
                      "corpus": dict(sorted(corpus.items()))}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def method_columns(spec: MethodSpec) -> dict[str, Any]:
    """Flat method columns: every registered family's columns, filled by the spec's family, others "".

    A combo fills the pruning columns from its first step and the quantization columns from its
    second (:mod:`experiments.methods.families.combo`). Tables written before the scope/damp columns existed
    lack them (see :mod:`experiments.methods.families.sparse`).
    """
    filled = families.family_of(spec.method).method_columns(spec)
    return {"method": spec.method, **{c: filled.get(c, "") for c in families.all_columns()},
            "spec": json.dumps(spec.to_dict(), sort_keys=True)}


def _device_of(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: no CUDA device is available here; use --device cpu")
    return dev


def text_digest(calib_text: str, eval_text: str) -> str:
    """Hash of the calibration and evaluation texts (the ``text_sha256`` context column): a changed
    text file under the same name is another context."""
    h = hashlib.sha256(calib_text.encode("utf-8", "replace"))
    h.update(b"\0")
    h.update(eval_text.encode("utf-8", "replace"))
    return h.hexdigest()[:16]


def _context_row(model_name: str, corpus: Mapping[str, str], text_sha: str, quick: bool,
                 settings: Mapping[str, int], prov: Mapping[str, str]) -> dict[str, Any]:
    """The context columns (``experiments.core.runs.SWEEP_CONTEXT``) of this run's rows."""
    return {"model": model_name, "corpus": corpus.get("corpus", ""),
            "calibration_text": corpus.get("calibration", ""), "evaluation_text": corpus.get("evaluation", ""),
            "text_sha256": text_sha, "quick": quick, "seqlen": settings["seqlen"],
            "eval_token_budget": settings["eval_tokens"], "seed": settings["seed"],
            "device_type": prov["device_type"], "device": prov["device"], "torch": prov["torch"]}


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
        ctx_row = _context_row(model_name, corpus, text_sha, quick, st, prov)
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
                       context=_context_row(model_name, corpus, text_sha, quick, job.settings, prov), prov=prov)
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


@dataclass(frozen=True)
class RunContext:
    """What every point of a run shares (picklable: executors ship it to their workers)."""
    model: str                      # the spec to load (models.load_model)
    model_name: str                 # the ``model`` column
    corpus: dict[str, str]
    text_sha: str
    quick: bool
    device: str
    source_grid: dict | None
    saved_dir: str | None = None    # saved compressed points to reuse / fill (see run_sweeps)


def _compressed_point(run: RunContext, pid: str, spec: MethodSpec, settings: Mapping[str, int], m, calib,
                      dev: torch.device, progress: bool):
    """(model compressed by ``spec``, the compression report's summary): compressed here, or loaded
    from ``run.saved_dir/<pid>`` when that holds this point (and saved there when it does not)."""
    from experiments.run import saving
    where = Path(run.saved_dir) / pid if run.saved_dir else None
    if where is not None and (where / saving.MANIFEST).exists():
        m = saving.load_compressed(where, base=m).to(dev)
        man = m.compressed_manifest
        if man.get("spec") != spec.to_dict() or not man.get("report"):
            raise saving.CompressedFormatError(
                f"{where}: saved for spec {man.get('spec')} (report {'present' if man.get('report') else 'missing'}), "
                f"but point {pid} is {spec.to_dict()}; remove that directory or use another --saved-dir")
        print(f"[sweep] {spec.label()}: loaded from {where} (not recompressed)", file=sys.stderr)
        return m, dict(man["report"])
    report = compress_model(m, spec, calib, progress=progress)
    if where is not None:
        calibration = ({"calib_samples": settings["calib_samples"], "calib_seqlen": settings["calib_seqlen"],
                        "seed": settings["seed"]} if spec.needs() else None)
        saving.save_compressed(m, report, where, base_model=run.model, calibration=calibration)
    return m, report.summary()


def measure_point(run: RunContext, sweep: str, pid: str, spec: MethodSpec, settings: Mapping[str, int],
                  windows: torch.Tensor, calib: torch.Tensor | None, *, progress: bool = True) -> dict[str, Any]:
    """Measure one sweep point where this runs and return its table row: a fresh copy of the model
    (``models.load_model`` keeps one template per process, so a worker loads the file once), the
    compression, the perplexity, and the provenance of this process's machine. Every executor calls
    this; the row does not depend on which one did.

    The modules' CPU backend choice by timing (``triton_kernels.nn._backend``) is off here: a
    perplexity is an accuracy number, and a choice that depends on the machine's load would make
    its last digits depend on it too. ``auto`` then takes each module's static order (the dense
    weight for SparseLinear, dequantize for fp32 QuantLinear); the ``module_backends`` column says
    what ran."""
    from experiments.lm import evaluate, models
    from experiments.core.provenance import provenance
    from triton_kernels.nn._backend import autotune

    dev = _device_of(run.device)
    prov = provenance(dev)
    torch.manual_seed(settings["seed"])
    m = models.load_model(run.model)[0].to(dev)
    calib = calib.to(dev) if calib is not None else None
    with autotune(False):
        m, summary = _compressed_point(run, pid, spec, settings, m, calib, dev, progress)
        ev = evaluate.perplexity(m, windows.to(dev), progress=progress)
        backends = module_backends(m)
    del m
    return {"sweep": sweep, "point_id": pid, "point": spec.label(), **method_columns(spec),
            "ppl": float(f"{ev['ppl']:.6g}"), "nll": float(f"{ev['nll']:.6g}"),
            "eval_tokens": int(ev["n_tokens"]), "seqlen": settings["seqlen"],
            "eval_token_budget": settings["eval_tokens"],
            "calib_samples": settings["calib_samples"] if spec.needs() else 0,
            "calib_seqlen": settings["calib_seqlen"] if spec.needs() else 0,
            "seed": settings["seed"],
            **summary,
            "eval_seconds": round(float(ev["seconds"]), 2),
            "module_backends": backends,
            "aliases_source_grid": aliases_source_grid(spec, run.source_grid),
            "source_grid": json.dumps(run.source_grid, sort_keys=True) if run.source_grid else "",
            **_context_row(run.model_name, run.corpus, run.text_sha, run.quick, settings, prov),
            **prov, "timestamp": provenance(dev)["timestamp"]}
