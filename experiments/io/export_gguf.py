"""Export a quantized Llama-architecture model to a GGUF file (llama.cpp, transformers' GGUF loader).

    report = export_gguf(model, "model.gguf", tokenizer_from="SmolLM2-135M-Instruct.Q4_1.gguf")

Each ``QuantLinear`` is written in the GGUF block type whose grid holds the toolkit's grid, from the
module's own codes and scales (no re-quantization). Every other tensor (the token embedding, an untied
``lm_head``, norms, a block linear left ``nn.Linear``) is *untouched* by the toolkit; ``untouched`` picks
how it is written:

- ``"auto"`` (default): the source GGUF's own bytes where ``source`` holds a tensor of that name and
  shape whose dequantized values equal the model's exactly (the default model's Q8_0 embedding, its F32
  norms; a dense export of a GGUF model is then its source tensor for tensor), else as ``"f16"``.
- ``"source"``: the source's bytes for every untouched tensor; a ValueError naming a tensor the source
  lacks or whose values the model changed.
- ``"f16"``: 2-D tensors in F16, 1-D ones (norms) in F32, as llama.cpp's ``convert_hf_to_gguf.py``
  writes them for ``--outtype f16``; a value outside fp16's range is a ValueError.
- ``"f32"``: everything in F32 (the only choice before; 2x the bytes of F16 for the embedding).

Why it matters: the default model's tied 49152x576 embedding is 28M of its 135M weights, and it is the
output projection too, read for every token. Written as F32 it made the export of ``rtn-w4-g64-asym``
173.1 MiB against the source file's 93.8 MiB, and llama.cpp decoded it at about half the source's speed
(issue 25); ``"auto"`` writes 93.8 MiB (the source's Q8_0 embedding), ``"f16"`` 119.1 MiB (docs/export.md).

============================  ======  ===============================================================
toolkit grid                  GGUF    block (32 weights of a row)
============================  ======  ===============================================================
symmetric, bits <= 4          Q4_0    fp16 d, nibbles q';  w = (q' - 8) d, q' = q + 8 - 2^(bits-1), d = s
asymmetric, bits <= 4         Q4_1    fp16 d, fp16 m, nibbles q;  w = q d + m, d = s, m = -z s
symmetric, 5 <= bits <= 8     Q8_0    fp16 d, int8 q';  w = q' d, q' = q - 2^(bits-1), d = s
============================  ======  ===============================================================

Groups: GGUF's blocks are 32 weights, so ``group_size`` must be 32 or a multiple of it (a group of 64
becomes two blocks with the same d, m), or ``-1`` with K a multiple of 32. Other formats (group 16,
a partial last group, asymmetric 5-8-bit grids, sparse or low-rank layers) are refused with a
``ValueError`` that says what would fit.

Exactness (checked by :func:`export_gguf`, which dequantizes every written tensor with
``gguf.quants.dequantize`` and compares it with ``QuantLinear.dequantize()``):

- Q4_0 and Q8_0 reproduce the toolkit's weights *exactly* when the scales are fp16 values (the
  harness stores fp16 scales; ``QuantLinear.from_linear`` keeps RTN's fp32 ones, which GGUF rounds).
  Both sides compute one product of a small integer and d, exact in fp32.
- Q4_1 stores the zero as the fp16 float ``m = -z s``. The toolkit's integer zero z (up to 4 bits)
  times s (an fp16 with an 11-bit significand) needs up to 15 bits, so fp16 rounds m in most groups:
  those weights differ from the toolkit's by the rounding of m, at most half an fp16 ulp of |z s|
  (|z s| * 2^-11 <= 15 s / 2048, under 1% of a quantization step). Groups where z s is an fp16
  value (z = 0, a power of two times a short s, ...) are exact. The report counts both.

``transformers`` reads the file back with ``from_pretrained(dir, gguf_file=...)`` (it dequantizes to
float and un-permutes q/k); ``q_proj``/``k_proj`` rows are written in llama.cpp's rotary order
(``convert_hf_to_gguf.py``'s ``permute``), which permutes whole rows and so never splits a block.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from experiments.core.atomic import atomic_file

GGUF_BLOCK = 32
UNTOUCHED_TYPES = ("auto", "source", "f16", "f32")
FP16_MAX = 65504.0


def gguf_type_for(bits: int, group_size: int, symmetric: bool, K: int) -> str:
    """The GGUF block type that holds this grid exactly (up to Q4_1's fp16 zero); ValueError otherwise."""
    if group_size == -1:
        if K % GGUF_BLOCK:
            raise ValueError(f"per-channel group (group_size=-1) with K={K}: GGUF blocks are {GGUF_BLOCK} weights of a "
                             f"row, so K must be a multiple of {GGUF_BLOCK}")
    elif group_size % GGUF_BLOCK or K % GGUF_BLOCK:
        raise ValueError(f"group_size={group_size} with K={K} does not fit GGUF's {GGUF_BLOCK}-weight blocks: use "
                         f"group_size 32 (or 64, 128, 256, -1: each group becomes whole blocks) with K a multiple of 32")
    if bits <= 4:
        return "Q4_0" if symmetric else "Q4_1"
    if symmetric:
        return "Q8_0"
    raise ValueError(f"an asymmetric {bits}-bit grid fits no GGUF block type exported here (Q4_1 holds "
                     f"asymmetric grids of up to 4 bits, Q8_0 symmetric grids of up to 8 bits): quantize with "
                     f"symmetric=True (-> Q8_0) or bits <= 4 (-> Q4_1)")


def _blocks(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int, qtype: str) -> np.ndarray:
    """(N, K) codes and per-32 block scales/zeros (N, K/32) -> uint8 (N, K/32 * block_bytes)."""
    N, K = q.shape
    nb = K // GGUF_BLOCK
    qb = q.reshape(N, nb, GGUF_BLOCK).to(torch.int64)
    d = s.to(torch.float16).reshape(N, nb, 1).view(torch.uint8)  # (N, nb, 2) little-endian fp16 bytes
    if qtype == "Q8_0":
        q8 = (qb - 2 ** (bits - 1)).to(torch.int8).view(torch.uint8)
        out = torch.cat([d.reshape(N, nb, 2), q8], dim=-1)
    else:
        if qtype == "Q4_0":
            qb = qb + (8 - 2 ** (bits - 1))
        nib = (qb[..., :16] | (qb[..., 16:] << 4)).to(torch.uint8)  # low nibble: 0..15, high: 16..31
        parts = [d.reshape(N, nb, 2)]
        if qtype == "Q4_1":
            m = (-(z.double() * s.double())).to(torch.float16).reshape(N, nb, 1).view(torch.uint8)
            parts.append(m.reshape(N, nb, 2))
        out = torch.cat(parts + [nib], dim=-1)
    return out.reshape(N, -1).contiguous().numpy()


def _rope_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's ``permute`` for q/k (per head: interleave the two rotary halves)."""
    hd = n_rows // n_head
    return torch.arange(n_rows).reshape(n_head, 2, hd // 2).transpose(1, 2).reshape(-1)


def _config_value(cfg, name: str, default=None):
    v = getattr(cfg, name, None)
    if v is None and name == "rope_theta":
        rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        v = rp.get("rope_theta") if isinstance(rp, dict) else None
    return default if v is None else v


def _copy_tokenizer(writer, source: str | os.PathLike) -> int:
    import gguf
    reader = gguf.GGUFReader(str(source))
    n = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        val = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, val)
        else:
            writer.add_key_value(name, val, vtype)
        n += 1
    return n


def _source_tensors(source: str | os.PathLike | None) -> dict[str, Any]:
    """GGUF name -> ReaderTensor of the source file ({} without one)."""
    if source is None:
        return {}
    import gguf
    return {t.name: t for t in gguf.GGUFReader(str(source)).tensors}


def _untouched_tensor(gname: str, arr: torch.Tensor, src, mode: str) -> tuple[np.ndarray, Any, str]:
    """(array, raw GGML type or None, type name) for an untouched tensor ``arr`` (fp32, GGUF row order).

    The source's bytes are passed through unchanged only when they dequantize to exactly ``arr``: then the
    file holds the model's values and the source's type (see the module docstring for the modes)."""
    import gguf
    why = None
    if mode in ("auto", "source"):
        if src is None:
            why = "the source GGUF has no tensor of that name"
        elif tuple(int(d) for d in reversed(src.shape.tolist())) != tuple(arr.shape):
            why = (f"the source's tensor has shape {tuple(int(d) for d in reversed(src.shape.tolist()))}, the "
                   f"model's {tuple(arr.shape)}")
        else:
            raw = np.ascontiguousarray(src.data).view(np.uint8)   # (rows, row bytes) or (bytes,): any type
            try:
                back = torch.from_numpy(np.array(gguf.quants.dequantize(raw, src.tensor_type), dtype=np.float32))
            except NotImplementedError:
                back = None
                why = f"the gguf package cannot dequantize its type {src.tensor_type.name} to check it"
            if back is not None and torch.equal(back.reshape(arr.shape), arr):
                return raw, src.tensor_type, src.tensor_type.name
            if back is not None:
                diff = (back.reshape(arr.shape) - arr).abs().max().item()
                why = (f"the model's values differ from the source's {src.tensor_type.name} tensor (max abs diff "
                       f"{diff:.3g}): they changed after loading")
        if mode == "source":
            raise ValueError(f"untouched='source': cannot pass {gname} through from the source GGUF: {why}; "
                             f"use untouched='f16' or 'f32' (or 'auto': the source's bytes where they fit)")
    if mode == "f32" or arr.dim() == 1:
        return arr.contiguous().numpy(), None, "F32"
    top = arr.abs().max().item() if arr.numel() else 0.0
    if not top <= FP16_MAX:   # also catches NaN
        raise ValueError(f"{gname}: values up to {top:.6g} do not fit F16 (largest {FP16_MAX:g}); export with "
                         f"untouched='f32'")
    return arr.to(torch.float16).contiguous().numpy(), None, "F16"


def export_gguf(model: nn.Module, path: str | os.PathLike, *, name: str | None = None,
                tokenizer_from: str | os.PathLike | None = None, source: str | os.PathLike | None = None,
                untouched: str = "auto") -> dict[str, Any]:
    """Write ``model`` (Llama architecture, its block linears ``QuantLinear`` or ``nn.Linear``) to ``path``.

    ``source``: the GGUF file the model was loaded from (``models.default_gguf_path()`` for the default
    model), whose tensors ``untouched`` may pass through (module docstring); ``untouched`` is one of
    ``UNTOUCHED_TYPES``. ``tokenizer_from`` (default: ``source``): a GGUF file whose ``tokenizer.*``
    metadata is copied (llama.cpp needs it; the default model's file has it). Returns ``{"path",
    "tensors": {gguf name: type}, "exact": bool, "inexact_weights", "inexact_groups", "max_abs_diff",
    "untouched", "passed_through"}``: the comparison of the file's dequantized quantized weights with the
    toolkit's (see the module docstring for what is exact), the ``untouched`` mode and how many tensors
    are the source's bytes. ``path`` appears complete or not at all (written beside it, fsynced, renamed:
    experiments.core.atomic); an existing file is replaced.
    """
    import gguf
    from experiments.lm import models

    if untouched not in UNTOUCHED_TYPES:
        raise ValueError(f"untouched={untouched!r}: give one of {', '.join(UNTOUCHED_TYPES)}")
    if untouched == "source" and source is None:
        raise ValueError("untouched='source' needs source=, the GGUF file the model was loaded from; without one "
                         "use 'auto', 'f16' or 'f32'")
    if tokenizer_from is None:
        tokenizer_from = source

    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        raise ValueError(f"GGUF export supports the Llama architecture (config.model_type 'llama'); this model is "
                         f"{getattr(cfg, 'model_type', type(model).__name__)!r}")
    blocks = models.find_blocks(model)
    n_head, n_kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    head_dim = int(_config_value(cfg, "head_dim", cfg.hidden_size // n_head))
    for i, b in enumerate(blocks):
        a = b.self_attn
        qn = a.q_proj.out_features
        if qn != n_head * head_dim:
            raise ValueError(f"block {i} has {qn // head_dim} query heads, the config {n_head}: GGUF's llama "
                             f"metadata has one head count for all blocks (structurally pruned heads do not export)")

    # Check every layer before writing anything.
    plan: list[tuple[str, Any]] = []
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, len(blocks))
    for hf_name, t in model.state_dict().items():
        mod_name, _, leaf = hf_name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        kind = type(mod).__name__
        if kind in ("SparseLinear", "LowRankLinear") or (kind not in ("QuantLinear",) and hasattr(mod, "memory_bytes")):
            raise ValueError(f"layer {mod_name} is a {kind}: GGUF stores dense (float or block-quantized) weights; "
                             f"export a quantized model (rtn/gptq, see gguf_type_for) or the dense one")
        if kind == "QuantLinear":
            if leaf != "packed":
                if leaf == "bias":
                    raise ValueError(f"layer {mod_name} has a bias; llama GGUF files have none")
                continue
            gguf_type_for(mod.bits, mod.group_size, mod.symmetric, mod.in_features)  # raises with the fix
        if hf_name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue  # tied to token_embd: a file without output.weight is read back tied
        gname = tmap.get_name(mod_name)
        if gname is None:
            raise ValueError(f"tensor {hf_name} has no GGUF llama name (gguf.get_tensor_name_map)")
        plan.append((f"{gname}.{leaf if kind != 'QuantLinear' else 'weight'}", (mod_name, leaf, mod, t)))

    writer = gguf.GGUFWriter(None, "llama")   # the file is opened by write_header_to_file below
    writer.add_name(name or getattr(cfg, "name_or_path", "") or "compressed")
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(len(blocks))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_config_value(cfg, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(int(cfg.vocab_size))
    n_tok = _copy_tokenizer(writer, tokenizer_from) if tokenizer_from else 0
    src_tensors = _source_tensors(source)

    stats = {"inexact_weights": 0, "inexact_groups": 0, "max_abs_diff": 0.0, "n_quantized": 0, "passed_through": 0}
    types: dict[str, str] = {}
    for gname, (mod_name, leaf, mod, t) in plan:
        rows = None
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            rows = _rope_rows(mod.out_features, n_head if "attn_q" in gname else n_kv)
        if type(mod).__name__ == "QuantLinear":
            from triton_kernels import dequant_matmul as dq
            qtype = gguf_type_for(mod.bits, mod.group_size, mod.symmetric, mod.in_features)
            K = mod.in_features
            gs = K if mod.group_size == -1 else mod.group_size
            per = gs // GGUF_BLOCK
            q = dq.unpack(mod.packed, mod.bits, K)
            nb = K // GGUF_BLOCK  # a partial last group of a multiple of 32 is whole blocks too
            s = mod.scales.float().repeat_interleave(per, dim=1)[:, :nb]
            z = None if mod.symmetric else mod.zeros.float().repeat_interleave(per, dim=1)[:, :nb]
            want = mod.dequantize().float()
            if rows is not None:
                q, s, want = q[rows], s[rows], want[rows]
                z = None if z is None else z[rows]
            raw = _blocks(q, s, z, mod.bits, qtype)
            got = torch.from_numpy(gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype)))
            diff = (got.reshape(want.shape) - want).abs()
            bad = diff > 0
            stats["inexact_weights"] += int(bad.sum())
            stats["inexact_groups"] += int(bad.reshape(want.shape[0], -1, GGUF_BLOCK).any(-1).sum())
            stats["max_abs_diff"] = max(stats["max_abs_diff"], float(diff.max()))
            stats["n_quantized"] += want.numel()
            writer.add_tensor(gname, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
            types[gname] = qtype
        else:
            arr = t.detach().float()
            if rows is not None:
                arr = arr[rows]
            data, raw_dtype, types[gname] = _untouched_tensor(gname, arr, src_tensors.get(gname), untouched)
            stats["passed_through"] += raw_dtype is not None
            writer.add_tensor(gname, data, raw_dtype=raw_dtype)
    # Written to a temporary file beside ``path``, fsynced and renamed into place once complete
    # (experiments.core.atomic): a failure (a full disk) leaves nothing at ``path`` and no temporary file.
    with atomic_file(path) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        except BaseException:
            with contextlib.suppress(OSError):   # after a write error, closing only releases the handle
                writer.close()
            raise
    return {"path": str(Path(path)), "tensors": types, "exact": stats["inexact_weights"] == 0,
            "tokenizer_fields": n_tok, "untouched": untouched, **stats}
