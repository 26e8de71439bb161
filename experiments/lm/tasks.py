"""A zero-shot multiple-choice task built from held-out text: pick the true ending of a sentence.

Task (HellaSwag-style, scored as lm-evaluation-harness scores multiple choice)
    Each item is a passage of exactly ``context_tokens`` tokens that stops in the middle of a sentence,
    followed by ``k`` candidate endings: the sentence's true second half, and ``k - 1`` second halves
    of other sentences of the same text. The model picks the candidate with the highest
    log-likelihood given the passage (``acc``), or the highest log-likelihood per character of the
    candidate (``acc_norm``, lm-eval's length normalisation: the summed log-likelihood divided by the
    candidate's length in characters, without the leading space). Chance is ``1 / k``.
    Measured on the default model and task text (k=4, 32 context tokens, seed 0, CPU fp32, 2026-12):
    200 items: dense acc 0.71 [0.64, 0.77], acc_norm 0.82 [0.76, 0.87]; RTN 3-bit g128 acc 0.42
    [0.35, 0.49], acc_norm 0.615 [0.55, 0.68] (dense right and RTN wrong on 59 items by acc, the reverse
    on 1); the first 100 items (the default ``n_items``): dense 0.69 / 0.83, RTN 0.43 / 0.62. 14,432
    tokens forwarded for 200 items (72 per item), so ~7.2k for 100, about what perplexity over 8,192
    tokens costs. Choosing the whole next sentence after a sentence end instead (the first design) gave
    0.40 / 0.40 on 80 items, too close to chance for this model, so endings it is.

Text (:func:`default_task_text`)
    The second half of *Emma*: from the first paragraph break after the middle of the novel (by
    characters) to its end. Emma is neither a calibration nor the evaluation novel of the default
    split (``experiments.lm.data.default_split``), so no calibration window and no evaluation window
    of Pride and Prejudice touches it; a second evaluation text cut from Emma must stay in its first
    half (``task_held_out_start`` says where the task begins).

Construction (:func:`build_task`; deterministic: same text, tokenizer and arguments -> same items)
    1. Paragraphs are the blocks between blank lines; inside one, line breaks and runs of spaces
       become one space. Sentences end at ``.``, ``!`` or ``?`` (with closing quotes, underscores or
       brackets) followed by a space and a capital letter or an opening quote; a full stop after
       ``Mr``, ``Mrs``, ``Dr``, ``St``... does not end a sentence. No further linguistic cleaning
       (a quotation's sentences are sentences).
    2. The *ending* of a sentence of ``w >= 4`` words is its last ``w // 2`` words (from after its
       middle space to its end). A target is an ending of
       ``MIN_CANDIDATE_TOKENS`` to ``MAX_CANDIDATE_TOKENS`` tokens with at least ``context_tokens``
       tokens of text before it. Targets are taken in the order of a permutation drawn with
       ``torch.Generator().manual_seed(seed)`` until ``n_items`` have been built, so the items for a
       smaller ``n_items`` are the first items for a larger one.
    3. Distractors: ``k - 1`` distinct endings (other text than the target's) at least
       ``DISTRACTOR_GAP`` endings away from the target, whose token count is within
       ``LENGTH_TOLERANCE`` of the target's (at least 2 tokens), drawn with the same generator; so the
       candidates of an item have nearly the same length, and length alone does not give the answer.
       The candidates' order is a permutation from the same generator; ``label`` is the true one's index.
    4. Token ids follow lm-eval's ``_encode_pair``: the context string and ``context + " " + ending``
       are tokenized without special tokens (no BOS, as ``experiments.lm.evaluate``), the candidate's
       ids are the whole string's ids after the context's; the context keeps its last
       ``context_tokens`` ids (lm-eval also truncates a long context from the left).

Scoring (:func:`score_task`)
    One forward pass over a batch of contexts (logits of the last position only, where the model
    accepts ``logits_to_keep``), its KV cache repeated ``k`` times, then one pass over the ``k``
    candidates of every item, right-padded (padding after a candidate's last token cannot change its
    log-likelihood in a causal model); items are batched by candidate length. Tokens forwarded per
    item: ``context_tokens + k * L`` with ``L`` the longest candidate of its batch (``tokens_forwarded``
    counts them). :func:`candidate_loglik_reference` scores the same items one candidate at a time on
    ``context + candidate`` with no cache; the tests hold the two equal. Intervals are Wilson score
    intervals at 95% (:func:`wilson_interval`), the items treated as independent draws.

Not done here: lm-eval's HellaSwag preprocessing, adversarial filtering of distractors, few-shot
prompts, mutual-information scoring. The task measures how well a (compressed) model continues text
it never saw in calibration or evaluation; it is not a HellaSwag score.
"""
from __future__ import annotations

