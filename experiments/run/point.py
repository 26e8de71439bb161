"""One sweep point, measured where this runs: :func:`measure_point` (a fresh copy of the model, the
compression, the perplexity, the table row), which every executor (:mod:`experiments.run.executors`)
calls, and what it shares with the runner (:mod:`experiments.run.sweep`): the run's
:class:`RunContext`, the context and method columns of a row, the device check.
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
                settings: Mapping[str, int], prov: Mapping[str, str]) -> dict[str, Any]:
    """The context columns (``experiments.core.runs.SWEEP_CONTEXT``) of this run's rows."""
    return {"model": model_name, "corpus": corpus.get("corpus", ""),
            "calibration_text": corpus.get("calibration", ""), "evaluation_text": corpus.get("evaluation", ""),
            "text_sha256": text_sha, "quick": quick, "seqlen": settings["seqlen"],
            "eval_token_budget": settings["eval_tokens"], "seed": settings["seed"],
            "device_type": prov["device_type"], "device": prov["device"], "torch": prov["torch"]}


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

    The modules' CPU backend choice by timing (``triton_kernels.nn.autotune``) is off here: a
    perplexity is an accuracy number, and a choice that depends on the machine's load would make
    its last digits depend on it too. ``auto`` then takes each module's static order (the dense
    weight for SparseLinear, dequantize for fp32 QuantLinear); the ``module_backends`` column says
    what ran."""
    from experiments.lm import evaluate, models
    from experiments.core.provenance import provenance
    from triton_kernels.nn import autotune

    dev = device_of(run.device)
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
            **context_row(run.model_name, run.corpus, run.text_sha, run.quick, settings, prov),
            **prov, "timestamp": provenance(dev)["timestamp"]}
