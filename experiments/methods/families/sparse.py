"""Pruning to a sparse format: ``magnitude``, ``wanda`` and ``sparsegpt`` onto SparseLinear.

    {"method": "magnitude" | "wanda" | "sparsegpt", "sparsity": 0.5, "pattern": "unstructured"}
    {"method": "magnitude", "sparsity": 0.5, "scope": "layer"}            # one threshold per layer
    {"method": "sparsegpt", "pattern": "2:4"}                             # N:M implies the sparsity
    {"method": "wanda", "sparsity": 0.5, "pattern": "block:32x32"}

``scope`` (magnitude, wanda; unstructured only): ``"row"`` compares weights within each output row
(Wanda's per-output comparison), ``"layer"`` uses one threshold for the whole layer (the magnitude
baseline of the Wanda and SparseGPT papers). A spec without the key means ``"row"``, which is what
every magnitude row computed before the key existed used; ``"row"`` is therefore left out of the
canonical form and the label, ``"layer"`` appears in both (``magnitude-unstructured-0.5-layer``).

Each layer becomes a ``SparseLinear`` holding exactly the mask; its size is the sparse format's
``memory_bytes()`` (values + indices/metadata), whatever dense-or-sparse backend the module runs.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from experiments.methods.families.base import (damp_suffix, dense_linear, fp16_exact, is_number, parse_damp,
                                               random_linear, stored_bytes)
from experiments.methods.spec import Family, LayerResult, fail, register, register_format

SCOPES = ("row", "layer")


def prune(spec, w: torch.Tensor, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_pruned, mask)`` from the spec's pruning algorithm."""
    from experiments.methods.algorithms import prune as alg
    if spec.method == "magnitude":
        return alg.magnitude(w, sparsity=spec.sparsity, pattern=spec.pattern, scope=spec.scope or "row")
    if spec.method == "wanda":
        return alg.wanda(w, stats.sq.float(), sparsity=spec.sparsity, pattern=spec.pattern, scope=spec.scope or "row")
    return alg.sparsegpt(w, stats.hessian(), sparsity=spec.sparsity, pattern=spec.pattern, damp=spec.damp)


def sparse_module(w_hat: torch.Tensor, mask: torch.Tensor, bias, pattern: str):
    """SparseLinear over ``w_hat`` with exactly ``mask``.

    The module picks its backend (and with it what it holds) at construction: on a CPU without
    Triton, "auto" may keep the masked weight dense because that is the fastest CPU forward. Its
    ``memory_bytes()`` still describes the sparse kernel's format (values + indices/metadata), which
    is what the size columns report.
    """
    from experiments.methods.algorithms.prune import parse_pattern
    from triton_kernels.nn.sparse import SparseLinear
    kw = parse_pattern(pattern).module_kwargs()
    return SparseLinear.from_linear(dense_linear(w_hat, bias), mask=mask, **kw)


def prune_scope(spec) -> str:
    """``"row"`` or ``"layer"`` for magnitude/wanda unstructured pruning, ``""`` where it does not apply."""
    if spec.method not in ("magnitude", "wanda") or spec.pattern != "unstructured":
        return ""
    return spec.scope or "row"