import bisect
import collections
import hashlib
import inspect
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

TASK_NOVEL = "Emma"
# Fraction of Emma's characters before the task text; the task starts at the next paragraph break.
TASK_START_FRACTION = 0.5
MIN_CANDIDATE_TOKENS = 4
MAX_CANDIDATE_TOKENS = 16
LENGTH_TOLERANCE = 0.2
DISTRACTOR_GAP = 50
# Defaults (see build_task): 4 candidates, so chance is 25%; 100 items, ~7.2k tokens forwarded.
TASK_K = 4
TASK_N_ITEMS = 100
TASK_CONTEXT_TOKENS = 32
TASK_SEED = 0
Z95 = 1.959963984540054

_ABBREVIATIONS = frozenset({"Mr", "Mrs", "Ms", "Dr", "St", "Messrs", "Col", "Capt", "Rev", "Esq", "Mme", "Mlle"})
# A sentence end: terminal punctuation, then closing quotes/underscores/brackets, then whitespace and a
# capital letter (possibly after opening quotes/underscores/brackets).
_SENTENCE_END = re.compile(r"[.!?]+[\"'_)\]]*(?=\s+[\"'_(\[]*[A-Z])")


@dataclass(frozen=True)
class TaskItems:
    """Tokenized items of the sentence-ending task (see the module docstring).

    ``context`` (n, context_tokens), ``candidates`` (n, k, max_len) right-padded with 0,
    ``cand_len`` (n, k) token counts, ``cand_chars`` (n, k) character counts (for ``acc_norm``),
    ``label`` (n,) the true candidate's index. ``texts``: per item (context string, candidate strings);
    ``target_spans``: per item the true ending's (start, end) character offsets in the normalised
    text (:func:`normalise`). ``settings``: how they were built (for result provenance)."""
    context: torch.Tensor
    candidates: torch.Tensor
    cand_len: torch.Tensor
    cand_chars: torch.Tensor
    label: torch.Tensor
    texts: tuple[tuple[str, tuple[str, ...]], ...] = field(repr=False)
    target_spans: tuple[tuple[int, int], ...] = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.label.numel())

    @property
    def k(self) -> int:
        return int(self.candidates.shape[1])


# ----------------------------------------------------------------------------------------- text

def task_held_out_start(emma: str) -> int:
    """Character offset in Emma where the task text starts: the first paragraph break (blank line)
    at or after ``TASK_START_FRACTION`` of its characters."""
    cut = int(len(emma) * TASK_START_FRACTION)
    brk = emma.find("\n\n", cut)
    if brk == -1:
        raise ValueError(f"{TASK_NOVEL}: no paragraph break after character {cut}; is this the novel's text?")
    return brk + 2


def default_task_text(cache_dir=None) -> tuple[str, dict[str, str]]:
    """(task text, description) from the default corpus: the second half of Emma (module docstring)."""
    from experiments.lm import data
    novels = data.load_corpus("austen", cache_dir)
    split = data.default_split()
    if TASK_NOVEL in split["calibration"] or TASK_NOVEL in split["evaluation"]:
        raise AssertionError(f"{TASK_NOVEL} is in the default split {split}; the task text must be held out")
    emma = novels[TASK_NOVEL]
    start = task_held_out_start(emma)
    return emma[start:], {"task_text": f"{TASK_NOVEL}, characters {start}..{len(emma)} (second half)"}


def normalise(text: str) -> str:
    """Paragraphs (blocks between blank lines) with their whitespace collapsed, joined by a blank line."""
    paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paras if p)


def sentences(norm: str) -> list[tuple[int, int, int]]:
    """(start, end, paragraph index) of every sentence of a :func:`normalise`\\ d text, in order."""
    out = []
    offset = 0
    for pi, para in enumerate(norm.split("\n\n")):
        start = 0
        for m in _SENTENCE_END.finditer(para):
            word = re.search(r"(\w+)\W*$", para[start:m.start() + 1])
            if m.group().startswith(".") and word and word.group(1) in _ABBREVIATIONS:
                continue
            out.append((offset + start, offset + m.end(), pi))
            start = m.end() + 1   # the one space after it (normalised)
        if start < len(para):
            out.append((offset + start, offset + len(para), pi))
        offset += len(para) + 2
    return out


