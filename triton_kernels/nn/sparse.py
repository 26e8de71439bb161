"""``SparseLinear``: a linear layer stored in one of the sparse formats of ``triton_kernels.sparse_matmul``.

Build one with ``SparseLinear.from_linear(linear, pattern, mask=None, sparsity=None, ...)``:

- ``pattern="block"`` (``block=(bn, bk)``, each 16/32/64): BSR blocks that hold any kept weight.
- ``pattern="nm"`` (``n=2, m=4``; also 1:4, 4:8, ...): N:M compressed values + packed indices.
- ``pattern="unstructured"`` (``tile=(64, 64)``): weight + 1-bit mask + list of non-empty tiles.
- ``pattern="activation"`` (``threshold=`` or ``sparsity=`` = target activation sparsity): the dense
  weight stored transposed (K, N); per call, input features with small |x| are dropped and their
  weight columns are not read. ``threshold`` (a finite number >= 0) keeps ``|x| >= threshold``;
  ``sparsity=s`` keeps the ``K - round(s*K)`` largest |x| of each row (ties may keep a few more).
  NaN features are always kept, so a NaN input gives NaN outputs as in ``nn.Linear`` (dropping it
  would return a finite number computed without it).

``mask`` (bool (N, K), True = kept) is used exactly as given, on a linear whose weight was already
updated (Wanda/SparseGPT). ``sparsity`` prunes by magnitude (``magnitude_prune``/``block_prune``;
for "nm" the sparsity is n/m by definition, so ``nm_prune`` is used). With neither, the zeros already
in the weight define the pattern (for "nm" the weight must then already be N:M).

Backends (``backend=``; resolved at construction, since each backend keeps its own storage):
- ``"triton"``: the ``sparse_matmul`` kernels (CUDA/ROCm, or CPU under ``TRITON_INTERPRET=1``).
- ``"torch_bsr"`` (block) / ``"torch_csr"`` (unstructured): torch's sparse CPU matmuls; float32 only
  (torch 2.13 raises "addmm_out_sparse_csr_impl_mkl not implemented" for fp16/bf16), so a forced one
  on another dtype raises ValueError.
- ``"torch_gather"`` (activation): ``x[:, kept] @ W^T[kept]`` in torch.
- ``"dense"``: the masked weight kept dense, ``F.linear`` (activation: sparsified x, dense weight).
- ``"auto"``: triton where ``triton_usable``; on CPU the fastest of ``cpu_candidates(pattern, dtype)``
  (masked dense, and torch_bsr / torch_csr / torch_gather where they apply) *measured on this
  machine*: ``from_linear`` builds each candidate, times its forward on a (``tune_m``, K) input
  (``tune_m=1`` by default: decoding) and keeps the fastest; the choice is cached in-process per
  (pattern, format, shape, density to 0.01, dtype, M bucket, device) (``_backend.measured_choice``;
  ``TKR_CPU_AUTOTUNE=0`` or ``_backend.AUTOTUNE = False`` takes "dense" without timing). No
  crossover constants: the BSR/CSR vs dense break-even differs between machines (AVX-512 vs AMX).
  Note that backends sum in different orders, so results can differ in the last fp32 bits with the
  machine's choice.

Sizes: ``memory_bytes()`` is the size of the pattern's sparse *format*, the storage of the Triton
kernels (block: values + row pointers + block columns; N:M: kept values + packed in-group indices;
unstructured: weight + 1-bit mask + tile list; activation: the dense weight), with floats counted at
16 bits (fp16/bf16, what a deployment stores) and integers as stored, whatever backend was chosen:
a 2:4 layer is 9 bits/weight (16-bit values + 2-bit indices) also where the CPU backend keeps a
masked dense fp32 weight. The bias is left out unless ``include_bias=True``. ``bits_per_weight()``
is ``8 * memory_bytes() / (N * K)``. ``resident_bytes()`` counts what the module holds in memory
right now: every buffer of the chosen backend in its actual dtype, bias included.
"""
import math
import numbers

