"""Compile-check cases, one module per kernel family.

Each module defines ``cases() -> list[Case]`` (``Case`` from ``triton_kernels.compile_cases.case``): every
autotune config of every kernel of that family, on a representative problem, with the same argument
dtypes the launcher passes. ``triton_kernels.compile_check`` compiles them all for each target; the cases
never import the check.

Import them through ``triton_kernels.compile_check``, which switches Triton's interpreter off before
``triton`` and the kernel files are imported (the cases must hold compiled kernels, not interpreted ones).
"""
from triton_kernels.compile_cases import codebook, dequant, lowrank, sparse
from triton_kernels.compile_cases.case import Case

BUILDERS = [dequant.cases, sparse.cases, lowrank.cases, codebook.cases]

__all__ = ["BUILDERS", "Case"]
