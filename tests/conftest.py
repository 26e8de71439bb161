"""Test-wide setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator executes (Triton reads it at
decoration time), so it is set here, before the kernel modules are imported by the tests.
There is no GPU on the development/CI machines: kernels run on CPU tensors through the interpreter.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ["TRITON_INTERPRET"] == "1":
    # Define every kernel now, under the interpreter: a test that unsets TRITON_INTERPRET to run the
    # modules' CPU backends as a user would (test_eval_columns, test_cli_errors, ...) must not be the first
    # to import a kernel module, or every later kernel test in that worker would get compiled kernels.
    import triton_kernels.codebook_matmul  # noqa: E402,F401
    import triton_kernels.dequant_matmul  # noqa: E402,F401
    import triton_kernels.lowrank_linear  # noqa: E402,F401
    import triton_kernels.sparse_matmul  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
