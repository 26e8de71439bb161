"""``QuantLinear``: a linear layer whose weight is stored as packed 1-8-bit codes.

Storage (the state_dict, and what ``memory_bytes()`` counts, floats at 16 bits)
-----------------------------------------------------------------------------
- ``packed``: int32 (N, ceil(K * bits / 32)), the layout of ``triton_kernels.dequant_matmul.pack``
  (each row an LSB-first bit stream of ``bits``-bit codes).
- ``scales``: (N, ceil(K / group_size)) in whatever float dtype it was given (fp32 from RTN; the
  format, and so ``memory_bytes()``, counts them as fp16).
- ``zeros``: same shape, asymmetric grids only (``None`` for symmetric: ``w = (q - 2^(bits-1)) * s``).
- ``bias``: (N,) or ``None``.

The weight is ``dequantize(packed, scales, zeros, ...)``: asymmetric ``(q - z) * s``, symmetric
``(q - 2^(bits-1)) * s``, one (scale, zero) per ``group_size`` consecutive weights of a row
(``group_size=-1``: one per row; the last group of a row may be partial).

Building one
------------
- ``QuantLinear.from_linear(linear, bits=4, group_size=128, symmetric=False)``: round-to-nearest.
- ``QuantLinear.from_codes(q, scales, zeros, bits=, group_size=, symmetric=, bias=None)``: integer
  codes (N, K) from any quantizer (GPTQ ...), packed here. This is the stable entry point for
  algorithms that choose their own codes.
- ``QuantLinear(packed, scales, zeros, in_features=K, bits=, group_size=, symmetric=, bias=None)``:
  already packed data.
- ``QuantLinear.concat([q_proj, k_proj, v_proj])``: layers of one format sharing an input fused into
  one (rows stacked): one call instead of three at decode, where per-call overhead dominates.

Backends (``backend=`` at construction, the ``backend`` attribute, or ``forward(x, backend=...)``)
-------------------------------------------------------------------------------------------
- ``"triton"``: ``dequant_matmul`` (CUDA/ROCm, or CPU tensors under ``TRITON_INTERPRET=1``), with the
  config stored for this GPU and call where ``triton_kernels/nn/configs/<gpu>.json`` has one
  (``triton_kernels.nn.tuned``; autotuned otherwise, and always under ``torch.compile``).
- ``"torch_int4"``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (CPU, bf16/fp16 activations; bits
  <= 4, any group size, any N and K). The op computes ``sum_k x_k * ((c - 8) * S_j + Z_j)`` in fp32
  for 4-bit codes ``c`` with one (S, Z) per op group ``j`` of 32/64/128/256 columns (both in x's
  dtype), K a multiple of the op group, N a multiple of 16 (torch 2.13 raises otherwise), and rounds
  the result to x's dtype once. The mapping, exact up to rounding S to the activation dtype:

  * codes: a b-bit code (b <= 4) is a 4-bit code. Symmetric grids shift it, ``c = q + 8 - 2^(b-1)``
    (still in [0, 15]), so ``Z = 0`` and ``S = s``; asymmetric grids shift by ``t = 8 - round(z)`` as
    far as [0, 15] allows, ``c = q + t``, ``S = s``, ``Z = (8 - t - z) * S`` (from the rounded ``S``):
    0 for integer zeros below 4 bits. At 4 bits ``t = 0`` and ``Z = (8 - z) S`` is as large as the
    weights; rounding it to the activation dtype errs by up to ``2^-8 |Z|`` (bf16) on every weight of
    the group in the same direction, which inputs with a large mean (or all >= 0) sum up: up to ~300x the
    dense path's error on heavy-tailed per-channel layers (measured). Added after the op, the
    correction would be lost in the op's rounded output, so it goes into the op: what rounding Z
    lost, ``delta = Z - round(Z)`` per (row, layer group), is written as ``Sd * sum_l (c_l - 8) / 16^l``
    (one scale ``Sd = max|delta| / 7`` per row, L = 2 to 4 codes per group: exact to ~2^-8 of the
    largest ``delta`` of the row, or better) in extra op groups whose x columns are each layer
    group's sum of x divided by ``16^l`` (hi and lo parts in x's dtype: two columns per code). That
    costs ``ceil(4 G / op group)`` op groups (G = groups per row): +3% of the work at 4096 columns
    with groups of 128, +12.5% with groups of 32, one op group per-channel; built only where some
    ``delta`` is nonzero (while compiling: 4-bit asymmetric grids, and zeros that are not integers
    in [0, 2^b - 1]), and then the packed weight is per activation dtype (not shared). fp16 rows
    whose group sums could overflow are scaled by a power of two for the op and back after (see
    ``torch_int8``); where ``Sd`` underflows fp16 (tiny scales), that row's correction is lost.
  * groups: one op group never spans two of the layer's groups. Groups of 32..256 are op groups as
    they are; larger groups (512 ...) are 256-column op groups with the scale repeated; one group per
    row (per-channel, or a group >= K) uses the largest of 256/128/64/32 that divides K rounded up to
    32 (4096 -> 256, 576 -> 64, 1536 -> 256, 11008 -> 256, 100 -> 128), scale repeated. Op group sizes
    cost about the same (4096x4096, M=1, bf16, 1 thread, AMD EPYC at load ~2, 2026-11-30: 0.94, 0.96,
    0.89, 0.89 ms for 32, 64, 128, 256), so the largest that needs no extra padding is taken.
  * groups of 16 (or less): each group is zero-padded to 32 columns (weight code 8, x zero there),
    so the op runs over ``32 / g`` times K: exact, at that multiple of the work and memory.
  * K: a partial last group, or K not a multiple of the op group, is padded with zero columns of x
    (a copy of x per call, M rows: cheap at decode sizes) and code 8 in the weight.
  * N: padded to a multiple of 16 with zero rows (S = Z = 0), sliced off the output.
- ``"torch_int4x2"``: the same op (bf16/fp16 activations) for bits 5..8: ``q = 16 * hi + lo`` with
  ``hi, lo`` 4-bit codes, and
  ``(q - z) s = 16 s (hi - 8) + s (lo - 8) + (136 - z) s``: ONE call on ``[x, x]`` (K doubled) against
  ``[hi, lo]`` with op scales ``16 S`` (exact: a power of two) and ``S``. Symmetric grids shift
  ``hi`` by ``8 - 2^(b-5)`` (in [0, 15] for b <= 8) and put ``Z = 8 S`` (exact) on the ``lo`` half;
  asymmetric grids split the offset ``(136 - z) S`` into its rounding ``Z_hi`` and the rounded
  remainder ``Z_lo = offset - Z_hi``, so the sum is exact to ~2^-16 relative. Groups, K and N as
  for ``torch_int4``. Twice the int4 work; resident copy 8 bits per weight.
- ``"torch_int8"``: ``torch._weight_int8pack_mm`` (CPU, bf16/fp16 activations; any bits, one group
  per row, any N and K). The op computes ``x @ (w_int8 * S)^T`` in fp32 and rounds the result to
  x's dtype once. The zero point is folded into the int8 weight, so no large term is added after
  that rounding: per row ``w_int8 = q - t`` with ``t = round(z)`` (symmetric: ``2^(b-1)``) wherever
  ``q - t`` fits int8, i.e. always below 8 bits. The rest of the offset, ``o = t - z`` per row
  (nonzero for 8-bit rows whose codes leave no room, |o| <= 128, and for fractional zeros), is
  written as int8 multiples of 1 (two of them), 2^-7 and 2^-14 in extra weight columns that multiply
  ``rowsum(x)``, ``rowsum / 128`` and ``rowsum / 2^14``: each call appends them to x, every one as
  three columns (hi + mid + lo parts of x's dtype, exact to ~2^-27), so the zero point is exact to
  2^-15 of a grid step. Only the columns some row needs are built (none for symmetric grids and
  integer zeros below 8 bits; while compiling, what the format can need: the integer ones at 8 bits,
  the rest for zeros that are not integers in [0, 2^b - 1]). fp16 rows whose rowsum could overflow are
  divided by a power of two for the op (exact) and the output multiplied back. Zeros more than 126
  outside [0, 2^b - 1] leave a residual, added in fp32 after the op. K (+ those columns) is padded
  to a multiple of 16 with zero columns (torch 2.13 gives wrong results or segfaults for other K,
  measured).
- ``"dequant"``: dequantize to fp32, cast to the activation dtype, ``F.linear``. Works everywhere.
  By default it dequantizes on every call and keeps nothing dense resident; that costs a full
  unpack per forward (~1 s for 4096x4096 on the 2-core dev CPU, ~80 ms for 1536x576). With
  ``cache_dequantized=True`` (constructor argument or attribute) the dense weight in the activation
  dtype is built once and kept: dense speed, dense memory (visible in ``resident_bytes()``).
- ``"auto"`` (default), decided per call:
  1. ``triton`` when ``triton_usable(x.device)`` (CUDA, or ``TRITON_INTERPRET=1`` on CPU);
  2. on CPU with **bf16 or fp16** activations: the exact fast paths that apply (``torch_int4`` for
     bits <= 4, ``torch_int4x2`` for 5..8, ``torch_int8`` for one group per row) and, only where the
     caller opted into the memory with ``cache_dequantized=True``, the cached dense weight
     (``dequant``). With one candidate it runs; with several, each is timed once on this machine per
     (layer format, shape, dtype, M bucket) and the fastest is kept (``_backend.measured_choice``,
     as Triton's autotuner does; ``TKR_CPU_AUTOTUNE=0`` or ``_backend.AUTOTUNE = False`` turns the
     timing off and takes the first of torch_int4, torch_int8, torch_int4x2, dequant that applies). Prepacked copies of losing candidates are
     dropped after the timing. Dequantize-per-call is never timed against them: it unpacks the whole
     weight per call (~1 s at 4096x4096), an O(N*K) pass the weight-only ops do fused.
     The dense copy is taken only with that opt-in (it costs dense memory). At M > 1 it is the fast
     path: on Intel Xeons with AMX dense bf16 is 3-6x faster than every weight-only op (4096x4096,
     M=16, 2 threads: dense bf16 1.08 ms, torch_int4 3.04, torch_int8 3.20, torch_int4x2 6.10; issue
     25, 2026-12-07), and on the AMD EPYC reference it wins at M=16 too (docs/cpu.md, "The opt-in
     dense cache"). So for prefill or batched use on CPU pass ``cache_dequantized=True``.
  3. otherwise ``dequant``. In particular fp32 activations on CPU go to ``dequant``: the torch
     weight-only ops are 30-125x slower with fp32 activations, and casting fp32 inputs to bf16 behind
     the caller's back would change the numerics (the harness measures perplexity in fp32 through
     this module). The torch ops are not offered for fp32 activations at all, forced or not: their
     fp32 sums of large terms that cancel (``(c - 8) S + Z``, ``16 S (hi - 8) + ...``, the int8
     rowsum columns) lose up to ~1e-4 relative on heavy-tailed layers where the dense fp32 path is
     ~1e-7, and even symmetric layers come out 2.5-9x less accurate (measured) than ``dequant``.
  fp16 note: torch 2.13's weight-only CPU ops take fp16 activations but have no fast fp16 kernel
  (4096x4096, M=1, 1 thread, AMD EPYC at load average ~8, 2026-11-30: int4 31 ms, int8 17 ms vs
  dense fp16 1.5 ms and int4 with bf16 activations 0.9 ms), so fp16 stays exact and compressed in
  memory but is not a speed path; bf16 is.

Accuracy of the CPU backends
----------------------------
The torch ops add no error of their own beyond holding the scales in x's dtype (torch requires
that) and rounding the output once. Against the exact product ``x @ dequantize()^T`` (float64), for
bf16 and fp16 activations, every CPU backend's relative error (Frobenius norm) is within **2x that
of the dense path on the same input** (``dequant``: the weight rounded to x's dtype, ``F.linear``),
and on heavy-tailed layers within 2x the larger of that and the error of the exact product with
the scales rounded to x's dtype (rounded once): there a few outlier groups carry the output and
their scale rounding does not average out the way independent per-weight rounding does (that
ideal alone measured up to 3x the dense error, fp16, groups of 32). Checked by
``tests/test_quant_linear.py::test_cpu_backends_within_twice_the_dense_error``: every bit width
1-8, symmetric and asymmetric, per-channel and groups of 32/128, RTN layers of Gaussian and
Student-t weights, fractional zeros, random codes, on ordinary, nonnegative (ReLU-like), large-mean
and huge-mean (fp16 rowsum overflow) inputs, N x K = 256 x 1536 and 96 x 1000; measured at most
1.2x (1.6x for the heavy-tailed bound). fp32 activations: ``dequant`` only (see ``auto`` above).
(Before: torch_int8 rounded ``x @ (q - 2^(b-1)) s`` to bf16 before adding back the zero's rank-1
term, 1.5e-2 instead of 2.3e-3 relative at 8 bits and 1.4 at 1 bit on nonnegative inputs; the
4-bit asymmetric torch_int4 rounded ``Z`` to bf16, up to ~300x the dense error on heavy-tailed
per-channel layers.)

Under ``torch.compile`` (``fullgraph=True`` works): nothing is timed; ``auto`` takes the choice an eager
call measured for the same key, else the static order above. The torch ops are traced as they are,
the Triton kernel through its custom operator (``triton_kernels.nn._ops``); a prepacked copy that does
not exist yet is built inside the first compiled call and stored, after which Dynamo recompiles once
(built there, a copy has the residual columns its format can need: no data-dependent branch can be
traced).

Each forward remembers its plan per (requested backend, ``cache_dequantized``, dtype, device, M bucket):
the checked input and the final choice (forced, the only candidate, or measured), so repeated calls at
decode skip the checks and the choice (41 -> 28 us per call for a 576x576 4-bit layer, bf16, M=1, AMD
EPYC, 2 threads; the default model decodes ~11% faster for it). Changing ``backend`` or
``cache_dequantized``, ``clear_choices()``, ``.to()``, ``load_state_dict`` and changing the storage
(below) drop or bypass the plans.

Cached copies follow the storage: every forward (and ``prepack()``) first checks that ``packed``,
``scales`` and ``zeros`` are the tensors the prepacked copies, the cached dense weight and the plans
were built from, unmodified (identity + version counter, ``_backend.SourceStamp``: a few attribute
reads per call). Assigning a new tensor or changing one in place (``m.scales.mul_(2)``,
``m.zeros[0] = 3``, ``copy_``) drops them, checks the new storage as the constructor does and
rebuilds on demand, so results always follow ``dequantize()``. Not seen: writes through ``.data``
and in-place changes of inference tensors (no version counter), and, under ``torch.compile``, any
change (the check is not traced): call ``release_prepacked()`` (or run one eager forward) after
changing the storage of a compiled model.

A forced backend that cannot run a given layer/input raises ``ValueError`` saying why and what would.
``last_backend`` holds the backend the most recent forward actually ran, ``last_candidates_ms`` what
``auto`` measured for it (``{backend: ms}``, or ``None``).

Resident memory
---------------
The torch CPU backends need their own weight formats (int4pack uint8 (Np, Kp/2) + [G, Np, 2]
scales-and-zeros, Kp including torch_int4's residual op groups; int8 (N, Kp) + scales, Kp
including the rowsum columns), and ``dequant`` with ``cache_dequantized=True`` a dense
(N, K) weight. They are built once, on first use (or by ``prepack()`` for the torch ops),
kept next to the storage format (not instead of it: the storage is the state_dict and the source
of truth), and dropped on ``.to()``/``load_state_dict`` or when the storage changes.
``memory_bytes()`` counts the storage format only, with scales/zeros at 16 bits (what a checkpoint
stores, what the harness reports); ``resident_bytes()`` counts every tensor this module currently
holds in its actual dtype, prepacked copies included (their K/N padding and extra columns too).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from triton_kernels import dequant_matmul as dq
from triton_kernels.nn import _ops, tuned
from triton_kernels.nn._backend import (SourceStamp, check_backend, check_input, choice_entry,
                                         choices_generation, cpu_dense_rows, format_nbytes, m_bucket,
                                         measured_choice, tensor_nbytes, triton_usable)

BACKENDS = ("auto", "triton", "torch_int4", "torch_int4x2", "torch_int8", "dequant")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Group sizes _weight_int4pack_mm_for_cpu accepts (torch 2.13 raises for any other), largest first.
_INT4_GROUP_SIZES = (256, 128, 64, 32)
# The torch weight-only ops, in auto's static order (the order when measuring is off).
# One pass over the weight before two (torch_int4x2 runs the int4 op over twice the columns).
_TORCH_OPS = ("torch_int4", "torch_int8", "torch_int4x2")
# torch_int8: the fractional part of a zero point multiplies rowsum(x) as int8 multiples of these
# (after the integer part, multiples of 1): exact to 2^-15 of a grid step.
_INT8_FRACTION_LEVELS = (2.0 ** -7, 2.0 ** -14)


@functools.lru_cache(maxsize=None)
def int4_layout(K: int, group_size: int) -> tuple[int, int, int]:
    """How a layer's groups map onto the int4 op's: ``(op_group, padded_group, n_groups)``.

    The op runs over ``n_groups * padded_group`` columns in op groups of ``op_group``; the layer's
    group ``i`` occupies columns ``[i * padded_group, i * padded_group + g)`` of it (zero padding
    after). ``padded_group == g`` except for groups < 32 (padded to 32 each) and the one group of a
    per-channel row (K rounded up to a multiple of 32). See the module docstring.
    """
    g = K if group_size == -1 or group_size >= K else group_size
    n_groups = -(-K // g)
    if n_groups == 1:
        kp = -(-K // 32) * 32
        return next(s for s in _INT4_GROUP_SIZES if kp % s == 0), kp, 1
    if g < 32:
        return 32, 32, n_groups
    return min(g, 256), g, n_groups  # power-of-two g >= 32: 256 divides every larger one


def _fp16_unscale(amax: torch.Tensor) -> torch.Tensor:
    """Per row, the power of two ``2^j >= 1`` that brings ``amax`` (M, 1), the largest sum of x a row
    puts into extra columns, below 2^14: fp16 rows are divided by it for the op (exact, barring
    underflow of tiny entries) and the op's output multiplied back; 1 for rows already in range."""
    return torch.exp2((torch.frexp(amax)[1] - 14).clamp(min=0).float())


