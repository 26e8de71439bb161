"""Backend choice, input checks and size accounting shared by the modules in ``triton_kernels.nn``."""
import contextlib
import os
import weakref

import torch


def triton_usable(device: torch.device) -> bool:
    """The Triton kernels run on CUDA/ROCm devices, or on CPU tensors under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def check_backend(backend: str, allowed: tuple[str, ...]) -> str:
    if backend not in allowed:
        raise ValueError(f"backend={backend!r} is not one of {allowed}")
    return backend


def cpu_dense_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as torch's CPU kernels should see it: contiguous (a copy only where ``x`` is not).

    Every CPU backend of the modules passes its activation through here before handing it to torch.
    Why: torch 2.13 on an Intel Xeon with AMX (``amx_bf16``) computes ``F.linear(x, w)`` wrongly
    for a bf16 ``x`` that is a column slice of a wider buffer (``buf[:, :K]``, row stride K+7,
    K=100) once M >= 17: it reads past column K, so whatever lies in the padding (NaN in the test)
    reaches the output; ``x.contiguous()`` is correct (M <= 16, K=96 or 576 were fine). A caller's
    activations are such a slice whenever they come from a fused projection (QKV) or a split.
    ``tests/test_cpu_strided_inputs.py`` shows the torch behaviour and checks every CPU backend.
    The Triton kernels take strides and need no copy. CUDA tensors are left as they are: the bug was
    seen in torch's CPU kernels, and a copy there would cost memory bandwidth for nothing known.
    """
    if x.device.type == "cpu" and not x.is_contiguous():
        return x.contiguous()
    return x


def check_input(x, *, in_features: int, device: torch.device, dtype: torch.dtype | None = None,
                dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)) -> None:
    """Validate a module's forward input ``x`` (..., in_features) before any backend sees it.

    ``dtype``: the one dtype the module requires (the weight's, for modules that do not cast);
    ``dtypes``: the activation dtypes it accepts when ``dtype`` is ``None`` (modules that cast). Raises
    ``TypeError`` for a non-tensor or a wrong dtype and ``ValueError`` for a wrong last dimension or
    device, each naming what the layer expects, so a caller never gets a raw torch shape/dtype error
    from inside a matmul.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a torch.Tensor of shape (..., {in_features}), got {type(x).__name__}")
    if dtype is not None:
        if x.dtype != dtype:
            raise TypeError(f"x.dtype ({x.dtype}) must equal the layer's dtype ({dtype}); cast x or the "
                            f"layer with .to()")
    elif x.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"x must be a {names} tensor (..., {in_features}), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}) (last dim = in_features = {in_features}), "
                         f"got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the layer's weights are on {device}; move one with .to()")


class SourceStamp:
    """Which tensors a cached copy was derived from: their identity and version counters.

    The modules keep derived copies of their storage (QuantLinear's prepacked weights and cached
    dense weight, CodebookLinear's dense cache). A copy is valid only while ``matches(storage)``:
    the same tensor objects (assignment, ``.to()`` and ``load_state_dict`` replace or rewrite them)
    with the same version counters (every in-place op bumps ``t._version``: ``mul_``, ``copy_``,
    ``t[...] = v``, through views too). The check costs a few attribute reads per forward.

    What it cannot see: writes through ``t.data`` (torch does not count them) and in-place changes
    of inference tensors (made under ``torch.inference_mode()``, which keep no version counter;
    only their identity is checked). Under ``torch.compile`` the modules skip the check (Dynamo
    cannot branch on a version counter): a compiled forward reads the copies as they are.
    Weak references hold the identity, so a replaced tensor is freed as usual and a new tensor
    that happens to get the old one's ``id()`` is still seen as new.
    """

    __slots__ = ("_refs", "_versions")

    def __init__(self, tensors):
        self._refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self._versions = tuple(_version(t) for t in tensors)

    def matches(self, tensors) -> bool:
        """True when ``tensors`` are the same objects, unmodified, as at construction."""
        if len(tensors) != len(self._refs):
            return False
        for ref, version, t in zip(self._refs, self._versions, tensors):
            if t is None or ref is None:
                if t is not None or ref is not None:
                    return False
            elif ref() is not t or _version(t) != version:
                return False
        return True


def _version(t):
    if t is None or t.is_inference():
        return None  # inference tensors keep no version counter (see SourceStamp)
    return t._version


def format_nbytes(*tensors, float_bytes: int = 2) -> int:
    """Bytes of tensors in a storage format whose floating-point tensors are 16-bit (fp16/bf16).

    The modules' ``memory_bytes()`` report the *format* (what a checkpoint or a GPU deployment stores:
    codes and indices as they are, every float at ``float_bytes``), independent of the dtype the
    module happens to hold and of its backend; ``resident_bytes()`` reports what is in memory now.
    """
    return sum(t.numel() * (float_bytes if t.is_floating_point() else t.element_size())
               for t in tensors if t is not None)


def tensor_nbytes(*tensors) -> int:
    """Bytes the given tensors occupy now (each tensor counted once; ``None`` and non-tensors skipped)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if torch.is_tensor(t) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# Backend choice by measurement on the machine at hand
