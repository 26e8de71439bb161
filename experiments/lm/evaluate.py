"""Perplexity of a causal LM over non-overlapping token windows.

Each window (from ``experiments.lm.data.eval_tokens``) is scored on its own, with no BOS token and no
context carried over from the previous window: the loss covers every next-token prediction inside
the window, i.e. ``seqlen - 1`` tokens per window (the first token of a window is only context).
This matches ``model(window, labels=window).loss`` in transformers, averaged over all predicted
tokens of all windows. Per-token NLL is computed in float32 and summed in float64, so the result
does not depend on batch size beyond float32 rounding inside the model.

The model is called as is, so a model whose linears were replaced by compressed modules is
evaluated through those modules' real forward.

Per window and against the dense model
    :func:`perplexity` also returns each window's mean NLL (``window_nll``): the windows are the same
    for every point of a run, so two points can be compared window by window (a *paired* difference,
    :mod:`experiments.core.stats`). Given a :class:`DenseReference` (the dense model's output on the
    same windows, :func:`dense_reference`), the same forward pass also scores, per token, the KL
    divergence KL(dense || this model) and whether this model's top-1 token is the dense model's; those
    are free (no extra forward). :func:`interval_columns` turns the per-window values into a row's
    columns with percentile bootstrap intervals over windows.

The dense reference (:class:`DenseReference`; :func:`save_reference` / :func:`load_reference`)
    Per predicted token: the dense model's top-``k`` token ids (int32) and their log-probabilities
    (float32, ``logit - logsumexp(logits)``, sorted descending), the log-probability of everything
    outside the top-k (float32, computed exactly as ``logsumexp`` of the other logits, not as
    ``1 - sum``), and the full ``logsumexp`` of the logits (float32; ``logit = logprob + lse`` recovers
    the top-k logits); per window its mean NLL (float64). That is ``8 k + 8`` bytes per token: 2,056 B at
    the default ``k = 256`` (:data:`REFERENCE_TOPK`), e.g. 16.8 MB for the full sweeps' 8,176 predicted
    tokens and 4.2 MB for quick mode's 2,040. Float32 rather than float16 values: float16 steps
    (0.004 nats at a log-probability of -4) would leave the dense model's KL against itself above 0,
    to save 2 k B/token; in float32 it is exactly 0 on the machine that computed the reference.

KL over top-k + rest
    KL(p || q) is computed over ``k + 1`` bins: the dense model's top-k tokens and one bin for all the
    others, with both models' probabilities of those bins (this model's rest bin also exactly, from
    the logsumexp of its other logits). Merging tokens into one bin can only lower a KL divergence (the
    data-processing inequality; log-sum inequality), so the value is a **lower bound** of the true
    per-token KL; with ``k`` = the vocabulary size it is the exact KL (tested). llama.cpp's
    ``llama-perplexity --kl-divergence`` stores every token's full log-probabilities instead (uint16,
    ~98 KB per token at the default model's vocabulary of 49,152) and reports the full KL and "same top
    p"; the reference here is ~48x smaller, for a bound that is tight where the dense model's top-k
    tokens carry nearly all of its probability (what it misses is the KL inside the rest bin; measured
    at :data:`REFERENCE_TOPK`).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# 256: on the default model (2 quick windows of Pride and Prejudice) the dense top 32 / 128 / 256 / 1024
# tokens leave 13% / 6.0% / 3.9% / 1.3% of the probability outside, and the bound is 80% / 90% / 94% / 98%
# of the full KL of rtn-w4-g64 (0.359 nats per token); 256 costs 2 KB per token.
REFERENCE_TOPK = 256
REFERENCE_FORMAT = 1     # bump when the stored fields change: an older file is then recomputed


def windows_digest(windows: torch.Tensor) -> str:
    """A short hash of the token windows (shape and ids): a reference is only used on its own windows."""
    w = windows.detach().to("cpu", torch.long).contiguous()
    h = hashlib.sha256(str(tuple(w.shape)).encode())
    h.update(w.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class DenseReference:
    """The dense model's output on a set of windows, for the paired metrics (module docstring).

    Shapes: ``n`` windows of ``seqlen`` tokens predict ``T = seqlen - 1`` tokens each."""
    topk_ids: torch.Tensor        # (n, T, k) int32, the dense model's k most likely tokens, most likely first
    topk_logprobs: torch.Tensor   # (n, T, k) float32, their log-probabilities
    rest_logprob: torch.Tensor    # (n, T) float32, log-probability of all other tokens (-inf when k = vocab)
    lse: torch.Tensor             # (n, T) float32, logsumexp of the dense logits
    window_nll: torch.Tensor      # (n,) float64, the dense model's mean NLL per predicted token of each window
    windows_sha: str              # windows_digest of the windows it was computed on

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[-1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.topk_ids, self.topk_logprobs, self.rest_logprob,
                                                          self.lse, self.window_nll))


def _check_windows(windows) -> tuple[int, int]:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise TypeError(f"windows must be a 2-D LongTensor (n_windows, seqlen), got "
                        f"{getattr(windows, 'dtype', type(windows).__name__)} of shape "
                        f"{tuple(getattr(windows, 'shape', ()))}")
    n_windows, seqlen = windows.shape
    if n_windows < 1 or seqlen < 2:
        raise ValueError(f"windows must hold at least one window of at least 2 tokens, got shape "
                         f"{tuple(windows.shape)}")
    return n_windows, seqlen


def _check_batch(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _rest_logprob(logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log of the probability of every token not in ``ids`` (exact: logsumexp of the other logits)."""
    return torch.logsumexp(logits.scatter(-1, ids, float("-inf")), dim=-1) - lse


