"""Provenance columns carried by every result row (device, versions, git commit, date)."""
from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import os
import platform
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def package_version(pkg: str) -> str:
    """The installed version of distribution ``pkg``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# One implementation with the kernels' tooling (the kernels never import the harness).
from triton_kernels.provenance import cpu_name, git_commit  # noqa: E402,F401


# The instruction-set extensions that decide which of torch's CPU kernels run and how fast: AVX-512
# (and its bf16/fp16/VNNI forms) for the weight-only int4/int8 kernels, AMX for oneDNN's bf16/int8
# GEMMs (an AMX machine runs dense bf16 GEMMs at M=16 faster than the weight-only kernels).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


@functools.lru_cache(maxsize=1)
def cpu_isa() -> str:
    """The ``ISA_FLAGS`` this CPU reports in /proc/cpuinfo, space-separated ("unknown" where it
    cannot be read, e.g. not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in ISA_FLAGS if f in have)
    except OSError:
        pass
    return "unknown"


def torch_cpu_capability() -> str:
    """The vectorized kernel set torch dispatches to on this CPU (e.g. "AVX512", "AVX2")."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def device_name(device: torch.device | str | None = None) -> str:
    """Human-readable device: the GPU name on CUDA, else the CPU model and thread count."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({torch.get_num_threads()} threads)"


def provenance(device: torch.device | str | None = None) -> dict[str, str]:
    """Columns every result row carries."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return {
        "device_type": device.type,
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host_threads": str(os.cpu_count()),
        # The host CPU on every row (on a CUDA row it is the host's, not the device's): its model
        # and the ISA extensions that decide torch's CPU kernels (PLATFORM.md: AVX-512 vs AMX).
        "cpu_model": cpu_name(),
        "cpu_isa": cpu_isa(),
        "torch_cpu_capability": torch_cpu_capability(),
    }