# --------------------------------------------------------------------------------------- build

def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


_CACHE: collections.OrderedDict[tuple, TaskItems] = collections.OrderedDict()
_CACHE_SIZE = 4


def build_task(tokenizer, text: str, *, n_items: int = TASK_N_ITEMS, k: int = TASK_K, seed: int = TASK_SEED,
               context_tokens: int = TASK_CONTEXT_TOKENS) -> TaskItems:
    """The ``n_items`` items of the sentence-ending task over ``text`` (module docstring, "Construction").

    Deterministic in (tokenizer, text, arguments); the last few builds are kept in memory. ValueError
    naming the argument when ``text`` holds too few eligible targets or distractors for them."""
    _check_int("n_items", n_items, 1)
    _check_int("k", k, 2)
    _check_int("seed", seed, 0)
    _check_int("context_tokens", context_tokens, 1)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string (the held-out text the items are cut from)")
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
           hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest(), n_items, k, seed, context_tokens)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    items = _build(tokenizer, text, n_items=n_items, k=k, seed=seed, context_tokens=context_tokens)
    _CACHE[key] = items
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return items


def endings(norm: str) -> list[tuple[int, int]]:
    """(start, end) of the ending of every sentence of ``w >= 4`` words of a :func:`normalise`\\ d text: its
    last ``w // 2`` words (words are separated by single spaces there)."""
    out = []
    for s, e, _ in sentences(norm):
        spaces = [m.start() for m in re.finditer(" ", norm[s:e])]
        if len(spaces) >= 3:
            out.append((s + spaces[len(spaces) // 2] + 1, e))
    return out


def clear_cache() -> None:
    """Forget the items :func:`build_task` keeps in memory."""
    _CACHE.clear()


def _build(tokenizer, text: str, *, n_items: int, k: int, seed: int, context_tokens: int) -> TaskItems:
    norm = normalise(text)
    units = endings(norm)
    lengths = [len(ids) for ids in _ids(tokenizer, [" " + norm[s:e] for s, e in units])]
    by_len = sorted(range(len(units)), key=lambda i: (lengths[i], i))
    sorted_len = [lengths[i] for i in by_len]
    targets = [i for i in range(len(units)) if MIN_CANDIDATE_TOKENS <= lengths[i] <= MAX_CANDIDATE_TOKENS]
    gen = torch.Generator().manual_seed(seed)
    # Characters of text before a target that surely hold context_tokens tokens (>= 1 character per token).
    window = 8 * context_tokens + 64

    contexts, cands, labels, texts, spans = [], [], [], [], []
    for t in (targets[j] for j in torch.randperm(len(targets), generator=gen).tolist()):
        if len(labels) == n_items:
            break
        s, e = units[t]
        ctx_text = norm[max(0, s - window):s].rstrip()
        if s - window > 0:
            ctx_text = ctx_text[ctx_text.find(" ") + 1:]          # no partial word at the left edge
        ctx_ids = _ids(tokenizer, [ctx_text])[0]
        if len(ctx_ids) < context_tokens:
            continue                                              # too near the start of the text
        true = norm[s:e]
        tol = max(2, math.ceil(LENGTH_TOLERANCE * lengths[t]))
        lo = bisect.bisect_left(sorted_len, lengths[t] - tol)
        hi = bisect.bisect_right(sorted_len, lengths[t] + tol)
        pool = [i for i in by_len[lo:hi] if abs(i - t) >= DISTRACTOR_GAP]
        seen, distractors = {true}, []
        for j in torch.randperm(len(pool), generator=gen).tolist():
            d = norm[units[pool[j]][0]:units[pool[j]][1]]
            if d not in seen:
                seen.add(d)
                distractors.append(d)
                if len(distractors) == k - 1:
                    break
        if len(distractors) < k - 1:
            raise ValueError(f"k={k}: the candidate at characters {s}..{e} of the text has only {len(distractors)} "
                             f"distractor(s) of a similar length (+-{tol} tokens, >= {DISTRACTOR_GAP} spans away); "
                             f"use a smaller k or a longer text")
        order = torch.randperm(k, generator=gen).tolist()
        options = [([true] + distractors)[o] for o in order]
        wholes = _ids(tokenizer, [ctx_text + " " + o for o in options])   # lm-eval's _encode_pair
        cand_ids = [w[len(ctx_ids):] for w in wholes]
        if any(len(c) == 0 for c in cand_ids):
            continue                                              # a candidate merged into the context's tokens
        contexts.append(ctx_ids[-context_tokens:])
        cands.append(cand_ids)
        labels.append(order.index(0))
        texts.append((ctx_text, tuple(options)))
        spans.append((s, e))
    if len(labels) < n_items:
        raise ValueError(f"n_items={n_items}: the text holds only {len(labels)} eligible items (endings of "
                         f"{MIN_CANDIDATE_TOKENS}..{MAX_CANDIDATE_TOKENS} tokens after >= context_tokens="
                         f"{context_tokens} tokens of text); use n_items <= {len(labels)}, a smaller context_tokens "
                         f"or a longer text")

    max_len = max(len(c) for item in cands for c in item)
    candidates = torch.zeros(n_items, k, max_len, dtype=torch.long)
    for i, item in enumerate(cands):
        for j, c in enumerate(item):
            candidates[i, j, :len(c)] = torch.tensor(c, dtype=torch.long)
    return TaskItems(
        context=torch.tensor(contexts, dtype=torch.long), candidates=candidates,
        cand_len=torch.tensor([[len(c) for c in item] for item in cands], dtype=torch.long),
        cand_chars=torch.tensor([[len(o) for o in opts] for _, opts in texts], dtype=torch.long),
        label=torch.tensor(labels, dtype=torch.long), texts=tuple(texts), target_spans=tuple(spans),
        settings={"task": "sentence-ending", "n_items": n_items, "k": k, "seed": seed, "context_tokens": context_tokens})


# ------------------------------------------------------------------------------------- scoring

def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% with the default ``z``)."""
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..n={n}, got {successes!r}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _check_items(items: TaskItems, batch_size: int) -> None:
    if not isinstance(items, TaskItems):
        raise TypeError(f"items must be TaskItems from build_task, got {type(items).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _forward_args(model: nn.Module) -> tuple[str, bool]:
    """(the name of the KV-cache argument: ``cache`` from transformers 5, ``past_key_values`` before;
    whether ``logits_to_keep`` is accepted)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def candidate_loglik(model: nn.Module, items: TaskItems, *, batch_size: int = 16) -> tuple[torch.Tensor, int]:
    """((n, k) float64 summed log-likelihood of every candidate given its context, tokens forwarded),
    with the shared-context KV cache (module docstring, "Scoring"). Items are batched in order of their
    longest candidate, so a batch pads little. A larger ``batch_size`` means fewer forward passes (a
    module that dequantizes its weight per call pays that once per pass) and more memory: the
    candidates' logits are ``batch_size * k * L * vocab`` floats (~200 MB for 16 x 4 x 16 x 49152)."""
    _check_items(items, batch_size)
    device = next(model.parameters()).device
    cache_arg, keep = _forward_args(model)
    keep_last = {"logits_to_keep": 1} if keep else {}
    k = items.k
    out = torch.empty(items.n, k, dtype=torch.float64)
    order = torch.argsort(items.cand_len.max(1).values, stable=True)
    forwarded = 0
    with torch.inference_mode():
        for i in range(0, items.n, batch_size):
            idx = order[i:i + batch_size]
            ctx = items.context[idx].to(device)
            b = ctx.shape[0]
            lens = items.cand_len[idx].reshape(-1).to(device)                          # (b*k,)
            width = int(lens.max())
            cand = items.candidates[idx, :, :width].reshape(b * k, width).to(device)
            first = model(input_ids=ctx, use_cache=True, **keep_last)
            cache = first.cache if cache_arg == "cache" else first.past_key_values
            cache.batch_repeat_interleave(k)
            last = first.logits[:, -1].float().log_softmax(-1).repeat_interleave(k, dim=0)   # (b*k, V)
            rest = model(input_ids=cand, use_cache=True, **{cache_arg: cache}).logits[:, :-1].float()
            # log p(token) = logit - logsumexp(logits): no second (b*k, width, V) tensor is made.
            tok = torch.cat([last.gather(-1, cand[:, :1]),
                             rest.gather(-1, cand[:, 1:].unsqueeze(-1)).squeeze(-1) - rest.logsumexp(-1)], dim=1)
            mask = torch.arange(width, device=device).unsqueeze(0) < lens.unsqueeze(1)
            out[idx] = (tok.double() * mask).sum(-1).view(b, k).cpu()
            forwarded += ctx.numel() + cand.numel()
    return out, forwarded


def candidate_loglik_reference(model: nn.Module, items: TaskItems) -> torch.Tensor:
    """(n, k) float64 log-likelihoods, one forward of ``context + candidate`` per candidate, no cache:
    the plain loop :func:`candidate_loglik` must match."""
    device = next(model.parameters()).device
    out = torch.empty(items.n, items.k, dtype=torch.float64)
    with torch.inference_mode():
        for i in range(items.n):
            for j in range(items.k):
                cand = items.candidates[i, j, :int(items.cand_len[i, j])]
                ids = torch.cat([items.context[i], cand]).unsqueeze(0).to(device)
                logp = model(input_ids=ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)
                n_ctx = items.context.shape[1]
                out[i, j] = float(logp[n_ctx - 1:].gather(-1, ids[0, n_ctx:].unsqueeze(-1)).double().sum())
    return out


def encode_correct(correct: torch.Tensor) -> str:
    """Per-item right/wrong answers as a hex string (item ``i`` is bit ``i % 4`` of hex digit ``i // 4``),
    so a result row can keep them and two points be compared item by item later (:func:`decode_correct`)."""
    bits = [bool(b) for b in correct.reshape(-1).tolist()]
    return "".join(f"{sum(1 << j for j, b in enumerate(bits[i:i + 4]) if b):x}" for i in range(0, len(bits), 4))


def decode_correct(code: str, n: int) -> torch.Tensor:
    """The (n,) bool tensor :func:`encode_correct` encoded; ValueError when ``code`` cannot hold ``n`` items."""
    if not isinstance(code, str) or len(code) != -(-n // 4) or not re.fullmatch(r"[0-9a-f]*", code):
        raise ValueError(f"code must be a hex string of {-(-n // 4)} digits for n={n} items, got {code!r}")
    bits = [(int(c, 16) >> j) & 1 for c in code for j in range(4)]
    if any(bits[n:]):
        raise ValueError(f"code {code!r} sets bits beyond n={n} items")
    return torch.tensor(bits[:n], dtype=torch.bool)


def accuracy(loglik: torch.Tensor, items: TaskItems) -> dict[str, Any]:
    """acc and acc_norm (lm-eval's: log-likelihood per character) with Wilson 95% intervals, and the
    per-item answers (``correct``, ``correct_norm``: :func:`encode_correct`)."""
    out: dict[str, Any] = {"n": items.n, "k": items.k, "chance": 1 / items.k}
    for name, scores in (("acc", loglik), ("acc_norm", loglik / items.cand_chars.double())):
        right = scores.argmax(-1) == items.label
        hits = int(right.sum())
        lo, hi = wilson_interval(hits, items.n)
        out.update({name: hits / items.n, f"{name}_lo": lo, f"{name}_hi": hi,
                    "correct" + name[3:]: encode_correct(right)})
    return out


def score_task(model: nn.Module, items: TaskItems, *, batch_size: int = 16) -> dict[str, Any]:
    """dict(acc, acc_lo, acc_hi, acc_norm, acc_norm_lo, acc_norm_hi, correct, correct_norm, n, k, chance,
    tokens_forwarded, seconds): the model's answers to ``items`` (intervals: Wilson 95%, see
    :func:`wilson_interval`; ``correct``/``correct_norm``: per item, :func:`decode_correct`)."""
    _check_items(items, batch_size)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        loglik, forwarded = candidate_loglik(model, items, batch_size=batch_size)
    finally:
        model.train(was_training)
    return {**accuracy(loglik, items), "tokens_forwarded": forwarded,
            "seconds": time.perf_counter() - start}


def task_columns(result: Mapping[str, Any], prefix: str = "task_") -> dict[str, Any]:
    """Flat result-row columns of a :func:`score_task` result (``task_acc``, ``task_acc_lo``, ...,
    ``task_correct``)."""
    return {f"{prefix}{k}": (round(float(result[k]), 6) if isinstance(result[k], float) else result[k])
            for k in TASK_RESULT_KEYS} | {f"{prefix}seconds": round(float(result["seconds"]), 2)}


TASK_RESULT_KEYS = ("acc", "acc_lo", "acc_hi", "acc_norm", "acc_norm_lo", "acc_norm_hi", "n", "k", "tokens_forwarded",
                    "correct", "correct_norm")
# The columns task_columns writes (a row scored without the task has them empty).
TASK_COLUMNS = tuple(f"task_{k}" for k in TASK_RESULT_KEYS) + ("task_seconds",)
