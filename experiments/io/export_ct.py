"""compressed-tensors (vLLM, llm-compressor): export QuantLinear layers as ``pack-quantized``, and import back.

    export_compressed_tensors(model, "out_dir")        # config.json + model.safetensors
    model = import_compressed_tensors("ckpt_dir")      # block linears become QuantLinear

Needs the optional ``compressed-tensors`` package (``pip install -e '.[export]'``); the packing is done
by the library's own compressor (``PackedQuantizationCompressor``), never re-implemented here.

Grid mapping (exact both ways): compressed-tensors stores signed codes ``c`` in
``[-2^(b-1), 2^(b-1) - 1]`` and ``w = (c - zp) * scale`` (``zp = 0`` when symmetric); the toolkit
stores unsigned codes ``q = c + 2^(b-1)``, an integer zero ``z = zp + 2^(b-1)`` (asymmetric) and
``w = (q - z) * s``, symmetric ``(q - 2^(b-1)) * s``. Strategy ``group`` (group_size = the toolkit's,
K a multiple of it: compressed-tensors has no partial last group) or ``channel`` (group_size -1).
Scales are written in the model's float dtype (fp32 here) holding the toolkit's fp16 values, so the
library's dequantization ``(c - zp) * scale`` is exact (an fp16 scale would round the product).
Every exported layer is decompressed with the library right away and compared with
``QuantLinear.dequantize()``; any difference is an error naming the layer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.core.atomic import atomic_dir, write_file

WEIGHTS_FILE = "model.safetensors"


def _require():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:
        from experiments.core.errors import SetupError
        raise SetupError("compressed-tensors export/import needs the compressed-tensors package: "
                         "pip install -e '.[export]' (or pip install compressed-tensors)") from e


def _args(bits: int, group_size: int, symmetric: bool, K: int, where: str):
    from compressed_tensors.quantization import QuantizationArgs
    if group_size != -1 and K % group_size:
        raise ValueError(f"{where}: group_size={group_size} does not divide K={K}; compressed-tensors has no partial "
                         f"last group: use a group size that divides {K}, or -1 (channel strategy)")
    if group_size == -1:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel")
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size)


def _quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    out = {}
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        if kind == "QuantLinear":
            out[name] = mod
        elif hasattr(mod, "memory_bytes"):
            raise ValueError(f"layer {name} is a {kind}: compressed-tensors export writes weight-only integer "
                             f"quantization (QuantLinear, from rtn/gptq) and dense layers")
    return out


def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``model`` as a Hugging Face directory in the compressed-tensors ``pack-quantized`` format.

    ``out_dir`` must not exist; it appears complete or not at all (experiments.core.atomic)."""
    _require()
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor as PQC
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from safetensors.torch import save

    out = Path(out_dir)
    if out.exists():
        raise ValueError(f"out_dir {str(out)!r} already exists; choose another directory")
    qmods = _quant_modules(model)
    if not qmods:
        raise ValueError("model has no QuantLinear layer: nothing to write in a quantized format")
    dtype = next(p for p in model.parameters()).dtype
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, Any]] = {}
    for name, mod in qmods.items():
        args = _args(mod.bits, mod.group_size, mod.symmetric, mod.in_features, f"layer {name}")
        key = json.dumps(args.model_dump(), sort_keys=True, default=str)
        groups.setdefault(key, {"args": args, "targets": []})["targets"].append(name)
        scheme = QuantizationScheme(targets=[name], weights=args)
        w = mod.dequantize()
        scale = mod.scales.to(dtype)
        sd: dict[str, torch.Tensor] = {"weight": w.to(dtype), "weight_scale": scale}
        half = 2 ** (mod.bits - 1)
        sd["weight_zero_point"] = (torch.zeros_like(scale, dtype=torch.int8) if mod.symmetric
                                   else (mod.zeros.float() - half).round().to(torch.int8))
        comp = PQC.compress(sd, scheme)
        back = PQC.decompress(dict(comp), scheme)["weight"]
        if not torch.equal(back.float(), w):
            raise ValueError(f"layer {name}: compressed-tensors dequantizes it to other weights (max diff "
                             f"{(back.float() - w).abs().max():.3g}); not exported")
        for k, v in comp.items():
            tensors[f"{name}.{k}"] = v.contiguous()
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.to(dtype).contiguous()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for k, v in model.state_dict().items():
        mod_name = k.rpartition(".")[0]
        if mod_name in qmods or (tied and k == "lm_head.weight"):
            continue
        tensors[k] = v.detach().contiguous()
    qcfg = QuantizationConfig(
        config_groups={f"group_{i}": QuantizationScheme(targets=g["targets"], weights=g["args"])
                       for i, g in enumerate(groups.values())},
        format="pack-quantized", quantization_status="compressed", ignore=["lm_head"])
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {**qcfg.to_dict(), "quant_method": "compressed-tensors"}
    # A unique temporary directory beside out_dir, every file fsynced, renamed into place; removed on
    # any failure (experiments.core.atomic). The tensors are serialized in memory first, so a full disk is a
    # plain OSError naming out_dir (safetensors' own file writer reports it as a SafetensorError).
    weights = save(tensors, metadata={"format": "pt"})
    with atomic_dir(out) as tmp:
        write_file(tmp / WEIGHTS_FILE, weights)
        write_file(tmp / "config.json", json.dumps(cfg, indent=2, sort_keys=True, default=str).encode())
    return {"path": str(out), "layers": len(qmods), "schemes": len(groups), "exact": True}


