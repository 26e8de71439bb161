"""Backend choice, input checks and size accounting shared by the modules in ``triton_kernels.nn``."""
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


def check_input(x, *, in_features: int, device: torch.device, dtype: torch.dtype | None = None,
                dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)) -> None:
    """Validate a module's forward input ``x`` (..., in_features) before any backend sees it.

    ``dtype``: the one dtype the module requires (the weight's, for modules that do not cast);
    ``dtypes``: the activation dtypes it accepts when ``dtype`` is ``None`` (modules that cast). Raises
    ``TypeError`` for a non-tensor or a wrong dtype and ``ValueError`` for a wrong last dimension or
    device, each naming what the layer expects, so a caller never gets a raw torch shape/dtype error
    from inside a matmul.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a torch.Tensor of shape (..., {in_features}), got {type(x).__name__}")
    if dtype is not None:
        if x.dtype != dtype:
            raise TypeError(f"x.dtype ({x.dtype}) must equal the layer's dtype ({dtype}); cast x or the "
                            f"layer with .to()")
    elif x.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"x must be a {names} tensor (..., {in_features}), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}) (last dim = in_features = {in_features}), "
                         f"got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the layer's weights are on {device}; move one with .to()")


def format_nbytes(*tensors, float_bytes: int = 2) -> int:
    """Bytes of tensors in a storage format whose floating-point tensors are 16-bit (fp16/bf16).

    The modules' ``memory_bytes()`` report the *format* (what a checkpoint or a GPU deployment stores:
    codes and indices as they are, every float at ``float_bytes``), independent of the dtype the
    module happens to hold and of its backend; ``resident_bytes()`` reports what is in memory now.
    """
    return sum(t.numel() * (float_bytes if t.is_floating_point() else t.element_size())
               for t in tensors if t is not None)


def tensor_nbytes(*tensors) -> int:
    """Bytes the given tensors occupy now (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