def _token_kl(logits: torch.Tensor, ref_ids: torch.Tensor, ref_lp: torch.Tensor,
              ref_rest: torch.Tensor) -> torch.Tensor:
    """Per-token KL(dense || this model) over the dense top-k bins + one rest bin, float64 (module docstring)."""
    lse = torch.logsumexp(logits, dim=-1)
    lq = logits.gather(-1, ref_ids) - lse[..., None]
    lq_rest = _rest_logprob(logits, ref_ids, lse)
    lp, lq = ref_lp.double(), lq.double()
    lp_rest, lq_rest = ref_rest.double(), lq_rest.double()
    kl = (lp.exp() * (lp - lq)).sum(-1)
    rest = torch.where(torch.isinf(lp_rest) & (lp_rest < 0), torch.zeros_like(lp_rest),
                       lp_rest.exp() * (lp_rest - lq_rest))
    return kl + rest


def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = True,
               reference: DenseReference | None = None) -> dict:
    """dict(ppl, nll (mean per predicted token), n_tokens (predicted tokens), seconds, nonfinite_batch,
    window_nll) over ``windows``; with ``reference``, also window_kl and window_top1.

    ``windows`` is a (n_windows, seqlen) LongTensor with seqlen >= 2. ``window_nll`` lists each
    window's mean NLL per predicted token (``seqlen - 1`` tokens each, in window order), so
    ``nll`` is their mean. ``nonfinite_batch`` is the index of the first window of the first batch
    whose loss was NaN or infinite (then ``ppl``/``nll`` are not finite; :func:`nonfinite_origin` on
    that batch names the layer), else None. A finite ``nll`` too large for ``exp`` gives ``ppl = inf``.

    ``reference`` (:func:`dense_reference` of the same windows, else a ValueError): ``window_kl`` is each
    window's mean per-token KL(dense || model) over the top-k + rest bins (a lower bound of the full
    KL, module docstring), ``window_top1`` the fraction of its tokens whose argmax is the dense model's
    argmax, both from the same forward pass as the NLL.
    """
    n_windows, seqlen = _check_windows(windows)
    _check_batch(batch_size)
    if reference is not None:
        _check_reference(reference, windows)
    from experiments.core.progress import progress_bar  # noqa: PLC0415

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    n_tokens = 0
    nonfinite_batch = None
    window_nll: list[float] = []
    window_kl: list[float] = []
    window_top1: list[float] = []
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for i in progress_bar(range(0, n_windows, batch_size), desc="perplexity", unit="batch",
                                  enabled=progress, leave=False):
                ids = windows[i:i + batch_size].to(device)
                # Upcast per batch: a float16/bfloat16 model's logits are scored in float32.
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                token_nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                            reduction="none").view(ids.shape[0], seqlen - 1).double()
                batch_sum = float(token_nll.sum())
                if nonfinite_batch is None and not math.isfinite(batch_sum):
                    nonfinite_batch = i
                nll_sum += batch_sum
                n_tokens += ids.shape[0] * (seqlen - 1)
                window_nll += token_nll.mean(dim=1).tolist()
                if reference is not None:
                    sl = slice(i, i + ids.shape[0])
                    ref_ids = reference.topk_ids[sl].to(device, torch.long)
                    kl = _token_kl(logits, ref_ids, reference.topk_logprobs[sl].to(device),
                                   reference.rest_logprob[sl].to(device))
                    window_kl += kl.mean(dim=1).tolist()
                    same = logits.argmax(dim=-1) == ref_ids[..., 0]
                    window_top1 += same.double().mean(dim=1).tolist()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    nll = nll_sum / n_tokens
    ppl = math.inf if nll > _MAX_EXP_ARG else math.exp(nll)   # math.exp raises OverflowError beyond
    out = {"ppl": ppl, "nll": nll, "n_tokens": n_tokens, "seconds": seconds, "nonfinite_batch": nonfinite_batch,
           "window_nll": window_nll}
    if reference is not None:
        out.update(window_kl=window_kl, window_top1=window_top1)
    return out


