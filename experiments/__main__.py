"""Command line: ``python -m experiments <command>``.

    python -m experiments list
    python -m experiments run <sweep|all|path.yaml> [--quick] [--model default] [--text-file F]
                              [--source austen] [--run NAME | --out-dir DIR] [--device cpu] [--no-progress]
                              [--executor serial|ray [--ray-address auto|ray://...] [--gpus-per-point G]
                               [--cpus-per-point N] [--max-retries R]]
    python -m experiments reproduce [--quick] [--run NAME]      # every step, then a diff vs results/
    python -m experiments compare [--quick] [--run NAME]        # a run's numbers vs the reference
    python -m experiments promote --run NAME [--quick]          # make a run the reference results/
    python -m experiments gpu-figures [--out DIR]               # figures of results/gpu/*.csv (make gpu-check)
    python -m experiments compress <point label|spec JSON> [--quick] [--model M] --out DIR   # save one
    python -m experiments eval DIR [--quick] [--decode N]       # evaluate a saved compressed model
    python -m experiments export DIR --format gguf|compressed-tensors --out PATH
    python -m experiments lm-eval DIR --tasks T1,T2 [--limit N] [--include-path D] [--run NAME | --out-dir DIR]
                                                                # lm-evaluation-harness on a saved model

Measuring commands write into a run directory (``runs/<NAME>/``, ignored by git; see
``experiments.core.runs``), never into the committed reference tables under ``results/``.

Each command is a function ``cmd_<name>(args) -> int`` registered in :data:`COMMANDS` with a
function that adds its arguments; adding a command is adding one entry. Bad input (unknown sweep
or model, missing/empty text file, a setting that does not fit the model, a corpus too short)
prints one ``error:`` line naming the option and exits with status 2 before any result row is written.
A missing piece of the environment (``datasets`` for ``--source wikitext2``, lm-eval for ``lm-eval``,
apt-get for the default corpus, the default model's package, no network for an uncached Hub model or
data set: ``SetupError``) prints one ``error:`` line saying what to install or do, exit status 1. A
file that cannot be written (a full disk: ``OSError``) is one ``error:`` line naming it, exit status 1;
writes are atomic (``experiments.core.atomic``, ``experiments.core.results``), so nothing
half-written is left and a rerun resumes. A perplexity that is NaN or infinite is a failure
(``NonFiniteResult``, exit status 1) naming the first layer whose output was not finite, never a
number printed as a result.

Streams: stdout carries only a command's product (the ``list`` table, the ``summary`` Markdown,
the paths of the tables a command wrote, one per line); progress, status lines and errors go to
stderr (see ``experiments.core.progress``).
"""
from __future__ import annotations

import argparse
import errno
import sys
import time
from pathlib import Path
from typing import Callable

from experiments.core.errors import NonFiniteResult, SetupError


def _add_list(p: argparse.ArgumentParser) -> None:
    pass


