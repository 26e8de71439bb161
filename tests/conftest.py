"""Test-wide setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator executes (Triton reads it at
decoration time), so it is set here, before the kernel modules are imported by the tests.
There is no GPU on the development/CI machines: kernels run on CPU tensors through the interpreter.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
