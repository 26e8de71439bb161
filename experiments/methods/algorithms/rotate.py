"""Rotations (incoherence processing): an orthogonal change of basis merged into a Llama model, exactly.

Model-level, on Llama-family decoders from transformers (``model.model.embed_tokens``, blocks at
``model.model.layers`` with ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``,
``mlp.{gate,up,down}_proj``, ``model.model.norm``, ``model.lm_head``). Pure torch.

Follows QuaRot (Ashkboos et al. 2024, ``spcl/QuaRot``: ``rotation_utils.py`` ``fuse_layer_norms``,
``rotate_embeddings``, ``rotate_attention_inputs``/``_output``, ``rotate_mlp_input``/``_output``,
``rotate_head``, ``rotate_ov_proj``) for weight-only quantization. With ``Q`` orthogonal (``d x d``, the
residual width) and the row-vector convention of ``nn.Linear`` (``y = x W^T``):

1. every RMSNorm's weight is folded into the linears that read it (``W <- W diag(w)``; the final norm's
   into ``lm_head``) and set to 1, so each norm is a plain ``x / rms(x)``, which commutes with ``Q``
   (``rms(x Q) = rms(x)``);
2. the residual stream is rotated once: the embedding rows ``E <- E Q``; linears that read it
   (q/k/v, gate/up, ``lm_head``) ``W <- W Q``; linears that write it (o_proj, down_proj)
   ``W <- Q^T W``. The model computes the same function (tested: equal to the original within fp32
   rounding);
3. per attention head, v_proj's outputs and o_proj's inputs are rotated by a ``head_dim``-wide Hadamard
   ``H`` (``W_v <- blockdiag(H)^T W_v``, ``W_o <- W_o blockdiag(H)``): attention mixes tokens, not head
   dimensions, so this is exact too (QuaRot's ``rotate_ov_proj``).

What differs from QuaRot, and why:

- **Widths that are not powers of two.** QuaRot's fast Walsh-Hadamard needs ``2^k`` (or ``2^k`` times a
  stored Hadamard of order 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172). Here :func:`hadamard` builds
  ``H_12^(x a) (x) H_(2^k)`` for ``n = 12^a 2^k`` with ``H_12`` from Paley's construction (q = 11) and
  ``H_(2^k)`` from Sylvester's, normalised by ``1/sqrt(n)``: SmolLM2's residual width 576 = 12^2 * 4 and
  its MLP width 1536 = 12 * 128 are both of that form, and ``head_dim`` 64 is a power of two. Widths of no
  such form get a random orthogonal matrix (QR of a seeded Gaussian, signs fixed), as SpinQuant starts
  from; ``rotation="random"`` asks for that everywhere.
- **No online Hadamard before down_proj.** QuaRot inserts one (``H_1536`` applied to the activations at
  run time) because it quantizes activations. For weight-only quantization it would rotate down_proj's
  input columns at the cost of an extra 1536-wide transform per token in every block; this module
  merges only what is exact and free (steps 1-3), so down_proj's inputs are not rotated.
- **Tied embeddings.** Folding the final norm into ``lm_head`` and rotating makes ``lm_head``
  (``E diag(w) Q``) differ from the embedding (``E Q``): a tied model is untied (``tie_word_embeddings``
  set to False) and stores one more ``vocab x d`` matrix (for SmolLM2-135M 28.3 M parameters, 56.6 MB in
  fp16). QuaRot's models are untied to begin with.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["paley_hadamard_12", "hadamard", "random_orthogonal", "rotation_matrix", "check_architecture",
           "fuse_norms", "rotate_model"]

ATTN_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


def paley_hadamard_12() -> torch.Tensor:
    """A Hadamard matrix of order 12 (entries +-1, ``H H^T = 12 I``) by Paley's first construction, q = 11."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _factor(n: int) -> tuple[int, int] | None:
    """(a, k) with ``n = 12^a 2^k``, or None."""
    a = 0
    while n % 12 == 0 and (n // 12) > 0:
        m = n // 12
        if m & (m - 1) == 0 or m % 12 == 0:
            n, a = m, a + 1
        else:
            break
    if n & (n - 1):
        return None
    return a, n.bit_length() - 1


def hadamard(n: int) -> torch.Tensor | None:
    """The orthogonal ``n x n`` Hadamard ``H_12^(x a) (x) H_(2^k) / sqrt(n)`` (float64) for ``n = 12^a 2^k``,
    else None (module docstring)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    f = _factor(n)
    if f is None:
        return None
    a, k = f
    h = _sylvester(2 ** k)
    for _ in range(a):
        h = torch.kron(paley_hadamard_12(), h)
    return h / math.sqrt(n)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A random orthogonal ``n x n`` matrix (float64): QR of a Gaussian from ``seed``, with R's diagonal
    signs moved into Q so the draw is uniform (Haar)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def rotation_matrix(n: int, rotation: str, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(orthogonal ``n x n`` float64 matrix, what it is): ``rotation="hadamard"`` gives :func:`hadamard`
    where ``n`` allows it, else a random orthogonal matrix; ``"random"`` always the latter."""
    if rotation not in ("hadamard", "random"):
        raise ValueError(f"rotation={rotation!r} must be 'hadamard' or 'random'")
    if rotation == "hadamard":
        h = hadamard(n)
        if h is not None:
            f = _factor(n)
            return h, f"hadamard 12^{f[0]} x 2^{f[1]}"
    return random_orthogonal(n, seed), f"random orthogonal (seed {seed})"


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def check_architecture(model: nn.Module) -> None:
    """ValueError naming what is missing unless ``model`` is a Llama-family decoder this module rotates."""
    inner = getattr(model, "model", None)
    need = ["model.embed_tokens", "model.norm", "lm_head", "model.layers"]
    missing = [n for n in need if _get(model, n) is None]
    if not missing:
        b = _blocks(model)[0]
        missing = [f"model.layers.0.{n}" for n in
                   ["input_layernorm", "post_attention_layernorm", *(f"self_attn.{p}" for p in (*ATTN_IN, "o_proj")),
                    *(f"mlp.{p}" for p in (*MLP_IN, "down_proj"))] if _get(b, n) is None]
    if missing or inner is None:
        raise ValueError(f"rotations merge into Llama-family decoders (embed_tokens, RMSNorms, q/k/v/o, "
                         f"gate/up/down, lm_head); this {type(model).__name__} lacks {missing}")
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.bias is not None and name.endswith(("o_proj", "down_proj")):
            raise ValueError(f"{name} has a bias: rotating a bias of the residual stream is not supported")


def _get(mod: nn.Module, path: str):
    try:
        return mod.get_submodule(path)
    except AttributeError:
        return None


@torch.no_grad()
def _fold(norm: nn.Module, linears: list[nn.Linear]) -> None:
    w = norm.weight.detach().double()
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * w.unsqueeze(0)).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