def _add_run_dir(p: argparse.ArgumentParser) -> None:
    """--run / --out-dir: where a measuring command writes (experiments.core.runs.run_root)."""
    p.add_argument("--run", default=None, metavar="NAME",
                   help="run directory runs/NAME (default: 'local' for the default model and corpus, "
                        "'local-<model>-<text>' otherwise; $TKR_RUNS_DIR relocates runs/)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="an explicit run directory instead of runs/NAME (never the reference results/)")


def cmd_list(args: argparse.Namespace) -> int:
    from experiments.run.sweep_config import available_sweeps, load_sweep
    print(f"{'sweep':10s} {'full':>5s} {'quick':>5s}  description")
    for name, path in available_sweeps().items():
        sw = load_sweep(path)
        desc = sw.description.splitlines()[0] if sw.description else ""
        print(f"{name:10s} {len(sw.full_points):5d} {len(sw.quick_points):5d}  {desc}")
    return 0


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep name (see `list`), 'all', or a path to a sweep .yaml file")
    p.add_argument("--quick", action="store_true", help="the quick subset with small budgets; writes under <out-dir>/quick/")
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M GGUF), an HF model id, a local directory or a .gguf file")
    p.add_argument("--text-file", default=None, help="plain-text file: first 10%% calibration, rest evaluation")
    p.add_argument("--source", default="austen", help="corpus when no --text-file: austen (default) or wikitext2 (online)")
    _add_run_dir(p)
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars/lines (on a terminal: tqdm bars; in a redirected log: a plain line "
                        "every TKR_PROGRESS_INTERVAL seconds, default 30)")
    p.add_argument("--saved-dir", default=None, metavar="DIR",
                   help="reuse saved compressed points (DIR/<point_id>, experiments.run.saving) instead of "
                        "recompressing; points not there are compressed and saved there")
    g = p.add_argument_group("executor", "where the points run (experiments.run.executors); this process writes the tables")
    g.add_argument("--executor", default="serial", choices=("serial", "ray"),
                   help="serial (default): one point after another here; ray: one Ray task per point "
                        "(pip install -e '.[ray]')")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (auto, host:port, ray://host:port; Ray expects a trusted network: "
                        "see the README); default: start a local instance that listens on 127.0.0.1 only")
    g.add_argument("--gpus-per-point", type=float, default=None, metavar="G",
                   help="GPUs a point reserves (default 1 with --device cuda, else 0)")
    g.add_argument("--cpus-per-point", type=int, default=None, metavar="N",
                   help="CPUs a point reserves; torch uses N threads there (default 1)")
    g.add_argument("--max-retries", type=int, default=None, metavar="R",
                   help="retries of a point whose worker dies (killed, out of memory) before it counts as failed "
                        "(default 2)")


