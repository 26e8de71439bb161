"""Save a compressed model and load it back, bit for bit, without recompressing.

    save_compressed(model, report_or_spec, out_dir, base_model="default", calibration={...})
    model = load_compressed(out_dir)                  # layers are QuantLinear / SparseLinear / ...

A saved directory holds

- ``layers.safetensors``: the compressed modules' *own* storage, one entry per buffer, named
  ``<module path>.<buffer>`` (QuantLinear: ``packed``, ``scales``, ``zeros``, ``bias``; SparseLinear: the
  tensors of its format and backend, e.g. ``values``/``meta`` for N:M; LowRankLinear: ``U``, ``V``,
  ``bias``; a block linear that stayed an ``nn.Linear``, e.g. a structurally pruned one: ``weight``,
  ``bias``). Dtypes are kept as the module holds them (fp16 scales stay fp16), so a reload is exact.
- ``base.safetensors`` (only with ``include_base=True``): every other tensor of the model
  (embeddings, norms, a tied ``lm_head`` once), so the directory loads without the base model.
- ``manifest.json``, written last: the format of every layer (its class, the non-tensor settings its
  constructor needs, the names/dtypes/shapes of its tensors, its ``memory_bytes()``), the method spec
  and label, the calibration settings, provenance (``experiments.core.provenance``), the base model (its
  spec/name, its config, and a SHA-256 per uncompressed tensor: what the base model must match), the
  model's structure (which original block each block is, attention head counts per block: structured
  pruning changes them), and a SHA-256 and size per tensor file.

Loading rebuilds the model from the base model (``base=`` a model or a model spec; by default the
spec in the manifest, or ``base.safetensors`` when present), applies the recorded structure, checks
that every tensor that was not compressed equals the one the model was compressed from, and puts
the saved modules in place. Every mismatch is an error that names what is wrong: a file whose size or
digest differs (truncated, tampered), a tensor missing from a file, a base model whose uncompressed
tensors differ (another base model), a module type this version cannot build.

Writing is atomic: everything goes into a temporary directory beside ``out_dir`` (``.<name>.tmp-*``),
each file is fsynced, the manifest is written last, and the directory is renamed into place. A save
killed at any point leaves either no ``out_dir`` or the previous one; a leftover temporary directory
has no manifest (or one whose files do not check out) and is refused by :func:`load_compressed`.
A save that fails (a full disk: ``OSError`` naming ``out_dir``) removes its temporary directory. The
directory gets the mode ``mkdir`` would give it (``0o777`` less the umask), as the tables do
(``experiments.core.atomic``).

Adding a module type is one entry in :data:`SERIALIZERS`: ``class name -> (to_parts, from_parts)``,
where ``to_parts(module) -> (tensors: dict[name, Tensor | None], config: dict)`` and
``from_parts(tensors, config) -> module`` (see :func:`register_serializer`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from experiments.core.atomic import atomic_dir, write_file

FORMAT = "triton-kernels-research/compressed-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LAYERS_FILE = "layers.safetensors"
BASE_FILE = "base.safetensors"
# Integer attributes of an attention module that structured pruning changes per block (transformers'
# Llama/Mistral/Qwen2 attention reads them in forward); recorded per block when present.
ATTENTION_ATTRS = ("num_heads", "num_key_value_heads", "num_key_value_groups", "head_dim")


class CompressedFormatError(ValueError):
    """A saved directory that cannot be loaded as it is (missing, truncated, tampered, another base)."""


# ----------------------------------------------------------------------------- serializers

ToParts = Callable[[nn.Module], tuple[dict[str, "torch.Tensor | None"], dict[str, Any]]]
FromParts = Callable[[dict[str, "torch.Tensor | None"], dict[str, Any]], nn.Module]
SERIALIZERS: dict[str, tuple[ToParts, FromParts]] = {}


def register_serializer(class_name: str, to_parts: ToParts, from_parts: FromParts) -> None:
    """Teach save/load one module type (keyed by class name, so the class is imported only on use)."""
    SERIALIZERS[class_name] = (to_parts, from_parts)


def _quant_to(m) -> tuple[dict, dict]:
    return ({"packed": m.packed, "scales": m.scales, "zeros": m.zeros, "bias": m.bias},
            {"in_features": m.in_features, "bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric,
             "backend": m.backend, "cache_dequantized": m.cache_dequantized})


def _quant_from(t: dict, c: dict):
    from triton_kernels.nn.quant import QuantLinear
    return QuantLinear(t["packed"], t["scales"], t.get("zeros"), bias=t.get("bias"), **c)


# SparseLinear's constructor settings; its buffers depend on (pattern, backend) and are saved by name.
_SPARSE_ARGS = ("block", "n", "m", "tile", "threshold", "activation_sparsity", "sparsity")


def _sparse_to(m) -> tuple[dict, dict]:
    cfg = {"in_features": m.in_features, "out_features": m.out_features, "pattern": m.pattern,
           "backend": m.backend, **{k: getattr(m, k) for k in _SPARSE_ARGS},
           "format": list(m._format), "buffers": list(m._buffers)}
    cfg["block"], cfg["tile"] = list(cfg["block"]), list(cfg["tile"])
    return dict(m.named_buffers(recurse=False)) | {k: None for k, v in m._buffers.items() if v is None}, cfg


def _sparse_from(t: dict, c: dict):
    from triton_kernels.nn.sparse import SparseLinear
    kw = {k: c[k] for k in _SPARSE_ARGS}
    kw["block"], kw["tile"] = tuple(kw["block"]), tuple(kw["tile"])
    mod = SparseLinear(c["in_features"], c["out_features"], c["pattern"], c["backend"], **kw)
    for name in c["buffers"]:  # registration order as saved (the state_dict order)
        mod.register_buffer(name, t.get(name))
    # The format size is a function of the stored tensors; recompute it and check it against the save.
    fmt = mod._format_parts(mod.dense_weight(), mod._stored_mask())
    if list(fmt) != list(c["format"]):
        raise CompressedFormatError(f"SparseLinear format size from the tensors {list(fmt)} differs from the "
                                    f"saved {c['format']} (pattern {c['pattern']!r}, backend {c['backend']!r})")
    mod._format = tuple(fmt)
    return mod


def _lowrank_to(m) -> tuple[dict, dict]:
    return {"U": m.U, "V": m.V, "bias": m.bias}, {"backend": m.backend}


def _lowrank_from(t: dict, c: dict):
    from triton_kernels.nn.lowrank import LowRankLinear
    return LowRankLinear(t["U"], t["V"], t.get("bias"), backend=c["backend"])


def _codebook_to(m) -> tuple[dict, dict]:
    return ({"packed": m.packed, "codebook": m.codebook, "scales": m.scales, "bias": m.bias},
            {"in_features": m.in_features, "bits": m.bits, "group_size": m.group_size, "backend": m.backend})


def _codebook_from(t: dict, c: dict):
    from triton_kernels.nn.codebook import CodebookLinear
    return CodebookLinear(t["packed"], t["codebook"], t.get("scales"), bias=t.get("bias"), **c)


def _linear_to(m: nn.Linear) -> tuple[dict, dict]:
    return ({"weight": m.weight.detach(), "bias": None if m.bias is None else m.bias.detach()},
            {"in_features": m.in_features, "out_features": m.out_features})


def _linear_from(t: dict, c: dict) -> nn.Linear:
    w, b = t["weight"], t.get("bias")
    lin = nn.Linear(c["in_features"], c["out_features"], bias=b is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b, requires_grad=False)
    return lin


register_serializer("QuantLinear", _quant_to, _quant_from)
register_serializer("SparseLinear", _sparse_to, _sparse_from)
register_serializer("LowRankLinear", _lowrank_to, _lowrank_from)
register_serializer("CodebookLinear", _codebook_to, _codebook_from)
register_serializer("Linear", _linear_to, _linear_from)


# ----------------------------------------------------------------------------- helpers

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (16 hex digits)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _saved_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> module whose storage is saved: every module of a type in :data:`SERIALIZERS`
    inside the transformer blocks (compressed modules, and linears that stayed ``nn.Linear``: the
    dense baseline, structurally pruned layers), and compressed modules anywhere else."""
    from experiments.lm import models
    in_blocks = {id(m) for b in models.find_blocks(model) for m in b.modules()}
    return {name: mod for name, mod in model.named_modules()
            if type(mod).__name__ in SERIALIZERS and (id(mod) in in_blocks or type(mod).__name__ != "Linear")}


