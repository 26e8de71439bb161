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


def cpu_dense_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as torch's CPU kernels should see it: contiguous (a copy only where ``x`` is not).

    Every CPU backend of the modules passes its activation through here before handing it to torch.
    Why: torch 2.13 on an Intel Xeon with AMX (``amx_bf16``) computes ``F.linear(x, w)`` wrongly
    for a bf16 ``x`` that is a column slice of a wider buffer (``buf[:, :K]``, row stride K+7,
    K=100) once M >= 17: it reads past column K, so whatever lies in the padding (NaN in the test)
    reaches the output; ``x.contiguous()`` is correct (M <= 16, K=96 or 576 were fine). A caller's
    activations are such a slice whenever they come from a fused projection (QKV) or a split.
    ``tests/test_cpu_strided_inputs.py`` shows the torch behaviour and checks every CPU backend.
    The Triton kernels take strides and need no copy. CUDA tensors are left as they are: the bug was
    seen in torch's CPU kernels, and a copy there would cost memory bandwidth for nothing known.
    """
    if x.device.type == "cpu" and not x.is_contiguous():
        return x.contiguous()
    return x