def _check_reference(reference: DenseReference, windows: torch.Tensor) -> None:
    if not isinstance(reference, DenseReference):
        raise TypeError(f"reference must be a DenseReference (from dense_reference), got {type(reference).__name__}")
    if reference.windows_sha != windows_digest(windows):
        raise ValueError(f"reference was computed on other windows (digest {reference.windows_sha}, these are "
                         f"{windows_digest(windows)}, shape {tuple(windows.shape)}); compute it with "
                         f"dense_reference on the same windows")


def dense_reference(model: nn.Module, windows: torch.Tensor, *, k: int = REFERENCE_TOPK, batch_size: int = 1,
                    progress: bool = True) -> DenseReference:
    """The dense model's :class:`DenseReference` on ``windows`` (one forward pass over them; module
    docstring). ``k`` above the vocabulary size is the vocabulary size (then the KL is exact)."""
    n_windows, seqlen = _check_windows(windows)
    _check_batch(batch_size)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (top-k tokens kept per position) must be a positive integer, e.g. "
                         f"{REFERENCE_TOPK}, got {k!r}")
    from experiments.core.progress import progress_bar  # noqa: PLC0415

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"ids": [], "lp": [], "rest": [], "lse": [], "nll": []}
    try:
        with torch.inference_mode():
            for i in progress_bar(range(0, n_windows, batch_size), desc="dense reference", unit="batch",
                                  enabled=progress, leave=False):
                ids = windows[i:i + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                lse = torch.logsumexp(logits, dim=-1)
                top, top_ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
                parts["ids"].append(top_ids.to("cpu", torch.int32))
                parts["lp"].append((top - lse[..., None]).cpu())
                parts["rest"].append(_rest_logprob(logits, top_ids, lse).cpu())
                parts["lse"].append(lse.cpu())
                token_nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
                parts["nll"].append(token_nll.view(ids.shape[0], seqlen - 1).double().mean(dim=1).cpu())
    finally:
        model.train(was_training)
    return DenseReference(topk_ids=torch.cat(parts["ids"]), topk_logprobs=torch.cat(parts["lp"]),
                          rest_logprob=torch.cat(parts["rest"]), lse=torch.cat(parts["lse"]),
                          window_nll=torch.cat(parts["nll"]), windows_sha=windows_digest(windows))


_REFERENCE_FIELDS = ("topk_ids", "topk_logprobs", "rest_logprob", "lse", "window_nll")


def save_reference(reference: DenseReference, path: str | Path) -> Path:
    """Write ``reference`` to ``path`` atomically (``torch.save`` of its tensors; complete or absent)."""
    from experiments.core.atomic import atomic_file  # noqa: PLC0415
    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save({"format": REFERENCE_FORMAT, "windows_sha": reference.windows_sha,
                    **{f: getattr(reference, f).contiguous() for f in _REFERENCE_FIELDS}}, tmp)
    return path


def load_reference(path: str | Path) -> DenseReference | None:
    """The reference saved at ``path``; None when there is none, or it is of an older format (recompute).
    A file that is not a reference is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types on a foreign or damaged file
        raise ValueError(f"{path}: not a dense reference ({type(e).__name__}: {e}); delete it to have it "
                         f"computed again") from e
    if not isinstance(data, dict) or data.get("format") != REFERENCE_FORMAT:
        return None
    missing = [f for f in (*_REFERENCE_FIELDS, "windows_sha") if f not in data]
    if missing:
        raise ValueError(f"{path}: a dense reference without {', '.join(missing)}; delete it to have it "
                         f"computed again")
    return DenseReference(**{f: data[f] for f in _REFERENCE_FIELDS}, windows_sha=str(data["windows_sha"]))


def _g(v: float) -> float:
    """A value as rows store it: 6 significant digits (NaN/inf as is)."""
    return float(f"{v:.6g}") if math.isfinite(v) else v


def interval_columns(ev: dict, reference: DenseReference | None = None, *, suffix: str = "") -> dict:
    """A row's interval columns from :func:`perplexity`'s output (percentile bootstrap over windows,
    :mod:`experiments.core.stats`): ``ppl{suffix}_lo/_hi``; with ``reference`` (the same windows) the
    paired metrics against the dense model, each with its interval: ``kl`` (mean per token, lower bound,
    module docstring), ``top1`` (agreement with the dense argmax), ``dnll`` (mean NLL minus the dense
    model's, per token). NaN bounds (fewer than 2 windows, or a non-finite NLL) are NaN."""
    from experiments.core.stats import paired_interval, ratio_interval  # noqa: PLC0415

    def exp(v: float) -> float:
        return math.inf if v > _MAX_EXP_ARG else math.exp(v)

    ppl = ratio_interval(ev["window_nll"]).map(exp)
    out = {f"ppl{suffix}_lo": _g(ppl.lo), f"ppl{suffix}_hi": _g(ppl.hi)}
    if reference is not None:
        kl = ratio_interval(ev["window_kl"])
        top1 = ratio_interval(ev["window_top1"])
        dnll = paired_interval(ev["window_nll"], reference.window_nll.tolist())
        for name, iv in (("kl", kl), ("top1", top1), ("dnll", dnll)):
            out.update({name: _g(iv.estimate), f"{name}_lo": _g(iv.lo), f"{name}_hi": _g(iv.hi)})
    return out


_MAX_EXP_ARG = math.log(1.7976931348623157e308)   # the largest float's log: exp of more overflows


def _has_nonfinite(value) -> bool | None:
    """Whether a module's output (a tensor, or tensors in a tuple/list/dict/ModelOutput) holds a NaN or
    inf in a floating-point tensor; None when it holds no floating-point tensor."""
    if isinstance(value, torch.Tensor):
        return bool((~torch.isfinite(value)).any()) if value.is_floating_point() else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        found = [_has_nonfinite(v) for v in value]
        return any(found) if any(f is not None for f in found) else None
    return None


def nonfinite_origin(model: nn.Module, ids: torch.Tensor) -> str | None:
    """The first module (in execution order) whose output holds a NaN or inf on ``ids``, described as
    ``'<module path> (<class>)'`` with whether its inputs were finite; None when every module output is
    finite (the loss itself overflowed). Forward hooks on every module of ``model``, removed after.
    """
    found: list[str] = []

    def hook(name: str):
        def fn(mod, inputs, output):
            if found or not _has_nonfinite(output):
                return
            bad_in = _has_nonfinite(list(inputs))
            found.append(f"{name or '<model>'} ({type(mod).__name__}), "
                         + ("whose inputs were not finite either" if bad_in else "from finite inputs"))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found[0] if found else None
