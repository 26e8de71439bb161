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

Backends (``backend=`` at construction, the ``backend`` attribute, or ``forward(x, backend=...)``)
-------------------------------------------------------------------------------------------
- ``"triton"``: ``dequant_matmul`` (CUDA/ROCm, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``"torch_int4"``: ``torch.ops.aten._weight_int4pack_mm_for_cpu``. CPU only; bits=4, group size
  32/64/128/256 (or per-channel with K one of those), K a multiple of the group size (no partial
  group), N a multiple of 16 (all measured on torch 2.13: the op raises otherwise). The op computes
  ``(q - 8) * scale + zero``; asymmetric ``(q - z) * s`` is mapped exactly by ``zero = (8 - z) * s``.
  Its scales/zeros must have the activation's dtype, so they are rounded to bf16 for bf16 inputs.
- ``"torch_int8"``: ``torch._weight_int8pack_mm``. CPU only; bits=8, one group per row, K a multiple
  of 16 (measured on torch 2.13: other K give wrong results or a segfault, so they are refused).
  The op computes ``x @ (w_int8 * s)^T`` with ``w_int8 = q - 128``; an asymmetric zero is added
  back as the rank-1 term ``rowsum(x) * (128 - z) * s`` in fp32.
- ``"dequant"``: dequantize to fp32, cast to the activation dtype, ``F.linear``. Works everywhere.
  By default it dequantizes on every call and keeps nothing dense resident; that costs a full
  unpack per forward (~1 s for 4096x4096 on the 2-core dev CPU, ~80 ms for 1536x576). With
  ``cache_dequantized=True`` (constructor argument or attribute) the dense weight in the activation
  dtype is built once and kept: dense speed, dense memory (visible in ``resident_bytes()``). Use
  it for accuracy runs in fp32 (perplexity), not for memory or latency claims.
- ``"auto"`` (default), decided per call:
  1. ``triton`` when ``triton_usable(x.device)`` (CUDA, or ``TRITON_INTERPRET=1`` on CPU);
  2. on CPU with **bf16** activations: ``torch_int4``, else ``torch_int8``, where they apply;
  3. otherwise ``dequant``. In particular fp32 (and fp16) activations on CPU go to ``dequant``:
     the torch weight-only ops are 30-125x slower with fp32 activations, and casting fp32 inputs
     to bf16 behind the caller's back would change the numerics (the harness measures perplexity
     in fp32 through this module). Force ``torch_int4``/``torch_int8`` to run them on fp32/fp16.

A forced backend that cannot run a given layer/input raises ``ValueError`` saying why and what would.
``last_backend`` holds the backend the most recent forward actually ran.

Resident memory
---------------
The torch CPU backends need their own weight formats (int4pack uint8 (N, K/2) + [G, N, 2]
scales-and-zeros; int8 (N, K) + scales), and ``dequant`` with ``cache_dequantized=True`` a dense
(N, K) weight. They are built once, on first use (or by ``prepack()`` for the torch ops),
kept next to the storage format (not instead of it: the storage is the state_dict and the source
of truth), and dropped on ``.to()``/``load_state_dict``. ``memory_bytes()`` counts the storage
format only, with scales/zeros at 16 bits (what a checkpoint stores, what the harness reports);
``resident_bytes()`` counts every tensor this module currently holds in its actual dtype, prepacked
copies included.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from triton_kernels import dequant_matmul as dq
from triton_kernels.nn._backend import (check_backend, check_input, cpu_dense_rows, format_nbytes, tensor_nbytes,
                                         triton_usable)

