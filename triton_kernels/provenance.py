"""Where a result came from: the checkout's git commit and the CPU's name. Shared by the kernels'
tooling (``compile_check``) and the harness (``experiments.core.provenance`` re-exports both), so the
kernels never import the harness and the two never disagree."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: The generation of the kernels' GPU code that a GPU number measured. ``make gpu-check`` writes it into
#: every row (``kernel_revision``); the docs call a GPU number *current* only when its revision is this one
#: (``python -m experiments summary``). Bump it in the commit that changes a kernel's GPU code path so
#: that earlier GPU timings no longer describe it.
#:
#: - 1: the kernels up to commit ed88e8b (the decode kernel gathered one 32-bit word per code). The one
#:   GPU run so far (NVIDIA H200, 2026-11-30) measured these; its rows predate the column.
#: - 2: from commit c64838b: whole packed words per thread, bit planes for 3/5/6/7 bits, factored group
#:   scales, split-K only where the rows are too few; the codebook kernel (added later) on that layout.
KERNEL_REVISION = 2


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """Short commit of the working tree, with '+dirty' when uncommitted changes exist.

    A copy of the tree without ``.git`` (e.g. what a remote GPU machine receives) reports the commit
    its caller passes in ``TKR_GIT_COMMIT``, else "unknown".
    """
    if not (REPO / ".git").exists() and os.environ.get("TKR_GIT_COMMIT"):
        return os.environ["TKR_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
