"""Each kernel file stays copyable alone, and the helpers it copies from another stay exact copies.

A kernel file imports only torch and triton, so it carries its own copy of what it shares with another
one: ``codebook_matmul.py`` the bit-plane packing and unpacking of ``dequant_matmul.py``, every file the
CPU-launch check ``_check_launchable``. A copy is compared by the AST of its definition (``ast.dump``:
code and docstring, not comments or formatting), so fixing one and not the other fails here.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parent.parent / "triton_kernels"
FILES = ["dequant_matmul", "codebook_matmul", "sparse_matmul", "lowrank_linear"]

# The definitions codebook_matmul.py copies from dequant_matmul.py: the packed layout (host and jit
# sides), the interpreter's bf16 dot emulation and small shared utilities.
CODEBOOK_COPIES = [
    "planes", "plane_args", "pack", "unpack", "_stream_words", "_num_words", "_num_groups", "check_bits",
    "check_group_size", "_unpack_words", "_plane_codes", "_codes_tile", "_per_weight", "_round_to_bf16",
    "_dot_acc", "_interpreting", "_num_sms",
]
# Copied into every kernel file (each names its own alternatives for CPU callers in _CPU_ALTERNATIVES).
EVERY_FILE_COPIES = ["_check_launchable", "_interpreting"]


def _definitions(name: str) -> dict[str, str]:
    """ast.dump of every top-level function of a kernel file, by name."""
    tree = ast.parse((KERNELS / f"{name}.py").read_text())
    return {n.name: ast.dump(n) for n in tree.body if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("helper", CODEBOOK_COPIES)
def test_codebook_copies_of_dequant_helpers_are_identical(helper):
    original, copy = _definitions("dequant_matmul"), _definitions("codebook_matmul")
    assert helper in original and helper in copy, f"{helper} missing from one of the files"
    assert copy[helper] == original[helper], \
        f"codebook_matmul.{helper} drifted from dequant_matmul.{helper}: copy the original over it"


@pytest.mark.parametrize("helper", EVERY_FILE_COPIES)
def test_helpers_every_kernel_file_carries_are_identical(helper):
    dumps = {name: _definitions(name).get(helper) for name in FILES}
    assert all(dumps.values()), f"{helper} missing from {[n for n, d in dumps.items() if not d]}"
    assert len(set(dumps.values())) == 1, f"the copies of {helper} differ: " + \
        ", ".join(f"{n}" for n, d in dumps.items() if d != dumps["dequant_matmul"])


# A call of each file's launcher on tiny inputs, checked against its pure-torch reference.
CALLS = {
    "dequant_matmul": "q, s, z = m.quantize_rtn(torch.randn(8, 32), 4, 16, False)\n"
                      "args = (torch.randn(2, 32), m.pack(q, 4), s, z)\n"
                      "kw = dict(bits=4, group_size=16, symmetric=False)\n"
                      "y, ref = m.dequant_matmul(*args, **kw), m.dequant_matmul_reference(*args, **kw)\n",
    "codebook_matmul": "args = (torch.randn(2, 32), m.pack(torch.randint(0, 16, (8, 32)), 4), torch.randn(1, 16))\n"
                       "y, ref = m.codebook_matmul(*args, bits=4), m.codebook_matmul_reference(*args, bits=4)\n",
    "sparse_matmul": "x, w = torch.randn(2, 32), torch.randn(8, 32)\n"
                     "nmw = m.nm_compress(w * m.nm_prune(w, 2, 4), 2, 4)\n"
                     "y, ref = m.nm_matmul(x, nmw), m.nm_matmul_reference(x, nmw)\n",
    "lowrank_linear": "x, U, V = torch.randn(2, 32), torch.randn(8, 4), torch.randn(4, 32)\n"
                      "y, ref = m.lowrank_linear(x, U, V), m.lowrank_linear_reference(x, U, V)\n",
}

# Run in `python -I` (no PYTHONPATH, no script or working directory on sys.path) with only the copy's
# directory added; the project's packages are refused even where an editable install would find them.
SCRIPT = """
import importlib.abc, sys
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("triton_kernels", "experiments", "benchmarks"):
            raise ImportError(f"a copied kernel file imported {{name}}")
sys.meta_path.insert(0, _Refuse())
sys.path.insert(0, {tmp!r})
import torch
import {name} as m
assert m.__file__.startswith({tmp!r}), m.__file__
{call}torch.testing.assert_close(y, ref.to(y.dtype), rtol=1e-4, atol=1e-4)
print("ok")
"""


@pytest.mark.parametrize("name", FILES)
def test_kernel_file_works_copied_alone(name, tmp_path):
    """Copied into an empty directory, the file imports and runs with only torch and triton around."""
    (tmp_path / f"{name}.py").write_text((KERNELS / f"{name}.py").read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    script = SCRIPT.format(tmp=str(tmp_path), name=name, call=CALLS[name])
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("ok"), proc.stdout