@torch.no_grad()
def untie_lm_head(model: nn.Module) -> bool:
    """Give ``lm_head`` its own weight when it shares the embedding's; True when it did."""
    head, emb = model.lm_head, model.model.embed_tokens
    if head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = []
    return True


@torch.no_grad()
def fuse_norms(model: nn.Module) -> None:
    """Step 1 of the module docstring: every RMSNorm's weight into the linears that read it, then 1."""
    untie_lm_head(model)
    for b in _blocks(model):
        _fold(b.input_layernorm, [getattr(b.self_attn, p) for p in ATTN_IN])
        _fold(b.post_attention_layernorm, [getattr(b.mlp, p) for p in MLP_IN])
    _fold(model.model.norm, [model.lm_head])


def _reads(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.double() @ q).to(lin.weight.dtype))


def _writes(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.copy_((q.T @ lin.weight.double()).to(lin.weight.dtype))


@torch.no_grad()
def rotate_model(model: nn.Module, *, rotation: str = "hadamard", seed: int = 0, heads: bool = True) -> dict[str, str]:
    """Fold the norms and rotate ``model`` in place (module docstring, steps 1-3); returns what was used
    per rotated width, e.g. ``{"residual": "hadamard 12^2 x 2^2", "head": "hadamard 12^0 x 2^6"}``."""
    check_architecture(model)
    fuse_norms(model)
    d = model.model.embed_tokens.weight.shape[1]
    q, what = rotation_matrix(d, rotation, seed)
    used = {"residual": what}
    emb = model.model.embed_tokens
    emb.weight.copy_((emb.weight.double() @ q).to(emb.weight.dtype))
    _reads(model.lm_head, q)
    for b in _blocks(model):
        for p in ATTN_IN:
            _reads(getattr(b.self_attn, p), q)
        for p in MLP_IN:
            _reads(getattr(b.mlp, p), q)
        _writes(b.self_attn.o_proj, q)
        _writes(b.mlp.down_proj, q)
    if heads:
        hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        h, hwhat = rotation_matrix(hd, rotation, seed + 1)
        used["head"] = hwhat
        for b in _blocks(model):
            v, o = b.self_attn.v_proj, b.self_attn.o_proj
            n_kv, n_q = v.weight.shape[0] // hd, o.weight.shape[1] // hd
            hv = torch.block_diag(*[h] * n_kv)
            ho = torch.block_diag(*[h] * n_q)
            v.weight.copy_((hv.T @ v.weight.double()).to(v.weight.dtype))
            o.weight.copy_((o.weight.double() @ ho).to(o.weight.dtype))
    return used
