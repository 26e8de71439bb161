"""Perplexity of a causal LM over non-overlapping token windows.

Each window (from ``experiments.lm.data.eval_tokens``) is scored on its own, with no BOS token and no
context carried over from the previous window: the loss covers every next-token prediction inside
the window, i.e. ``seqlen - 1`` tokens per window (the first token of a window is only context).
This matches ``model(window, labels=window).loss`` in transformers, averaged over all predicted
tokens of all windows. Per-token NLL is computed in float32 and summed in float64, so the result
does not depend on batch size beyond float32 rounding inside the model.

The model is called as is, so a model whose linears were replaced by compressed modules is
evaluated through those modules' real forward.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn


def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1,
               progress: bool = True) -> dict[str, float]:
    """dict(ppl, nll (mean per predicted token), n_tokens (predicted tokens), seconds, nonfinite_batch)
    over ``windows``.

    ``windows`` is a (n_windows, seqlen) LongTensor with seqlen >= 2. ``nonfinite_batch`` is the index
    of the first window of the first batch whose loss was NaN or infinite (then ``ppl``/``nll`` are not
    finite; :func:`nonfinite_origin` on that batch names the layer), else None. A finite ``nll`` too
    large for ``exp`` gives ``ppl = inf``.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise TypeError(f"windows must be a 2-D LongTensor (n_windows, seqlen), got "
                        f"{getattr(windows, 'dtype', type(windows).__name__)} of shape "
                        f"{tuple(getattr(windows, 'shape', ()))}")
    n_windows, seqlen = windows.shape
    if n_windows < 1 or seqlen < 2:
        raise ValueError(f"windows must hold at least one window of at least 2 tokens, got shape "
                         f"{tuple(windows.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    from experiments.core.progress import progress_bar  # noqa: PLC0415

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    n_tokens = 0
    nonfinite_batch = None
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for i in progress_bar(range(0, n_windows, batch_size), desc="perplexity", unit="batch",
                                  enabled=progress, leave=False):
                ids = windows[i:i + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                # Upcast per batch: a float16/bfloat16 model's logits are scored in float32.
                token_nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                            reduction="none")
                batch_sum = float(token_nll.double().sum())
                if nonfinite_batch is None and not math.isfinite(batch_sum):
                    nonfinite_batch = i
                nll_sum += batch_sum
                n_tokens += ids.shape[0] * (seqlen - 1)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    nll = nll_sum / n_tokens
    ppl = math.inf if nll > _MAX_EXP_ARG else math.exp(nll)   # math.exp raises OverflowError beyond
    return {"ppl": ppl, "nll": nll, "n_tokens": n_tokens, "seconds": seconds, "nonfinite_batch": nonfinite_batch}


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
