"""End-to-end decode speed: greedy-decoding tokens/s of a model (:func:`decode_tokens_per_second`), and
of the default model dense and compressed, each against dense in the same dtype on the same machine
(``speedup_vs_dense``) and against the fastest dense dtype measured in the same run
(``speedup_vs_fastest_dense``, :func:`fastest_dense`), upserted into ``<run>/decode_<device_type>.csv``
(:func:`run_decode`; one machine per table, as the layer table). The command line is :mod:`.latency`
(``--decode``).

Why two baselines: the fastest dense dtype depends on the machine. On the AMD EPYC development machines
dense bf16 decodes faster than dense fp32; on an Intel Xeon with AMX dense fp32 decoded faster (29.0 vs
24.5 tok/s, issue 25), so "x vs dense bf16" overstated what a format buys over the dense model a user
would run there.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from experiments.core import results
from experiments.core.dtypes import DTYPE_NAMES, DTYPES
from experiments.core.progress import progress_bar, status
from experiments.core.provenance import provenance
from experiments.core.runs import MEASURE_CONTEXT, run_root
from experiments.measure.formats import canonical, format_of

DECODE_KEY = ("device_type", "device", "label", "spec", "dtype", "new_tokens", "prompt")
# The columns :func:`fastest_dense` adds; rows written before they existed have them empty.
FASTEST_DENSE_COLUMNS = ("speedup_vs_fastest_dense", "fastest_dense_dtype", "fastest_dense_tokens_per_s")
DEFAULT_PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune,"


def default_decode_out(device: torch.device | str) -> Path:
    """Where ``record_decode`` writes when given no ``out``: the default run directory."""
    return run_root() / f"decode_{torch.device(device).type}.csv"


def decode_tokens_per_second(model, tokenizer, *, prompt: str = DEFAULT_PROMPT, new_tokens: int = 32,
                             repeats: int = 3, label: str = "decode", progress: bool = True,
                             input_ids: torch.Tensor | None = None, compile: bool = False) -> dict:
    """Greedy-decoding speed: ``new_tokens`` generated tokens / wall seconds (median of ``repeats``
    timed runs after one warm-up), prompt prefill included, on the model's own device.

    ``min_new_tokens`` pins the length so an early end-of-sequence cannot shorten a run.
    ``input_ids`` ((1, n) LongTensor) replaces ``prompt`` and then ``tokenizer`` may be None.

    ``compile=True``: a static KV cache (fixed shapes: one graph for the prefill, one for the
    one-token steps) and ``model.forward`` compiled with ``torch.compile(fullgraph=True)`` (Inductor).
    An eager generate runs first (it settles the layers' measured backends and builds their
    prepacked CPU weights, see ``triton_kernels.nn._ops``); the compiled warm-up that follows is
    timed separately (``compile_seconds``, not part of tokens/s). The model's forward is restored after.
    """
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens!r} must be a positive int")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be a positive int")
    device = next(model.parameters()).device
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be a (1, n) LongTensor, got {getattr(input_ids, 'shape', input_ids)!r}")
        enc = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids, device=device)}
        prompt = f"<{input_ids.shape[1]} token ids>"
        pad = model.generation_config.pad_token_id
        pad = pad if pad is not None else model.generation_config.eos_token_id
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    else:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
    if compile:
        kw["cache_implementation"] = "static"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds, generated, compile_s = [], 0, None
    # One generate call of a dequantize-per-call model takes ~15 s on the 2-core CPU: show progress.
    bar = progress_bar(total=1 + int(compile) + repeats, desc=label, unit="generate call", enabled=progress)
    eager_forward = model.__dict__.get("forward")
    try:
        # Not inference_mode under compile: its tensors cannot be traced as graph inputs later.
        with (torch.no_grad() if compile else torch.inference_mode()):
            model.generate(**enc, **kw)  # warm-up: caches, lazy packing, allocator, backend choices
            bar.update(1)
            if compile:
                # Graphs of an earlier model are guarded on that model: they would count against
                # Dynamo's recompile limit (8 per code object) for no use. Start clean.
                torch._dynamo.reset()
                model.forward = torch.compile(model.forward, fullgraph=True)
                sync()
                t0 = time.perf_counter()
                model.generate(**enc, **kw)  # compiles the prefill and the one-token step
                sync()
                compile_s = time.perf_counter() - t0
                bar.update(1)
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                out = model.generate(**enc, **kw)
                sync()
                seconds.append(time.perf_counter() - t0)
                generated = out.shape[1] - enc["input_ids"].shape[1]
                bar.update(1)
    finally:
        if compile:
            torch._dynamo.reset()
            if eager_forward is None:
                model.__dict__.pop("forward", None)
            else:
                model.forward = eager_forward
    bar.close()
    med = statistics.median(seconds)
    timer = "time.perf_counter around model.generate (greedy)"
    if compile:
        timer += "; static cache, model.forward = torch.compile(fullgraph=True)"
    return {"tokens_per_s": generated / med, "seconds_median": med, "seconds_min": min(seconds),
            "new_tokens": generated, "prompt_tokens": int(enc["input_ids"].shape[1]), "repeats": repeats,
            "prompt": prompt, "timer": timer, "compiled": bool(compile), "compile_seconds": compile_s}


def fastest_dense(dense_rows: Iterable[dict]) -> dict | None:
    """The fastest of ``dense_rows`` (decode rows of the dense model in several dtypes, all measured in
    the same run on the same machine: the caller's duty), or None without any."""
    rows = [r for r in dense_rows if r is not None]
    return max(rows, key=lambda r: float(r["tokens_per_s"])) if rows else None


def versus_fastest_dense(row: dict, fastest: dict | None) -> dict:
    """``row`` with :data:`FASTEST_DENSE_COLUMNS` against ``fastest`` (a dense row of the same run; None
    leaves ``row`` as it is)."""
    if fastest is None:
        return row
    best = float(fastest["tokens_per_s"])
    return {**row, "speedup_vs_fastest_dense": float(row["tokens_per_s"]) / best,
            "fastest_dense_dtype": fastest["dtype"], "fastest_dense_tokens_per_s": best}


def record_decode(model, tokenizer, *, label: str, spec: dict | None = None, dense_tokens_per_s: float | None = None,
                  fastest: dict | None = None, out: str | Path | None = None, **kw) -> dict:
    """Measure decode speed and upsert a row into ``out`` (default ``runs/local/decode_<device_type>.csv``).

    ``dense_tokens_per_s`` (measured on the same machine in the same run) adds ``speedup_vs_dense``;
    ``fastest`` (the fastest dense row of the same run, :func:`fastest_dense`) adds
    :data:`FASTEST_DENSE_COLUMNS`.
    """
    device = next(model.parameters()).device
    r = decode_tokens_per_second(model, tokenizer, label=f"decode {label}", **kw)
    row = {**provenance(device), "label": label, "spec": canonical(spec or {"method": "dense"}),
           "dtype": DTYPE_NAMES.get(next(model.parameters()).dtype, str(next(model.parameters()).dtype)), **r}
    if dense_tokens_per_s:
        row["speedup_vs_dense"] = r["tokens_per_s"] / dense_tokens_per_s
    row = versus_fastest_dense(row, fastest)
    results.replace_rows(Path(out) if out else default_decode_out(device), [row], DECODE_KEY,
                         context=MEASURE_CONTEXT)
    return row


def run_decode(specs: Iterable[dict], *, device: torch.device, new_tokens: int = 32,
               dtypes: Iterable[torch.dtype] = (torch.float32, torch.bfloat16), out: str | Path | None = None,
               resume: bool = False, log: Callable[[str], None] = status, compile: bool = False,
               dense_measured: Iterable[dict] = ()) -> list[dict]:
    """Decode tokens/s of the default model, dense and compressed by each spec that needs no
    calibration data (RTN, magnitude, plain SVD: the decode speed depends on the format only, so the
    calibrated methods of the same format are left to the sweep runner). One row per model and dtype.

    Each model runs in every one of ``dtypes`` against the dense model in the same dtype: on CPU the
    fast weight-only kernels (torch int4/int8) exist only for bf16 activations, so fp32 decoding of a
    quantized model takes the dequantize-per-call fallback, and the fp32 rows show that cost.

    With ``resume`` the rows already in ``out`` for this machine (same label, spec, dtype, token count
    and prompt) are kept and not measured again; a model is loaded only when something is left to do,
    and a compressed row's speedup uses the dense row of the table (same machine, checked).

    ``compile=True`` measures the models under ``torch.compile`` instead (static cache, fullgraph;
    see :func:`decode_tokens_per_second`): rows labelled ``"... compiled"``, each compressed one
    against the compiled dense model.

    Every row measured here (dense ones too) also gets :data:`FASTEST_DENSE_COLUMNS`: its speed over the
    fastest dense model among those measured *in this run* (this call, plus ``dense_measured``: dense
    rows an earlier call of the same process returned, e.g. reproduce's fp32+bf16 call before its
    bf16-only one), in the same mode (eager or compiled), with the same token count and prompt. Dense
    rows taken from the table by ``resume`` were measured by another run and are never the baseline:
    when every dense row was resumed, the columns stay empty (``speedup_vs_dense`` still uses them).
    """
    from experiments.methods.compress import compress_model, parse_spec
    from experiments.lm.models import load_model

    device = torch.device(device)
    dtypes = list(dtypes)
    out = Path(out) if out is not None else default_decode_out(device)
    prov = provenance(device)
    existing = results.read_rows(out)
    results.check_context(out, [prov], MEASURE_CONTEXT, existing=existing)  # before any timing
    have = {tuple(r.get(k, "") for k in DECODE_KEY): r for r in existing} if resume else {}

    sfx = " compiled" if compile else ""

    def done_row(label: str, spec: dict, dtype: torch.dtype) -> dict | None:
        key = (prov["device_type"], prov["device"], label, canonical(spec), DTYPE_NAMES[dtype], str(new_tokens),
               DEFAULT_PROMPT)
        return have.get(key)

    todo_specs = []
    seen = set()
    for spec in specs:
        parsed = parse_spec(spec)
        fk = canonical(format_of(spec))
        if parsed.needs() or fk in seen:
            continue
        seen.add(fk)
        todo_specs.append(parsed)

    rows = []
    dense: dict[torch.dtype, dict] = {}
    for dt in dtypes:
        r = done_row(f"dense {DTYPE_NAMES[dt]}{sfx}", {"method": "dense"}, dt)
        if r is not None:
            dense[dt] = {**r, "tokens_per_s": float(r["tokens_per_s"])}
    if len(dense) < len(dtypes):
        log(f"[decode {device.type}] loading the default model")
        model, tok, _ = load_model()
        for dt in dtypes:
            if dt in dense:
                continue
            model.to(device=device, dtype=dt)
            name = DTYPE_NAMES[dt]
            dense[dt] = record_decode(model, tok, label=f"dense {name}{sfx}", new_tokens=new_tokens, out=out,
                                     compile=compile)
            log(f"[decode {device.type}] dense {name}{sfx}: {dense[dt]['tokens_per_s']:.1f} tok/s")
            rows.append(dense[dt])
        del model

    def same_setting(r: dict) -> bool:
        return (r.get("device") == prov["device"] and str(r.get("label", "")).startswith("dense ")
                and str(r.get("label", "")).endswith(sfx) and str(r.get("compiled")) == str(compile)
                and str(r.get("new_tokens")) == str(new_tokens) and r.get("prompt") == DEFAULT_PROMPT)
    fastest = fastest_dense([r for r in [*dense_measured, *rows] if same_setting(r)])
    if fastest is not None and rows:   # the dense rows of this run, now that all of them are measured
        rows = [versus_fastest_dense(r, fastest) for r in rows]
        dense.update({DTYPES[r["dtype"]]: r for r in rows})
        results.replace_rows(out, rows, DECODE_KEY, context=MEASURE_CONTEXT)
    for parsed in todo_specs:
        left = [dt for dt in dtypes if done_row(f"{parsed.label()} {DTYPE_NAMES[dt]}{sfx}", parsed.to_dict(), dt) is None]
        if not left:
            log(f"[decode {device.type}] {parsed.label()}: already in {out}")
            continue
        log(f"[decode {device.type}] compressing the default model: {parsed.label()}")
        m, tok, _ = load_model()  # a fresh copy to compress in place
        compress_model(m, parsed, None, progress=True)
        for dt in left:
            m.to(device=device, dtype=dt)
            name = DTYPE_NAMES[dt]
            row = record_decode(m, tok, label=f"{parsed.label()} {name}{sfx}", spec=parsed.to_dict(),
                                new_tokens=new_tokens, dense_tokens_per_s=dense[dt]["tokens_per_s"],
                                fastest=fastest, out=out, compile=compile)
            log(f"[decode {device.type}] {parsed.label()} {name}{sfx}: {row['tokens_per_s']:.1f} tok/s "
                f"(x{row['speedup_vs_dense']:.2f} vs dense {name}{sfx}"
                + (f", x{row['speedup_vs_fastest_dense']:.2f} vs the fastest, dense {fastest['dtype']}{sfx})"
                   if fastest is not None else ")"))
            rows.append(row)
        del m
    return rows


class StepDecoder:
    """Greedy decoding timed as an engine's ``tg`` test times it (llama-bench; :mod:`experiments.io.engine`):
    the prompt's prefill untimed, then ``new_tokens`` one-token forward calls with a static KV cache, timed
    together. No ``generate``: no logits processors, stopping criteria or cache bookkeeping per token, so
    what is timed is the model's own step (and, eager, PyTorch's per-op dispatch).

    ``compile=True`` compiles the one-token step (``torch.compile(model.forward, fullgraph=True)``; the
    prefill stays eager: one graph per model). One eager run settles the layers' measured backends first
    (``triton_kernels.nn._ops``); the compiling run is timed apart (``compile_seconds``).
    ``fuse=True`` first fuses the model's q/k/v and gate/up projections in place
    (:func:`experiments.lm.fuse.fuse_projections`: 4 linear calls per block instead of 7, same outputs).
    ``decoder()`` returns ``(seconds, greedy token ids)``.
    """

    def __init__(self, model, prompt_ids: Iterable[int], new_tokens: int, *, compile: bool = True,
                 fuse: bool = False):
        from transformers import StaticCache
        from experiments.lm.fuse import fuse_projections
        self.prompt = torch.tensor([list(prompt_ids)], dtype=torch.long)
        if self.prompt.shape[1] < 1:
            raise ValueError("prompt_ids is empty: give the prompt's token ids")
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
            raise ValueError(f"new_tokens={new_tokens!r} must be a positive int")
        self.model, self.new_tokens, self.compiled = model, new_tokens, bool(compile)
        self.fused = fuse_projections(model) if fuse else None
        device = next(model.parameters()).device
        self.prompt = self.prompt.to(device)
        self.cache = StaticCache(config=model.config, max_cache_len=self.prompt.shape[1] + new_tokens)
        self.step = model.forward
        self.compile_seconds = None
        self.eager_tokens = self()[1]          # settles backends and prepacked weights, eagerly
        if compile:
            # Every model compiled in one process adds graphs to the same code object (the model class's
            # forward); Dynamo refuses to compile more than recompile_limit of them (8) by default.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.step = torch.compile(model.forward, fullgraph=True)
            t0 = time.perf_counter()
            self()
            self.compile_seconds = time.perf_counter() - t0

    def _forward(self, fn, ids: torch.Tensor, start: int):
        pos = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
        return fn(input_ids=ids, cache=self.cache, position_ids=pos, use_cache=True, logits_to_keep=1).logits

    def __call__(self, around_steps=None) -> tuple[float, list[int]]:
        """One run: ``(seconds of the new_tokens steps, greedy token ids)``. ``around_steps``: a context
        manager entered around the timed steps only (a profiler: :func:`profile_step`)."""
        import contextlib
        device = self.prompt.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        n = self.prompt.shape[1]
        out = []
        with torch.no_grad():
            self.cache.reset()
            logits = self._forward(self.model.forward, self.prompt, 0)     # prefill: untimed, eager
            sync()
            with around_steps if around_steps is not None else contextlib.nullcontext():
                t0 = time.perf_counter()
                for i in range(self.new_tokens):
                    tok = logits[0, -1].argmax()
                    out.append(tok)
                    logits = self._forward(self.step, tok.view(1, 1), n + i)
                sync()
                seconds = time.perf_counter() - t0
        return seconds, [int(t) for t in out]


# Where a decode step's time goes (:func:`profile_step`): torch.profiler op names -> category, first match.
PROFILE_CATEGORIES = (
    ("linear layers", ("int4pack_mm", "int8pack_mm", "aten::mm", "aten::addmm", "aten::linear", "aten::matmul",
                       "tkr::", "dequant", "mkldnn", "linear_pointwise")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::bmm", "aten::baddbmm", "softmax")),
    ("compiled graph (fused kernels and glue)", ("Torch-Compiled Region", "CompiledFunction", "CompiledFxGraph",
                                                 "cpp_fused", "Inductor")),
)


def profile_step(decoder: StepDecoder, *, compiled: bool) -> dict[str, float]:
    """Milliseconds per decoded token by where they go, from ``torch.profiler`` around one timed run of
    ``decoder`` (its eager forward, or its compiled step when ``compiled``): each profiled op's *self* time
    summed into :data:`PROFILE_CATEGORIES` (else ``other ops``: norms, rotary, elementwise, copies,
    embedding), and ``Python and dispatch outside ops`` = the run's wall time minus every op's self time
    (the interpreter, nn.Module calls, HF bookkeeping, Dynamo guards). Profiling slows every op a little:
    read the shares, not the totals, against an unprofiled run. ``wall`` is the profiled run's total."""
    from torch.profiler import ProfilerActivity, profile
    if compiled and not decoder.compiled:
        raise ValueError("compiled=True needs a StepDecoder built with compile=True")
    step = decoder.step
    decoder.step = step if compiled else decoder.model.forward
    try:
        prof = profile(activities=[ProfilerActivity.CPU])
        seconds, _ = decoder(around_steps=prof)
    finally:
        decoder.step = step
    per_cat: dict[str, float] = {name: 0.0 for name, _ in PROFILE_CATEGORIES}
    per_cat["other ops"] = 0.0
    for e in prof.key_averages():
        cat = next((name for name, keys in PROFILE_CATEGORIES if any(k in e.key for k in keys)), "other ops")
        per_cat[cat] += float(e.self_cpu_time_total)
    n, wall_us = decoder.new_tokens, seconds * 1e6
    out = {k: v / n / 1e3 for k, v in per_cat.items()}
    out["Python and dispatch outside ops"] = max(0.0, wall_us - sum(per_cat.values())) / n / 1e3
    out["wall"] = wall_us / n / 1e3
    return out