def _int4_residual_layout(G: int, op_group: int) -> tuple[int, int]:
    """torch_int4's zero residual: ``(extra op groups, columns per layer group)`` for G layer groups.

    At least 2 codes per group (the residual to 1/224 of its largest value in the row), up to 4 where
    the op groups that hold them have room (per-channel: 4 in one op group); two columns each (the
    group sum's hi and lo parts in x's dtype)."""
    extra = -(-4 * G // op_group)
    return extra, min(4, extra * op_group // (2 * G))


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` stored as packed ``bits``-bit codes and group-wise scales/zeros.

    See the module docstring for the storage format, the backends and what ``auto`` picks.
    """

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *,
                 in_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: torch.Tensor | None = None, backend: str = "auto",
                 cache_dequantized: bool = False):
        super().__init__()
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if not isinstance(group_size, int) or not (
                group_size == -1 or (group_size >= 1 and group_size & (group_size - 1) == 0)):
            raise ValueError(f"group_size must be -1 (per-channel) or a power of two (32, 64, 128 ...), "
                             f"got {group_size!r}")
        if not torch.is_tensor(packed) or packed.dtype != torch.int32 or packed.dim() != 2:
            raise TypeError(f"packed must be a 2-D int32 tensor (N, ceil(K*bits/32)), got "
                            f"{getattr(packed, 'dtype', type(packed))} with shape "
                            f"{tuple(getattr(packed, 'shape', ()))}")
        N, K = packed.shape[0], in_features
        words = math.ceil(K * bits / 32)
        if packed.shape[1] != words:
            raise ValueError(f"packed has {packed.shape[1]} words per row; K={K} at bits={bits} needs {words}")
        if symmetric:
            zeros = None  # the symmetric grid's zero is 2^(bits-1); a stored one would be dead weight
        _check_storage(packed, scales, zeros, bias, N=N, K=K, bits=bits, group_size=group_size,
                       symmetric=symmetric)

        self.in_features = K
        self.out_features = N
        self.bits = bits
        self.group_size = group_size
        self.symmetric = bool(symmetric)
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("zeros", None if zeros is None else zeros.contiguous())
        self.register_buffer("bias", None if bias is None else bias.contiguous())
        self.backend = backend
        self.cache_dequantized = bool(cache_dequantized)
        self.last_backend: str | None = None
        # {candidate: ms} auto measured (on this machine) for the last forward's choice; None when
        # there was nothing to choose between, measuring is off, or the backend was forced.
        self.last_candidates_ms: dict[str, float] | None = None
        self._prepacked: dict[tuple, tuple[torch.Tensor, ...]] = {}
        # Per-input plans: (requested backend, cache_dequantized, dtype, device, M bucket, Triton usable,
        # choices generation) -> (backend, what auto measured). Only final choices are kept (forced,
        # single candidate, or measured): a repeated forward then skips the checks and the choice
        # (~13 us per call on the dev CPU, ~2.7 ms per token over the default model's 210 linears).
        self._plans: dict[tuple, tuple[str, dict[str, float] | None]] = {}
        # What the prepacked copies were built from (identity + version of packed/scales/zeros).
        self._stamp: SourceStamp | None = None
        self._plain_zeros = self._zeros_are_plain()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *,
                   bits: int, group_size: int, symmetric: bool, bias: torch.Tensor | None = None,
                   backend: str = "auto", cache_dequantized: bool = False) -> "QuantLinear":
        """Build from integer codes ``q`` (N, K) in [0, 2^bits) chosen by any quantizer.

        ``scales``/``zeros``: (N, ceil(K / group_size)) (``group_size=-1``: (N, 1)); ``zeros`` may be
        ``None`` for ``symmetric=True`` (it is ignored there). The codes are packed here.
        """
        if not torch.is_tensor(q) or q.dim() != 2 or q.dtype.is_floating_point or q.dtype == torch.bool:
            raise TypeError(f"q must be a 2-D integer tensor of codes (N, K), got "
                            f"{getattr(q, 'dtype', type(q))} with shape {tuple(getattr(q, 'shape', ()))}")
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
        if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2 ** bits):
            raise ValueError(f"q must hold codes in [0, {2 ** bits - 1}] for bits={bits}, "
                             f"got values in [{int(q.min())}, {int(q.max())}]")
        packed = dq.pack(q, bits)
        return cls(packed, scales, zeros, in_features=q.shape[1], bits=bits, group_size=group_size,
                   symmetric=symmetric, bias=bias, backend=backend, cache_dequantized=cache_dequantized)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128,
                    symmetric: bool = False, backend: str = "auto",
                    cache_dequantized: bool = False) -> "QuantLinear":
        """Round-to-nearest quantization of ``linear.weight`` (``dequant_matmul.quantize_rtn``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float()
        q, scales, zeros = dq.quantize_rtn(w, bits, group_size, symmetric)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_codes(q, scales, zeros, bits=bits, group_size=group_size, symmetric=symmetric,
                              bias=bias, backend=backend, cache_dequantized=cache_dequantized)

    @classmethod
    def concat(cls, layers: "list[QuantLinear]") -> "QuantLinear":
        """One layer whose output is the concatenation of ``layers``' outputs (same input): their rows
        stacked, e.g. q/k/v or gate/up projections fused into one call. Every layer must share
        ``in_features``, ``bits``, ``group_size``, ``symmetric`` and the scales' dtype and device; a
        missing bias is zeros where another layer has one. Backend and ``cache_dequantized`` come from the
        first layer. Every row is stored and computed as in its own layer (exact)."""
        layers = list(layers)
        if not layers or not all(isinstance(m, QuantLinear) for m in layers):
            raise TypeError(f"layers must be a non-empty list of QuantLinear, got "
                            f"{[type(m).__name__ for m in layers]}")
        first = layers[0]
        for name in ("in_features", "bits", "group_size", "symmetric"):
            vals = [getattr(m, name) for m in layers]
            if len(set(vals)) != 1:
                raise ValueError(f"layers differ in {name} ({vals}): only layers of one format concatenate")
        kinds = {(m.scales.dtype, m.scales.device) for m in layers}
        if len(kinds) != 1:
            raise ValueError(f"layers' scales differ in dtype/device ({sorted(map(str, kinds))}): move them "
                             f"to one first")
        bias = None
        if any(m.bias is not None for m in layers):
            bias = torch.cat([m.bias if m.bias is not None else m.scales.new_zeros(m.out_features)
                              for m in layers])
        return cls(torch.cat([m.packed for m in layers]), torch.cat([m.scales for m in layers]),
                   None if first.symmetric else torch.cat([m.zeros for m in layers]),
                   in_features=first.in_features, bits=first.bits, group_size=first.group_size,
                   symmetric=first.symmetric, bias=bias, backend=first.backend,
                   cache_dequantized=first.cache_dequantized)

    # -- backend choice --------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(value, BACKENDS)
        self._plans = {}

    def _one_group_per_row(self) -> bool:
        return self.group_size == -1 or self.group_size >= self.in_features

    def why_not(self, backend: str, x: torch.Tensor) -> str | None:
        """``None`` when ``backend`` can run this layer on ``x``, else the reason it cannot."""
        check_backend(backend, BACKENDS)
        dev = x.device
        if backend in ("auto", "dequant"):
            return None
        if backend == "triton":
            if not triton_usable(dev):
                return (f"the Triton kernel needs a CUDA/ROCm tensor or TRITON_INTERPRET=1 on CPU "
                        f"(x is on {dev})")
            return None
        if dev.type != "cpu":
            return f"torch's weight-only CPU ops need CPU tensors (x is on {dev})"
        if x.dtype not in (torch.bfloat16, torch.float16):
            return (f"torch's weight-only ops run bf16/fp16 activations, x is {x.dtype} (with fp32 "
                    f"activations their internal sums cancel and miss fp32's accuracy by up to ~1000x; "
                    f"'dequant' runs fp32 exactly, or cast x to bfloat16)")
        if backend == "torch_int4":
            if self.bits > 4:
                return f"it needs bits <= 4 (torch_int4x2 runs 5..8), this layer has bits={self.bits}"
            return None
        if backend == "torch_int4x2":
            if self.bits <= 4:
                return f"it needs bits in 5..8 (torch_int4 runs <= 4), this layer has bits={self.bits}"
            return None
        if backend == "torch_int8":
            if not self._one_group_per_row():
                return (f"it needs one group per row (group_size=-1 or >= in_features), this layer has "
                        f"group_size={self.group_size} with in_features={self.in_features}")
            return None
        raise AssertionError(backend)

    def _auto_candidates(self, x: torch.Tensor) -> list[str]:
        """What ``auto`` chooses among on CPU for ``x`` (empty: it runs ``dequant``)."""
        if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
            return []
        cands = [b for b in _TORCH_OPS if self.why_not(b, x) is None]
        if self.cache_dequantized:
            cands.append("dequant")  # the caller opted into a dense copy: it competes on speed
        return cands

    def _choice_key(self, x2: torch.Tensor, cands: list[str]) -> tuple:
        return ("QuantLinear", self.out_features, self.in_features, self.bits, self.group_size, self.symmetric,
                self.bias is not None, str(x2.dtype), m_bucket(x2.shape[0]), str(x2.device), tuple(cands))

    def resolve_backend(self, x: torch.Tensor, backend: str | None = None) -> str:
        """The backend a forward on ``x`` would run (``auto`` resolved; a forced one validated).

        With several CPU candidates and no cached measurement for this key, this returns the first
        candidate in the static order; the forward measures (it has the input to time with).
        """
        backend = self.backend if backend is None else check_backend(backend, BACKENDS)
        if backend != "auto":
            reason = self.why_not(backend, x)
            if reason is not None:
                raise ValueError(f"backend={backend!r} cannot run here: {reason}. backend='dequant' runs "
                                 f"anywhere; backend='auto' picks the fastest that applies. (layer: "
                                 f"{self.extra_repr()}; x: {x.dtype} on {x.device})")
            return backend
        if triton_usable(x.device):
            return "triton"
        cands = self._auto_candidates(x)
        if not cands:
            return "dequant"
        x2 = x.reshape(-1, self.in_features)
        hit = choice_entry(self._choice_key(x2, cands))
        return hit[0] if hit is not None else cands[0]

    # -- prepacked weights for torch's CPU ops -------------------------------------------------

    def _codes(self) -> torch.Tensor:
        return dq.unpack(self.packed, self.bits, self.in_features).to(torch.int32)

    def _zeros_are_plain(self) -> bool:
        """Symmetric, or integer zeros in [0, 2^b - 1] (RTN's, GPTQ's): then below 4 (torch_int4) / 8
        (torch_int8) bits no zero residual exists. Kept as a Python fact for compiled calls, which
        cannot look at the data (set at construction and when a forward finds the storage changed)."""
        z = self.zeros
        return z is None or bool(((z == z.round()) & (z >= 0) & (z <= 2 ** self.bits - 1)).all())

    def _sync_caches(self) -> None:
        """Drop the prepacked copies and plans if ``packed``/``scales``/``zeros`` changed since they
        were built (assigned, or modified in place: ``_backend.SourceStamp``), checking the new
        storage as the constructor does. Skipped while compiling (see the module docstring)."""
        if _ops.compiling():
            return
        storage = (self.packed, self.scales, self.zeros)
        if self._stamp is not None and self._stamp.matches(storage):
            return
        if self._stamp is not None:
            _check_storage(self.packed, self.scales, self.zeros, self.bias, N=self.out_features,
                           K=self.in_features, bits=self.bits, group_size=self.group_size,
                           symmetric=self.symmetric)
        self._prepacked = {}
        self._plans = {}
        self._stamp = SourceStamp(storage)
        self._plain_zeros = self._zeros_are_plain()

    def prepack(self, backend: str, dtype: torch.dtype = torch.bfloat16) -> tuple:
        """Build (once) and return the weights ``backend`` needs for activations of ``dtype``.

        torch_int4/torch_int4x2: (int4pack weight, [G, Np, 2] scales-and-zeros, number of op groups
        appended for the zero residual); torch_int8: (int8 weight (N, Kp), scales (N,), the factors
        of rowsum(x) its extra column triples multiply (a tuple, empty: none), fp32 residual (N,) of
        zeros far outside the code range or None). See the module docstring. Only bf16/fp16
        activations. Rebuilt after the storage changed.
        """
        self._sync_caches()
        key = (backend, dtype)
        if key in self._prepacked:
            return self._prepacked[key]
        probe = torch.empty(0, self.in_features, dtype=dtype, device=self.packed.device)
        reason = self.why_not(backend, probe)
        if backend not in _TORCH_OPS or reason is not None:
            raise ValueError(f"nothing to prepack for backend={backend!r} and dtype {dtype}"
                             + (f": {reason}" if reason else f" (only {'/'.join(_TORCH_OPS)} prepack)"))
        # The packed weight does not depend on the activation dtype; share it across dtypes.
        other = next((v for k, v in self._prepacked.items() if k[0] == backend), None)
        if backend == "torch_int8":
            packed = self._prepack_int8(other, dtype)
        else:
            packed = self._prepack_int4(backend, None if other is None else other[0], dtype)
        self._prepacked[key] = packed
        return packed

    def _prepack_int8(self, other, dtype):
        s = self.scales.float()[:, 0]
        if other is None:
            b, K = self.bits, self.in_features
            q = self._codes()
            z = torch.full_like(s, 2.0 ** (b - 1)) if self.symmetric else self.zeros.float()[:, 0]
            zr = z.round().clamp(0, 2 ** b - 1).to(torch.int32)
            # Per row the int8 weight is q - t with t as close to round(z) as int8 allows; t = round(z)
            # for bits <= 7 (and symmetric grids), and for 8-bit rows whose codes leave room.
            t = torch.minimum(torch.maximum(zr, q.amax(dim=1) - 127), q.amin(dim=1) + 128)
            # (q - z) s = (q - t) s + (t - z) s: the offset o = t - z as int8 multiples of 1 (two of them:
            # |o| <= 254), 2^-7 and 2^-14 multiplies rowsum(x) through extra columns (module docstring).
            # Eager calls keep only the columns some row uses. While compiling (no data-dependent
            # branch) the format decides: integer pieces at 8 bits, fractions (and the fp32 residual
            # pass) unless the zeros are plain (``_zeros_are_plain``).
            static = _ops.compiling()
            plain = self.symmetric or self._plain_zeros
            rem = t.double() - z.double()
            levels, cols = [], []
            if not self.symmetric:  # symmetric: t = 2^(b-1) = z exactly
                for level in (1.0, 1.0, *_INT8_FRACTION_LEVELS):
                    k = (rem / level).round().clamp(-127, 127)
                    need = (b == 8 or not plain) if level == 1.0 else not plain
                    if need if static else bool(k.any()):
                        levels.append(level)
                        cols.append(k)
                        rem = rem - k * level
            # What is left: < 2^-15 of a step, except for zeros more than 126 outside [0, 2^b - 1]
            # (added in fp32 after the op, rounded with its output then).
            far = not plain if static else bool((rem.abs() > 2.0 ** -15).any())
            resid = (rem * s.double()).float().contiguous() if far else None
            extra = [c.to(torch.int32)[:, None].expand(-1, 3) for c in cols]  # hi, mid, lo of each column
            w = torch.cat([q - t[:, None], *extra], dim=1)
            kp = -(-w.shape[1] // 16) * 16
            w = F.pad(w, (0, kp - w.shape[1])).to(torch.int8).contiguous()
            other = (w, None, tuple(levels), resid)
        return other[0], s.to(dtype).contiguous(), other[2], other[3]

    def _prepack_int4(self, backend, w, dtype):
        N, K, b = self.out_features, self.in_features, self.bits
        op_group, pg, G = int4_layout(K, self.group_size)
        g = K if self._one_group_per_row() else self.group_size
        np_ = -(-N // 16) * 16
        S = self.scales.float().to(dtype).float()  # the op's scales are in x's dtype: round first
        z = torch.full_like(S, 2.0 ** (b - 1)) if self.symmetric else self.zeros.float()
        zr = z.round().clamp(0, 2 ** b - 1).to(torch.int32)
        extra = 0  # op groups appended for the zero residual (torch_int4, see the module docstring)
        if backend == "torch_int4":
            # c = q + t with t = 8 - round(z) where c stays in [0, 15]: (c - 8) S = (q - round(z)) S is
            # as small as the weight, Z = (8 - t - z) S is 0 for integer zeros (symmetric: always).
            t = (8 - zr).clamp(0, 16 - 2 ** b)
            Z = (8.0 - t - z) * S
            Zr = Z.to(dtype).float()
            parts = [(t, S, Zr)]
            delta = Z - Zr  # what rounding Z to x's dtype lost, per (row, layer group)
            # (while compiling, no data-dependent branch: 4-bit asymmetric grids and zeros that are not
            # plain get the residual groups, see _zeros_are_plain)
            static_need = not self.symmetric and (b == 4 or not self._plain_zeros)
            if static_need if _ops.compiling() else bool(delta.any()):
                # delta ~ Sd sum_l (c_l - 8) / 16^l: L = 2..4 4-bit codes per layer group with one scale
                # Sd per row, in `extra` op groups whose x columns are each layer group's sum of x / 16^l
                # (L columns per group, zeros after; L = 4 where the op groups have room, e.g. per-channel).
                extra, L = _int4_residual_layout(G, op_group)
                Sd = (delta.abs().amax(dim=1) / 7).to(dtype).float()[:, None]
                inv = torch.where(Sd > 0, 1.0 / Sd.clamp_min(1e-38), torch.zeros_like(Sd))
                rest, codes = delta, []
                for level in range(L):
                    c = (rest * inv * 16 ** level).round().clamp(-8, 7)
                    codes.append(c)
                    rest = rest - c * Sd / 16 ** level
                # each code twice: its column of x holds the group sum's hi part, the next one the lo part
                cd = torch.stack(codes, dim=2).repeat_interleave(2, dim=2).reshape(N, 2 * L * G).to(torch.int32) + 8
                Sd = Sd[:, 0]
                w = None  # these codes depend on x's dtype: no sharing across dtypes
        else:
            # torch_int4x2: hi shifted the same way (as far as [0, 15] allows: not for 8 bits), lo as
            # is; the offset (136 - 16 t - z) S rounded in two steps, Z_hi + Z_lo (see the docstring).
            t = (8 - (zr >> 4)).clamp(0, 16 - 2 ** (b - 4))
            offset = (136.0 - 16 * t - z) * S
            z_hi = offset.to(dtype).float()
            parts = [(t, 16 * S, z_hi), (torch.zeros_like(t), S, (offset - z_hi).to(dtype).float())]
        if w is None:
            q = self._codes()
            codes = [q] if backend == "torch_int4" else [q >> 4, q & 15]
            cols = []
            for (t, _, _), c in zip(parts, codes):
                c = c + t.repeat_interleave(g, dim=1)[:, :K]
                c = F.pad(c, (0, G * g - K), value=8).view(N, G, g)
                cols.append(F.pad(c, (0, pg - g), value=8).reshape(N, G * pg))
            if extra:
                cols.append(F.pad(cd, (0, extra * op_group - cd.shape[1]), value=8))
            c = F.pad(torch.cat(cols, dim=1), (0, 0, 0, np_ - N), value=8)
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.contiguous(), 2)
        reps = pg // op_group  # op groups per layer group
        sz = []
        for _, scale, zero in parts:
            sz.append(torch.stack([scale, zero], dim=-1).repeat_interleave(reps, dim=1))  # [N, Gop, 2]
        if extra:
            sz.append(torch.stack([Sd, torch.zeros_like(Sd)], dim=-1)[:, None].expand(-1, extra, -1))
        sz = F.pad(torch.cat(sz, dim=1), (0, 0, 0, 0, 0, np_ - N))  # padded rows: S = Z = 0
        return w, sz.transpose(0, 1).to(dtype).contiguous(), extra

    def _int4_input(self, x2: torch.Tensor, parts: int, extra: int = 0):
        """``(x laid out like the int4 weight's columns, row unscale or None)``: zero padding; twice for
        torch_int4x2; the group sums in ``extra`` op groups after, for torch_int4's zero residual
        (fp16 rows whose sums could overflow are scaled by a power of two: see ``_fp16_unscale``)."""
        K = self.in_features
        op_group, pg, G = int4_layout(K, self.group_size)
        g = K if self._one_group_per_row() else self.group_size
        xg = F.pad(x2, (0, G * g - K)) if G * g != K else x2  # a partial last group
        unscale = sums = None
        if extra:
            sums = xg.float().view(-1, G, g).sum(dim=2)
            if x2.dtype == torch.float16:
                unscale = _fp16_unscale(sums.abs().amax(dim=1, keepdim=True))
                xg, sums = (xg.float() / unscale).to(x2.dtype), sums / unscale
        xp = xg
        if pg != g:  # groups < 32, or the one group of a per-channel row
            xp = F.pad(xg.view(-1, G, g), (0, pg - g)).reshape(-1, G * pg)
        if parts == 2:
            return torch.cat([xp, xp], dim=1), None
        if extra:
            L = _int4_residual_layout(G, op_group)[1]
            sums = torch.stack([sums / 16 ** level for level in range(L)], dim=2)  # (M, G, L)
            hi = sums.to(x2.dtype)
            lo = (sums - hi.float()).to(x2.dtype)
            cols = torch.stack([hi, lo], dim=3).reshape(-1, 2 * L * G)
            return torch.cat([xp, F.pad(cols, (0, extra * op_group - 2 * L * G))], dim=1), unscale
        return xp, None

    def release_prepacked(self, keep: str | None = None) -> None:
        """Drop the prepacked copies (all, or all but backend ``keep``'s); they are rebuilt on demand.

        E.g. after a forward at another batch size chose another backend, to hold only what the
        current one reads (``resident_bytes()`` then counts storage + that copy).
        """
        self._prepacked = {k: v for k, v in self._prepacked.items() if keep is not None and k[0] == keep}

    def _apply(self, fn, *args, **kwargs):
        # Prepacked copies are derived from the buffers; rebuild them after a move/cast (and check the
        # inputs again: the plans were made for the old device).
        self._prepacked = {}
        self._plans = {}
        self._stamp = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._prepacked = {}
        self._plans = {}
        self._stamp = None
        return super()._load_from_state_dict(*args, **kwargs)

    # -- forward -----------------------------------------------------------------------------

    def _plan_key(self, x: torch.Tensor, backend: str | None) -> tuple | None:
        """The key of ``x``'s plan, or ``None`` where no plan applies (under torch.compile, an input the
        checks would reject, an empty batch: auto does not time on one)."""
        K = self.in_features
        if not torch.is_tensor(x) or x.dim() < 1 or x.shape[-1] != K or x.numel() == 0 or _ops.compiling():
            return None
        return (self._backend if backend is None else backend, self.cache_dequantized, x.dtype, x.device,
                m_bucket(x.numel() // K), triton_usable(x.device), choices_generation())

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        self._sync_caches()  # storage changed since the copies were built: drop them (and the plans)
        pkey = self._plan_key(x, backend)
        plan = self._plans.get(pkey) if pkey is not None else None
        if plan is not None:  # seen before: same dtype, device, width and M bucket, so checked and chosen
            chosen, measured = plan
            x2 = x.reshape(-1, self.in_features)
            y = self._run(chosen, x2 if chosen == "triton" else cpu_dense_rows(x2))
            self.last_backend, self.last_candidates_ms = chosen, measured
            return y.reshape(*x.shape[:-1], self.out_features)
        # Any float activation dtype: every backend casts the dequantized weight/scales to it.
        check_input(x, in_features=self.in_features, device=self.packed.device, dtypes=_FLOAT_DTYPES)
        chosen = self.resolve_backend(x, backend)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if chosen != "triton":
            x2 = cpu_dense_rows(x2)  # torch's CPU kernels can misread column slices (see the helper)
        measured = None
        final = True  # the choice will not change for this plan key (see _plans)
        # Under torch.compile nothing is timed: the choice measured by an eager call (cached per key),
        # else auto's static order (see the module docstring and ``triton_kernels.nn._ops``).
        if (backend or self.backend) == "auto" and chosen != "triton" and not _ops.compiling():
            cands = self._auto_candidates(x2)
            if len(cands) > 1 and x2.shape[0] > 0:  # nothing to time on an empty batch
                before = set(self._prepacked)
                key = self._choice_key(x2, cands)
                chosen = measured_choice(key, {c: (lambda c=c: self._run(c, x2)) for c in cands})
                entry = choice_entry(key)
                measured = entry[1] if entry is not None else None
                final = entry is not None  # measuring off: the static order, until something measures
                # Drop what the timing built for the losers (a forced or earlier winner's copy stays).
                for k in set(self._prepacked) - before:
                    if k[0] != chosen:
                        del self._prepacked[k]
        y = self._run(chosen, x2)
        self.last_backend = chosen
        self.last_candidates_ms = measured
        if pkey is not None and final:
            self._plans[pkey] = (chosen, measured)
        return y.reshape(*lead, self.out_features)

    def _run(self, backend: str, x2: torch.Tensor) -> torch.Tensor:
        """``backend``'s product of the (M, K) rows ``x2`` (already dense rows on CPU), bias included."""
        N = self.out_features
        if backend == "triton":
            if _ops.compiling():
                return _ops.dequant_linear(x2, self.packed, self.scales, self.zeros, self.bias, self.bits,
                                           self.group_size, self.symmetric)
            # A config tuned for this GPU and call (triton_kernels/nn/configs/<gpu>.json) skips the search.
            fmt = dict(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, dtype=x2.dtype,
                       param_dtype=self.scales.dtype, device=x2.device)
            M, K = x2.shape
            config = tuned.dequant_config(M, N, K, **fmt)
            y = dq.dequant_matmul(x2, self.packed, self.scales, self.zeros, bits=self.bits,
                                  group_size=self.group_size, symmetric=self.symmetric, bias=self.bias,
                                  config=config)
            if config is None and tuned.is_recording():
                tuned.note_dequant(M, N, K, **fmt)
            return y
        if backend == "dequant":
            if self.cache_dequantized:
                key = ("dequant", x2.dtype)
                if key not in self._prepacked:
                    self._prepacked[key] = (self.dequantize().to(x2.dtype),)
                w = self._prepacked[key][0]
            else:
                w = self.dequantize().to(x2.dtype)
            return F.linear(x2, w, None if self.bias is None else self.bias.to(x2.dtype))
        if x2.shape[0] == 0:
            return x2.new_zeros(0, N)
        if backend == "torch_int8":
            return self._run_int8(x2)
        w, sz, extra = self.prepack(backend, x2.dtype)
        xp, unscale = self._int4_input(x2, 2 if backend == "torch_int4x2" else 1, extra)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xp, w, int4_layout(self.in_features, self.group_size)[0], sz)
        if y.shape[1] != N:
            y = y[:, :N]
        return self._finish(y, x2.dtype, unscale=unscale)

    def _run_int8(self, x2: torch.Tensor) -> torch.Tensor:
        """torch_int8: ``[x, rowsum columns, 0 padding] @ (int8 weight * S)^T`` (module docstring)."""
        dt, K, M = x2.dtype, self.in_features, x2.shape[0]
        w, S, levels, resid = self.prepack("torch_int8", dt)
        unscale = corr = None
        if resid is not None:
            corr = x2.float().sum(dim=1, keepdim=True) * resid
        if levels:
            rs = x2.float().sum(dim=1, keepdim=True)
            xin = x2
            if dt == torch.float16:
                unscale = _fp16_unscale(rs.abs())
                xin, rs = (x2.float() / unscale).to(dt), rs / unscale
            vals = rs * rs.new_tensor(levels)               # (M, columns): rowsum * 1, 2^-7, 2^-14
            hi = vals.to(dt)
            rest = vals - hi.float()
            mid = rest.to(dt)
            lo = (rest - mid.float()).to(dt)
            cols = torch.stack([hi, mid, lo], dim=2).reshape(M, 3 * len(levels))
            xp = torch.cat([xin, cols, xin.new_zeros(M, w.shape[1] - K - cols.shape[1])], dim=1)
        elif w.shape[1] != K:
            xp = F.pad(x2, (0, w.shape[1] - K))
        else:
            xp = x2
        y = torch._weight_int8pack_mm(xp, w, S)
        return self._finish(y, dt, unscale=unscale, corr=corr)

    def _finish(self, y: torch.Tensor, dtype: torch.dtype, *, unscale=None, corr=None) -> torch.Tensor:
        """The op's output ``y`` (M, N), its rows scaled back, the residual ``corr`` and the bias added
        in fp32, rounded once to ``dtype``; ``y`` as it is when there is nothing to add."""
        if unscale is None and corr is None and self.bias is None:
            return y
        y = y.float()
        if unscale is not None:
            y = y * unscale
        if corr is not None:
            y = y + corr
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (N, K) these codes stand for."""
        return dq.dequantize(self.packed, self.scales, self.zeros, bits=self.bits,
                             group_size=self.group_size, K=self.in_features, symmetric=self.symmetric)

    # -- sizes -------------------------------------------------------------------------------

    def memory_bytes(self, include_bias: bool = False) -> int:
        """Bytes of the storage format: packed codes + 16-bit scales (+ 16-bit zeros).

        Scales and zeros count 16 bits each whatever dtype this module holds them in (fp16, as GPTQ
        and GGUF checkpoints store them and as the harness counts them; ``from_linear`` keeps RTN's
        fp32 scales, which ``resident_bytes()`` shows). The bias (16-bit) only with ``include_bias``:
        it is not part of the compressed weight. Prepacked copies are never counted here.
        """
        return format_nbytes(self.packed, self.scales, self.zeros, self.bias if include_bias else None)

    def bits_per_weight(self) -> float:
        """Storage bits per weight, scales and zeros included: ``8 * memory_bytes() / (N * K)``."""
        return 8.0 * self.memory_bytes() / (self.out_features * self.in_features)

    def resident_bytes(self) -> int:
        """Every tensor this module holds right now, in its actual dtype: storage, bias, prepacked copies."""
        return tensor_nbytes(self.packed, self.scales, self.zeros, self.bias,
                             *(t for v in self._prepacked.values() for t in v))

    def extra_repr(self) -> str:
        gs = "per-channel" if self.group_size == -1 else self.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={gs}, symmetric={self.symmetric}, bias={self.bias is not None}, "
                f"backend={self.backend!r}" + (", cache_dequantized=True" if self.cache_dequantized else ""))


def _check_storage(packed, scales, zeros, bias, *, N: int, K: int, bits: int, group_size: int,
                   symmetric: bool) -> None:
    """The checks of the constructor on scales/zeros/bias against packed (N, words); also run when a
    forward finds the storage changed."""
    if not torch.is_tensor(packed) or packed.dtype != torch.int32 or tuple(packed.shape) != (
            N, math.ceil(K * bits / 32)):
        raise ValueError(f"packed must be an int32 tensor of shape {(N, math.ceil(K * bits / 32))} "
                         f"(N, ceil(K*bits/32)), got {getattr(packed, 'dtype', type(packed))} with shape "
                         f"{tuple(getattr(packed, 'shape', ()))}")
    n_groups = 1 if group_size == -1 else math.ceil(K / group_size)
    _check_param("scales", scales, (N, n_groups), packed.device)
    if not symmetric:
        if zeros is None:
            raise ValueError("zeros is required for an asymmetric grid (symmetric=False); "
                             "pass symmetric=True for w = (q - 2^(bits-1)) * s")
        _check_param("zeros", zeros, (N, n_groups), packed.device)
    if bias is not None:
        _check_param("bias", bias, (N,), packed.device)


def _check_param(name: str, t, shape: tuple[int, ...], device: torch.device) -> None:
    if not torch.is_tensor(t) or t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a fp32/bf16/fp16 tensor of shape {shape}, got "
                        f"{getattr(t, 'dtype', type(t))}")
    if tuple(t.shape) != shape:
        what = "(N,)" if len(shape) == 1 else "(N, ceil(K / group_size)), or (N, 1) per-channel"
        raise ValueError(f"{name} must have shape {shape} = {what}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but packed is on {device}; put them on one device")