def cmd_run(args: argparse.Namespace) -> int:
    from experiments.run.executors import PointsFailed, make_executor
    from experiments.run.sweep import run_sweeps
    from experiments.run.sweep_config import resolve_sweeps
    t0 = time.perf_counter()
    if args.saved_dir is not None and Path(args.saved_dir).expanduser().exists() \
            and not Path(args.saved_dir).expanduser().is_dir():
        raise ValueError(f"--saved-dir {args.saved_dir!r} is a file, not a directory; give a directory of saved "
                         f"points (it is created if missing)")
    executor = make_executor(args.executor, ray_address=args.ray_address, gpus_per_point=args.gpus_per_point,
                             cpus_per_point=args.cpus_per_point, max_retries=args.max_retries)
    sweeps = resolve_sweeps(args.sweep)
    try:
        paths = run_sweeps(sweeps, quick=args.quick, model=args.model, text_file=args.text_file, source=args.source,
                           out_dir=args.out_dir, run=args.run, device=args.device, progress=not args.no_progress,
                           executor=executor, saved_dir=args.saved_dir)
    except PointsFailed as e:
        for p in e.paths:
            print(p)
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    print(f"done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _add_latency(p: argparse.ArgumentParser) -> None:
    from experiments.measure.latency import add_arguments
    add_arguments(p)


def cmd_latency(args: argparse.Namespace) -> int:
    from experiments.measure import latency
    latency.main(args)
    lat_out, dec_out = latency.output_paths(args)
    print(lat_out)
    if args.decode:
        print(dec_out)
    return 0


def _add_roofline(p: argparse.ArgumentParser) -> None:
    from experiments.measure.roofline import add_arguments
    add_arguments(p)


def cmd_roofline(args: argparse.Namespace) -> int:
    from experiments.measure.roofline import main as roofline_main
    for path in roofline_main(args):
        print(path)
    return 0


def _add_reproduce(p: argparse.ArgumentParser) -> None:
    from experiments.analysis.reproduce import add_arguments
    add_arguments(p)


def cmd_reproduce(args: argparse.Namespace) -> int:
    if not args.skip_notebooks:
        # Checked before the first step, not after an hour of sweeps.
        try:
            import ipykernel  # noqa: F401, PLC0415
            import papermill  # noqa: F401, PLC0415
        except ImportError as e:
            raise ValueError(f"reproduce executes the notebooks, which needs the notebooks extra ({e}): "
                             f"pip install -e '.[notebooks]' (make reproduce installs every extra), "
                             f"or pass --skip-notebooks for the tables only") from None
    from experiments.analysis.reproduce import main as reproduce_main
    return reproduce_main(args)


def _add_compare(p: argparse.ArgumentParser) -> None:
    from experiments.analysis.compare import add_arguments
    add_arguments(p)


def cmd_compare(args: argparse.Namespace) -> int:
    from experiments.analysis.compare import main as compare_main
    return compare_main(args)


def _add_promote(p: argparse.ArgumentParser) -> None:
    from experiments.analysis.promote import add_arguments
    add_arguments(p)


def cmd_promote(args: argparse.Namespace) -> int:
    from experiments.analysis.promote import main as promote_main
    return promote_main(args)


def _add_summary(p: argparse.ArgumentParser) -> None:
    from experiments.analysis.summary import add_arguments
    add_arguments(p)


def cmd_summary(args: argparse.Namespace) -> int:
    from experiments.analysis.summary import main as summary_main
    return summary_main(args)


def _add_gpu_figures(p: argparse.ArgumentParser) -> None:
    from experiments.analysis.plots import add_gpu_figures_arguments
    add_gpu_figures_arguments(p)


def cmd_gpu_figures(args: argparse.Namespace) -> int:
    from experiments.analysis.plots import gpu_figures_main
    return gpu_figures_main(args)


def _add_compress(p: argparse.ArgumentParser) -> None:
    from experiments.io.saved_model_cli import add_compress_arguments
    add_compress_arguments(p)


def cmd_compress(args: argparse.Namespace) -> int:
    from experiments.io.saved_model_cli import compress_main
    return compress_main(args)


def _add_eval(p: argparse.ArgumentParser) -> None:
    from experiments.io.saved_model_cli import add_eval_arguments
    add_eval_arguments(p)


def cmd_eval(args: argparse.Namespace) -> int:
    from experiments.io.saved_model_cli import eval_main
    return eval_main(args)


def _add_export(p: argparse.ArgumentParser) -> None:
    from experiments.io.saved_model_cli import add_export_arguments
    add_export_arguments(p)


def cmd_export(args: argparse.Namespace) -> int:
    from experiments.io.saved_model_cli import export_main
    return export_main(args)


def _add_lm_eval(p: argparse.ArgumentParser) -> None:
    from experiments.io.lm_eval_cli import add_arguments
    add_arguments(p)
    _add_run_dir(p)


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from experiments.io.lm_eval_cli import lm_eval_main
    return lm_eval_main(args)


def _add_engine(p: argparse.ArgumentParser) -> None:
    from experiments.io.engine import DEFAULT_POINTS
    p.add_argument("--point", action="append", default=None, metavar="LABEL_OR_JSON", dest="points",
                   help="a sweep point label or a method spec as JSON to export and measure (repeat for several; "
                        f"default: {', '.join(DEFAULT_POINTS)}); the dense model (F16, F32) and the source GGUF "
                        f"file are always measured beside them")
    p.add_argument("--quick", action="store_true",
                   help="the quick settings' windows (fewer tokens); without --point only the 4-bit g64 point and "
                        "Q4_0, and the toolkit's dense fp32 and unfused rows left out")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per run (default 32, as tg32)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds, every file once per round (default 5)")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: torch's, the machine's cores)")
    p.add_argument("--workdir", default=None, metavar="DIR", help="where the GGUF files go (default: a temporary dir)")
    p.add_argument("--no-toolkit", action="store_true",
                   help="measure the engine only, not the toolkit's own compiled decode of the same models beside "
                        "it (each compile takes about a minute)")
    p.add_argument("--no-progress", action="store_true")
    _add_run_dir(p)


