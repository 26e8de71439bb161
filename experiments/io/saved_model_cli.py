"""``python -m experiments compress`` and ``python -m experiments eval``: compress once, save, evaluate later.

    python -m experiments compress gptq-w4-g32-asym --out saved/gptq4        # a sweep point's label
    python -m experiments compress '{"method": "rtn", "bits": 4, "group_size": 32}' --quick --out DIR
    python -m experiments eval saved/gptq4 [--quick] [--decode 32]          # perplexity (+ decode speed)
    python -m experiments eval saved/gptq4 --reference-dir runs/refs          # dense reference kept there

``compress`` takes a point label of any sweep (``python -m experiments list``; ``--sweep`` narrows the
search) or a method spec as JSON (inline or a ``.json`` file), compresses the model with the
calibration settings of the sweep that holds the point (else ``_defaults.yaml``; ``--quick`` for the
quick settings) and writes the directory with :func:`experiments.run.saving.save_compressed`. ``eval``
loads it with :func:`experiments.run.saving.load_compressed` (no recompression) and prints one JSON object
to stdout: perplexity over the evaluation windows of the same settings, the stored size, and with
``--decode N`` the greedy decode speed (tokens/s, on this machine's CPU unless ``--device``).

The JSON carries the same evaluation columns as a sweep row (``experiments.run.point``): the perplexity
with its 95% bootstrap interval and per-window NLL, the paired metrics against the dense base model on
the same windows (KL, top-1 agreement, ΔNLL, each with its interval; ``--no-dense`` skips them and the
dense forward pass they need), and the second evaluation text (``ppl2`` ...; none for ``--text-file``).
The dense reference is computed with the base model (one forward pass over the windows) or, with
``--reference-dir DIR``, loaded from / saved to DIR (the file name is a digest of the model, windows,
machine and torch, as in a run directory), so evaluating several saved points computes it once.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from experiments.core.errors import NonFiniteResult
from experiments.core.runs import refuse_reference_dir


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="the quick settings (small calibration/evaluation budgets)")
    p.add_argument("--text-file", default=None, help="plain-text file: first 10%% calibration, rest evaluation")
    p.add_argument("--source", default="austen", help="corpus when no --text-file: austen (default) or wikitext2")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars/lines")


def add_compress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("point", help="a sweep point label (see `list` and the sweep tables' `point` column), a method "
                                 "spec as JSON, or a path to a .json file holding one")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (must not exist unless --overwrite)")
    p.add_argument("--sweep", default=None, help="look the label up in this sweep only (name or .yaml path)")
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M GGUF), an HF model id, a local directory or a .gguf file")
    p.add_argument("--include-base", action="store_true",
                   help="also store the uncompressed tensors (embeddings, norms): DIR loads without the base model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    _common(p)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a directory written by `compress`")
    p.add_argument("--base", default=None, help="model spec of the base model (default: the one in the manifest)")
    p.add_argument("--decode", type=int, default=0, metavar="N",
                   help="also time greedy decoding of N new tokens (median of 3 runs after a warm-up)")
    p.add_argument("--no-dense", action="store_true",
                   help="skip the paired metrics against the dense base model (KL, top-1, ΔNLL) and its forward pass")
    p.add_argument("--reference-dir", default=None, metavar="DIR",
                   help="keep the dense reference in DIR (loaded when it is there, else computed and saved)")
    p.add_argument("--task-items", type=int, default=None, metavar="N",
                   help="items of the multiple-choice task (experiments.lm.tasks; 0: none; default: the sweeps' "
                        "task_items, 100 full / 0 quick); the default corpus only")
    _common(p)


def resolve_point(point: str, sweep: str | None = None):
    """``(MethodSpec, Sweep | None)`` for a label, an inline JSON spec or a .json file."""
    from experiments.methods.compress import parse_spec
    from experiments.run.sweep_config import available_sweeps, load_sweep, resolve_sweeps
    text = point.strip()
    if text.endswith(".json"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"point {point!r}: no such .json file")
        text = path.read_text()
    if text.startswith("{"):
        try:
            return parse_spec(json.loads(text), where="point"), (resolve_sweeps(sweep)[0] if sweep else None)
        except json.JSONDecodeError as e:
            raise ValueError(f"point: not valid JSON ({e}); give a method spec like "
                             f'\'{{"method": "rtn", "bits": 4, "group_size": 32}}\' or a point label') from e
    sweeps = resolve_sweeps(sweep) if sweep else [load_sweep(p) for p in available_sweeps().values()]
    found: dict[str, tuple[Any, Any]] = {}
    labels: set[str] = set()
    for sw in sweeps:
        for s in sw.full_points + sw.quick_points:
            labels.add(s.label())
            if s.label() == point:
                found.setdefault(json.dumps(s.to_dict(), sort_keys=True), (s, sw))
    if not found:
        near = sorted(lab for lab in labels if lab.split("-")[0] == point.split("-")[0])[:8]
        raise ValueError(f"point {point!r} is not the label of a point of "
                         f"{'sweep ' + repr(sweep) if sweep else 'any sweep'}"
                         + (f"; labels of that method: {', '.join(near)}" if near else "")
                         + "; or give the method spec as JSON")
    if len(found) > 1:
        raise ValueError(f"point {point!r} names {len(found)} different specs: "
                         f"{', '.join(found)}; give the spec as JSON")
    return next(iter(found.values()))


def sweep_settings(sw, quick: bool) -> dict[str, int]:
    """The settings of sweep ``sw`` (``None``: those of ``_defaults.yaml``), quick or full."""
    from experiments.run.sweep_config import SWEEPS_DIR, load_yaml, merge_settings
    if sw is not None:
        return dict(sw.settings(quick))
    d = load_yaml(SWEEPS_DIR / "_defaults.yaml")
    section = "quick" if quick else "full"
    return merge_settings(d.get(section, {}), None, f"_defaults.yaml {section}")


def compress_main(args: argparse.Namespace) -> int:
    import torch

    from experiments.lm import data, models
    from experiments.lm.models import layer_shapes
    from experiments.methods.compress import check_spec_fits, compress_model
    from experiments.run.saving import save_compressed
    from experiments.run.point import device_of
    from experiments.run.sweep import text_digest

    out = refuse_reference_dir(Path(args.out), "--out")
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {str(out)!r} already exists; choose another directory or pass --overwrite")
    spec, sw = resolve_point(args.point, args.sweep)
    st = sweep_settings(sw, args.quick)
    dev = device_of(args.device)
    calib_ids = None
    calibration: dict[str, Any] = {"used": bool(spec.needs())}
    if spec.needs():
        calib_text, eval_text, corpus = data.get_texts(source=args.source, text_file=args.text_file)
        tokenizer = models.load_tokenizer(args.model)
        n_tok = int(data.tokenize(tokenizer, calib_text).numel())
        if n_tok < st["calib_seqlen"]:
            raise ValueError(f"the calibration text has {n_tok} tokens, fewer than calib_seqlen={st['calib_seqlen']}; "
                             f"give a longer --text-file")
        calib_ids = data.calibration_batches(tokenizer, calib_text, n_samples=st["calib_samples"],
                                             seqlen=st["calib_seqlen"], seed=st["seed"]).to(dev)
        calibration.update(calib_samples=st["calib_samples"], calib_seqlen=st["calib_seqlen"], seed=st["seed"],
                           text_sha256=text_digest(calib_text, eval_text), **dict(corpus))
    t0 = time.perf_counter()
    model, _tok, info = models.load_model(args.model)
    model = model.to(dev)
    check_spec_fits(spec, layer_shapes(model))
    torch.manual_seed(st["seed"])
    report = compress_model(model, spec, calib_ids, progress=not args.no_progress)
    path = save_compressed(model.cpu(), report, out, base_model=args.model, base_name=str(info.get("name", args.model)),
                           calibration=calibration, include_base=args.include_base, overwrite=args.overwrite,
                           extra={"settings": st, "quick": args.quick, "sweep": sw.name if sw else None})
    print(f"{spec.label()}: {report.bits_per_weight:.3f} bits/weight, compressed in {report.seconds:.1f}s, "
          f"saved in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    print(path)
    return 0


def _dense_reference(base_spec: str, windows, dev, args: argparse.Namespace):
    """The dense base model's reference on ``windows``: from ``--reference-dir`` when it holds it, else
    computed (and saved there when given)."""
    from experiments.core.provenance import provenance
    from experiments.lm import evaluate, models
    from experiments.run.sweep import dense_reference_path
    path = None
    if args.reference_dir is not None:
        path = dense_reference_path(refuse_reference_dir(Path(args.reference_dir), "--reference-dir"), base_spec,
                                    models.model_name(base_spec), windows, provenance(dev))
        ref = evaluate.load_reference(path)
        if ref is not None and ref.windows_sha == evaluate.windows_digest(windows):
            return ref
    t0 = time.perf_counter()
    ref = evaluate.dense_reference(models.load_model(base_spec)[0].to(dev), windows.to(dev),
                                   progress=not args.no_progress)
    print(f"dense reference computed in {time.perf_counter() - t0:.1f}s"
          + (f" -> {evaluate.save_reference(ref, path)}" if path is not None else ""), file=sys.stderr)
    return ref


def eval_main(args: argparse.Namespace) -> int:
    from experiments.core.stats import bootstrap_method
    from experiments.lm import data, evaluate, models
    from experiments.methods.compress import module_backends
    from experiments.run.saving import load_compressed, read_manifest
    from experiments.run.point import device_of, evaluation_columns

    manifest = read_manifest(args.dir)
    base_spec = args.base or manifest["base_model"].get("spec")
    if not base_spec:
        raise ValueError(f"{args.dir}: the manifest names no base model spec (the tokenizer comes from it); "
                         f"pass --base SPEC")
    dev = device_of(args.device)
    extra = manifest.get("extra") or {}
    settings = extra.get("settings") if extra.get("quick", False) == args.quick and extra.get("settings") else None
    # Settings the manifest predates (eval2_windows) come from _defaults.yaml.
    settings = {**sweep_settings(None, args.quick), **(settings or {})}
    if args.reference_dir is not None and args.no_dense:
        raise ValueError("--reference-dir keeps the dense reference that --no-dense skips: give one of them")
    if args.task_items is not None:
        if args.task_items < 0:
            raise ValueError(f"--task-items must be 0 (no task) or a positive item count, got {args.task_items}")
        if args.task_items and (args.text_file is not None or args.source != "austen"):
            raise ValueError("--task-items: the task is cut from the default corpus (Emma); it has no items for "
                             "--text-file or --source wikitext2 (pass --task-items 0)")
        settings["task_items"] = args.task_items
    n_task = settings.get("task_items", 0) if args.text_file is None and args.source == "austen" else 0
    tokenizer = models.load_tokenizer(base_spec)
    _calib, eval_text, corpus = data.get_texts(source=args.source, text_file=args.text_file)
    windows = data.eval_tokens(tokenizer, eval_text, max_tokens=settings["eval_tokens"], seqlen=settings["seqlen"])
    n2 = settings.get("eval2_windows", 0)
    second = data.second_evaluation_text(source=args.source, text_file=args.text_file) if n2 else None
    windows2 = (data.eval_tokens(tokenizer, second[1], max_tokens=n2 * settings["seqlen"], seqlen=settings["seqlen"])
                if second else None)
    reference = None if args.no_dense else _dense_reference(base_spec, windows, dev, args)
    t0 = time.perf_counter()
    model = load_compressed(args.dir, base=args.base).to(dev)
    load_s = time.perf_counter() - t0
    ev = evaluate.perplexity(model, windows.to(dev), progress=not args.no_progress, reference=reference)
    if not math.isfinite(ev["ppl"]):
        raise NonFiniteResult(_nonfinite_message(args.dir, model, windows, ev))
    ev2 = evaluate.perplexity(model, windows2.to(dev), progress=not args.no_progress) if second else None
    metrics = evaluation_columns(ev, reference, ev2)
    if n_task:
        from experiments.lm import tasks
        task_text, task_desc = tasks.default_task_text()
        items = tasks.build_task(tokenizer, task_text, n_items=n_task)
        metrics.update(tasks.task_columns(tasks.score_task(model, items)), **task_desc)
    for col in ("window_nll", "window_nll2"):   # lists in the JSON, not the table's JSON-in-a-cell
        metrics[col] = json.loads(metrics[col]) if metrics[col] else None
    out: dict[str, Any] = {"dir": str(args.dir), "label": manifest["label"], "base_model": manifest["base_model"]["name"],
                           "ppl": float(f"{ev['ppl']:.6g}"), "nll": float(f"{ev['nll']:.6g}"),
                           "eval_tokens": int(ev["n_tokens"]), "seqlen": settings["seqlen"],
                           "eval_seconds": round(ev["seconds"], 2), "load_seconds": round(load_s, 2),
                           "module_backends": module_backends(model), "corpus": corpus.get("corpus", ""),
                           "evaluation_text": corpus.get("evaluation", ""),
                           "evaluation_text2": second[0] if second else None,
                           "bootstrap": bootstrap_method(), "kl_topk": reference.k if reference is not None else None,
                           **{k: (None if v == "" else v) for k, v in metrics.items()},
                           "bits_per_weight": (manifest.get("report") or {}).get("bits_per_weight")}
    if args.decode:
        from experiments.measure.decode_speed import decode_tokens_per_second
        r = decode_tokens_per_second(model, tokenizer, new_tokens=args.decode, progress=not args.no_progress)
        out.update(decode_tokens_per_s=round(r["tokens_per_s"], 3), decode_new_tokens=r["new_tokens"],
                   device=str(dev))
    print(json.dumps(out, sort_keys=True))
    return 0


def _nonfinite_message(where: str, model, windows, ev: dict[str, Any]) -> str:
    """Why a perplexity is NaN or infinite: the first layer whose output was not finite (forward hooks on
    the batch whose loss was not), or a finite loss too large for exp."""
    from experiments.lm import evaluate
    head = f"{where}: the perplexity is {ev['ppl']} (mean NLL {ev['nll']}), not a number to report"
    i = ev.get("nonfinite_batch")
    if i is None:
        return (f"{head}: every output was finite, but the mean NLL is too large for exp (the model's "
                f"predictions are far off); the saved model is probably broken: compress it again")
    origin = evaluate.nonfinite_origin(model, windows[i:i + 1])
    return (f"{head}: evaluation window {i} first gave a non-finite loss; the first layer whose output was "
            f"not finite is {origin or 'none (only the loss overflowed)'}; check that layer's saved tensors "
            f"(scales, zeros, codebook) or compress the model again")


EXPORT_FORMATS = ("gguf", "compressed-tensors")
UNTOUCHED_TYPES = ("auto", "source", "f16", "f32")   # experiments.io.export_gguf.UNTOUCHED_TYPES (gguf imported lazily)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a directory written by `compress`")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="gguf: one .gguf file (llama.cpp; Q4_0/Q4_1/Q8_0 blocks); compressed-tensors: a Hugging Face "
                        "directory in the compressed-tensors pack-quantized format (vLLM, llm-compressor)")
    p.add_argument("--out", required=True, help="the .gguf file or the output directory (must not exist)")
    p.add_argument("--base", default=None, help="model spec of the base model (default: the one in the manifest)")
    p.add_argument("--untouched-type", default="auto", choices=UNTOUCHED_TYPES,
                   help="gguf: how the tensors the toolkit did not compress (token embedding, tied lm_head, norms) "
                        "are written: auto (default: the source GGUF's own bytes where the model still holds "
                        "them, else F16), source (the source GGUF's bytes, an error where they do not fit), "
                        "f16 (norms stay F32), f32")


def export_main(args: argparse.Namespace) -> int:
    from experiments.run.saving import load_compressed, read_manifest
    out = refuse_reference_dir(Path(args.out), "--out")
    if out.exists():
        raise ValueError(f"--out {str(out)!r} already exists; choose another path")
    manifest = read_manifest(args.dir)
    base_spec = args.base or manifest["base_model"].get("spec")
    if args.format == "gguf":
        from experiments.io.export_gguf import export_gguf
        if out.suffix != ".gguf":
            raise ValueError(f"--out {str(out)!r}: a GGUF export is one file ending in .gguf")
        src = None   # the GGUF file the base model is loaded from: its tokenizer and untouched tensors
        if base_spec:
            from experiments.lm import models
            if base_spec == "default":
                src = models.default_gguf_path()
            elif str(base_spec).endswith(".gguf"):
                src = Path(base_spec)
        if args.untouched_type == "source" and src is None:
            raise ValueError(f"--untouched-type source: the base model {base_spec!r} is not a GGUF file, so there "
                             f"are no source tensors to pass through; use auto, f16 or f32")
        model = load_compressed(args.dir, base=args.base)
        report = export_gguf(model, out, name=manifest.get("label"), tokenizer_from=src, source=src,
                             untouched=args.untouched_type)
        summary = {k: v for k, v in report.items() if k != "tensors"}
        summary["file_bytes"] = out.stat().st_size
    else:
        from experiments.io.export_ct import export_compressed_tensors
        summary = export_compressed_tensors(load_compressed(args.dir, base=args.base), out)
    print(json.dumps(summary, sort_keys=True), file=sys.stderr)
    print(out)
    return 0
