"""One sweep point, measured where this runs: :func:`measure_point` (a fresh copy of the model, the
compression, the perplexity, the table row), which every executor (:mod:`experiments.run.executors`)
calls, and what it shares with the runner (:mod:`experiments.run.sweep`): the run's
:class:`RunContext`, what a point is scored on (:class:`Evaluation`), the context and method columns
of a row, the device check.

The columns of the evaluation (issue 24; tables older than them read them empty):

- ``ppl``, ``nll``, ``ppl_lo``/``ppl_hi`` (95% percentile bootstrap over the windows,
  :mod:`experiments.core.stats`; the method in ``bootstrap``), ``window_nll`` (JSON list: each window's
  mean NLL per predicted token, 8 significant digits; the windows are the same for every point of a
  table, so any two rows give a paired difference: ``experiments.analysis.paired``);
- against the dense model on the same windows, from the same forward pass (the run's dense reference,
  ``experiments.lm.evaluate.DenseReference``, top ``kl_topk`` tokens): ``kl`` (mean KL(dense || point)
  per token over the top-k + rest bins, a lower bound of the full KL), ``top1`` (fraction of tokens
  whose argmax is the dense model's), ``dnll`` (mean NLL minus the dense model's), each with
  ``_lo``/``_hi`` (paired bootstrap over windows). The dense point itself gets 0 / 1 / 0;
- the second evaluation text (``evaluation_text2``, ``eval2_windows`` of ``seqlen`` tokens (the setting),
  ``text2_sha256``): ``ppl2``, ``nll2``, ``ppl2_lo``/``ppl2_hi``, ``window_nll2``,
  ``eval2_tokens``, ``eval2_seconds``. Empty where the corpus has no second text (``--text-file``).
- the zero-shot multiple-choice task (``experiments.lm.tasks``, setting ``task_items``; context columns
  ``task_text``, ``task_items``): ``task_acc``/``task_acc_norm`` with Wilson 95% ``_lo``/``_hi``, ``task_n``,
  ``task_k``, ``task_correct``/``task_correct_norm`` (per-item answers, for paired comparisons),
  ``task_tokens_forwarded``, ``task_seconds``. Empty where ``task_items`` is 0 (the default) or the corpus
  has no task text (``--text-file``, WikiText-2).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from experiments.methods.compress import aliases_source_grid, compress_model, module_backends
from experiments.methods.spec import MethodSpec, all_columns, family_of


def method_columns(spec: MethodSpec) -> dict[str, Any]:
    """Flat method columns: every registered family's columns, filled by the spec's family, others "".

    A combo fills the pruning columns from its first step and the quantization columns from its
    second (:mod:`experiments.methods.families.combo`). Tables written before the scope/damp columns existed
    lack them (see :mod:`experiments.methods.families.sparse`).
    """
    filled = family_of(spec.method).method_columns(spec)
    return {"method": spec.method, **{c: filled.get(c, "") for c in all_columns()},
            "spec": json.dumps(spec.to_dict(), sort_keys=True)}


def device_of(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: no CUDA device is available here; use --device cpu")
    return dev


def context_row(model_name: str, corpus: Mapping[str, str], text_sha: str, quick: bool,
                settings: Mapping[str, int], prov: Mapping[str, str], text2: Mapping[str, str] | None = None,
                task_text: str | None = None) -> dict[str, Any]:
    """The context columns (``experiments.core.runs.SWEEP_CONTEXT`` and ``SWEEP_CONTEXT_ADDED``) of this
    run's rows; ``text2`` the second evaluation text's description and hash (:attr:`RunContext.text2`),
    ``task_text`` the task text's description (:attr:`RunContext.task_text`)."""
    from experiments.core.stats import bootstrap_method
    from experiments.lm.evaluate import REFERENCE_TOPK
    second = bool(text2) and settings.get("eval2_windows", 0) > 0
    task = bool(task_text) and settings.get("task_items", 0) > 0
    return {"model": model_name, "corpus": corpus.get("corpus", ""),
            "calibration_text": corpus.get("calibration", ""), "evaluation_text": corpus.get("evaluation", ""),
            "text_sha256": text_sha, "quick": quick, "seqlen": settings["seqlen"],
            "eval_token_budget": settings["eval_tokens"], "seed": settings["seed"],
            "device_type": prov["device_type"], "device": prov["device"], "torch": prov["torch"],
            "evaluation_text2": text2["name"] if second else "", "text2_sha256": text2["sha256"] if second else "",
            "eval2_windows": settings["eval2_windows"] if second else "",
            "kl_topk": REFERENCE_TOPK, "bootstrap": bootstrap_method(),
            "task_text": task_text if task else "", "task_items": settings["task_items"] if task else ""}


