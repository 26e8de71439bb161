"""The compression-family interface and its registry.

A *family* is everything the harness knows about one kind of compression: which ``method`` names
it answers to and which options each accepts, how it validates a spec and fills its defaults, its
labels, the calibration statistics it needs, whether a setting fits a model's layers, how it
compresses (one linear layer at a time, or the whole model at once), how many bytes the result
stores, the flat columns it fills in a sweep table, and the per-layer storage format its specs
produce (with :func:`register_format`, how ``experiments.measure.latency`` builds such a layer to time it). :mod:`experiments.methods.compress` (the driver)
asks the registry and never names a family; adding one is adding a module that subclasses
:class:`Family` and calls :func:`register` (imported from :mod:`experiments.methods.families`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from experiments.methods.compress import CompressionReport, MethodSpec

# GPTQ's and SparseGPT's damping (relative to mean(diag H)), as in their reference code; labels
# name a damping only when it differs from this value (the former default of every method).
DEFAULT_DAMP = 0.01


def fail(where: str, msg: str) -> None:
    """Raise the ``ValueError`` every spec check raises: ``"<where>: <what is wrong, what would fit>"``."""
    raise ValueError(f"{where}: {msg}")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_damp(spec: Mapping[str, Any], where: str, default: float = DEFAULT_DAMP) -> float:
    d = spec.get("damp", default)
    if not is_number(d) or not 0 <= d < 1:
        fail(where, f"damp={d!r} must be in [0, 1) (fraction of the mean diagonal of H added before inverting)")
    return float(d)


def damp_suffix(spec: "MethodSpec") -> str:
    """``-damp<d>`` for a label when the damping differs from :data:`DEFAULT_DAMP`, else ``""``."""
    return f"-damp{spec.damp:g}" if spec.damp is not None and spec.damp != DEFAULT_DAMP else ""


def check_group_fits(group_size: int, shapes: Mapping[str, tuple[int, int]]) -> None:
    """A group (of weights sharing a scale) must not be larger than the smallest K of the layers."""
    ks = sorted({k for _, k in shapes.values()})
    if group_size != -1 and group_size > ks[0]:
        fail("group_size", f"group_size={group_size} is larger than the layer's in_features K={ks[0]} "
                           f"(layers have K in {ks}); use a group size <= {ks[0]} (a partial last group is fine) "
                           f"or -1 for one group per output channel")


def fp16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back: the values a deployment stores, kept in fp32 for the fp32 evaluation."""
    return t.to(torch.float16).float()


def dense_linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def stored_bytes(mod: nn.Module) -> int:
    """``memory_bytes()`` of the module: its storage format, floats at 16 bits, bias excluded.

    The evaluation runs in fp32 (the model's dtype), but a compressed layer is deployed with fp16
    floats (scales, factors, kept values), and the ratio is taken against fp16 dense weights. The
    modules count their formats that way whatever dtype and backend they hold; the values were
    rounded to fp16 before the module was built (see :func:`fp16_exact`), so this is the size of
    exactly what was evaluated. The bias is not compressed and is counted on neither side.
    """
    return int(mod.memory_bytes())


@dataclass
class LayerResult:
    """What a layer-level family returns for one linear layer."""

    module: nn.Module  # the real compressed module that replaces the layer (never a dense copy)
    w_hat: torch.Tensor  # fp32 (N, K): the dense weight the module computes with
    bytes: int  # the module's format size (stored_bytes), bias excluded
    rank: int | None = None
    nnz: int | None = None
    modelled: bool = False  # True when ``bytes`` is a size model rather than a real module's format