class SparseFamily(Family):
    name = "sparse"
    methods = {"magnitude": frozenset({"sparsity", "pattern", "scope"}),
               "wanda": frozenset({"sparsity", "pattern", "scope"}),
               "sparsegpt": frozenset({"sparsity", "pattern", "damp"})}
    columns = ("prune_method", "pattern", "sparsity", "scope", "damp")

    def parse(self, method: str, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
        from experiments.methods.algorithms.prune import parse_pattern
        pattern = spec.get("pattern", "unstructured")
        if not isinstance(pattern, str):
            fail(where, f"pattern={pattern!r} must be a string: 'unstructured', 'N:M' (e.g. '2:4') or 'block:BNxBK'")
        try:
            pat = parse_pattern(pattern)
        except ValueError as e:
            fail(where, str(e))
        pattern = str(pat)
        sparsity = spec.get("sparsity")
        if pat.kind == "nm":
            implied = 1 - pat.n / pat.m
            if sparsity is not None and not math.isclose(float(sparsity), implied):
                fail(where, f"sparsity={sparsity!r} contradicts pattern={pattern!r} (which means sparsity {implied:g}); omit sparsity")
            sparsity = implied
        elif not is_number(sparsity) or not 0 < sparsity < 1:
            fail(where, f"sparsity={sparsity!r} must be a fraction in (0, 1) for pattern={pattern!r}")
        kw: dict[str, Any] = dict(pattern=pattern, sparsity=float(sparsity))
        if method == "sparsegpt":
            kw.update(damp=parse_damp(spec, where))
        if "scope" in spec:
            scope = spec["scope"]
            if scope not in SCOPES:
                fail(where, f"scope={scope!r} must be 'row' (compare weights within each output row) or "
                            f"'layer' (one threshold for the whole layer, the papers' magnitude baseline)")
            if pat.kind != "unstructured":
                fail(where, f"scope={scope!r} applies to pattern='unstructured' only; pattern={pattern!r} "
                            f"fixes its own groups (N:M within each row's groups of M, blocks across the layer)")
            # "row" is what a spec without the key means (and meant before the key existed): canonical None.
            kw.update(scope=None if scope == "row" else scope)
        return kw

    def label(self, spec) -> str:
        if ":" in spec.pattern and not spec.pattern.startswith("block"):
            return f"{spec.method}-{spec.pattern}{damp_suffix(spec)}"
        return (f"{spec.method}-{spec.pattern}-{spec.sparsity:g}" + ("-layer" if spec.scope == "layer" else "")
                + damp_suffix(spec))

    def needs(self, spec) -> set[str]:
        return {"sparsegpt": {"H"}, "wanda": {"sq"}}.get(spec.method, set())

    def check_fits(self, spec, shapes) -> None:
        from experiments.methods.algorithms.prune import parse_pattern
        pat = parse_pattern(spec.pattern)
        for name, (n, k) in shapes.items():
            try:
                pat.check_fits(n, k)
            except ValueError as e:
                fail("pattern", f"layer {name} ({n}x{k}): {e}")

    def compress_layer(self, spec, w, bias, stats) -> LayerResult:
        w_hat, mask = prune(spec, w, stats)
        w_hat = fp16_exact(w_hat.float() * mask)
        mod = sparse_module(w_hat, mask, bias, spec.pattern)
        return LayerResult(mod, w_hat, stored_bytes(mod), nnz=int(mask.sum()))

    def method_columns(self, spec) -> dict[str, Any]:
        # Tables written before the scope/damp columns existed lack them: there, scope is "row" for
        # every magnitude/wanda unstructured row and damp is in the spec column.
        return {"prune_method": spec.method, "pattern": spec.pattern, "sparsity": round(spec.sparsity, 6),
                "scope": prune_scope(spec), "damp": "" if spec.damp is None else spec.damp}

    def storage_format(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``SparseLinear``'s pattern: ``block`` (``"block:32x32"`` or ``block=(bn, bk)``) with its sparsity,
        ``nm`` with n and m, ``unstructured`` / ``activation`` with the sparsity."""
        pattern = str(spec.get("pattern", "unstructured")).strip().lower()
        if pattern.startswith("block"):
            block = tuple(int(v) for v in pattern.split(":", 1)[1].split("x")) if ":" in pattern \
                else tuple(spec.get("block", (32, 32)))
            return {"kind": "sparse", "pattern": "block", "sparsity": float(spec["sparsity"]), "block": block}
        if ":" in pattern:
            n, m = (int(x) for x in pattern.split(":"))
            return {"kind": "sparse", "pattern": "nm", "n": n, "m": m}
        if pattern in ("unstructured", "activation"):
            return {"kind": "sparse", "pattern": pattern, "sparsity": float(spec.get("sparsity", 0.0))}
        raise ValueError(f"spec pattern={pattern!r} is not one of 'unstructured', 'N:M' (e.g. '2:4'), "
                         "'block:BNxBK' (e.g. 'block:32x32'), 'activation'")


FAMILY = register(SparseFamily())


def _build(N, K, *, dtype, device, backend, seed, tune_m, pattern, sparsity=0.0, n=2, m=4, block=(32, 32)):
    """A magnitude mask with the format's pattern and sparsity over random weights."""
    from triton_kernels.nn.sparse import SparseLinear
    lin = random_linear(N, K, dtype, device, torch.Generator().manual_seed(seed))
    kw = {"pattern": pattern}
    if pattern == "nm":
        kw.update(n=n, m=m, sparsity=1 - n / m)  # magnitude N:M mask
    else:
        kw.update(sparsity=sparsity)
        if pattern == "block":
            kw.update(block=tuple(block))
    return SparseLinear.from_linear(lin, backend=backend, tune_m=tune_m, **kw)


register_format("sparse", _build)