def cmd_engine(args: argparse.Namespace) -> int:
    from experiments.io.engine import run_engine
    from experiments.io.engine import DEFAULT_POINTS, QUICK_POINTS
    out = run_engine(args.points or (QUICK_POINTS if args.quick else DEFAULT_POINTS), quick=args.quick, run=args.run, out_dir=args.out_dir, new_tokens=args.new_tokens,
                     repeats=args.repeats, threads=args.threads, progress=not args.no_progress, workdir=args.workdir,
                     toolkit=not args.no_toolkit)
    print(out)
    return 0


COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "list": (_add_list, cmd_list, "list the sweeps with their point counts (full and --quick)"),
    "run": (_add_run, cmd_run, "run or resume a sweep; one CSV row per point in the run directory (runs/NAME)"),
    "latency": (_add_latency, cmd_latency,
                "time the compressed layers vs dense on this device (runs/NAME/latency_<device_type>.csv)"),
    "roofline": (_add_roofline, cmd_roofline,
                 "ideal kernel times on named GPUs from bytes and FLOPs (runs/NAME/roofline_model.csv)"),
    "reproduce": (_add_reproduce, cmd_reproduce,
                  "sweeps + latency + decode + roofline + notebooks/figures into runs/NAME, then a diff "
                  "against the reference results/ (resumable)"),
    "compare": (_add_compare, cmd_compare, "a run's perplexities and sizes against the reference results/"),
    "promote": (_add_promote, cmd_promote, "replace the reference tables in results/ by a finished run's"),
    "summary": (_add_summary, cmd_summary, "headline numbers from the result tables, as Markdown"),
    "gpu-figures": (_add_gpu_figures, cmd_gpu_figures,
                    "the GPU figures (speedup vs batch, %% of copy bandwidth) from results/gpu/*.csv"),
    "compress": (_add_compress, cmd_compress,
                 "compress the model once (a sweep point label or a spec as JSON) and save it to --out DIR"),
    "eval": (_add_eval, cmd_eval, "perplexity (and --decode speed) of a model saved by `compress`, without recompressing"),
    "export": (_add_export, cmd_export, "write a model saved by `compress` as GGUF (llama.cpp) or compressed-tensors (vLLM)"),
    "lm-eval": (_add_lm_eval, cmd_lm_eval,
                "lm-evaluation-harness tasks on a model saved by `compress` (runs/NAME/lm_eval_<device_type>.csv; "
                "the lmeval extra)"),
    "engine": (_add_engine, cmd_engine,
               "export points to GGUF and measure them in llama.cpp: decode tokens/s and perplexity beside the "
               "toolkit's (runs/NAME/engine_cpu.csv; the engines extra)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments",
                                     description="Compress a language model and measure what it costs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (add, fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(func=fn)
    return parser


def _one_line(e: BaseException) -> str:
    """An error's message on one line (messages quoting a library's may hold newlines)."""
    return " ".join(str(e).split()) or type(e).__name__


def _os_error(e: OSError) -> str:
    """An OSError as one line that names the file: '<file>: <what>' (+ what to do for a full disk)."""
    msg = f"{e.filename}: {e.strerror}" if e.filename is not None and e.strerror else _one_line(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        msg += ("; nothing half-written was left there (writes are atomic): free some space or write elsewhere, "
                "and rerun the same command (a sweep resumes from its finished points)")
    return msg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad input: one clear line, exit status 2 (argparse's own convention), no traceback.
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (SetupError, NonFiniteResult) as e:
        # Something to install or provide, or a result that is not a number: one line, exit status 1.
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        # A full disk, a directory that cannot be written, ...: one line naming the file, exit status 1.
        print(f"error: {_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished points are saved, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
