"""Compile-check cases, one module per kernel family.

Each module defines ``cases() -> list[triton_kernels.compile_check.Case]``: every autotune config of
every kernel of that family, on a representative problem, with the same argument dtypes the launcher
passes. ``triton_kernels.compile_check`` compiles them all for each target.
"""
from triton_kernels.compile_cases import codebook, dequant, lowrank, sparse

BUILDERS = [dequant.cases, sparse.cases, lowrank.cases, codebook.cases]
