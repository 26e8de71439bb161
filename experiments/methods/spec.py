"""What a compression method is: its spec, the family interface that gives it meaning, the registry
of families and storage formats, and the report a compression returns. The lowest module of
:mod:`experiments.methods`: the families, the algorithms and the driver import it, it imports none of them.

- :class:`MethodSpec` (one setting: a method, its options, and (``combo``) its steps) and
  :func:`parse_spec`, which validates a plain-data spec through the family that owns the method.
- :class:`Family`: everything the harness knows about one kind of compression (which ``method`` names
  it answers to and which options each accepts, how it validates a spec and fills its defaults, its
  labels, the calibration statistics it needs, whether a setting fits a model's layers, how it
  compresses (one linear layer at a time, or the whole model at once), how many bytes the result
  stores, the flat columns it fills in a sweep table, and the per-layer storage format its specs
  produce). :func:`register` adds one; :func:`family_of` finds a method's family.
- :data:`FORMATS` / :func:`register_format`: how a layer of each storage format is built from random
  weights (what ``experiments.measure`` times).
- :class:`LayerRecord` and :class:`CompressionReport`: what :func:`experiments.methods.compress.compress_model`
  (the driver) returns.

The built-in families register themselves when :mod:`experiments.methods.families` is imported, which
importing any module of :mod:`experiments.methods` does (the package's ``__init__``); adding a family is
adding a module there that subclasses :class:`Family` and calls :func:`register`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn


def fail(where: str, msg: str) -> None:
    """Raise the ``ValueError`` every spec check raises: ``"<where>: <what is wrong, what would fit>"``."""
    raise ValueError(f"{where}: {msg}")


# ----------------------------------------------------------------------------- the method spec

class MethodSpec:
    """One compression setting: a method, its options, and (``combo``) its steps. Immutable.

    Build it with :func:`parse_spec` (which validates and fills defaults). Every option a registered
    family knows is readable as an attribute (``spec.bits``, ``spec.pattern`` ...), ``None`` when
    this spec does not set it.
    """

    __slots__ = ("method", "steps", "_options")

    def __init__(self, method: str, steps: tuple["MethodSpec", ...] = (), **options: Any):
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "steps", tuple(steps))
        object.__setattr__(self, "_options", tuple(sorted((k, v) for k, v in options.items() if v is not None)))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        for k, v in self._options:
            if k == name:
                return v
        if name in option_names():
            return None
        raise AttributeError(f"MethodSpec has no option {name!r}; the registered methods accept "
                             f"{sorted(option_names())}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("MethodSpec is immutable; build a new one with parse_spec")

    def __reduce__(self):
        # Pickling (Ray, multiprocessing) must go through __init__: the default protocol would setattr.
        return (_make_spec, (self.method, self.steps, self._options))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MethodSpec):
            return NotImplemented
        return (self.method, self.steps, self._options) == (other.method, other.steps, other._options)

    def __hash__(self) -> int:
        return hash((self.method, self.steps, self._options))

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self._options)
        steps = f", steps={self.steps!r}" if self.steps else ""
        return f"MethodSpec({self.method!r}{opts}{steps})"

    @property
    def family(self) -> str:
        """The name of the family the method belongs to (``"quant"``, ``"sparse"`` ...)."""
        return family_of(self.method).name

    def _step_of(self, family: str) -> "MethodSpec | None":
        if self.family == family:
            return self
        return next((s for s in self.steps if s.family == family), None)

    @property
    def prune_step(self) -> "MethodSpec | None":
        """The spec itself, or its step, that prunes to a sparse format (``None`` if none does)."""
        return self._step_of("sparse")

    @property
    def quant_step(self) -> "MethodSpec | None":
        """The spec itself, or its step, that quantizes onto the uniform grid (``None`` if none does)."""
        return self._step_of("quant")

    def needs(self) -> set[str]:
        """Calibration statistics the method needs: "H" (X^T X / n), "sq" (sum of x^2) and/or "fisher"
        (per-weight squared gradients of the dense model's loss)."""
        return family_of(self.method).needs(self)

    def to_dict(self) -> dict[str, Any]:
        """Canonical plain-data form (only the options that are set): stable across runs."""
        d: dict[str, Any] = {"method": self.method, **dict(self._options)}
        if self.steps:
            d["steps"] = [s.to_dict() for s in self.steps]
        return d

    def label(self) -> str:
        """Short human-readable label, e.g. ``gptq-w3-g64-asym-act`` or ``sparsegpt-2:4+gptq-w4-g64-asym``."""
        return family_of(self.method).label(self)


def _make_spec(method: str, steps: tuple, options: tuple) -> MethodSpec:
    return MethodSpec(method, steps, **dict(options))


def parse_spec(spec: Mapping[str, Any] | MethodSpec, *, where: str = "method spec") -> MethodSpec:
    """Validate a plain-data spec and fill defaults; ``ValueError`` names the bad option."""
    if isinstance(spec, MethodSpec):
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a mapping like {{'method': 'rtn', 'bits': 4}}, got {type(spec).__name__}")
    method = spec.get("method")
    fam = family_of(method, where)
    accepted = fam.methods[method]
    unknown = set(spec) - accepted - {"method"}
    if unknown:
        fail(where, f"unknown option(s) {sorted(unknown)} for method={method!r}; "
                    f"it accepts {sorted(accepted) or 'no options'}")
    return MethodSpec(method, **fam.parse(method, spec, where))


# ----------------------------------------------------------------------------- the family interface

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
    # True when the family changes tensors outside the layers it compresses (AWQ folds its scales into the
    # norms): a saved point must then carry the model's other tensors (experiments.run.saving includes them)
    rewrites_base: bool = False

    def parse(self, method: str, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Validated options with defaults filled (the canonical form; a ``None`` value is omitted)."""
        raise NotImplementedError

    def label(self, spec: "MethodSpec") -> str:
        return spec.method

    def needs(self, spec: "MethodSpec") -> set[str]:
        """Per-layer calibration statistics: ``"H"`` (X^T X / n), ``"sq"`` (sum of x^2 per input) and/or
        ``"fisher"`` (the layer's (N, K) per-weight Fisher of the dense model, ``stats.fisher``)."""
        return set()

    def check_fits(self, spec: "MethodSpec", shapes: Mapping[str, tuple[int, int]]) -> None:
        """Raise ``ValueError`` naming the option if ``spec`` does not fit a layer (N, K) in ``shapes``."""

    def compress_layer(self, spec: "MethodSpec", w: torch.Tensor, bias: torch.Tensor | None,
                       stats: Any) -> LayerResult:
        raise NotImplementedError(f"family {self.name!r} works on whole models (level={self.level!r})")

    def compress_model(self, model: nn.Module, spec: "MethodSpec", calib_ids: torch.Tensor | None, *,
                       driver: Callable[..., "CompressionReport"], progress: bool = True) -> "CompressionReport":
        """Compress the whole model in place (``level = "model"``). ``driver`` is the driver's own
        ``compress_model(model, spec, calib_ids, progress=...)``, handed down by the driver for a family
        that compresses the layers of its result further (structured pruning, then quantization): a
        family never imports the driver."""
        raise NotImplementedError(f"family {self.name!r} compresses layer by layer (level={self.level!r})")

    def method_columns(self, spec: "MethodSpec") -> dict[str, Any]:
        """Values for (a subset of) :attr:`columns`; the driver leaves the others empty."""
        return {}

    def uniform_grid(self, spec: "MethodSpec") -> dict[str, Any] | None:
        """The uniform grid the spec's weights end on, ``{"bits", "group_size", "symmetric",
        "integer_zero"}`` (what decides whether it can reproduce an already-quantized source model's
        weights: :func:`experiments.lm.models.aliases_source_grid`), or ``None`` (no uniform grid)."""
        return None

    def storage_format(self, spec: Mapping[str, Any]) -> dict[str, Any] | None:
        """The per-layer storage format a spec dict produces, ``{"kind": <a registered format>, ...}``
        (what ``experiments.measure`` times with random weights: a format's speed does not depend on the
        algorithm that chose its values). ``None``: no per-layer format (a model-level family whose
        result is an ordinary, smaller model)."""
        return None


# ----------------------------------------------------------------------------- the registry

FAMILIES: dict[str, Family] = {}
_BY_METHOD: dict[str, Family] = {}
# storage-format kind -> builder(N, K, *, dtype, device, backend, seed, tune_m, **format) of a layer in
# that format from random weights (see register_format)
FORMATS: dict[str, Callable[..., nn.Module]] = {}


def register_format(kind: str, build: Callable[..., nn.Module]) -> None:
    """Teach ``experiments.measure`` to build a layer of storage-format ``kind`` from random weights:
    ``build(N, K, *, dtype, device, backend, seed, tune_m, **format_options) -> nn.Module``."""
    if kind in FORMATS:
        raise ValueError(f"a storage format named {kind!r} is already registered")
    FORMATS[kind] = build


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


# ----------------------------------------------------------------------------- the report

@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]  # (out_features N, in_features K)
    module: str  # class name of the module that replaced the layer
    bytes: int
    fp16_bytes: int
    weight_sq_error: float  # ||W - W_hat||_F^2
    weight_sq_norm: float  # ||W||_F^2
    rank: int | None = None
    nnz: int | None = None


@dataclass
class CompressionReport:
    spec: MethodSpec
    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0
    size_is_modelled: bool = False
    # Optional (``keep_weights=True``): the dense W_hat of every compressed layer, for tests.
    weights: dict[str, torch.Tensor] | None = None
    # Columns a family adds to its rows beyond the spec's (``mixed``: the per-layer ``allocation``);
    # :meth:`summary` includes them.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_weights(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.layers)

    @property
    def fp16_bytes(self) -> int:
        return sum(r.fp16_bytes for r in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.n_weights if self.layers else float("nan")

    @property
    def compression_vs_fp16(self) -> float:
        return self.fp16_bytes / self.bytes if self.bytes else float("nan")

    @property
    def weight_rel_error(self) -> float:
        """sqrt(sum ||W - W_hat||^2 / sum ||W||^2) over the compressed layers (0 for dense)."""
        num = sum(r.weight_sq_error for r in self.layers)
        den = sum(r.weight_sq_norm for r in self.layers)
        return math.sqrt(num / den) if den else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "n_layers": len(self.layers),
            "n_weights": self.n_weights,
            "bytes": self.bytes,
            "fp16_bytes": self.fp16_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "compression_vs_fp16": round(self.compression_vs_fp16, 4),
            "weight_rel_error": float(f"{self.weight_rel_error:.6g}"),
            "compress_seconds": round(self.seconds, 2),
            "size_is_modelled": self.size_is_modelled,
            **self.extra,
        }


def fp16_bytes(n: int, k: int) -> int:
    """The dense fp16 size of an (N, K) weight; the bias is excluded, as in the modules' ``memory_bytes()``."""
    return 2 * n * k
