"""From a method spec to the storage format it produces, to a layer of that format built from random weights.

Latency depends on the storage format and sparsity pattern, never on which values an algorithm
chose, so the timed modules are built from random weights in the spec's format: an RTN-style
``QuantLinear`` for any spec on the same grid (RTN, GPTQ, ...), a magnitude mask with the same
pattern and sparsity for any pruning spec (magnitude, Wanda, SparseGPT), random rank-``r`` factors
for any low-rank spec. A spec's format is its family's ``storage_format`` and the builders are the
registered ``FORMATS`` (:mod:`experiments.methods.spec`): a new family with a format of its own needs
no change here.

Shared by the layer timing (:mod:`.layer_latency`), the decode timing (:mod:`.decode_speed`), the
roofline model (:mod:`.roofline`) and the figures.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

# rank_for: the low-rank family's convention (rank capped by the shape; ratio of the dense parameters kept)
from experiments.methods.families.lowrank import rank_for
from experiments.methods.spec import FORMATS, family_of

# The storage formats the modules implement (the registered FORMATS of the built-in families).
KINDS = ("dense", "quant", "codebook", "sparse", "lowrank")


def canonical(spec: dict) -> str:
    """The canonical JSON text of a spec or format (sorted keys): the key rows and tables compare."""
    return json.dumps(spec, sort_keys=True)


def format_of(spec: dict) -> dict:
    """The storage format a method spec produces, as ``{"kind": ..., **format}``: its family's
    :meth:`~experiments.methods.spec.Family.storage_format` (a new algorithm on an existing format, or
    a new family with its own format, needs no change here). A prune-then-quantize ``combo`` is timed
    as its pruning step's sparse format (it runs through a ``SparseLinear``).
    """
    if not isinstance(spec, dict) or "method" not in spec:
        raise TypeError(f"spec={spec!r} must be a dict with a 'method' key, e.g. {{'method': 'rtn', 'bits': 4, 'group_size': 64}}")
    try:
        fam = family_of(spec["method"])
    except ValueError as e:
        raise ValueError(f"spec={spec} names no known format: {e}") from None
    fmt = fam.storage_format(spec)
    if fmt is None:
        raise ValueError(f"spec={spec}: family {fam.name!r} has no per-layer storage format (it rebuilds the "
                         f"whole model); its speed is measured end to end (decode), not per layer")
    return fmt


def build_layer(kind: str, N: int, K: int, *, dtype: torch.dtype = torch.float32, device="cpu",
                backend: str = "auto", seed: int = 0, tune_m: int = 1, **fmt) -> nn.Module:
    """A layer ``[N, K]`` (out x in) in storage format ``kind`` (``experiments.methods.spec.FORMATS``:
    dense, quant, codebook, sparse, lowrank, ...), from random weights of ``dtype``.

    Sparse masks are magnitude masks with the format's pattern and sparsity; low-rank factors are
    random; codebook codes and tables random. ``tune_m``: the batch rows a sparse layer's ``auto``
    times its CPU backends with (QuantLinear measures per M bucket at its first forward).
    """
    if kind not in FORMATS:
        raise ValueError(f"kind={kind!r} must be one of {', '.join(repr(k) for k in FORMATS)}")
    return FORMATS[kind](N, K, dtype=dtype, device=device, backend=backend, seed=seed, tune_m=tune_m, **fmt)


def format_label(fmt: dict, N: int | None = None, K: int | None = None) -> str:
    """Short, stable name of a format, e.g. ``quant int4 g128 asym``, ``sparse 2:4``, ``lowrank r128``.

    A quantized format with the opt-in dense copy (``cache_dequantized``) gets `` +dense cache``; a
    low-rank format given by its ratio is named by its rank at ``N x K`` (``lowrank ratio <r>`` without
    a shape).
    """
    if fmt.get("cache_dequantized"):
        return format_label({k: v for k, v in fmt.items() if k != "cache_dequantized"}, N, K) + " +dense cache"
    if fmt["kind"] == "lowrank" and "rank" not in fmt and N is not None:
        fmt = {"kind": "lowrank", "rank": rank_for(N, K, fmt)}
    if fmt["kind"] == "lowrank" and "rank" not in fmt:
        return f"lowrank ratio {fmt['ratio']}"
    kind = fmt["kind"]
    if kind == "dense":
        return "dense fp16"
    if kind == "quant":
        g = fmt.get("group_size")
        grp = "per-channel" if g in (None, 0, -1) else f"g{g}"
        return f"quant int{fmt['bits']} {grp} {'sym' if fmt.get('symmetric') else 'asym'}"
    if kind == "codebook":
        g = fmt.get("group_size")
        grp = "per-channel" if g in (None, 0, -1) else f"g{g}"
        return f"codebook {fmt['bits']}-bit {grp} {'shared' if fmt.get('table') == 'shared' else 'per-row'} table"
    if kind == "sparse":
        p = fmt["pattern"]
        if p == "nm":
            return f"sparse {fmt['n']}:{fmt['m']}"
        if p == "block":
            bn, bk = fmt.get("block", (32, 32))
            return f"sparse block{bn}x{bk} {fmt['sparsity']:.0%}"
        if p == "activation":
            return f"sparse activation {fmt.get('act_sparsity', 0.0):.0%}"
        return f"sparse unstructured {fmt['sparsity']:.0%}"
    if kind == "lowrank":
        return f"lowrank r{fmt['rank']}"
    raise ValueError(f"format {fmt} has unknown kind; use one of {KINDS}")


def format_from_row(row: dict) -> dict | None:
    """The roofline format of a latency row (``None`` for dense rows in other dtypes than fp16)."""
    spec = json.loads(row["spec"])
    fmt = format_of(spec)
    if fmt["kind"] == "lowrank":
        fmt = {"kind": "lowrank", "rank": int(row["rank"])}
    if fmt["kind"] == "dense" and spec.get("dtype") != "fp16":
        return None
    return fmt


@contextlib.contextmanager
def triton_interpret(value: str):
    """Set TRITON_INTERPRET for the modules' backend choice inside the block, restore it after.

    The modules read it at call time (``triton_usable``), not the kernels' decorators, so this only
    steers which backend ``auto`` picks and which storage a ``backend="triton"`` module is built with.
    """
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
