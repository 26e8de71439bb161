"""A kernel launched on CPU tensors with no GPU and no interpreter says what to do.

Without this check Triton raises ``RuntimeError: 0 active drivers ([]). There should only be one.``
The tests run in a subprocess: conftest sets TRITON_INTERPRET=1 for this process, and Triton reads it
when the kernels are defined, so only a fresh interpreter can import the kernels without it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Each launcher on small valid CPU inputs; the script prints {launcher: error message or "ran"}.
SCRIPT = r"""
import json, os, sys
import torch
from triton_kernels import dequant_matmul as dq, lowrank_linear as lr, sparse_matmul as sm
from triton_kernels import codebook_matmul as cbm
if sys.argv[1] == "late":
    os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels are already defined
torch.manual_seed(0)
N, K = 32, 64
x, w = torch.randn(3, K), torch.randn(N, K)
q, s, z = dq.quantize_rtn(w, 4, 32, False)
mask = sm.magnitude_prune(w, 0.5)
calls = {
    "dequant_matmul": lambda: dq.dequant_matmul(x, dq.pack(q, 4), s, z, bits=4, group_size=32, symmetric=False),
    "block_sparse_matmul": lambda: sm.block_sparse_matmul(x, sm.to_block_sparse(w, (16, 16))),
    "nm_matmul": lambda: sm.nm_matmul(x, sm.nm_compress(w * sm.nm_prune(w, 2, 4), 2, 4)),
    "packed_masked_matmul": lambda: sm.packed_masked_matmul(x, sm.to_masked(w, mask)),
    "masked_matmul": lambda: sm.masked_matmul(x, w, mask),
    "activation_sparse_matmul": lambda: sm.activation_sparse_matmul(x, w, threshold=0.5),
    "lowrank_linear": lambda: lr.lowrank_linear(x, torch.randn(N, 8), torch.randn(8, K)),
    "codebook_matmul": lambda: cbm.codebook_matmul(x, cbm.pack(q, 4), torch.randn(1, 16), s, bits=4, group_size=32),
}
out = {}
for name, call in calls.items():
    try:
        call()
        out[name] = "ran"
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""

# launcher -> (the nn module and the reference its message must point to)
EXPECTED = {
    "dequant_matmul": ("QuantLinear", "dequant_matmul_reference"),
    "block_sparse_matmul": ("SparseLinear", "_reference"),
    "nm_matmul": ("SparseLinear", "_reference"),
    "packed_masked_matmul": ("SparseLinear", "_reference"),
    "masked_matmul": ("SparseLinear", "_reference"),
    "activation_sparse_matmul": ("SparseLinear", "_reference"),
    "lowrank_linear": ("LowRankLinear", "lowrank_linear_reference"),
    "codebook_matmul": ("CodebookLinear", "codebook_matmul_reference"),
}


def _run(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU even on a machine that has one
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results():
    return {mode: _run(mode) for mode in ("unset", "late")}


@pytest.mark.parametrize("launcher", list(EXPECTED))
def test_cpu_launch_without_interpreter_says_what_to_do(results, launcher):
    msg = results["unset"][launcher]
    module, reference = EXPECTED[launcher]
    assert msg.startswith("RuntimeError: "), msg
    assert "active drivers" not in msg, msg
    for part in ("x is a CPU tensor", "GPU", "TRITON_INTERPRET=1 before this module is imported",
                 module, reference):
        assert part in msg, f"{part!r} missing from: {msg}"
    assert "is set now" not in msg, msg


@pytest.mark.parametrize("launcher", list(EXPECTED))
def test_interpreter_set_after_import_is_named(results, launcher):
    msg = results["late"][launcher]
    assert msg.startswith("RuntimeError: ") and "was not when this module was imported" in msg, msg


def test_interpreted_launch_still_runs_here():
    # In this process conftest set TRITON_INTERPRET=1 before the kernels were imported: no error.
    from triton_kernels import lowrank_linear as lr
    x, U, V = torch.randn(3, 16), torch.randn(8, 4), torch.randn(4, 16)
    torch.testing.assert_close(lr.lowrank_linear(x, U, V), lr.lowrank_linear_reference(x, U, V))
