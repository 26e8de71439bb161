"""Backend choice shared by the modules in ``triton_kernels.nn``."""
import os

import torch


def triton_usable(device: torch.device) -> bool:
    """The Triton kernels run on CUDA/ROCm devices, or on CPU tensors under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def check_backend(backend: str, allowed: tuple[str, ...]) -> str:
    if backend not in allowed:
        raise ValueError(f"backend={backend!r} is not one of {allowed}")
    return backend
