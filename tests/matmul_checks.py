"""Checks shared by the matmul kernel tests (dequant, codebook): NaN-padded strided inputs and the
rounding bound of a dot product."""
import torch


def sliced(shape, dtype, offset=5, extra=11):
    """x as a non-contiguous view at an offset into a wider NaN-padded buffer (catches missing masks)."""
    *lead, K = shape
    buf = torch.full((*lead, K + offset + extra), float("nan"), dtype=dtype)
    x = buf[..., offset:offset + K]
    x.copy_(torch.randn(*lead, K).to(dtype))
    return x


def assert_matmul_close(y, ref, x, w, bias, atol, rtol):
    """``|y - ref| <= atol + rtol * (|x| @ |w|^T + |bias|)`` elementwise, and no NaN in ``y``."""
    bound = x.double().abs().reshape(-1, x.shape[-1]) @ w.double().abs().T
    if bias is not None:
        bound = bound + bias.double().abs()
    bound = bound.reshape(ref.shape)
    y64, r64 = y.double(), ref.double()
    assert not torch.isnan(y64).any(), f"{int(torch.isnan(y64).sum())} NaN outputs (missed store or mask)"
    err = (y64 - r64).abs()
    rel = (err / r64.abs().clamp_min(1e-12)).max().item()
    ok = err <= atol + rtol * bound
    assert ok.all(), (f"{int((~ok).sum())}/{ok.numel()} outside tolerance: max abs err {err.max().item():.3e}, "
                      f"max rel err {rel:.3e}, worst err/bound {(err / bound.clamp_min(1e-30)).max().item():.3e} "
                      f"(rtol {rtol:.2e})")