def _uncompressed_state(model: nn.Module, saved: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """State-dict entries outside the saved modules (embeddings, norms, lm_head)."""
    return {k: v for k, v in model.state_dict().items()
            if not any(k.startswith(p + ".") for p in saved)}


def _structure(model: nn.Module, source_blocks: list[int] | None) -> dict[str, Any]:
    from experiments.lm import models
    blocks = models.find_blocks(model)
    attn = []
    for b in blocks:
        a = getattr(b, "self_attn", None)
        attn.append({k: int(getattr(a, k)) for k in ATTENTION_ATTRS
                     if a is not None and isinstance(getattr(a, k, None), int)})
    return {"n_blocks": len(blocks), "source_blocks": list(source_blocks or range(len(blocks))), "attention": attn}


def _config_dict(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    return json.loads(cfg.to_json_string(use_diff=False))


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


# ----------------------------------------------------------------------------- save

def save_compressed(model: nn.Module, report_or_spec: Any, out_dir: str | os.PathLike, *,
                    base_model: str | None = None, base_name: str | None = None,
                    calibration: Mapping[str, Any] | None = None, include_base: bool = False,
                    extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``model``'s compressed storage to ``out_dir`` (see the module docstring); returns the path.

    ``report_or_spec``: the ``CompressionReport`` of ``compress_model`` (its spec, summary and, for a
    model-level family, ``kept_blocks`` are recorded), a ``MethodSpec``, a spec dict, or ``None``.
    ``base_model``: the model spec the model was loaded from (``"default"``, a path, a Hub id), so
    :func:`load_compressed` can rebuild it; ``None`` when the model was built in memory (then pass
    ``include_base=True`` or give ``base=`` when loading); a family that changes tensors outside its
    layers (``Family.rewrites_base``: AWQ's norms) always includes them. ``calibration``: the calibration settings
    (samples, seqlen, seed, text) to record. ``overwrite``: replace an existing ``out_dir``.
    """
    from experiments.methods.compress import CompressionReport, MethodSpec, parse_spec
    from experiments.methods.spec import family_of
    from experiments.core.provenance import provenance

    from experiments.core.runs import refuse_reference_dir
    out = refuse_reference_dir(Path(out_dir), "out_dir")
    if out.exists() and not overwrite:
        raise FileExistsError(f"out_dir {str(out)!r} already exists; choose another directory or pass "
                              f"overwrite=True (--overwrite)")
    report = report_or_spec if isinstance(report_or_spec, CompressionReport) else None
    spec = report.spec if report is not None else report_or_spec
    if spec is not None and not isinstance(spec, MethodSpec):
        spec = parse_spec(spec)
    if spec is not None and family_of(spec.method).rewrites_base:
        include_base = True  # e.g. AWQ's scales live in the norms: the base model's tensors would not fit
    saved = _saved_modules(model)
    if not saved:
        raise ValueError("model has no compressed module and no transformer-block linear to save")

    layer_tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for path, mod in saved.items():
        cls = type(mod).__name__
        tensors, cfg = SERIALIZERS[cls][0](mod)
        entry: dict[str, Any] = {"type": cls, "config": cfg, "tensors": {}, "none": []}
        for name, t in tensors.items():
            if t is None:
                entry["none"].append(name)
                continue
            layer_tensors[f"{path}.{name}"] = t
            entry["tensors"][name] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        if hasattr(mod, "memory_bytes"):
            entry["memory_bytes"] = int(mod.memory_bytes())
        entry["repr"] = mod.extra_repr()
        layers[path] = entry

    rest = _uncompressed_state(model, saved)
    uncompressed = {k: {"dtype": _dtype_name(v.dtype), "shape": list(v.shape), "sha256": tensor_digest(v)}
                    for k, v in rest.items()}
    h = hashlib.sha256()
    for k in sorted(uncompressed):
        h.update(f"{k}={uncompressed[k]['sha256']};".encode())

    files: dict[str, bytes] = {LAYERS_FILE: _safetensors_bytes(layer_tensors)}
    aliases: dict[str, str] = {}
    if include_base:
        unique: dict[str, torch.Tensor] = {}
        by_ptr: dict[tuple, str] = {}
        for k, v in rest.items():
            key = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else None
            if key is not None and key in by_ptr:
                aliases[k] = by_ptr[key]  # tied weights (lm_head = embed_tokens) are stored once
                continue
            if key is not None:
                by_ptr[key] = k
            unique[k] = v
        files[BASE_FILE] = _safetensors_bytes(unique)

    spec_dict = spec.to_dict() if spec is not None else None
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "spec": spec_dict, "label": spec.label() if spec is not None else None,
        "family": spec.family if spec is not None else None,
        "report": report.summary() if report is not None else None,
        "calibration": dict(calibration) if calibration else None,
        "provenance": provenance(),
        "base_model": {
            "spec": base_model, "name": base_name or base_model, "architecture": type(model).__name__,
            "config": _config_dict(model), "uncompressed_sha256": h.hexdigest(), "uncompressed": uncompressed,
            "included": include_base, "aliases": aliases,
        },
        "structure": _structure(model, getattr(report, "kept_blocks", None)),
        "layers": layers,
        "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()},
        **({"extra": dict(extra)} if extra else {}),
    }

    # experiments.core.atomic: a temporary directory beside out_dir, every file fsynced, renamed into place
    # (the old directory replaced as a whole with overwrite=True); removed on any error.
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name, data in files.items():
            write_file(tmp / name, data)
        # The manifest last: a directory without one is never loadable.
        write_file(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return out


# ----------------------------------------------------------------------------- load

def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a saved directory, checked for the format; ``CompressedFormatError`` otherwise."""
    d = Path(path)
    if not d.is_dir():
        raise CompressedFormatError(f"{str(d)!r} is not a directory written by save_compressed "
                                    f"(python -m experiments compress ... --out DIR)")
    mf = d / MANIFEST
    if not mf.is_file():
        raise CompressedFormatError(f"{str(d)!r} has no {MANIFEST}: not a saved compressed model, or a save that "
                                    f"did not finish (the manifest is written last); save it again")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompressedFormatError(f"{mf}: not valid JSON ({e}); the file is damaged, save the model again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CompressedFormatError(f"{mf}: not a manifest of format {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CompressedFormatError(f"{mf}: format_version {manifest.get('format_version')!r}; this version "
                                    f"reads {FORMAT_VERSION}")
    problem = _manifest_problem(manifest)
    if problem:
        raise CompressedFormatError(f"{mf}: {problem}: not a manifest written by save_compressed (damaged or "
                                    f"edited); save the model again")
    return manifest


def _manifest_problem(m: Mapping[str, Any]) -> str | None:
    """What in a manifest's structure is not what :func:`save_compressed` writes (types of the parts that
    loading reads), or None."""
    def kind(v: Any, want: type | tuple[type, ...], where: str) -> str | None:
        names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
        return None if isinstance(v, want) else f"{where} is {type(v).__name__}, not {names}"

    checks: list[str | None] = []
    for key, want in (("files", dict), ("base_model", dict), ("structure", dict), ("layers", dict)):
        if key not in m:
            return f"no {key!r} entry"
        checks.append(kind(m[key], want, key))
    checks.append(kind(m.get("label"), (str, type(None)), "label"))
    checks.append(kind(m.get("report"), (dict, type(None)), "report"))
    checks.append(kind(m.get("extra", {}), (dict, type(None)), "extra"))
    if any(checks):
        return next(c for c in checks if c)
    for name, f in m["files"].items():
        checks += [kind(f, dict, f"files[{name!r}]")]
        if isinstance(f, dict):
            checks += [kind(f.get("bytes"), int, f"files[{name!r}].bytes"), kind(f.get("sha256"), str,
                                                                                 f"files[{name!r}].sha256")]
    bm = m["base_model"]
    checks += [kind(bm.get("uncompressed"), dict, "base_model.uncompressed"),
               kind(bm.get("aliases", {}), dict, "base_model.aliases"),
               kind(bm.get("config") or {}, dict, "base_model.config"),
               kind(bm.get("spec"), (str, type(None)), "base_model.spec")]
    if isinstance(bm.get("uncompressed"), dict):
        checks += [kind(v, dict, f"base_model.uncompressed[{k!r}]") or kind(v.get("sha256"), str,
                   f"base_model.uncompressed[{k!r}].sha256") for k, v in bm["uncompressed"].items()]
    st = m["structure"]
    checks += [kind(st.get("n_blocks"), int, "structure.n_blocks"),
               kind(st.get("attention"), list, "structure.attention"),
               kind(st.get("source_blocks"), list, "structure.source_blocks")]
    if isinstance(st.get("source_blocks"), list):
        checks += [kind(b, int, "structure.source_blocks[...]") for b in st["source_blocks"]]
    if isinstance(st.get("attention"), list):
        checks += [kind(a, dict, "structure.attention[...]") for a in st["attention"]]
    for path, e in m["layers"].items():
        w = f"layers[{path!r}]"
        checks.append(kind(e, dict, w))
        if not isinstance(e, dict):
            continue
        checks += [kind(e.get("type"), str, f"{w}.type"), kind(e.get("config"), dict, f"{w}.config"),
                   kind(e.get("tensors"), dict, f"{w}.tensors"), kind(e.get("none"), list, f"{w}.none")]
        if isinstance(e.get("tensors"), dict):
            for name, meta in e["tensors"].items():
                checks.append(kind(meta, dict, f"{w}.tensors[{name!r}]") or kind(
                    meta.get("shape"), list, f"{w}.tensors[{name!r}].shape"))
    return next((c for c in checks if c), None)


def _read_checked(d: Path, name: str, manifest: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load
    want = manifest["files"].get(name)
    if want is None:
        raise CompressedFormatError(f"{d / MANIFEST} lists no file {name!r}")
    p = d / name
    if not p.is_file():
        raise CompressedFormatError(f"{p} is missing (the manifest lists it with {want['bytes']} bytes)")
    data = p.read_bytes()
    if len(data) != want["bytes"]:
        raise CompressedFormatError(f"{p} has {len(data)} bytes, the manifest says {want['bytes']}: the file is "
                                    f"truncated or was replaced; save the model again")
    if _sha256(data) != want["sha256"]:
        raise CompressedFormatError(f"{p}: SHA-256 {_sha256(data)[:16]}... differs from the manifest's "
                                    f"{want['sha256'][:16]}...: the file was modified after the save")
    return load(data)


def _model_from_config(config: Mapping[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise CompressedFormatError("the manifest's base_model.config has no model_type; cannot rebuild the model")
    conf = AutoConfig.for_model(model_type, **cfg)
    dtype = getattr(torch, str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", ""))
    # A real (randomly initialised) model, not one on the meta device: non-persistent buffers such as
    # the rotary inv_freq are computed at construction and are not in any state dict.
    return AutoModelForCausalLM.from_config(conf, dtype=dtype)


def _apply_structure(model: nn.Module, manifest: Mapping[str, Any], *, rebuilt: bool) -> None:
    """Drop the blocks that structured pruning removed, set per-block attention head counts and the config."""
    from experiments.lm import models
    st = manifest["structure"]
    blocks = models.find_blocks(model)
    src = st["source_blocks"]
    if not rebuilt and list(src) != list(range(len(blocks))):
        if max(src) >= len(blocks):
            raise CompressedFormatError(f"the saved model uses block {max(src)} of its base, which has only "
                                        f"{len(blocks)} blocks: another base model")
        holder = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else None
        if holder is None:
            raise CompressedFormatError("cannot drop blocks of this architecture (no model.layers)")
        holder.layers = nn.ModuleList([blocks[i] for i in src])
        for new_idx, b in enumerate(holder.layers):
            for mod in b.modules():
                if hasattr(mod, "layer_idx"):
                    mod.layer_idx = new_idx
        blocks = models.find_blocks(model)
    if len(blocks) != st["n_blocks"]:
        raise CompressedFormatError(f"the model has {len(blocks)} blocks, the saved one {st['n_blocks']}: "
                                    f"another base model")
    for b, attrs in zip(blocks, st["attention"]):
        a = getattr(b, "self_attn", None)
        for k, v in attrs.items():
            setattr(a, k, v)
    saved_cfg = manifest["base_model"].get("config") or {}
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for k, v in saved_cfg.items():
            if k in ("transformers_version", "architectures", "dtype", "torch_dtype"):
                continue
            if hasattr(cfg, k) and getattr(cfg, k) != v and k in ("num_hidden_layers", "layer_types",
                                                                   "num_attention_heads", "num_key_value_heads",
                                                                   "head_dim", "intermediate_size"):
                setattr(cfg, k, v)


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def load_compressed(path: str | os.PathLike, base: nn.Module | str | None = None) -> nn.Module:
    """The model saved in ``path``, its layers the saved compressed modules (bit-exact storage).

    ``base``: the uncompressed model to rebuild from (an ``nn.Module``, modified in place and
    returned, or a model spec for ``experiments.lm.models.load_model``). Default: ``base.safetensors`` if
    the directory has it, else the manifest's base model spec. The returned model carries the manifest
    as ``model.compressed_manifest``.
    """
    from safetensors import SafetensorError
    if base is not None and not isinstance(base, (str, nn.Module)):
        raise TypeError(f"base must be None, a model spec string or an nn.Module, got {type(base).__name__}")
    d = Path(path)
    manifest = read_manifest(d)
    try:
        return _load(d, manifest, base)
    except CompressedFormatError:
        raise
    except (KeyError, AttributeError, TypeError, IndexError) as e:
        # What the manifest check above does not cover (a value of the right type that does not fit):
        # one error naming the directory, never a traceback from deep inside the rebuild.
        raise CompressedFormatError(f"{str(d)!r} does not load as a saved compressed model ({type(e).__name__}: "
                                    f"{e}); the directory is damaged or was edited: save the model again") from e
    except SafetensorError as e:
        raise CompressedFormatError(f"{str(d)!r}: a tensor file does not parse as safetensors ({e}); the "
                                    f"directory is damaged or was edited: save the model again") from e


def _rewrites_base(manifest: Mapping[str, Any]) -> bool:
    """Whether the saved point's family changes tensors outside its layers (``Family.rewrites_base``)."""
    from experiments.methods.families import FAMILIES
    fam = FAMILIES.get(manifest.get("family") or "")
    return bool(fam is not None and fam.rewrites_base)


def _load(d: Path, manifest: Mapping[str, Any], base: nn.Module | str | None) -> nn.Module:
    layer_tensors = _read_checked(d, LAYERS_FILE, manifest)
    bm = manifest["base_model"]
    rebuilt = False
    if base is None:
        if bm.get("included"):
            model = _model_from_config(bm["config"])
            base_t = _read_checked(d, BASE_FILE, manifest)
            rebuilt = True
        elif bm.get("spec"):
            from experiments.lm import models
            model = models.load_model(bm["spec"])[0]
        else:
            raise CompressedFormatError(f"{d / MANIFEST}: the model was saved without a base model spec and "
                                        f"without its uncompressed tensors; pass base= (the model it was "
                                        f"compressed from) or save with include_base=True")
    elif isinstance(base, str):
        from experiments.lm import models
        model = models.load_model(base)[0]
    elif isinstance(base, nn.Module):
        model = base
    else:
        raise TypeError(f"base must be None, a model spec string or an nn.Module, got {type(base).__name__}")

    _apply_structure(model, manifest, rebuilt=rebuilt)
    layers = manifest["layers"]
    if not rebuilt and bm.get("included") and _rewrites_base(manifest):
        # The family changed tensors outside its layers (AWQ's norms): the carried ones replace the base's.
        base_t = _read_checked(d, BASE_FILE, manifest)
        rebuilt = True
    if rebuilt:
        # Every tensor outside the saved modules comes from base.safetensors (tied ones by alias).
        state = {}
        for k in bm["uncompressed"]:
            src = bm["aliases"].get(k, k)
            if src not in base_t:
                raise CompressedFormatError(f"{d / BASE_FILE} has no tensor {src!r} (the manifest lists it)")
            state[k] = base_t[src]
        if ((bm.get("config") or {}).get("tie_word_embeddings") is False
                and getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head")):
            # Saved untied (rotations fold the final norm into lm_head only): untie the base before loading.
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
            model.config.tie_word_embeddings = False
        missing, _unexpected = model.load_state_dict(state, strict=False)
        left = [k for k in missing if not any(k.startswith(p + ".") for p in layers)]
        if left:
            raise CompressedFormatError(f"{d / BASE_FILE} does not hold {left[:5]} of the model")
        if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
            model.tie_weights()

    # Build every module first (errors before the model is touched), then swap them in.
    built: dict[str, nn.Module] = {}
    for mpath, entry in layers.items():
        cls = entry["type"]
        if cls not in SERIALIZERS:
            raise CompressedFormatError(f"layer {mpath}: module type {cls!r} is unknown to this version "
                                        f"(known: {sorted(SERIALIZERS)})")
        tensors: dict[str, torch.Tensor | None] = {n: None for n in entry["none"]}
        for name, meta in entry["tensors"].items():
            key = f"{mpath}.{name}"
            if key not in layer_tensors:
                raise CompressedFormatError(f"layer {mpath}: tensor {name!r} ({key}) is missing from "
                                            f"{d / LAYERS_FILE}")
            t = layer_tensors[key]
            if _dtype_name(t.dtype) != meta["dtype"] or list(t.shape) != meta["shape"]:
                raise CompressedFormatError(f"layer {mpath}: tensor {name!r} is {_dtype_name(t.dtype)} "
                                            f"{list(t.shape)}, the manifest says {meta['dtype']} {meta['shape']}")
            tensors[name] = t
        try:
            mod = SERIALIZERS[cls][1](tensors, entry["config"])
        except (TypeError, ValueError, KeyError) as e:
            raise CompressedFormatError(f"layer {mpath}: cannot rebuild {cls} ({type(e).__name__}: {e})") from e
        if "memory_bytes" in entry and int(mod.memory_bytes()) != entry["memory_bytes"]:
            raise CompressedFormatError(f"layer {mpath}: rebuilt {cls} stores {mod.memory_bytes()} bytes, the "
                                        f"manifest says {entry['memory_bytes']}")
        built[mpath] = mod
    try:
        for mpath in built:
            model.get_submodule(mpath)
    except AttributeError as e:
        raise CompressedFormatError(f"the base model has no module {mpath!r} ({e}): another base model "
                                    f"(the manifest's is {bm.get('name')!r}, {bm.get('architecture')})") from e

    # The base model must be the one the model was compressed from: compare every uncompressed tensor.
    rest = _uncompressed_state(model, built)
    want = bm["uncompressed"]
    wrong = [k for k in want if k not in rest]
    wrong += [k for k in rest if k not in want]
    wrong += [k for k in want if k in rest and tensor_digest(rest[k]) != want[k]["sha256"]]
    if wrong:
        raise CompressedFormatError(
            f"the base model does not match the one {d} was compressed from ({bm.get('name')!r}, "
            f"{bm.get('architecture')}): {len(wrong)} uncompressed tensor(s) differ or are missing, e.g. "
            f"{sorted(wrong)[:3]}; load with the right base model (base=...)")
    for mpath, mod in built.items():
        _set_module(model, mpath, mod)
    model.eval()
    model.requires_grad_(False)
    model.compressed_manifest = manifest
    return model
