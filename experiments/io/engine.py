"""What a format buys in a real engine: exported points decoded by llama.cpp (issue 25).

    python -m experiments engine                                  # the default points, full windows
    python -m experiments engine --point rtn-w4-g32-asym --point gptq-w4-g64-asym --quick --run NAME

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

Baselines in the same engine and run: the dense model written as F16 (``dense F16``) and as F32, and the
source GGUF file as it ships (the default model's Q4_1). Each row's ``speedup_vs_f16`` and
``speedup_vs_fastest_dense`` (the fastest dense file of the run) are ratios of the same run.
Rows: ``<run>/engine_<device_type>.csv`` with the provenance columns, the engine's version and the CPU
features it was built for (``engine_system_info``), the file's tensor types and MiB, and the load average.
Formats the engine has no type for (sparse, low rank, codebook, 8-bit asymmetric) are refused by the
export, by name; the README lists which points have an engine row.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from experiments.core.errors import SetupError
from experiments.measure.decode_speed import DEFAULT_PROMPT

# Points whose format llama.cpp runs (the export maps them exactly, up to Q4_1's fp16 zero): sweep labels or
# JSON specs (symmetric grids, Q4_0 and Q8_0, are in no sweep).
DEFAULT_POINTS = ("rtn-w4-g32-asym", "rtn-w4-g64-asym", "rtn-w4-g128-asym", "gptq-w4-g64-asym", "rtn-w3-g64-asym",
                  '{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": true}',
                  '{"method": "rtn", "bits": 8, "group_size": 32, "symmetric": true}')
ENGINE = "llama.cpp"
ENGINE_KEY = ("device_type", "device", "engine", "label", "new_tokens", "threads", "eval_tokens", "seqlen")


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
        logits = torch.from_numpy(llm.scores[:len(w) - 1].copy()).double()
        lp = torch.log_softmax(logits, dim=-1)
        nll.append(float(-lp.gather(1, torch.tensor(w[1:]).view(-1, 1)).mean()))
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


def interleaved_decode(models: dict[str, Any], prompt: Sequence[int], *, new_tokens: int, repeats: int,
                       progress: bool = True) -> dict[str, dict[str, Any]]:
    """Greedy decode speed of every model, one warm-up each, then ``repeats`` rounds in which every model is
    timed once (interleaved): ``{label: {"tokens_per_s", "seconds_median", "seconds_min", "tokens"}}``."""
    from experiments.core.progress import progress_bar
    seconds: dict[str, list[float]] = {k: [] for k in models}
    tokens: dict[str, list[int]] = {}
    for label, llm in models.items():
        tokens[label] = _decode_once(llm, prompt, new_tokens)[1]   # warm-up
    for _ in progress_bar(range(repeats), desc="engine decode", unit="round", enabled=progress):
        for label, llm in models.items():
            seconds[label].append(_decode_once(llm, prompt, new_tokens)[0])
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
    """Add ``speedup_vs_f16`` and ``speedup_vs_fastest_dense`` (ratios within these rows, one run)."""
    dense = [r for r in rows if r["dense"]]
    f16 = next((r for r in dense if r["label"] == "dense F16"), None)
    fastest = max(dense, key=lambda r: r["tokens_per_s"], default=None)
    for r in rows:
        r["speedup_vs_f16"] = r["tokens_per_s"] / f16["tokens_per_s"] if f16 else ""
        r["speedup_vs_fastest_dense"] = r["tokens_per_s"] / fastest["tokens_per_s"] if fastest else ""
        r["fastest_dense_label"] = fastest["label"] if fastest else ""
    return rows


def run_engine(points: Iterable[str] = DEFAULT_POINTS, *, quick: bool = False, run: str | None = None,
               out_dir: str | os.PathLike | None = None, new_tokens: int = 32, repeats: int = 5, threads: int | None = None, progress: bool = True,
               workdir: str | os.PathLike | None = None) -> Path:
    """Measure ``points`` (sweep point labels) and the dense baselines in llama.cpp; upsert the rows into
    ``<run>/engine_cpu.csv``; returns that path (module docstring)."""
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

    dense = models.load_model("default")[0]
    ev_dense = toolkit_eval(dense)
    for mode in ("f16", "f32"):
        path = work / f"dense-{mode}.gguf"
        rep = export_gguf(dense, path, source=source, untouched=mode)
        files[f"dense {mode.upper()}"] = {"path": path, "spec": '{"method": "dense"}', "dense": True,
                                          "types": gguf_types(rep["tensors"]), "toolkit": ev_dense}
    files["source file (as shipped)"] = {"path": Path(source), "spec": "", "dense": False,
                                         "types": file_types(source), "toolkit": None}
    for label, spec, sw in specs:
        m = models.load_model("default")[0]
        s = dict(sw.settings(quick)) if sw is not None else settings
        calib = (data.calibration_batches(tokenizer, calib_text, n_samples=s["calib_samples"], seqlen=s["calib_seqlen"],
                                          seed=s["seed"]) if spec.needs() else None)
        compress_model(m, spec, calib, progress=progress)
        path = work / f"{label}.gguf"
        rep = export_gguf(m, path, source=source)
        files[label] = {"path": path, "spec": spec, "dense": False, "types": gguf_types(rep["tensors"]),
                        "toolkit": toolkit_eval(m), "export_exact": rep["exact"]}
        del m
    del dense
    prompt = tokenizer(DEFAULT_PROMPT)["input_ids"]
    n_ctx = max(int(windows.shape[1]), len(prompt) + new_tokens + 8)
    llms = {k: open_model(v["path"], threads=threads, n_ctx=n_ctx) for k, v in files.items()}
    for k, v in files.items():
        v["engine"] = engine_perplexity(llms[k], windows)
    load = os.getloadavg()
    speed = interleaved_decode(llms, prompt, new_tokens=new_tokens, repeats=repeats, progress=progress)
    prov = provenance("cpu")
    rows = []
    for k, v in files.items():
        tk, en = v["toolkit"], v["engine"]
        spec = v["spec"] if isinstance(v["spec"], str) else json.dumps(v["spec"].to_dict(), sort_keys=True)
        rows.append({**prov, **info, "label": k, "spec": spec,
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
                     "loadavg_before": " ".join(f"{x:.2f}" for x in load),
                     "timer": "time.perf_counter around new_tokens one-token llama_cpp.Llama.eval calls (greedy)"})
    results.replace_rows(out, with_speedups(rows), ENGINE_KEY)
    return out