def import_compressed_tensors(path: str | os.PathLike) -> nn.Module:
    """A compressed-tensors ``pack-quantized`` checkpoint (W4A16/W8A16, group or channel) as a model whose
    quantized linears are ``QuantLinear`` (codes, scales, zeros taken over exactly)."""
    _require()
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from triton_kernels.nn.quant import QuantLinear

    d = Path(path)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{str(d)!r} has no config.json: not a Hugging Face checkpoint directory")
    raw_cfg = json.loads(cfg_path.read_text())
    qc = raw_cfg.pop("quantization_config", None)
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{cfg_path}: no compressed-tensors quantization_config")
    if qc.get("format") != "pack-quantized":
        raise ValueError(f"{cfg_path}: format {qc.get('format')!r}; only 'pack-quantized' (integer weight-only) is imported")
    qconf = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "quant_method"})
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(d)!r} has no .safetensors file")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))

    model_type = raw_cfg.pop("model_type")
    conf = AutoConfig.for_model(model_type, **raw_cfg)
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    packed_names = sorted(k[: -len(".weight_packed")] for k in state if k.endswith(".weight_packed"))

    def matches(name: str, target: str) -> bool:
        # compressed-tensors targets: a module name, a module class name ("Linear"), or "re:<regex>".
        import re
        if target.startswith("re:"):
            return re.fullmatch(target[3:], name) is not None
        return target == name or target == type(model.get_submodule(name)).__name__

    def scheme_of(name: str):
        for g in qconf.config_groups.values():
            if any(matches(name, t) for t in g.targets):
                return g
        raise ValueError(f"{cfg_path}: no config group targets layer {name}")

    new: dict[str, QuantLinear] = {}
    for name in packed_names:
        args = scheme_of(name).weights
        if args.type != "int" or args.strategy not in ("group", "channel") or args.num_bits > 8:
            raise ValueError(f"layer {name}: {args.type} {args.strategy} {args.num_bits}-bit is not a weight grid "
                             f"QuantLinear holds (int, group or channel, 1-8 bits)")
        shape = tuple(int(x) for x in state[f"{name}.weight_shape"].tolist())
        N, K = shape
        scale = state[f"{name}.weight_scale"]
        c = unpack_from_int32(state[f"{name}.weight_packed"], args.num_bits, torch.Size(shape)).to(torch.int64)
        half = 2 ** (args.num_bits - 1)
        zeros = None
        if not args.symmetric:
            zp = unpack_from_int32(state[f"{name}.weight_zero_point"], args.num_bits, torch.Size((N, scale.shape[1])),
                                   packed_dim=0)
            zeros = (zp.float() + half)
        gs = -1 if args.strategy == "channel" else int(args.group_size)
        new[name] = QuantLinear.from_codes(c + half, scale.float(), zeros, bits=args.num_bits, group_size=gs,
                                           symmetric=bool(args.symmetric), bias=state.get(f"{name}.bias"))
    rest = {k: v for k, v in state.items() if k.rpartition(".")[0] not in new}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    left = [k for k in missing if k.rpartition(".")[0] not in new and k != "lm_head.weight"]
    if left or unexpected:
        raise ValueError(f"{str(d)!r}: tensors missing {left[:5]} / unexpected {unexpected[:5]} for {model_type}")
    if getattr(conf, "tie_word_embeddings", False):
        model.tie_weights()
    for name, mod in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, mod)
    return model.eval().requires_grad_(False)
