"""GPU readiness without a GPU: compile every autotune config of every kernel for real targets.

    python -m triton_kernels.compile_check [--targets sm_80,sm_90,gfx942] [--out results/compile_check.csv]

``make compile-check`` refreshes the committed ``results/compile_check.csv``; ``make test`` writes its
report to ``build/compile_check.csv`` (ignored), so tests and CI leave the tracked tables alone.

For each kernel family a ``cases()`` function (in ``triton_kernels/compile_cases/``) yields one
:class:`~triton_kernels.compile_cases.case.Case` per (kernel, autotune config, representative problem).
Each case is compiled through the kernel's own ``warmup`` with a minimal fake driver installed, so the JIT
specializes exactly as it would at launch (16-byte-aligned pointers, ints divisible by 16, ints equal to
1 as constants). Imports point one way: this module imports the cases, the cases never import it.

Registers and spills come from the bundled ``ptxas -v`` on NVIDIA and from the AMDGCN metadata on AMD;
shared memory from the compiled metadata. The command fails (exit 1) on any register spill, any shared
memory above the target's per-block limit, or any config that does not compile.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

# The check compiles real GPU code; the interpreter would replace the kernels with Python. Triton reads
# TRITON_INTERPRET when it defines its own jit functions (at ``import triton``) and the kernel files' ones
# (when the cases import them), so this comes before both.
if os.environ.get("TRITON_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from triton_kernels import compile_sass  # noqa: E402
from triton_kernels.provenance import cpu_name, git_commit  # noqa: E402
from triton_kernels.compile_cases import BUILDERS, Case  # noqa: E402

# Per-block shared-memory limits in bytes (opt-in maximum), see PLATFORM.md.
TARGETS: dict[str, tuple[GPUTarget, int]] = {
    "sm_80": (GPUTarget("cuda", 80, 32), 166912),
    "sm_90": (GPUTarget("cuda", 90, 32), 232448),
    "gfx942": (GPUTarget("hip", "gfx942", 64), 65536),
}

__all__ = ["Case", "TARGETS", "all_cases", "compile_case", "main", "run"]


class _FakeDriver:
    """Just enough of a Triton driver for the JIT to pick a target and compile (no launches)."""

    def __init__(self, target: GPUTarget, device_id: int):
        self.target = target
        self.device_id = device_id  # distinct per target, else the JIT reuses the previous binary

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device_id

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):  # used by some launchers; never reached without launching
        return ty


def _nvidia_bin(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from the bundled ptxas -v."""
    ptxas = _nvidia_bin("ptxas-blackwell" if arch >= 90 else "ptxas")
    if not Path(ptxas).exists():
        ptxas = _nvidia_bin("ptxas")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(src),
                              "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log}")
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spill


def _amd_usage(amdgcn: str) -> tuple[int, int]:
    def field(key: str) -> int:
        m = re.search(rf"\.{key}:\s+(\d+)", amdgcn)
        return int(m.group(1)) if m else 0
    return field("vgpr_count"), field("vgpr_spill_count") + field("sgpr_spill_count")


def compile_case(case: Case, target_name: str, device_id: int) -> dict[str, Any]:
    target, smem_limit = TARGETS[target_name]
    row = {"kernel": case.name, "config": case.config, "target": target_name}
    # This process only compiles, never launches, so the fake driver simply stays installed.
    triton.runtime.driver.set_active(_FakeDriver(target, device_id))
    try:
        compiled = case.kernel.warmup(*case.args, grid=(1,), **case.meta)
        shared = int(compiled.metadata.shared)
        problems = []
        if target.backend == "cuda":
            regs, spills = _ptxas_usage(compiled.asm["ptx"], target.arch)
            row.update(_sass_row(case, compiled))
            if row["local_mem_instrs"]:
                problems.append("local memory")
            if case.wide_loads and (not row["weight_load_bits"]
                                    or min(int(b) for b in row["weight_load_bits"].split("/")) < 64):
                problems.append("packed weights loaded narrower than 64 bits")
        else:
            regs, spills = _amd_usage(compiled.asm["amdgcn"])
        if spills:
            problems.insert(0, "spills")
        if shared > smem_limit:
            problems.append("shared memory over limit")
        row.update(registers=regs, spill_bytes=spills, shared_bytes=shared, shared_limit=smem_limit,
                   status="; ".join(problems) or "ok")
    except Exception as e:  # a config that does not compile is a failure of the check, reported per row
        row.update(registers="", spill_bytes="", shared_bytes="", shared_limit=smem_limit,
                   status=f"compile error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    return row


def _sass_row(case: Case, compiled) -> dict[str, Any]:
    """Load widths of the packed weights (PTX def-use), local memory and MMA instructions (SASS)."""
    widths = compile_sass.ptx_weight_loads(compiled.asm["ptx"], case.weight_args) if case.weight_args else []
    counts = compile_sass.sass_counts(compiled.asm["cubin"], _nvidia_bin("cuobjdump"))
    return {**compile_sass.weight_load_facts(widths), **compile_sass.sass_facts(counts)}


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for build in BUILDERS:
        cases.extend(build())
    return cases


def run(targets: list[str], cases: list[Case] | None = None,
        progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    cases = all_cases() if cases is None else cases
    rows = []
    for t_index, t in enumerate(targets):
        for case in cases:
            if case.targets and t not in case.targets:
                continue
            rows.append(compile_case(case, t, device_id=1000 + t_index))
            if progress:
                progress(f"{t} {case.name} {case.config}: {rows[-1]['status']}")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ["kernel", "config", "target", "registers", "spill_bytes", "shared_bytes", "weight_load_bits",
            "local_mem_instrs", "tensor_core_instrs", "status"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def provenance(argv: list[str] | None = None) -> dict[str, str]:
    """Columns every row of the report carries: where and with what it was compiled, and how.

    Its own (not the harness's ``experiments.provenance``): the kernels and their tooling do not
    import the research harness. The column names are the harness's, so readers treat both alike.
    """
    args = sys.argv[1:] if argv is None else argv
    return {
        "device_type": "cpu",
        "device": f"compiled ahead of time on CPU {cpu_name()} ({torch.get_num_threads()} threads) (no GPU)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_threads": str(os.cpu_count()),
        "command": shlex.join(["python", "-m", "triton_kernels.compile_check", *args]),
    }


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``rows`` (header from the first row) through a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [], restval="")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated subset of {list(TARGETS)} (default: all)")
    p.add_argument("--out", default=None, help="write the table as CSV here (with provenance)")
    p.add_argument("--kernel", default=None, help="only cases whose kernel name contains this")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        p.error(f"--targets: unknown {unknown}; choose from {list(TARGETS)}")
    cases = all_cases()
    if args.kernel:
        cases = [c for c in cases if args.kernel in c.name]
    rows = run(targets, cases)
    print(format_table(rows))
    if args.out:
        prov = provenance(argv)
        write_csv(args.out, [{**r, **prov} for r in rows])
        print(f"wrote {args.out}")
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(bad)}/{len(rows)} configs ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