BACKENDS = ("auto", "triton", "torch_int4", "torch_int8", "dequant")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Group sizes _weight_int4pack_mm_for_cpu accepts (torch 2.13 raises for any other).
_INT4_GROUP_SIZES = (32, 64, 128, 256)


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
                            f"{getattr(packed, 'dtype', type(packed))} with shape {tuple(getattr(packed, 'shape', ()))}")
        N, K = packed.shape[0], in_features
        words = math.ceil(K * bits / 32)
        if packed.shape[1] != words:
            raise ValueError(f"packed has {packed.shape[1]} words per row; K={K} at bits={bits} needs {words}")
        n_groups = 1 if group_size == -1 else math.ceil(K / group_size)
        _check_param("scales", scales, (N, n_groups), packed.device)
        if symmetric:
            zeros = None  # the symmetric grid's zero is 2^(bits-1); a stored one would be dead weight
        else:
            if zeros is None:
                raise ValueError("zeros is required for an asymmetric grid (symmetric=False); "
                                 "pass symmetric=True for w = (q - 2^(bits-1)) * s")
            _check_param("zeros", zeros, (N, n_groups), packed.device)
        if bias is not None:
            _check_param("bias", bias, (N,), packed.device)

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
        self._prepacked: dict[tuple, tuple[torch.Tensor, ...]] = {}

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

    # -- backend choice --------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(value, BACKENDS)

    def _group(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    def why_not(self, backend: str, x: torch.Tensor) -> str | None:
        """``None`` when ``backend`` can run this layer on ``x``, else the reason it cannot."""
        check_backend(backend, BACKENDS)
        N, K, dev = self.out_features, self.in_features, x.device
        if backend in ("auto", "dequant"):
            return None
        if backend == "triton":
            if not triton_usable(dev):
                return (f"the Triton kernel needs a CUDA/ROCm tensor or TRITON_INTERPRET=1 on CPU "
                        f"(x is on {dev})")
            return None
        if dev.type != "cpu":
            return f"torch's weight-only CPU ops need CPU tensors (x is on {dev})"
        if x.dtype not in _FLOAT_DTYPES:
            return f"x must be fp32/bf16/fp16, got {x.dtype}"
        if backend == "torch_int4":
            if self.bits != 4:
                return f"it needs bits=4, this layer has bits={self.bits}"
            gs = self._group()
            if gs not in _INT4_GROUP_SIZES:
                return f"it needs a group size in {_INT4_GROUP_SIZES}, this layer's group is {gs}"
            if K % gs:
                return f"it needs K divisible by the group size (no partial group): K={K}, group {gs}"
            if N % 16:
                return f"it needs out_features divisible by 16, got {N}"
            return None
        if backend == "torch_int8":
            if self.bits != 8:
                return f"it needs bits=8, this layer has bits={self.bits}"
            if self.group_size != -1 and self.group_size < K:
                return f"it needs one group per row (group_size=-1), this layer has group_size={self.group_size}"
            if K % 16:
                # Measured on torch 2.13 (AVX-512): other K give garbage or a segfault.
                return f"it needs in_features divisible by 16, got {K}"
            return None
        raise AssertionError(backend)

    def resolve_backend(self, x: torch.Tensor, backend: str | None = None) -> str:
        """The backend a forward on ``x`` would run (``auto`` resolved; a forced one validated)."""
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
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            for cand in ("torch_int4", "torch_int8"):
                if self.why_not(cand, x) is None:
                    return cand
        return "dequant"

    # -- prepacked weights for torch's CPU ops -------------------------------------------------

    def prepack(self, backend: str, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, ...]:
        """Build (once) and return the weights ``backend`` needs for activations of ``dtype``."""
        key = (backend, dtype)
        if key in self._prepacked:
            return self._prepacked[key]
        probe = torch.empty(0, self.in_features, dtype=dtype, device=self.packed.device)
        reason = self.why_not(backend, probe)
        if backend not in ("torch_int4", "torch_int8") or reason is not None:
            raise ValueError(f"nothing to prepack for backend={backend!r} and dtype {dtype}"
                             + (f": {reason}" if reason else " (only torch_int4/torch_int8 prepack)"))
        q = dq.unpack(self.packed, self.bits, self.in_features)
        s = self.scales.float()
        if backend == "torch_int4":
            # The int4pack weight does not depend on the activation dtype; share it across dtypes.
            w = next((v[0] for k, v in self._prepacked.items() if k[0] == "torch_int4"), None)
            if w is None:
                w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
            zero = torch.zeros_like(s) if self.symmetric else (8.0 - self.zeros.float()) * s
            sz = torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [G, N, 2]
            packed = (w, sz)
        else:
            w = next((v[0] for k, v in self._prepacked.items() if k[0] == "torch_int8"), None)
            if w is None:
                w = (q.to(torch.int16) - 128).to(torch.int8).contiguous()
            s1 = s[:, 0]
            corr = None if self.symmetric else ((128.0 - self.zeros.float()[:, 0]) * s1).contiguous()
            packed = (w, s1.to(dtype).contiguous()) + ((corr,) if corr is not None else ())
        self._prepacked[key] = packed
        return packed

    def _apply(self, fn, *args, **kwargs):
        # Prepacked copies are derived from the buffers; rebuild them after a move/cast.
        self._prepacked = {}
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._prepacked = {}
        return super()._load_from_state_dict(*args, **kwargs)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        # Any float activation dtype: every backend casts the dequantized weight/scales to it.
        check_input(x, in_features=self.in_features, device=self.packed.device, dtypes=_FLOAT_DTYPES)
        chosen = self.resolve_backend(x, backend)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if chosen != "triton":
            x2 = cpu_dense_rows(x2)  # torch's CPU kernels can misread column slices (see the helper)
        if chosen == "triton":
            y = dq.dequant_matmul(x2, self.packed, self.scales, self.zeros, bits=self.bits,
                                  group_size=self.group_size, symmetric=self.symmetric, bias=self.bias)
        elif chosen == "dequant":
            if self.cache_dequantized:
                key = ("dequant", x.dtype)
                if key not in self._prepacked:
                    self._prepacked[key] = (self.dequantize().to(x.dtype),)
                w = self._prepacked[key][0]
            else:
                w = self.dequantize().to(x.dtype)
            y = F.linear(x2, w, None if self.bias is None else self.bias.to(x.dtype))
        elif chosen == "torch_int4":
            w, sz = self.prepack("torch_int4", x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w, self._group(), sz)
            if self.bias is not None:
                y = (y.float() + self.bias.float()).to(x.dtype)
        else:  # torch_int8
            w, s, *corr = self.prepack("torch_int8", x.dtype)
            y = torch._weight_int8pack_mm(x2, w, s)
            if corr or self.bias is not None:
                y = y.float()
                if corr:
                    y = y + x2.float().sum(dim=1, keepdim=True) * corr[0]
                if self.bias is not None:
                    y = y + self.bias.float()
                y = y.to(x.dtype)
        self.last_backend = chosen
        return y.reshape(*lead, self.out_features)

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


def _check_param(name: str, t, shape: tuple[int, ...], device: torch.device) -> None:
    if not torch.is_tensor(t) or t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a fp32/bf16/fp16 tensor of shape {shape}, got "
                        f"{getattr(t, 'dtype', type(t))}")
    if tuple(t.shape) != shape:
        what = "(N,)" if len(shape) == 1 else "(N, ceil(K / group_size)), or (N, 1) per-channel"
        raise ValueError(f"{name} must have shape {shape} = {what}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but packed is on {device}; put them on one device")
