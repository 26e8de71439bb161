"""Version-specific choices for the supported Triton range (3.6-3.9), checked on the installed one.

The GPU-side evidence is the compile check (``python -m triton_kernels.compile_check``) run with each
Triton; here: that the launch-time pruning applies the rule that evidence gave.
"""
import pytest
import torch
import triton

from triton_kernels import sparse_matmul as sm


@pytest.mark.parametrize("triton_3_6", [True, False])
def test_nm_keeps_only_small_tiles_on_triton_3_6(triton_3_6, monkeypatch):
    # Triton 3.6 cannot compile BLOCK_M >= 64 N:M tiles for sm_90, and its autotuner would raise.
    monkeypatch.setattr(sm, "_TRITON_3_6", triton_3_6)
    x = torch.empty(128, 4096, dtype=torch.bfloat16)
    kept = sm.prune_nm_configs(sm.nm_configs(interpret=False), {"x_ptr": x})
    block_m = {c.kwargs["BLOCK_M"] for c in kept}
    assert block_m == ({16, 32} if triton_3_6 else {16, 32, 64, 128}), block_m


def test_triton_3_6_flag_matches_the_installed_triton():
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    assert sm._TRITON_3_6 == ((major, minor) < (3, 7))
    assert (3, 6) <= (major, minor) < (4, 0), f"triton {triton.__version__} is outside the supported range"