# ---------------------------------------------------------------------------------------------
# The CPU backends' relative speed depends on the machine (AVX-512 vs AMX, cache sizes, threads):
# on an AMD EPYC (avx512_bf16, no AMX) torch's weight-only int4 kernel is ~3x faster than dense
# bf16 at M=1, on an Intel Xeon with AMX dense bf16 beats it 2.4x at M=16 (PLATFORM.md). A crossover
# measured on one machine is wrong on the other, so ``auto`` times its candidates once per key on
# the machine it runs on and caches the winner in-process, as Triton's autotuner and cuDNN's
# benchmark mode do.

#: Module-level switch: ``False`` turns measuring off (``auto`` then takes its static order).
#: The environment variable ``TKR_CPU_AUTOTUNE=0`` does the same.
AUTOTUNE = True

_CHOICES: dict[tuple, tuple[str, dict[str, float]]] = {}
_TIMER = None
# Bumped by clear_choices(): modules that remember a resolved choice (QuantLinear's per-input plans)
# key it by this, so forgetting the measurements also forgets what was derived from them.
_GENERATION = 0


@contextlib.contextmanager
def autotune(enabled: bool):
    """``with autotune(False):`` turns measuring off inside the block (``AUTOTUNE``), restoring it after.

    Accuracy runs use it: which backend wins a timing race depends on the machine's load, and two
    exact backends (dense vs CSR/BSR in fp32) still sum in different orders, so a measured choice
    would let the last digits of a perplexity depend on what else ran at the time."""
    global AUTOTUNE
    old, AUTOTUNE = AUTOTUNE, bool(enabled)
    try:
        yield
    finally:
        AUTOTUNE = old


def autotune_enabled() -> bool:
    """Whether ``auto`` may time its candidates (``AUTOTUNE`` and ``TKR_CPU_AUTOTUNE`` != "0")."""
    return AUTOTUNE and os.environ.get("TKR_CPU_AUTOTUNE", "1") != "0"


def m_bucket(m: int) -> int:
    """The M bucket a choice is cached for: 1, 4, 16, 64, 256, then powers of 4 (upper bounds).

    Decode (M=1) and small batches get their own choice; the weight-only ops' cost grows with M
    while dense GEMMs amortize the weight, so the winner changes with M (PLATFORM.md: M=1 vs 16).
    """
    b = 1
    while b < m:
        b *= 4
    return b


#: A candidate later in the static order must be this much faster to be chosen: timings on a shared
#: machine jitter by a few percent, and a near-tie is not worth flipping the default for.
MARGIN = 0.05


def _best_ms(fn, min_seconds: float = 0.02, max_calls: int = 50) -> float:
    """Fastest wall time of ``fn()`` in ms: one warm-up call (it builds prepacked copies), then
    at least 3 and at most ``max_calls`` timed calls, stopping once ``min_seconds`` have passed.

    The minimum, as ``timeit`` advises: other processes only ever add time, and on a loaded
    machine (the 2-core development box at load average 12) whole scheduler slices of 4 ms land in
    a median of ~1 ms calls, which then says nothing about the kernels."""
    import time
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_calls and time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def set_timer(timer) -> None:
    """Replace the timer of ``measured_choice`` (``timer(name, fn) -> ms``; ``None`` restores the
    wall-clock median). Tests inject a deterministic one; nothing else should need it."""
    global _TIMER
    _TIMER = timer


def clear_choices() -> None:
    """Forget every cached choice (the next ``auto`` forward of each key measures again)."""
    global _GENERATION
    _CHOICES.clear()
    _GENERATION += 1


def choices_generation() -> int:
    """A counter that changes whenever the cached choices are forgotten (``clear_choices``)."""
    return _GENERATION


def choice_entry(key: tuple) -> tuple[str, dict[str, float]] | None:
    """``(winner, {candidate: ms})`` measured for ``key`` in this process, or ``None`` (no copy of the
    whole cache, unlike ``cached_choices``: forwards ask this on every call)."""
    return _CHOICES.get(key)


def cached_choices() -> dict[tuple, tuple[str, dict[str, float]]]:
    """``{key: (winner, {candidate: ms})}`` of every choice measured in this process."""
    return dict(_CHOICES)


def measured_choice(key: tuple, candidates: dict, *, log=None) -> str:
    """The fastest of ``candidates`` (``{name: zero-argument callable}``) for ``key``, by measurement.

    ``key`` must say everything the timing depends on (module kind, format, shape, dtype,
    ``m_bucket(M)``, device, the candidate names). The first call for a key times each candidate
    (``_best_ms``, or the injected timer) and caches the winner: the first candidate in the given
    order within ``MARGIN`` of the fastest. Later calls return it without timing. With one candidate, or measuring disabled (``autotune_enabled()``), the first candidate
    is returned and nothing is cached (enabling it later measures then).
    """
    names = list(candidates)
    if not names:
        raise ValueError("measured_choice needs at least one candidate")
    if len(names) == 1:
        return names[0]
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit[0]
    if not autotune_enabled():
        return names[0]
    timer = _TIMER or (lambda name, fn: _best_ms(fn))
    times = {name: float(timer(name, fn)) for name, fn in candidates.items()}
    fastest = min(times.values())
    # The first in the static order within MARGIN of the fastest (ties keep the default).
    best = next(n for n in names if times[n] <= fastest * (1.0 + MARGIN))
    _CHOICES[key] = (best, times)
    if log is not None:
        log(f"measured {key}: " + ", ".join(f"{n} {t:.4g} ms" for n, t in times.items()) + f" -> {best}")
    return best
