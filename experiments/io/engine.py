"""What a format buys in a real engine: exported points decoded by llama.cpp (issue 25).

    python -m experiments engine                                  # the default points, full windows
    python -m experiments engine --point rtn-w4-g32-asym --point gptq-w4-g64-asym --quick --run NAME
    python -m experiments engine --quick      # QUICK_POINTS (4-bit g64 and Q4_0), no fp32/unfused toolkit rows

Time (AMD EPYC, 2 threads, 16 default points): ~10 min compressing and evaluating in the toolkit, the
engine's perplexity of 19 files, ~1 min compiling each of the toolkit's 9 decoders, ~2 min of timed rounds.

Each point is compressed as its sweep does (calibrated points on the sweep's calibration windows), its
perplexity measured by the toolkit on the sweep's evaluation windows, then exported to GGUF
(:func:`experiments.io.export_gguf.export_gguf`, untouched tensors ``auto``: the source file's own bytes
where they are unchanged) and loaded into llama.cpp through its Python binding (``llama-cpp-python``, the
``engines`` extra; ``make engines`` builds it from its sdist, once). In the engine, on the same machine:

- **perplexity** of the file on the *same* windows (logits of every position through the binding, no BOS
  added, as the toolkit scores them): ``engine_ppl`` beside ``toolkit_ppl``, and ``engine_dnll`` = the
  mean per-token NLL difference. llama.cpp multiplies quantized weights with activations it quantizes to
  8 bits (Q4_0/Q4_1/Q8_0 dot products), and Q4_1 stores the zero as an fp16 ``-z s`` (export_gguf), so the
  two differ by that, no more; the export itself is checked exact (or counted) by ``export_gguf``.
- **decode speed**: greedy tokens per second over ``new_tokens`` one-token steps after the prompt (the
  prompt's prefill not timed: llama-bench's ``tg``), median of ``repeats``, every file timed in turn within
  each repeat (interleaved, so a change in the machine's load hits all of them alike), ``threads`` threads.

Beside the engine, in the same interleaved rounds (``toolkit=True``, the default; ``--no-toolkit`` skips
it): **the toolkit's own decode** of the same models, :class:`experiments.measure.decode_speed.StepDecoder`
(the same prompt tokens, prefill untimed, ``new_tokens`` one-token steps with a static KV cache and the
step compiled by ``torch.compile(fullgraph=True)``, q/k/v and gate/up projections fused:
:mod:`experiments.lm.fuse`), for the dense model in bf16 and fp32 and the first point of each (bits,
symmetric) in bf16; dense bf16 and the first point also unfused (``... unfused`` rows, ``fused_projections``
column: what fusing buys). Rows ``engine = "toolkit (torch.compile)"``, with ``fraction_of_engine`` (over
llama.cpp's tokens/s for the same point's file), ``fraction_of_engine_q4_0`` (over llama.cpp's Q4_0 file:
issue 25's target is >= 1/3), ``tokens_same_prefix`` (leading greedy tokens equal to the engine's: bf16 and
8-bit activations drift apart after a few) and ``compile_seconds``. Where the toolkit's time per token
goes, eager and compiled (:func:`experiments.measure.decode_speed.profile_step`: linear layers, attention,
the compiled graph's fused kernels, other ops, and Python/dispatch outside any op), goes to
``<run>/decode_profile_<device_type>.csv``, measured after the timed rounds.

Baselines in the same engine and run: the dense model written as F16 (``dense F16``) and as F32, and the
source GGUF file as it ships (the default model's Q4_1). Each row's ``speedup_vs_f16`` and
``speedup_vs_fastest_dense`` (the fastest dense model of the same engine in the run) are ratios of the
same run.
Rows: ``<run>/engine_<device_type>.csv`` with the provenance columns, the engine's version and the CPU
features it was built for (``engine_system_info``), the file's tensor types and MiB, and the load average.
Formats the engine has no type for (sparse, low rank, codebook, 8-bit asymmetric) are refused by the
export, by name; the README lists which points have an engine row.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from experiments.core.dtypes import DTYPE_NAMES
from experiments.core.errors import SetupError
from experiments.measure.decode_speed import DEFAULT_PROMPT

# Points whose format llama.cpp runs (the export maps them exactly, up to Q4_1's fp16 zero): every 2-4-bit
# asymmetric RTN point of the quant sweep and its GPTQ headline points (Q4_1), and symmetric grids (Q4_0,
# Q8_0: in no sweep) as JSON specs. 8-bit asymmetric, sparse, low-rank and codebook points have no GGUF type.
# The toolkit's own decode runs for the first point of each (bits, symmetric) (group size changes its speed
# little; each is a compile), so the 4-bit g64 point, the reference, comes first.
DEFAULT_POINTS = ("rtn-w4-g64-asym", "rtn-w4-g32-asym", "rtn-w4-g128-asym", "rtn-w4-pc-asym",
                  "rtn-w3-g64-asym", "rtn-w3-g32-asym", "rtn-w3-g128-asym", "rtn-w3-pc-asym",
                  "rtn-w2-g64-asym", "rtn-w2-g32-asym", "rtn-w2-g128-asym", "rtn-w2-pc-asym",
                  "gptq-w4-g64-asym", "gptq-w3-g64-asym",
                  '{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": true}',
                  '{"method": "rtn", "bits": 8, "group_size": 32, "symmetric": true}')
# --quick: the reference 4-bit point and Q4_0 (the issue-25 target), the toolkit's fp32 and unfused rows left out.
QUICK_POINTS = ("rtn-w4-g64-asym", '{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": true}')
ENGINE = "llama.cpp"
TOOLKIT_ENGINE = "toolkit (torch.compile)"
ENGINE_KEY = ("device_type", "device", "engine", "label", "new_tokens", "threads", "eval_tokens", "seqlen")
PROFILE_KEY = ("device_type", "device", "label", "mode", "category", "new_tokens", "threads")


def load_engine():
    """The ``llama_cpp`` module, or :class:`SetupError` saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise SetupError("llama.cpp's Python binding is not installed: `make engines` (builds llama-cpp-python "
                         "from its sdist with cmake, about 15 minutes on 2 cores, cached afterwards) or "
                         "`pip install llama-cpp-python`") from e
    return llama_cpp


