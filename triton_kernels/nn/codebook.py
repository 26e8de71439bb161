"""``CodebookLinear``: a linear layer whose weight is stored as packed 1-8-bit codes into a lookup table.

Storage (the state_dict, and what ``memory_bytes()`` counts, floats at 16 bits)
-----------------------------------------------------------------------------
- ``packed``: int32 (N, ceil(K * bits / 32)), the bit-plane layout of ``dequant_matmul.pack``.
- ``codebook``: (N, 2^bits) one table per output row (SqueezeLLM, k-means) or (1, 2^bits) one shared
  table (NF4, FP4), fp16 / bf16 / fp32 (the format counts 16 bits per entry).
- ``scales``: (N, ceil(K / group_size)) or ``None`` (scale 1; the table holds the weights' values).
- ``bias``: (N,) or ``None``.

The weight is ``codebook_matmul.dequantize_codebook(packed, codebook, scales, ...)``:
``W[n, k] = codebook[r, q[n, k]] * scales[n, k // group_size]`` (r = n per-row, 0 shared).

Building one
------------
- ``CodebookLinear.from_codes(q, codebook, scales, bits=, group_size=-1, bias=None)``: integer codes
  (N, K) in [0, 2^bits) from any algorithm (NF, FP4, k-means, SqueezeLLM, GPTQ over a grid), packed
  here. The stable entry point for the algorithms in ``experiments/``.
- ``CodebookLinear.from_linear(linear, bits=4, group_size=64, codebook=None)``: the simple default:
  a shared table (NF4 when ``codebook`` is None, QLoRA's published values), group absmax scales
  (``absmax / max|table|``, rounded to fp16 as the format stores them), each weight rounded to the
  nearest table entry.
- ``CodebookLinear(packed, codebook, scales, in_features=K, bits=, group_size=-1, bias=None)``.

Backends (``backend=`` at construction, the ``backend`` attribute, or ``forward(x, backend=...)``)
-------------------------------------------------------------------------------------------
- ``"triton"``: ``codebook_matmul`` (CUDA/ROCm, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``"dense_cache"``: the dense weight in the activation dtype, built once (per dtype) and kept, then
  ``F.linear``. There is no exact compressed CPU kernel for a non-uniform table: torch's weight-only
  CPU ops (``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) compute affine functions of
  the code, ``(q - 8) * scale + zero``, which a non-uniform table is not (only a 1-bit table is, and
  that mapping rounds differently). So the fast CPU path is dense, and this backend says so in its
  name and in ``resident_bytes()`` (dense memory: 2 or 4 bytes per weight on top of the storage).
- ``"dequant"``: dequantize on every call (fp32, cast to the activation dtype), ``F.linear``, nothing
  kept. Works everywhere; slow (a full unpack per forward); for memory-faithful runs.
- ``"auto"`` (default), decided per call: ``triton`` when ``triton_usable(x.device)``, else
  ``dense_cache``.

A forced backend that cannot run raises ``ValueError`` saying why. ``last_backend`` holds the backend
the most recent forward actually ran. ``memory_bytes()`` counts the storage format only (packed codes,
table and scales at 16 bits, bias excluded unless asked for); ``resident_bytes()`` every tensor the
module holds now in its actual dtype, the dense cache included. The cache is dropped on
``.to()``/``load_state_dict``, and whenever ``packed``, ``codebook`` or ``scales`` changed since it was
built: each forward checks their identity and version counters (``_backend.SourceStamp``), so
assigning a new tensor or changing one in place (``m.scales.mul_(2)``, ``m.codebook[0, 3] = x``) is
seen and the next ``dense_cache`` forward follows ``dequantize()``. Not seen: writes through ``.data``,
in-place changes of inference tensors, and any change under ``torch.compile`` (the check is not
traced; call ``release_dense_cache()`` after changing a compiled model's storage).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from triton_kernels import codebook_matmul as cb
from triton_kernels.nn import _ops
from triton_kernels.nn._backend import (SourceStamp, check_backend, check_input, cpu_dense_rows, format_nbytes,
                                         tensor_nbytes, triton_usable)

BACKENDS = ("auto", "triton", "dense_cache", "dequant")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# NormalFloat-4 (QLoRA, Dettmers et al. 2023; the values bitsandbytes ships): quantiles of N(0, 1)
# normalized to [-1, 1], with an exact zero. The default table of ``from_linear``.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)


class CodebookLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W[n, k] = codebook[r, q[n, k]] * scales[n, group]``, codes packed.

    See the module docstring for the storage format, the backends and what ``auto`` picks.
    """

    def __init__(self, packed: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None, *,
                 in_features: int, bits: int, group_size: int = -1, bias: torch.Tensor | None = None,
                 backend: str = "auto"):
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        # The kernel file's own checks name the argument and the shape that would fit.
        N = cb.check_weight(packed, codebook, scales, bits, group_size, in_features)
        if bias is not None:
            if not torch.is_tensor(bias) or bias.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"bias must be a fp32/bf16/fp16 tensor of shape ({N},) or None, got "
                                f"{getattr(bias, 'dtype', type(bias))}")
            if tuple(bias.shape) != (N,):
                raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
            if bias.device != packed.device:
                raise ValueError(f"bias is on {bias.device} but packed is on {packed.device}")
        self.in_features = in_features
        self.out_features = N
        self.bits = bits
        self.group_size = group_size
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("codebook", codebook.contiguous())
        self.register_buffer("scales", None if scales is None else scales.contiguous())
        self.register_buffer("bias", None if bias is None else bias.contiguous())
        self.backend = backend
        self.last_backend: str | None = None
        self._dense: dict[torch.dtype, torch.Tensor] = {}
        self._stamp: SourceStamp | None = None  # what the dense cache was built from

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_codes(cls, q: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None, *, bits: int,
                   group_size: int = -1, bias: torch.Tensor | None = None,
                   backend: str = "auto") -> "CodebookLinear":
        """Build from integer codes ``q`` (N, K) in [0, 2^bits) chosen by any algorithm.

        ``codebook``: (N, 2^bits) per-row or (1, 2^bits) shared; ``scales``: (N, ceil(K / group_size))
        (``group_size=-1``: (N, 1)) or ``None``. The codes are packed here.
        """
        if not torch.is_tensor(q) or q.dim() != 2 or q.dtype.is_floating_point or q.dtype == torch.bool \
                or q.is_complex():
            raise TypeError(f"q must be a 2-D integer tensor of codes (N, K), got "
                            f"{getattr(q, 'dtype', type(q))} with shape {tuple(getattr(q, 'shape', ()))}")
        cb.check_bits(bits)
        if q.shape[1] < 1:
            raise ValueError(f"q must have K >= 1 columns, got shape {tuple(q.shape)}")
        if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2 ** bits):
            raise ValueError(f"q must hold codes in [0, {2 ** bits - 1}] for bits={bits}, "
                             f"got values in [{int(q.min())}, {int(q.max())}]")
        return cls(cb.pack(q, bits), codebook, scales, in_features=q.shape[1], bits=bits, group_size=group_size,
                   bias=bias, backend=backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 64,
                    codebook: torch.Tensor | None = None, backend: str = "auto") -> "CodebookLinear":
        """Shared-table quantization of ``linear.weight`` with group absmax scales, nearest entry.

        ``codebook``: a (2^bits,) or (1, 2^bits) float table (any order); ``None`` = NF4 (bits=4 only).
        Scales: ``absmax(group) / max|table|`` rounded to fp16 (an all-zero group gets 1), so the
        group's largest weight maps onto the table's largest magnitude; each weight then takes the
        table entry nearest to ``w / s`` (ties to the lower entry). Table stored as fp16.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        cb.check_bits(bits)
        cb.check_group_size(group_size)
        if codebook is None:
            if bits != 4:
                raise ValueError(f"codebook=None means NF4, which needs bits=4 (got bits={bits}); pass a "
                                 f"(2^bits,) table for other widths")
            codebook = torch.tensor(NF4)
        if not torch.is_tensor(codebook) or not codebook.is_floating_point():
            raise TypeError(f"codebook must be a float tensor of shape ({2 ** bits},) or (1, {2 ** bits}), got "
                            f"{getattr(codebook, 'dtype', type(codebook))}")
        if codebook.numel() != 2 ** bits or codebook.dim() > 2 or (codebook.dim() == 2 and codebook.shape[0] != 1):
            raise ValueError(f"codebook must have shape ({2 ** bits},) or (1, {2 ** bits}) for bits={bits} "
                             f"(one shared table), got {tuple(codebook.shape)}")
        table = codebook.detach().reshape(1, -1).to(torch.float16).cpu()
        tmax = table.float().abs().max()
        if not torch.isfinite(table.float()).all() or tmax == 0:
            raise ValueError("codebook must be finite with at least one nonzero entry")
        w = linear.weight.detach().float()
        N, K = w.shape
        gs = K if group_size == -1 else group_size
        G = math.ceil(K / gs)
        pad = G * gs - K
        wp = torch.cat([w, w[:, -1:].expand(N, pad)], dim=1) if pad else w
        amax = wp.view(N, G, gs).abs().amax(dim=2)
        s = (amax / tmax.to(w.device)).to(torch.float16)
        s = torch.where(s == 0, torch.ones_like(s), s)  # all-zero group (or one that underflows fp16)
        z = (w / s.float().repeat_interleave(gs, dim=1)[:, :K]).cpu()
        values, order = torch.sort(table.float()[0])
        mid = (values[1:] + values[:-1]) / 2
        q = order[torch.bucketize(z, mid)]  # nearest entry (a tie goes to the lower one)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        dev = w.device
        return cls.from_codes(q.to(dev), table.to(dev), s, bits=bits, group_size=group_size, bias=bias,
                              backend=backend)

    # -- backend choice --------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(value, BACKENDS)

    def why_not(self, backend: str, x: torch.Tensor) -> str | None:
        """``None`` when ``backend`` can run this layer on ``x``, else the reason it cannot."""
        check_backend(backend, BACKENDS)
        if backend == "triton" and not triton_usable(x.device):
            return f"the Triton kernel needs a CUDA/ROCm tensor or TRITON_INTERPRET=1 on CPU (x is on {x.device})"
        return None

    def resolve_backend(self, x: torch.Tensor, backend: str | None = None) -> str:
        """The backend a forward on ``x`` would run (``auto`` resolved; a forced one validated)."""
        backend = self.backend if backend is None else check_backend(backend, BACKENDS)
        if backend != "auto":
            reason = self.why_not(backend, x)
            if reason is not None:
                raise ValueError(f"backend={backend!r} cannot run here: {reason}. backend='dense_cache' or "
                                 f"'dequant' run anywhere. (layer: {self.extra_repr()})")
            return backend
        return "triton" if triton_usable(x.device) else "dense_cache"

    def _apply(self, fn, *args, **kwargs):
        self._dense = {}  # derived from the buffers: rebuilt after a move/cast
        self._stamp = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense = {}
        self._stamp = None
        return super()._load_from_state_dict(*args, **kwargs)

    def release_dense_cache(self) -> None:
        """Drop the dense cache (rebuilt by the next ``dense_cache`` forward)."""
        self._dense = {}

    def _sync_cache(self) -> None:
        """Drop the dense cache if ``packed``/``codebook``/``scales`` changed since it was built (assigned
        or modified in place), checking the new storage as the constructor does. Skipped while compiling."""
        if _ops.compiling():
            return
        storage = (self.packed, self.codebook, self.scales)
        if self._stamp is not None and self._stamp.matches(storage):
            return
        if self._stamp is not None:
            N = cb.check_weight(self.packed, self.codebook, self.scales, self.bits, self.group_size,
                                 self.in_features)
            if N != self.out_features:
                raise ValueError(f"packed now has {N} rows but the layer has out_features={self.out_features}")
        self._dense = {}
        self._stamp = SourceStamp(storage)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        self._sync_cache()  # the storage changed since the dense cache was built: drop it
        check_input(x, in_features=self.in_features, device=self.packed.device, dtypes=_FLOAT_DTYPES)
        chosen = self.resolve_backend(x, backend)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if chosen == "triton" and _ops.compiling():  # an opaque operator under torch.compile
            y = _ops.codebook_linear(x2, self.packed, self.codebook, self.scales, self.bias, self.bits,
                                     self.group_size)
        elif chosen == "triton":
            y = cb.codebook_matmul(x2, self.packed, self.codebook, self.scales, bits=self.bits,
                                   group_size=self.group_size, bias=self.bias)
        else:
            x2 = cpu_dense_rows(x2)  # torch's CPU kernels can misread column slices (see the helper)
            if chosen == "dense_cache":
                if x.dtype not in self._dense:
                    self._dense[x.dtype] = self.dequantize().to(x.dtype)
                w = self._dense[x.dtype]
            else:
                w = self.dequantize().to(x.dtype)
            y = F.linear(x2, w, None if self.bias is None else self.bias.to(x.dtype))
        self.last_backend = chosen
        return y.reshape(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (N, K) these codes stand for."""
        return cb.dequantize_codebook(self.packed, self.codebook, self.scales, bits=self.bits,
                                      group_size=self.group_size, K=self.in_features)

    # -- sizes -------------------------------------------------------------------------------

    def memory_bytes(self, include_bias: bool = False) -> int:
        """Bytes of the storage format: packed codes + the table(s) at 16 bits + scales at 16 bits.

        Whatever dtype the module holds the table and scales in, the format counts 16 bits per value
        (a per-row 4-bit table adds 16 x 16 = 256 bits per row). The bias (16-bit) only with
        ``include_bias``. The dense cache is never counted here (see ``resident_bytes``).
        """
        return format_nbytes(self.packed, self.codebook, self.scales, self.bias if include_bias else None)

    def bits_per_weight(self) -> float:
        """Storage bits per weight, tables and scales included: ``8 * memory_bytes() / (N * K)``."""
        return 8.0 * self.memory_bytes() / (self.out_features * self.in_features)

    def resident_bytes(self) -> int:
        """Every tensor this module holds right now, in its actual dtype: storage, bias, dense caches."""
        return tensor_nbytes(self.packed, self.codebook, self.scales, self.bias, *self._dense.values())

    def extra_repr(self) -> str:
        gs = "per-channel" if self.group_size == -1 else self.group_size
        table = "shared" if self.codebook.shape[0] == 1 else "per-row"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"codebook={table}, group_size={gs if self.scales is not None else 'no scales'}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")