import torch
from torch import nn

from triton_kernels import sparse_matmul as sm
from triton_kernels.nn import _ops
from triton_kernels.nn._backend import (check_backend, check_input, cpu_dense_rows, format_nbytes, m_bucket,
                                         measured_choice, tensor_nbytes, triton_usable)

PATTERNS = ("block", "nm", "unstructured", "activation")
BACKENDS = {
    "block": ("auto", "triton", "torch_bsr", "dense"),
    "nm": ("auto", "triton", "dense"),
    "unstructured": ("auto", "triton", "torch_csr", "dense"),
    "activation": ("auto", "triton", "torch_gather", "dense"),
}
# Storage buffers per (pattern, backend); resident_bytes() counts them, memory_bytes() the Triton format's.
_BUFFERS = {
    ("block", "triton"): ("values", "row_ptr", "col_idx"),
    ("block", "torch_bsr"): ("values", "row_ptr", "col_idx"),
    ("nm", "triton"): ("values", "meta"),
    ("unstructured", "triton"): ("weight", "bits", "tile_ptr", "tile_k"),
    ("unstructured", "torch_csr"): ("crow", "col", "values"),
}


def _check_threshold(threshold) -> None:
    """pattern='activation': ``threshold`` must be a finite number >= 0 (NaN would drop every feature,
    a negative one none)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a finite number >= 0 (features with |x| >= threshold are kept), "
                        f"got {type(threshold).__name__}")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0 (features with |x| >= threshold are kept), "
                         f"got {threshold!r}")


def cpu_candidates(pattern: str, dtype: torch.dtype, block=(32, 32)) -> tuple[str, ...]:
    """The CPU backends ``auto`` chooses among for ``pattern`` and weight ``dtype`` (static order:
    the first is taken when measuring is off). torch's CSR/BSR matmuls exist only in fp32 (torch 2.13
    raises for fp16/bf16), BSR only for square blocks (MKL refuses others); N:M has no torch CPU
    kernel, so it stays a masked dense weight."""
    cands = ["dense"]
    if pattern == "block" and dtype == torch.float32 and block[0] == block[1]:
        cands.append("torch_bsr")
    if pattern == "unstructured" and dtype == torch.float32:
        cands.append("torch_csr")
    if pattern == "activation":
        cands.append("torch_gather")
    return tuple(cands)


class SparseLinear(nn.Module):
    """A sparse ``nn.Linear``; build with :meth:`from_linear`. See the module docstring."""

    def __init__(self, in_features: int, out_features: int, pattern: str, backend: str, *,
                 block=(32, 32), n=2, m=4, tile=(64, 64), threshold=None, activation_sparsity=None,
                 sparsity=0.0):
        super().__init__()
        if threshold is not None:
            _check_threshold(threshold)
        self.in_features, self.out_features = in_features, out_features
        self.pattern, self.backend = pattern, backend
        self.block, self.n, self.m, self.tile = tuple(block), n, m, tuple(tile)
        self.threshold, self.activation_sparsity = threshold, activation_sparsity
        self.sparsity = float(sparsity)  # fraction of zero weights in the effective (masked) weight
        self._format = (0, 0)  # (float values, metadata bytes); set by from_linear / load_state_dict

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: str, mask=None, sparsity=None, *, block=(32, 32),
                    n=2, m=4, tile=(64, 64), threshold=None, backend="auto", tune_m: int = 1) -> "SparseLinear":
        """A ``SparseLinear`` holding ``linear``'s weight in ``pattern``'s format (see the module docstring).

        ``backend="auto"`` on CPU times the candidate backends (``cpu_candidates``) on a (``tune_m``, K)
        input and keeps the fastest (cached per format, shape, density, dtype, M bucket, device);
        ``tune_m`` is the batch rows the layer will mostly see (1: decoding).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
        check_backend(backend, BACKENDS[pattern])
        if isinstance(tune_m, bool) or not isinstance(tune_m, int) or tune_m < 1:
            raise ValueError(f"tune_m must be a positive int (rows of the input auto times with), got {tune_m!r}")
        w = linear.weight
        if backend == "auto" and not triton_usable(w.device):
            cands = cpu_candidates(pattern, w.dtype, tuple(block))
            if len(cands) > 1:
                kw = dict(mask=mask, sparsity=sparsity, block=block, n=n, m=m, tile=tile, threshold=threshold)
                return cls._measured(linear, pattern, cands, tune_m, kw)
        w = linear.weight.detach()
        N, K = w.shape
        sm.check_weight(w, "linear.weight")
        bias = None if linear.bias is None else linear.bias.detach().clone()

        if pattern == "activation":
            if mask is not None:
                raise ValueError("mask is a weight mask; pattern='activation' takes threshold= or sparsity=")
            if (threshold is None) == (sparsity is None):
                raise ValueError("pattern='activation' needs exactly one of threshold= or sparsity= "
                                 "(target fraction of dropped input features)")
            if sparsity is not None:
                sm.check_sparsity(sparsity)
            else:
                _check_threshold(threshold)
            mod = cls(K, N, pattern, "", threshold=threshold, activation_sparsity=sparsity)
            mod.backend = mod._resolve(backend, w.device, w.dtype, 1.0)
            mod.register_buffer("weight_t", w.t().contiguous())
            mod.register_buffer("bias", bias)
            mod._format = mod._format_parts(w, None)
            return mod

        if threshold is not None:
            raise ValueError(f"threshold applies to pattern='activation' only, not {pattern!r}")
        if mask is not None and sparsity is not None:
            raise ValueError("give mask= (used exactly) or sparsity= (magnitude pruning), not both")
        if mask is not None:
            sm.check_mask(mask, w)
        elif sparsity is not None:
            if pattern == "nm":
                if abs(sparsity - (1 - n / m)) > 1e-9:
                    raise ValueError(f"sparsity={sparsity} contradicts {n}:{m} (sparsity {1 - n / m}); omit it")
                mask = sm.nm_prune(w, n, m)
            elif pattern == "block":
                mask = sm.block_prune(w, block, sparsity)
            else:
                mask = sm.magnitude_prune(w, sparsity)
        else:
            mask = w != 0
        w_eff = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
        zero_frac = float((w_eff == 0).float().mean()) if w_eff.numel() else 0.0
        mod = cls(K, N, pattern, "", block=block, n=n, m=m, tile=tile, sparsity=zero_frac)

        if pattern == "block":
            bsw = sm.to_block_sparse(w_eff, block)
            mod.backend = mod._resolve(backend, w.device, w.dtype, bsw.block_density)
            if mod.backend == "dense":
                mod.register_buffer("weight", w_eff.contiguous())
            else:
                for name in _BUFFERS[("block", "triton")]:
                    mod.register_buffer(name, getattr(bsw, name))
        elif pattern == "nm":
            nmw = sm.nm_compress(w_eff, n, m)  # raises on a mask that is not n:m
            mod.backend = mod._resolve(backend, w.device, w.dtype, n / m)
            if mod.backend == "dense":
                mod.register_buffer("weight", w_eff.contiguous())
            else:
                mod.register_buffer("values", nmw.values)
                mod.register_buffer("meta", nmw.meta)
        else:
            density = float(mask.float().mean()) if mask.numel() else 0.0
            mod.backend = mod._resolve(backend, w.device, w.dtype, density)
            if mod.backend == "triton":
                mw = sm.to_masked(w_eff, mask, tile)
                for name in _BUFFERS[("unstructured", "triton")]:
                    mod.register_buffer(name, getattr(mw, name))
            elif mod.backend == "torch_csr":
                csr = w_eff.to_sparse_csr()
                # Own copies: the accessors return views into the sparse tensor, which torch.compile
                # would then have to trace (it cannot fake a CSR base).
                mod.register_buffer("crow", csr.crow_indices().clone())
                mod.register_buffer("col", csr.col_indices().clone())
                mod.register_buffer("values", csr.values().clone())
            else:
                mod.register_buffer("weight", w_eff.contiguous())
        mod.register_buffer("bias", bias)
        mod._format = mod._format_parts(w_eff, mask)
        return mod

    @classmethod
    def _measured(cls, linear, pattern, cands, tune_m, kw) -> "SparseLinear":
        """``auto`` on CPU: build the candidates, time each once per key, keep the fastest."""
        built = {cands[0]: cls.from_linear(linear, pattern, backend=cands[0], **kw)}
        first = built[cands[0]]
        N, K = first.out_features, first.in_features
        w = linear.weight
        fmt = {"block": first.block, "nm": (first.n, first.m), "unstructured": first.tile,
               "activation": (first.threshold, first.activation_sparsity)}[pattern]
        key = ("SparseLinear", pattern, fmt, N, K, round(1.0 - first.sparsity, 2), str(w.dtype),
               m_bucket(tune_m), str(w.device), cands)
        x = torch.randn(tune_m, K, generator=torch.Generator().manual_seed(0)).to(device=w.device, dtype=w.dtype)

        def run(c):
            if c not in built:
                built[c] = cls.from_linear(linear, pattern, backend=c, **kw)
            with torch.no_grad():
                return built[c](x)
        choice = measured_choice(key, {c: (lambda c=c: run(c)) for c in cands})
        return built[choice] if choice in built else cls.from_linear(linear, pattern, backend=choice, **kw)

    def _resolve(self, backend: str, device: torch.device, dtype: torch.dtype, density: float) -> str:
        if backend == "auto":
            if triton_usable(device):
                return "triton"
            cands = cpu_candidates(self.pattern, dtype, self.block)
            if len(cands) > 1:  # from_linear measures these before it gets here
                raise AssertionError(f"auto on CPU with candidates {cands} must be measured")
            return cands[0]
        if backend == "triton" and not triton_usable(device):
            raise ValueError(f"backend='triton' needs a CUDA/ROCm device or TRITON_INTERPRET=1, weight is on {device}")
        if backend in ("torch_bsr", "torch_csr"):
            if device.type != "cpu" or dtype != torch.float32:
                raise ValueError(f"backend={backend!r} needs a float32 CPU weight (torch's sparse CPU matmul), "
                                 f"got {dtype} on {device}")
        if backend == "torch_bsr" and self.block[0] != self.block[1]:
            # torch 2.13: "MKL Sparse doesn't support matrices with non-square blocks"
            raise ValueError(f"backend='torch_bsr' needs square blocks, got block={self.block}")
        return backend

    # ------------------------------------------------------------------ storage views
    def _bsw(self):
        return sm.BlockSparseWeight(self.values, self.row_ptr, self.col_idx,
                                    (self.out_features, self.in_features), self.block)

    def _nmw(self):
        return sm.NMWeight(self.values, self.meta, (self.out_features, self.in_features), self.n, self.m)

    def _mw(self):
        return sm.MaskedWeight(self.weight, self.bits, self.tile_ptr, self.tile_k,
                               (self.out_features, self.in_features), self.tile)

    def dense_weight(self) -> torch.Tensor:
        """The effective (N, K) weight the layer multiplies by (for the activation pattern: all of it)."""
        key = (self.pattern, self.backend)
        if self.pattern == "activation":
            return self.weight_t.t()
        if key in (("block", "triton"), ("block", "torch_bsr")):
            return self._bsw().to_dense()
        if key == ("nm", "triton"):
            return self._nmw().to_dense()
        if key == ("unstructured", "triton"):
            return self._mw().to_dense()
        if key == ("unstructured", "torch_csr"):
            return torch.sparse_csr_tensor(self.crow, self.col, self.values, check_invariants=False, size=
                                           (self.out_features, self.in_features)).to_dense()
        return self.weight

    def _activation_mask(self, x):
        """The features each row keeps; NaN ones always (NaN must reach the output, as in nn.Linear)."""
        if self.threshold is not None:
            return (x.abs() >= self.threshold) | torch.isnan(x)
        K = x.shape[-1]
        kept = K - round(self.activation_sparsity * K)
        if kept == 0:
            return torch.isnan(x)
        kth = torch.topk(x.abs(), kept, dim=-1).values[..., -1:]
        return (x.abs() >= kth) | torch.isnan(x)

    # ------------------------------------------------------------------ forward
    def _weight_tensor(self) -> torch.Tensor:
        """The stored tensor whose dtype and device the input must match."""
        for name in ("weight_t", "weight", "values"):
            t = getattr(self, name, None)
            if torch.is_tensor(t):
                return t
        raise AssertionError("SparseLinear without a weight buffer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight_tensor()
        # Every backend multiplies x by the stored weight without casting (torch's CSR/BSR exist only
        # in fp32, F.linear and the kernels need one dtype), so x must have the weight's dtype.
        check_input(x, in_features=self.in_features, device=w.device, dtype=w.dtype)
        b, p, be = self.bias, self.pattern, self.backend
        if be != "triton":
            x = cpu_dense_rows(x)  # torch's CPU kernels can misread column slices (see the helper)
        if p == "activation":
            amask = self._activation_mask(x)
            if be == "triton":
                if _ops.compiling():
                    y = _ops.activation_sparse_linear(x.reshape(-1, self.in_features), self.weight_t,
                                                      amask.reshape(-1, self.in_features), b)
                    return y.reshape(*x.shape[:-1], self.out_features)
                return sm.activation_sparse_matmul(x, self.weight_t.t(), mask=amask, bias=b)
            xs = torch.where(amask, x, torch.zeros((), dtype=x.dtype, device=x.device))
            if be == "torch_gather":
                K = self.in_features
                # the gather's shape depends on the data: one opaque operator under torch.compile
                gather = _ops.gather_linear if _ops.compiling() else _ops.gather_linear_impl
                y = gather(xs.reshape(-1, K), amask.reshape(-1, K), self.weight_t, b)
                return y.reshape(*x.shape[:-1], self.out_features)
            return nn.functional.linear(xs, self.weight_t.t(), b)
        if be == "dense":
            return nn.functional.linear(x, self.weight, b)
        if be == "triton":
            if _ops.compiling():
                return self._compiled_triton_forward(x)
            if p == "block":
                return sm.block_sparse_matmul(x, self._bsw(), b)
            if p == "nm":
                return sm.nm_matmul(x, self._nmw(), b)
            return sm.packed_masked_matmul(x, self._mw(), b)
        return self._torch_sparse_forward(x)

    def _compiled_triton_forward(self, x):
        """The Triton kernels through their custom operators (``triton_kernels.nn._ops``)."""
        N, K, b = self.out_features, self.in_features, self.bias
        x2 = x.reshape(-1, K)
        if self.pattern == "block":
            y = _ops.block_sparse_linear(x2, self.values, self.row_ptr, self.col_idx, b, N, K, *self.block)
        elif self.pattern == "nm":
            y = _ops.nm_linear(x2, self.values, self.meta, b, N, K, self.n, self.m)
        else:
            y = _ops.masked_linear(x2, self.weight, self.bits, self.tile_ptr, self.tile_k, b, *self.tile)
        return y.reshape(*x.shape[:-1], N)

    def _torch_sparse_forward(self, x):
        """torch's BSR/CSR CPU matmuls (custom operators under torch.compile: sparse tensors cannot
        be built inside a graph)."""
        N, K = self.out_features, self.in_features
        x2 = x.reshape(-1, K)
        c = _ops.compiling()
        if self.backend == "torch_bsr":
            bsr = _ops.bsr_linear if c else _ops.bsr_linear_impl
            y = bsr(x2, self.row_ptr, self.col_idx, self.values, self.bias, N, K, *self.block)
        else:
            csr = _ops.csr_linear if c else _ops.csr_linear_impl
            y = csr(x2, self.crow, self.col, self.values, self.bias, N, K)
        return y.reshape(*x.shape[:-1], N)

    # ------------------------------------------------------------------ accounting
    def _format_parts(self, w_eff: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, int]:
        """(stored float values, bytes of integer metadata) of the pattern's Triton storage format.

        Counted from the layout of ``triton_kernels.sparse_matmul`` (int32 indices/bits), so it does
        not depend on the backend: block counts the blocks ``to_block_sparse`` keeps (any nonzero),
        unstructured the tiles ``to_masked`` lists (any kept entry of ``mask``).
        """
        N, K = self.out_features, self.in_features
        if self.pattern == "activation":
            return N * K, 0
        if self.pattern == "nm":
            Kp = -(-K // self.m) * self.m
            kept = Kp * self.n // self.m
            return N * kept, N * sm.nm_meta_words(kept, self.m) * 4
        if self.pattern == "block":
            bn, bk = self.block
            nbr, nbc = -(-N // bn), -(-K // bk)
            nz = sm.pad2(w_eff != 0, nbr * bn, nbc * bk).reshape(nbr, bn, nbc, bk).any(dim=3).any(dim=1)
            nnzb = int(nz.sum())
            return nnzb * bn * bk, (nbr + 1) * 4 + nnzb * 4
        tn, tk = self.tile
        ntr, ntc = -(-N // tn), -(-K // tk)
        keep = mask if mask is not None else w_eff != 0
        tiles = int(sm.pad2(keep, ntr * tn, ntc * tk).reshape(ntr, tn, ntc, tk).any(dim=3).any(dim=1).sum())
        return N * K, N * (-(-K // 32)) * 4 + (ntr + 1) * 4 + tiles * 4

    def format_values(self) -> int:
        """How many floating-point values the sparse format stores (kept values with the format's
        padding; the whole weight for the unstructured and activation formats)."""
        return self._format[0]

    def _stored_mask(self) -> torch.Tensor | None:
        """The exact keep-mask where the storage holds one (unstructured Triton bits), else None."""
        if (self.pattern, self.backend) == ("unstructured", "triton"):
            return self._mw().mask()
        return None

    def memory_bytes(self, include_bias: bool = False) -> int:
        """Bytes of the sparse format (see the module docstring): floats at 16 bits, any backend.

        The bias (also at 16 bits) only with ``include_bias=True``: it is not part of the compressed weight.
        """
        values, meta = self._format
        n = 2 * values + meta
        if include_bias and self.bias is not None:
            n += format_nbytes(self.bias)
        return n

    def bits_per_weight(self) -> float:
        """Bits per weight of the sparse format: ``8 * memory_bytes() / (N * K)``, bias excluded."""
        return 8.0 * self.memory_bytes() / (self.in_features * self.out_features)

    def resident_bytes(self) -> int:
        """Bytes of every tensor the module holds now (the chosen backend's storage and the bias)."""
        return tensor_nbytes(*(t for _, t in self.named_buffers()))

    def extra_repr(self) -> str:
        opts = {"block": f"block={self.block}", "nm": f"n={self.n}, m={self.m}",
                "unstructured": f"tile={self.tile}",
                "activation": (f"threshold={self.threshold}" if self.threshold is not None
                               else f"activation_sparsity={self.activation_sparsity}")}[self.pattern]
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern!r}, "
                f"{opts}, backend={self.backend!r}, sparsity={self.sparsity:.3f}, "
                f"bits_per_weight={self.bits_per_weight():.2f}, bias={self.bias is not None}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The number of stored blocks/values depends on the mask: take the incoming sizes.
        for name, t in list(self._buffers.items()):
            src = state_dict.get(prefix + name)
            if t is not None and src is not None and src.shape != t.shape:
                self._buffers[name] = torch.empty(src.shape, dtype=t.dtype, device=t.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # New contents, new format size (where the mask is not stored, the kept weights are the nonzeros).
        self._format = self._format_parts(self.dense_weight(), self._stored_mask())