def engine_info() -> dict[str, str]:
    llama_cpp = load_engine()
    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return {"engine": ENGINE, "engine_version": f"llama-cpp-python {llama_cpp.__version__}",
            "engine_system_info": " ".join(info.split())}


def open_model(path: str | os.PathLike, *, threads: int, n_ctx: int):
    """A llama.cpp model of ``path`` that keeps the logits of every evaluated position (``scores``)."""
    llama_cpp = load_engine()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                           n_threads_batch=threads, logits_all=True, verbose=False, seed=0)


def engine_perplexity(llm, windows: torch.Tensor) -> dict[str, Any]:
    """Mean next-token NLL of every window (``(n, seqlen)`` token ids, no BOS added) from the engine's logits."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n_windows, seqlen >= 2), got {tuple(windows.shape)}")
    nll, t0 = [], time.perf_counter()
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        # NLL = logsumexp(logits) - logit of the next token; the log-sum-exp in fp32 over the engine's own
        # fp32 logits (a view: no copy of the (seqlen, vocab) array), the difference in fp64.
        logits = torch.from_numpy(llm.scores[:len(w) - 1])
        lse = torch.logsumexp(logits, dim=-1).double()
        target = logits.gather(1, torch.tensor(w[1:]).view(-1, 1)).squeeze(1).double()
        nll.append(float((lse - target).mean()))
    mean = sum(nll) / len(nll)
    return {"window_nll": nll, "nll": mean, "ppl": float(torch.tensor(mean).exp()),
            "seconds": time.perf_counter() - t0}


def _decode_once(llm, prompt: Sequence[int], new_tokens: int) -> tuple[float, list[int]]:
    llm.reset()
    llm.eval(list(prompt))
    out = []
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        out.append(tok)
        llm.eval([tok])
    return time.perf_counter() - t0, out


def llama_decoder(llm, prompt: Sequence[int], new_tokens: int) -> Callable[[], tuple[float, list[int]]]:
    """A decoder of a llama.cpp model for :func:`interleaved_decode`: the prompt evaluated untimed, then
    ``new_tokens`` greedy one-token ``eval`` calls timed (llama-bench's ``tg``)."""
    return lambda: _decode_once(llm, prompt, new_tokens)


def interleaved_decode(decoders: dict[str, Callable[[], tuple[float, list[int]]]], *, new_tokens: int,
                       repeats: int, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Greedy decode speed of every decoder (a callable returning ``(seconds, token ids)`` of
    ``new_tokens`` timed one-token steps: :func:`llama_decoder`, or the toolkit's
    :class:`experiments.measure.decode_speed.StepDecoder`), one warm-up each, then ``repeats`` rounds in
    which every decoder is timed once (interleaved): ``{label: {"tokens_per_s", "seconds_median",
    "seconds_min", "tokens"}}``."""
    from experiments.core.progress import progress_bar
    seconds: dict[str, list[float]] = {k: [] for k in decoders}
    tokens: dict[str, list[int]] = {}
    for label, decode in decoders.items():
        tokens[label] = decode()[1]   # warm-up
    for _ in progress_bar(range(repeats), desc="engine decode", unit="round", enabled=progress):
        for label, decode in decoders.items():
            seconds[label].append(decode()[0])
    return {k: {"tokens_per_s": new_tokens / statistics.median(v), "seconds_median": statistics.median(v),
                "seconds_min": min(v), "tokens": tokens[k]} for k, v in seconds.items()}


def gguf_types(tensors: dict[str, str]) -> str:
    """``{name: type}`` of a written file as ``"Q4_1:210 Q8_0:1 F32:61"`` (most common first)."""
    return " ".join(f"{t}:{n}" for t, n in Counter(tensors.values()).most_common())


def file_types(path: str | os.PathLike) -> str:
    import gguf
    r = gguf.GGUFReader(str(path))
    return gguf_types({t.name: t.tensor_type.name for t in r.tensors})


def with_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``speedup_vs_f16`` (llama.cpp rows: over its dense F16 file) and ``speedup_vs_fastest_dense``
    (over the fastest dense row *of the same engine*), ratios within these rows, one run; and on the
    toolkit's rows ``fraction_of_engine`` (its tokens/s over llama.cpp's for the same point's file) and
    ``fraction_of_engine_q4_0`` (over llama.cpp's Q4_0 file, the issue-25 target: >= 1/3)."""
    def engine_of(r):
        return r.get("engine", ENGINE)
    for name in {engine_of(r) for r in rows}:
        group = [r for r in rows if engine_of(r) == name]
        dense = [r for r in group if r["dense"]]
        f16 = next((r for r in dense if r["label"] == "dense F16"), None)
        fastest = max(dense, key=lambda r: r["tokens_per_s"], default=None)
        for r in group:
            r["speedup_vs_f16"] = r["tokens_per_s"] / f16["tokens_per_s"] if f16 else ""
            r["speedup_vs_fastest_dense"] = r["tokens_per_s"] / fastest["tokens_per_s"] if fastest else ""
            r["fastest_dense_label"] = fastest["label"] if fastest else ""
    by_point = {r["point"]: r for r in rows if engine_of(r) == ENGINE and r.get("point")}
    q4_0 = next((r for r in rows if engine_of(r) == ENGINE and str(r.get("gguf_types", "")).startswith("Q4_0")), None)
    for r in rows:
        if engine_of(r) == ENGINE:
            continue
        twin = by_point.get(r.get("point"))
        r["fraction_of_engine"] = r["tokens_per_s"] / twin["tokens_per_s"] if twin else ""
        r["fraction_of_engine_q4_0"] = r["tokens_per_s"] / q4_0["tokens_per_s"] if q4_0 else ""
    return rows


def spec_text(spec) -> str:
    """A row's ``spec`` cell: JSON of a parsed spec, or the string given (dense, the source file)."""
    return spec if isinstance(spec, str) else json.dumps(spec.to_dict(), sort_keys=True)


def same_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two greedy decodes share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_engine(points: Iterable[str] = DEFAULT_POINTS, *, quick: bool = False, run: str | None = None,
               out_dir: str | os.PathLike | None = None, new_tokens: int = 32, repeats: int = 5, threads: int | None = None, progress: bool = True,
               workdir: str | os.PathLike | None = None, toolkit: bool = True) -> Path:
    """Measure ``points`` (sweep point labels) and the dense baselines in llama.cpp, and (``toolkit``) the
    toolkit's own compiled decode of the same models beside them; upsert the rows into
    ``<run>/engine_cpu.csv``; returns that path (module docstring)."""
    from experiments.measure.decode_speed import StepDecoder, profile_step
    from experiments.measure.formats import format_of
    from experiments.core import results
    from experiments.core.provenance import provenance
    from experiments.core.runs import run_root
    from experiments.io.export_gguf import export_gguf
    from experiments.io.saved_model_cli import resolve_point, sweep_settings
    from experiments.lm import data, evaluate, models
    from experiments.methods.compress import compress_model

    info = engine_info()
    threads = threads or torch.get_num_threads()
    for name, v in (("new_tokens", new_tokens), ("repeats", repeats), ("threads", threads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    specs = []
    for p in points:
        spec, sw = resolve_point(p)
        specs.append((spec.label(), spec, sw))
    settings = sweep_settings(None, quick)
    tokenizer = models.load_tokenizer("default")
    calib_text, eval_text, corpus = data.get_texts()
    windows = data.eval_tokens(tokenizer, eval_text, max_tokens=settings["eval_tokens"], seqlen=settings["seqlen"])
    source = models.default_gguf_path()
    out = Path(run_root(out_dir=out_dir, run=run)) / f"engine_{torch.device('cpu').type}.csv"
    work = Path(workdir or tempfile.mkdtemp(prefix="engine-"))
    work.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}

    def toolkit_eval(m) -> dict[str, Any]:
        return evaluate.perplexity(m, windows, progress=progress)

    # The toolkit's own models to decode beside the engine: the dense model in bf16 and fp32, and the first
    # point of each (bits, symmetric) in bf16 (the CPU's fast weight-only kernels take bf16 activations).
    ours: dict[str, dict[str, Any]] = {}
    dense = models.load_model("default")[0]
    ev_dense = toolkit_eval(dense)
    for mode in ("f16", "f32"):
        path = work / f"dense-{mode}.gguf"
        rep = export_gguf(dense, path, source=source, untouched=mode)
        files[f"dense {mode.upper()}"] = {"path": path, "spec": '{"method": "dense"}', "dense": True,
                                          "types": gguf_types(rep["tensors"]), "toolkit": ev_dense,
                                          "point": f"dense {mode[1:]}-bit"}
    if toolkit:
        for dt, bits in ((torch.bfloat16, 16),) + (() if quick else ((torch.float32, 32),)):
            for fuse in ((True,) if quick else (True, False)) if dt == torch.bfloat16 else (True,):
                ours[f"toolkit dense {DTYPE_NAMES[dt]}" + ("" if fuse else " unfused")] = {
                    "model": models.load_model("default")[0].to(dt), "spec": '{"method": "dense"}', "dense": True,
                    "point": f"dense {bits}-bit", "fuse": fuse}
    files["source file (as shipped)"] = {"path": Path(source), "spec": "", "dense": False,
                                         "types": file_types(source), "toolkit": None, "point": "source"}
    seen_formats = set()
    for label, spec, sw in specs:
        m = models.load_model("default")[0]
        s = dict(sw.settings(quick)) if sw is not None else settings
        calib = (data.calibration_batches(tokenizer, calib_text, n_samples=s["calib_samples"], seqlen=s["calib_seqlen"],
                                          seed=s["seed"]) if spec.needs() else None)
        compress_model(m, spec, calib, progress=progress)
        path = work / f"{label}.gguf"
        rep = export_gguf(m, path, source=source)
        files[label] = {"path": path, "spec": spec, "dense": False, "types": gguf_types(rep["tensors"]),
                        "toolkit": toolkit_eval(m), "export_exact": rep["exact"], "point": label}
        f = format_of(spec.to_dict())
        fmt = (f.get("kind"), f.get("bits"), f.get("symmetric"))
        if toolkit and fmt not in seen_formats:
            if not seen_formats and not quick:   # the first point also unfused: what fusing the projections buys
                ours[f"toolkit {label} bf16 unfused"] = {"model": copy.deepcopy(m).to(torch.bfloat16), "spec": spec,
                                                         "dense": False, "point": label, "fuse": False}
            seen_formats.add(fmt)
            ours[f"toolkit {label} bf16"] = {"model": m.to(torch.bfloat16), "spec": spec, "dense": False,
                                             "point": label, "fuse": True}
        del m
    del dense
    prompt = tokenizer(DEFAULT_PROMPT)["input_ids"]
    n_ctx = max(int(windows.shape[1]), len(prompt) + new_tokens + 8)
    llms = {k: open_model(v["path"], threads=threads, n_ctx=n_ctx) for k, v in files.items()}
    for k, v in files.items():
        v["engine"] = engine_perplexity(llms[k], windows)
    decoders = {k: llama_decoder(llm, prompt, new_tokens) for k, llm in llms.items()}
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k, v in ours.items():
            if progress:
                print(f"[engine] compiling the toolkit's decode step: {k}", flush=True)
            v["decoder"] = StepDecoder(v["model"], prompt, new_tokens, compile=True, fuse=v["fuse"])
            decoders[k] = v["decoder"]
        load = os.getloadavg()
        speed = interleaved_decode(decoders, new_tokens=new_tokens, repeats=repeats, progress=progress)
        # Where the toolkit's time goes, after the timed rounds, with the same threads.
        profiles = {(k, mode): profile_step(v["decoder"], compiled=mode == "compiled")
                    for k, v in ours.items() for mode in ("eager", "compiled")}
    finally:
        torch.set_num_threads(prev_threads)
    prov = provenance("cpu")
    rows = []
    for k, v in files.items():
        tk, en = v["toolkit"], v["engine"]
        rows.append({**prov, **info, "label": k, "spec": spec_text(v["spec"]),
                     "dense": v["dense"], "gguf_types": v["types"],
                     "file_mib": round(Path(v["path"]).stat().st_size / 2 ** 20, 2), "threads": threads,
                     "tokens_per_s": speed[k]["tokens_per_s"], "seconds_median": speed[k]["seconds_median"],
                     "seconds_min": speed[k]["seconds_min"], "new_tokens": new_tokens, "repeats": repeats,
                     "prompt_tokens": len(prompt), "engine_ppl": float(f"{en['ppl']:.6g}"),
                     "engine_nll": float(f"{en['nll']:.6g}"),
                     "toolkit_ppl": float(f"{tk['ppl']:.6g}") if tk else "",
                     "engine_dnll": float(f"{en['nll'] - tk['nll']:.4g}") if tk else "",
                     "export_exact": v.get("export_exact", ""), "eval_tokens": int(windows.numel()),
                     "seqlen": int(windows.shape[1]), "quick": quick, "corpus": corpus.get("corpus", ""),
                     "evaluation_text": corpus.get("evaluation", ""),
                     "loadavg_before": " ".join(f"{x:.2f}" for x in load), "point": v["point"],
                     "timer": "time.perf_counter around new_tokens one-token llama_cpp.Llama.eval calls (greedy)"})
    toolkit_info = {"engine": TOOLKIT_ENGINE, "engine_version": f"torch {torch.__version__}",
                    "engine_system_info": f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"}
    for k, v in ours.items():
        twin_label = next((lk for lk, f in files.items() if f["point"] == v["point"]), None)
        rows.append({**prov, **toolkit_info, "label": k, "spec": spec_text(v["spec"]), "dense": v["dense"],
                     "threads": threads,
                     "tokens_per_s": speed[k]["tokens_per_s"], "seconds_median": speed[k]["seconds_median"],
                     "seconds_min": speed[k]["seconds_min"], "new_tokens": new_tokens, "repeats": repeats,
                     "prompt_tokens": len(prompt), "eval_tokens": int(windows.numel()),
                     "seqlen": int(windows.shape[1]), "quick": quick, "corpus": corpus.get("corpus", ""),
                     "evaluation_text": corpus.get("evaluation", ""), "point": v["point"],
                     "loadavg_before": " ".join(f"{x:.2f}" for x in load),
                     "compile_seconds": round(v["decoder"].compile_seconds, 1), "fused_projections": v["fuse"],
                     "tokens_same_prefix": (same_prefix(speed[k]["tokens"], speed[twin_label]["tokens"])
                                            if twin_label else ""),
                     "timer": "time.perf_counter around new_tokens one-token model.forward calls (greedy, "
                              "static KV cache, forward = torch.compile(fullgraph=True); prefill untimed)"
                              + ("; q/k/v and gate/up fused" if v["fuse"] else "")})
    results.replace_rows(out, with_speedups(rows), ENGINE_KEY)
    if ours:
        profile_rows = []
        for (k, mode), prof in profiles.items():
            prof = dict(prof)
            wall = prof.pop("wall")
            for cat, ms in prof.items():
                profile_rows.append({**prov, **toolkit_info, "label": k, "spec": spec_text(ours[k]["spec"]),
                                     "mode": mode, "category": cat, "ms_per_token": round(ms, 4),
                                     "share": round(ms / wall, 4), "wall_ms_per_token": round(wall, 4),
                                     "new_tokens": new_tokens, "threads": threads,
                                     "loadavg_before": " ".join(f"{x:.2f}" for x in load),
                                     "method": "torch.profiler self CPU time per op over the timed steps; "
                                               "outside ops = wall - all ops' self time"})
        results.replace_rows(out.with_name(f"decode_profile_{torch.device('cpu').type}.csv"), profile_rows,
                             PROFILE_KEY)
    return out
