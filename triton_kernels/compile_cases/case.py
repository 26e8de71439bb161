"""What a compile-check case is: the lowest module of the compile check (imports no other part of it).

``triton_kernels.compile_check`` compiles the :class:`Case` objects that the family modules beside this
one (``dequant``, ``codebook``, ``sparse``, ``lowrank``) build; those import this module, never the check.
"""
from __future__ import annotations

import dataclasses
from typing import Any

# The plane arguments that are runtime ints of the bit-plane kernels (dequant, codebook); the rest of
# ``plane_args(K, bits)`` are constexprs (plane widths, alignment).
PLANE_SIZE_ARGS = ("WPR", "P1_WORD0", "P1_SHIFT", "P2_WORD0", "P2_SHIFT")


@dataclasses.dataclass
class Case:
    """One compile: ``kernel.warmup(*args, grid=(1,), **meta)``.

    ``args`` are CPU tensors (only dtype and alignment matter) and ints in the kernel's argument order;
    ``meta`` holds the constexpr meta-parameters plus ``num_warps``/``num_stages``.
    """
    kernel: Any
    name: str
    config: str
    args: tuple
    meta: dict
    weight_args: tuple = ()  # indices (among the leading tensor args) of the packed-weight pointers
    wide_loads: bool = False  # a decode kernel: packed weights must be fetched >= 64 bits at a time
    targets: tuple = ()  # the targets this case is compiled for (empty: every target asked for)


def split_plane_args(plane_args: dict) -> tuple[tuple, dict]:
    """``plane_args(K, bits)`` of a bit-plane kernel -> (its runtime ints in kernel order, its constexprs)."""
    sizes = tuple(plane_args[k] for k in PLANE_SIZE_ARGS)
    constexprs = {k: v for k, v in plane_args.items() if k not in PLANE_SIZE_ARGS}
    return sizes, constexprs
