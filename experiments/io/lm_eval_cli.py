"""``python -m experiments lm-eval``: EleutherAI's lm-evaluation-harness on a model saved by ``compress``.

    python -m experiments lm-eval saved/gptq4 --tasks arc_easy,hellaswag,winogrande,wikitext --device cuda
    python -m experiments lm-eval saved/gptq4 --tasks my_task --include-path my_tasks/ --limit 100

The saved directory is loaded with :func:`experiments.run.saving.load_compressed` (the compressed
modules run their own forward, as in ``eval``), its base model's tokenizer with
:func:`experiments.lm.models.load_tokenizer`, and the pair is handed to lm-eval's own Hugging Face
model class (``lm_eval.models.huggingface.HFLM(pretrained=<the nn.Module>, tokenizer=...)``); the tasks
run through ``lm_eval.simple_evaluate`` with a ``lm_eval.tasks.TaskManager`` (``--include-path`` adds
a directory of task YAMLs to lm-eval's own). So a number here is lm-eval's number for that model: its
prompts, its loglikelihood scoring (``acc`` = the choice of highest summed log-probability, ``acc_norm``
that divided by the choice's length in characters), its standard errors. Not done here: chat templates,
generation settings, multi-GPU (``parallelize``/``accelerate launch``), lm-eval's own result files and
request cache; the model runs in the dtype it loads in (fp32).

Every (task, metric, filter) of the result becomes one row of ``<run>/lm_eval_<device_type>.csv``
(:data:`LM_EVAL_KEY` upserted, so a rerun replaces its rows; one machine per table:
``experiments.core.runs.MEASURE_CONTEXT``), with the provenance columns
(``experiments.core.provenance``), lm-eval's version, the task's version, the few-shot count, the
number of documents scored, ``--limit``, the seeds, and what identifies the saved model (its label,
spec, base model, and the SHA-256 of its ``layers.safetensors`` from the manifest).

lm-eval is an optional extra (``pip install -e '.[lmeval]'``); without it the command stops before
loading anything, with one line saying so. The standard tasks download their data sets from the
Hugging Face Hub on first use (cached under ``$HF_DATASETS_CACHE``); with no network and no cached
copy, the command stops with one line naming the task's data set (``SetupError``).
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from pathlib import Path
from typing import Any

from experiments.core.errors import SetupError

INSTALL = "pip install -e '.[lmeval]'"
# What makes a row the same measurement again (replaced on a rerun): the machine, the saved model, the task
# and how it was run.
LM_EVAL_KEY = ("device_type", "device", "label", "model_sha256", "base_model", "task", "metric", "filter",
               "num_fewshot", "limit")
# lm-eval's own defaults (lm_eval.evaluator.simple_evaluate), passed explicitly and recorded.
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a directory written by `compress`")
    p.add_argument("--tasks", required=True, metavar="T1,T2",
                   help="lm-eval task, group or tag names, comma-separated (e.g. arc_easy,hellaswag,winogrande,"
                        "wikitext; `lm-eval ls tasks` lists them), or tasks of --include-path")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="a directory of lm-eval task YAMLs, added to lm-eval's own tasks (e.g. a local JSON task)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only the first N documents of each task (a quick check, not a result to compare)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="few-shot examples per prompt (default: each task's own default)")
    p.add_argument("--batch-size", default="1", metavar="B",
                   help="requests per forward pass: a positive integer or 'auto' (default 1)")
    p.add_argument("--base", default=None, help="model spec of the base model (default: the one in the manifest)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def import_lm_eval():
    """``(lm_eval, HFLM, TaskManager)``; :class:`SetupError` naming the extra when lm-eval is missing."""
    try:
        import lm_eval  # noqa: PLC0415 - optional extra
        from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
        from lm_eval.tasks import TaskManager  # noqa: PLC0415
    except ImportError as e:
        raise SetupError(f"lm-eval is not installed ({e}); the lm-eval command needs the lmeval extra: "
                         f"{INSTALL}") from None
    return lm_eval, HFLM, TaskManager


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks {text!r} names no task; give lm-eval task names, e.g. --tasks arc_easy,hellaswag")
    return list(dict.fromkeys(tasks))


def parse_batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        b = int(text)
    except ValueError:
        b = 0
    if b < 1:
        raise ValueError(f"--batch-size {text!r} must be a positive integer or 'auto'")
    return b


def check_tasks(tasks: list[str], known: list[str], include_path: str | None) -> None:
    """ValueError naming the tasks lm-eval does not know, with the nearest known names."""
    have = set(known)
    unknown = [t for t in tasks if t not in have]
    if not unknown:
        return
    hints = []
    for t in unknown:
        near = difflib.get_close_matches(t, known, n=3)
        hints.append(f"{t!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks (see `lm-eval ls tasks`)"
    raise ValueError(f"--tasks: {', '.join(hints)} not in {where}; a task of your own is a YAML file in a "
                     f"directory given with --include-path DIR")


def result_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric, filter) of ``simple_evaluate``'s result: value, stderr ('' when lm-eval
    gives none), the task's version, few-shot count and documents scored."""
    rows = []
    for task, metrics in res["results"].items():
        n = (res.get("n-samples") or {}).get(task) or {}
        for key, value in metrics.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or isinstance(value, str) or value is None:
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else "",
                         "task_version": (res.get("versions") or {}).get(task, ""),
                         "num_fewshot": (res.get("n-shot") or {}).get(task, ""),
                         "n_samples": n.get("effective", ""),
                         "is_group": task in (res.get("groups") or {})})
    return rows


