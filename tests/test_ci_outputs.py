"""CI writes only to ignored or temporary paths; the compile report carries its own provenance.

``make test`` once rewrote the tracked ``results/compile_check.csv``; and ``triton_kernels.compile_check``
imported the harness (``experiments.core.provenance``) to stamp its rows.
"""
import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _make_dry_run(target: str) -> list[list[str]]:
    """The commands ``make <target>`` runs (-B: as if nothing were built), the venv counted as installed."""
    venv = Path(sys.prefix)
    proc = subprocess.run(["make", "-s", "-n", "-B", "-o", str(venv / ".installed-stamp"), target, f"VENV={venv}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.replace("\\\n", " ").splitlines() if line.strip()]


def _ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0


def test_make_test_writes_no_tracked_results():
    commands = _make_dry_run("test")
    assert any("triton_kernels.compile_check" in c for c in commands), commands
    for cmd in commands:
        for arg, value in zip(cmd, cmd[1:]):
            if arg in ("--out", "--out-dir", "-o"):
                assert _ignored(value), f"make test writes {value}, which git does not ignore: {cmd}"
        assert not any(a.startswith("results/") or "/results/" in a for a in cmd), cmd


def test_triton_range_side_venvs_are_ignored():
    # CI (.ci/run, see test_project) runs `make test-triton-range`: its venvs must not dirty `git status`.
    venvs = {c[i + 2] for c in _make_dry_run("test-triton-range") for i in range(len(c) - 2)
             if c[i:i + 2] == ["-m", "venv"]}
    assert venvs == {".venv-triton3.6.0", ".venv-triton3.9.0"}, venvs
    assert all(_ignored(v + "/") for v in venvs)


def test_compile_report_has_its_own_provenance(tmp_path):
    out = tmp_path / "cc.csv"
    code = (
        "import json, sys\n"
        "from triton_kernels import compile_check as cc\n"
        f"rc = cc.main(['--targets', 'sm_80', '--kernel', 'sparse_block_64x64', '--out', {str(out)!r}])\n"
        "print(json.dumps({'rc': rc, 'harness': sorted(m for m in sys.modules\n"
        "                  if m.split('.')[0] in ('experiments', 'benchmarks'))}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "harness": []}, result
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and all(r["status"] == "ok" and r["target"] == "sm_80" for r in rows), rows
    import torch
    import triton
    for r in rows:
        assert r["torch"] == torch.__version__ and r["triton"] == triton.__version__, r
        assert r["device"].startswith("compiled ahead of time on CPU") and r["device_type"] == "cpu", r
        assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?|unknown", r["git_commit"]), r["git_commit"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", r["timestamp"]), r["timestamp"]
        assert r["command"].startswith("python -m triton_kernels.compile_check --targets sm_80"), r["command"]
