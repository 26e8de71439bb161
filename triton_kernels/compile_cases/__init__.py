"""Compile-check cases, one module per kernel family.

Each module defines ``cases() -> list[triton_kernels.compile_check.Case]``: every autotune config of
every kernel of that family, on a representative problem, with the same argument dtypes the launcher
passes. ``triton_kernels.compile_check`` compiles them all for each target.
"""
import importlib

FAMILIES = ("dequant", "sparse", "lowrank")


def _builders():
    out = []
    for fam in FAMILIES:
        try:
            mod = importlib.import_module(f"{__name__}.{fam}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{fam}":  # family not written yet
                continue
            raise
        out.append(mod.cases)
    return out


BUILDERS = _builders()