@dataclass(frozen=True)
class Evaluation:
    """What a point is scored on (picklable: executors ship it to their workers, Ray once per sweep):
    the evaluation windows, the dense model's reference on them (None: no paired metrics), and the
    second text's windows (None: no second text)."""
    windows: torch.Tensor
    reference: Any = None           # experiments.lm.evaluate.DenseReference of ``windows``
    windows2: torch.Tensor | None = None
    task: Any = None                # experiments.lm.tasks.TaskItems (None: no task)


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
    saved_dir: str | None = None    # saved compressed points to reuse / fill (see experiments.run.sweep.run_sweeps)
    text2: dict[str, str] | None = None   # the second evaluation text: {"name", "sha256"}; None: there is none
    task_text: str | None = None    # the task text's description (experiments.lm.tasks); None: there is none


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


def _nll_list(values) -> str:
    return json.dumps([float(f"{v:.8g}") for v in values])


def evaluation_columns(ev: Mapping[str, Any], reference, ev2: Mapping[str, Any] | None) -> dict[str, Any]:
    """The evaluation columns of a row (module docstring) from ``experiments.lm.evaluate.perplexity``'s
    output on the windows (``ev``, with ``reference`` when there is one) and on the second text (``ev2``);
    what was not measured is "" (an empty cell)."""
    from experiments.lm.evaluate import interval_columns
    cols: dict[str, Any] = {"ppl_lo": "", "ppl_hi": "", "window_nll": _nll_list(ev["window_nll"]),
                            **{f"{m}{b}": "" for m in ("kl", "top1", "dnll") for b in ("", "_lo", "_hi")},
                            "ppl2": "", "nll2": "", "ppl2_lo": "", "ppl2_hi": "", "window_nll2": "",
                            "eval2_tokens": "", "eval2_seconds": ""}
    cols.update(interval_columns(ev, reference))
    if ev2 is not None:
        cols.update(ppl2=float(f"{ev2['ppl']:.6g}"), nll2=float(f"{ev2['nll']:.6g}"),
                    window_nll2=_nll_list(ev2["window_nll"]), eval2_tokens=int(ev2["n_tokens"]),
                    eval2_seconds=round(float(ev2["seconds"]), 2), **interval_columns(ev2, suffix="2"))
    return {k: ("" if isinstance(v, float) and v != v else v) for k, v in cols.items()}


def measure_point(run: RunContext, sweep: str, pid: str, spec: MethodSpec, settings: Mapping[str, int],
                  windows: torch.Tensor | Evaluation, calib: torch.Tensor | None, *,
                  progress: bool = True) -> dict[str, Any]:
    """Measure one sweep point where this runs and return its table row: a fresh copy of the model
    (``models.load_model`` keeps one template per process, so a worker loads the file once), the
    compression, the perplexity (with the paired metrics against the dense reference and the second
    text, when ``windows`` is an :class:`Evaluation` that holds them), and the provenance of this
    process's machine. Every executor calls this; the row does not depend on which one did.

    The modules' CPU backend choice by timing (``triton_kernels.nn.autotune``) is off here: a
    perplexity is an accuracy number, and a choice that depends on the machine's load would make
    its last digits depend on it too. ``auto`` then takes each module's static order (the dense
    weight for SparseLinear, dequantize for fp32 QuantLinear); the ``module_backends`` column says
    what ran."""
    from experiments.lm import evaluate, models, tasks
    from experiments.core.provenance import provenance
    from triton_kernels.nn import autotune

    dev = device_of(run.device)
    prov = provenance(dev)
    torch.manual_seed(settings["seed"])
    m = models.load_model(run.model)[0].to(dev)
    calib = calib.to(dev) if calib is not None else None
    ev_in = windows if isinstance(windows, Evaluation) else Evaluation(windows)
    with autotune(False):
        m, summary = _compressed_point(run, pid, spec, settings, m, calib, dev, progress)
        ev = evaluate.perplexity(m, ev_in.windows.to(dev), progress=progress, reference=ev_in.reference)
        ev2 = (evaluate.perplexity(m, ev_in.windows2.to(dev), progress=progress)
               if ev_in.windows2 is not None else None)
        task = tasks.task_columns(tasks.score_task(m, ev_in.task)) if ev_in.task is not None else {}
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
            **evaluation_columns(ev, ev_in.reference, ev2),
            **{c: task.get(c, "") for c in tasks.TASK_COLUMNS},
            "module_backends": backends,
            "aliases_source_grid": aliases_source_grid(spec, run.source_grid),
            "source_grid": json.dumps(run.source_grid, sort_keys=True) if run.source_grid else "",
            **context_row(run.model_name, run.corpus, run.text_sha, run.quick, settings, prov,
                          run.text2 if ev_in.windows2 is not None else None,
                          run.task_text if ev_in.task is not None else None),
            **prov, "timestamp": provenance(dev)["timestamp"]}