def lm_eval_main(args: argparse.Namespace) -> int:
    # The extra first: without it nothing is loaded and nothing is written.
    lm_eval, HFLM, TaskManager = import_lm_eval()
    import torch

    from experiments.core import results
    from experiments.core.provenance import package_version, provenance
    from experiments.core.runs import MEASURE_CONTEXT, run_root
    from experiments.lm import models
    from experiments.methods.compress import module_backends
    from experiments.run.point import device_of
    from experiments.run.saving import LAYERS_FILE, load_compressed, read_manifest

    tasks = parse_tasks(args.tasks)
    batch_size = parse_batch_size(args.batch_size)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be a positive number of documents per task")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot {args.num_fewshot} must be 0 or more")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise ValueError(f"--include-path {args.include_path!r} is not a directory (give a directory of lm-eval "
                         f"task YAML files)")
    dev = device_of(args.device)
    manifest = read_manifest(args.dir)
    base_spec = args.base or manifest["base_model"].get("spec")
    if not base_spec:
        raise ValueError(f"{args.dir}: the manifest names no base model spec (the tokenizer comes from it); "
                         f"pass --base SPEC")
    out = run_root(out_dir=args.out_dir, run=args.run, model=base_spec) / f"lm_eval_{dev.type}.csv"
    prov = provenance(dev)
    results.check_context(out, [prov], MEASURE_CONTEXT)  # another machine's table: stop before measuring

    t0 = time.perf_counter()
    tm = TaskManager(include_path=args.include_path)
    check_tasks(tasks, tm.all_tasks, args.include_path)
    tokenizer = models.load_tokenizer(base_spec)
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of base model {base_spec!r} has neither a BOS nor an EOS token; lm-eval "
                         f"puts one before a continuation scored without context")
    model = load_compressed(args.dir, base=args.base).to(dev).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    print(f"lm-eval {package_version('lm_eval')}: {', '.join(tasks)} on {manifest['label']} ({dev})", file=sys.stderr)
    try:
        with torch.no_grad():
            res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                          task_manager=tm, log_samples=False, **SEEDS)
    except ConnectionError as e:
        raise SetupError(f"a task's data set is not reachable ({e}); the standard tasks download their data "
                         f"sets from the Hugging Face Hub on first use: run once with network (they are then "
                         f"cached under $HF_DATASETS_CACHE), or give a local task with --include-path DIR") from None
    if res is None:  # simple_evaluate returns None on the non-zero ranks of a distributed run
        raise SetupError("lm-eval returned no result (a distributed launch?); run the command as one process")
    seconds = time.perf_counter() - t0

    report = manifest.get("report") or {}
    ident = {"label": manifest["label"], "spec": json.dumps(manifest.get("spec"), sort_keys=True),
             "base_model": manifest["base_model"].get("name") or base_spec, "base_spec": base_spec,
             "model_sha256": manifest["files"][LAYERS_FILE]["sha256"],
             "bits_per_weight": report.get("bits_per_weight", ""), "saved_dir": str(Path(args.dir).resolve())}
    run = {"lm_eval": package_version("lm_eval"), "limit": args.limit if args.limit is not None else "",
           "batch_size": batch_size, "seeds": json.dumps(SEEDS, sort_keys=True),
           "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
           "module_backends": module_backends(model), "eval_seconds": round(seconds, 2)}
    rows = [{**prov, **ident, **r, **run} for r in result_rows(res)]
    if not rows:
        raise ValueError(f"--tasks {args.tasks!r}: lm-eval returned no metric for these tasks")
    results.replace_rows(out, rows, LM_EVAL_KEY, context=MEASURE_CONTEXT)
    for r in rows:
        err = f" ± {r['stderr']:.4f}" if r["stderr"] != "" else ""
        print(f"{r['task']} {r['metric']} ({r['filter']}): {r['value']:.4f}{err}  [n={r['n_samples']}]",
              file=sys.stderr)
    print(out)
    return 0