class Family:
    """One compression family. Subclasses set the class attributes and override what applies."""

    name: str = ""
    # method name -> the option names it accepts ("method" itself is always accepted)
    methods: Mapping[str, frozenset[str]] = {}
    # flat sweep-table columns this family fills (the union over families = every table's method columns)
    columns: tuple[str, ...] = ()
    # "layer": the driver calls compress_layer for every linear of every block, block by block with
    # calibration statistics; "model": the driver calls compress_model once (it may rewrite the model)
    level: str = "layer"

    def parse(self, method: str, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Validated options with defaults filled (the canonical form; a ``None`` value is omitted)."""
        raise NotImplementedError

    def label(self, spec: "MethodSpec") -> str:
        return spec.method

    def needs(self, spec: "MethodSpec") -> set[str]:
        """Per-layer calibration statistics: ``"H"`` (X^T X / n) and/or ``"sq"`` (sum of x^2 per input)."""
        return set()

    def check_fits(self, spec: "MethodSpec", shapes: Mapping[str, tuple[int, int]]) -> None:
        """Raise ``ValueError`` naming the option if ``spec`` does not fit a layer (N, K) in ``shapes``."""

    def compress_layer(self, spec: "MethodSpec", w: torch.Tensor, bias: torch.Tensor | None,
                       stats: Any) -> LayerResult:
        raise NotImplementedError(f"family {self.name!r} works on whole models (level={self.level!r})")

    def compress_model(self, model: nn.Module, spec: "MethodSpec", calib_ids: torch.Tensor | None, *,
                       progress: bool = True) -> "CompressionReport":
        raise NotImplementedError(f"family {self.name!r} compresses layer by layer (level={self.level!r})")

    def method_columns(self, spec: "MethodSpec") -> dict[str, Any]:
        """Values for (a subset of) :attr:`columns`; the driver leaves the others empty."""
        return {}

    def storage_format(self, spec: Mapping[str, Any]) -> dict[str, Any] | None:
        """The per-layer storage format a spec dict produces, ``{"kind": <a registered format>, ...}``
        (what ``experiments.measure.latency`` times with random weights: a format's speed does not depend on the
        algorithm that chose its values). ``None``: no per-layer format (a model-level family whose
        result is an ordinary, smaller model)."""
        return None


FAMILIES: dict[str, Family] = {}
_BY_METHOD: dict[str, Family] = {}
# storage-format kind -> builder(N, K, *, dtype, device, backend, seed, tune_m, **format) of a layer in
# that format from random weights (see register_format)
FORMATS: dict[str, Callable[..., nn.Module]] = {}


def register_format(kind: str, build: Callable[..., nn.Module]) -> None:
    """Teach ``experiments.measure.latency`` to build a layer of storage-format ``kind`` from random weights:
    ``build(N, K, *, dtype, device, backend, seed, tune_m, **format_options) -> nn.Module``."""
    if kind in FORMATS:
        raise ValueError(f"a storage format named {kind!r} is already registered")
    FORMATS[kind] = build


def random_linear(N: int, K: int, dtype: torch.dtype, device, generator: torch.Generator) -> nn.Linear:
    """An ``nn.Linear(K, N)`` without bias, weights ~ N(0, 1/K) from ``generator`` (the format builders' input)."""
    lin = nn.Linear(K, N, bias=False)
    w = torch.randn(N, K, generator=generator) * (1.0 / math.sqrt(K))
    lin.weight.data = w.to(device=device, dtype=dtype)
    return lin


def register(family: Family) -> Family:
    """Add ``family`` to the registry; its name and method names must be new."""
    if family.level not in ("layer", "model"):
        raise ValueError(f"family {family.name!r}: level={family.level!r} must be 'layer' or 'model'")
    if family.name in FAMILIES:
        raise ValueError(f"a compression family named {family.name!r} is already registered")
    clash = sorted(set(family.methods) & set(_BY_METHOD))
    if clash:
        raise ValueError(f"family {family.name!r}: method(s) {clash} already belong to "
                         f"{sorted({_BY_METHOD[m].name for m in clash})}")
    FAMILIES[family.name] = family
    for m in family.methods:
        _BY_METHOD[m] = family
    return family


def methods() -> tuple[str, ...]:
    """Every method name the registered families answer to, in registration order."""
    return tuple(_BY_METHOD)


def family_of(method: str, where: str = "method spec") -> Family:
    fam = _BY_METHOD.get(method)
    if fam is None:
        fail(where, f"unknown method={method!r}; choose one of {', '.join(methods())}")
    return fam


def option_names() -> frozenset[str]:
    """Every option any registered method accepts (the attributes a ``MethodSpec`` answers)."""
    return frozenset().union(*(o for f in FAMILIES.values() for o in f.methods.values()))


def all_columns() -> tuple[str, ...]:
    """The method columns of a sweep table: the families' columns, in registration order, once each."""
    out: list[str] = []
    for f in FAMILIES.values():
        out.extend(c for c in f.columns if c not in out)
    return tuple(out)
