"""Tuned kernel configs as data: the autotuner's choice per (kernel, shape bucket, GPU), kept in a JSON file.

Autotuning searches a few configs per key on the first call (Triton's ``@triton.autotune``): seconds per
shape, minutes for a model, and GemLite users report 67-181 s per kernel. So, as GemLite ships
``configs/<gpu>.json``, the choices a GPU made are saved once and read back:

- ``CONFIG_DIR/<file_name(gpu)>`` (``triton_kernels/nn/configs/nvidia-h200.json``) holds one GPU's table,
  ``{"gpu": name, "version": 1, "configs": {key: config}}``. A key names the kernel, the variant a
  call takes and its autotune bucket (``dequant_key``); a config is what the launcher takes
  (``dequant_matmul(..., config=)``: meta-parameters, ``num_warps``, ``num_stages``).
- ``QuantLinear``'s Triton path looks its call up in the table of its GPU (``for_device``; matched by
  ``torch.cuda.get_device_name``) and passes the config to the launcher, which then launches it without
  searching; a key the table lacks autotunes as before. ``TKR_TUNED_CONFIGS=0`` turns the lookup off.
- ``make gpu-check`` writes the table of the GPU it ran on (``<out-dir>/configs/<gpu>.json``): copy it
  here and commit it with the results (docs/gpu.md).

Only this module reads the files; the kernel files take configs as an argument and stay copyable.
What it does not do: share configs across GPU models (a table is used only on a GPU of exactly that
name), or cover the codebook / sparse / low-rank kernels (they autotune as before).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch

from triton_kernels import dequant_matmul as dq

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
VERSION = 1

_LOADED: dict[tuple[str, str], "TunedConfigs | None"] = {}  # (directory, device) -> table, or None: no file
_RECORDING: "TunedConfigs | None" = None


def gpu_name(device: torch.device) -> str | None:
    """The name a table is matched by: the CUDA device's name, ``None`` for anything else."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


def file_name(gpu: str) -> str:
    """The table's file name for ``gpu``: lower case, runs of other characters as one '-' ("nvidia-h200.json")."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(gpu).lower()).strip("-")
    if not slug:
        raise ValueError(f"gpu must be a GPU name with at least one letter or digit, got {gpu!r}")
    return f"{slug}.json"


def dequant_key(M: int, N: int, K: int, *, bits: int, group_size: int, symmetric: bool, dtype: torch.dtype,
                param_dtype: torch.dtype, device: torch.device) -> str:
    """The table key of a ``dequant_matmul`` call: variant and M bucket (``dq.launch_plan``), the layer's
    N, K and format, the activation and scale dtypes (what the kernels' autotune keys hold)."""
    variant, bucket = dq.launch_plan(M, N, dtype, device)
    return (f"dequant_matmul/{variant}/M{bucket}/N{N}/K{K}/w{bits}/g{group_size}/"
            f"{'sym' if symmetric else 'asym'}/{str(dtype).replace('torch.', '')}/"
            f"{str(param_dtype).replace('torch.', '')}")


class TunedConfigs:
    """One GPU's table of chosen configs, ``{key: config}``."""

    def __init__(self, gpu: str, configs: dict[str, dict] | None = None):
        file_name(gpu)  # validates the name
        self.gpu = str(gpu)
        self.configs: dict[str, dict] = dict(configs or {})

    def get(self, key: str) -> dict | None:
        return self.configs.get(key)

    def set(self, key: str, config: dict) -> None:
        self.configs[key] = {k: int(v) for k, v in config.items()}

    def __len__(self) -> int:
        return len(self.configs)

    def to_json(self) -> str:
        return json.dumps({"gpu": self.gpu, "version": VERSION,
                           "configs": {k: self.configs[k] for k in sorted(self.configs)}}, indent=1) + "\n"

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``<directory>/<file_name(gpu)>`` (atomically), merged over an existing table of the same
        GPU there (this table's keys win); returns the path."""
        path = Path(directory) / file_name(self.gpu)
        merged = TunedConfigs(self.gpu)
        if path.exists():
            merged.configs.update(TunedConfigs.load(path).configs)
        merged.configs.update(self.configs)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(merged.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TunedConfigs":
        """Read a table; a file that is not one raises ``ValueError`` naming it and what was wrong."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a tuned-config table (invalid JSON: {e})") from None
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("gpu"), str) \
                or not isinstance(data.get("configs"), dict):
            raise ValueError(f"{path}: not a tuned-config table of version {VERSION} "
                             f"(expected {{'gpu': name, 'version': {VERSION}, 'configs': {{key: config}}}})")
        for key, cfg in data["configs"].items():
            if not isinstance(cfg, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                    for v in cfg.values()):
                raise ValueError(f"{path}: config of {key!r} must map names to ints, got {cfg!r}")
        return cls(data["gpu"], data["configs"])


def _enabled() -> bool:
    return os.environ.get("TKR_TUNED_CONFIGS", "1") != "0"


def for_device(device: torch.device, directory: str | os.PathLike | None = None) -> TunedConfigs | None:
    """The table of ``device``'s GPU from ``directory`` (default ``CONFIG_DIR``), read once per process and
    device (forwards ask on every call); ``None`` when there is none, the device is no GPU, or
    ``TKR_TUNED_CONFIGS=0``."""
    if not _enabled():
        return None
    directory = str(directory if directory is not None else CONFIG_DIR)
    key = (directory, str(device))
    if key not in _LOADED:
        gpu = gpu_name(device)
        table = None
        path = Path(directory) / file_name(gpu) if gpu is not None else None
        if path is not None and path.exists():
            table = TunedConfigs.load(path)
            if table.gpu != gpu:
                raise ValueError(f"{path}: holds configs of {table.gpu!r}, but is the file of {gpu!r}")
        _LOADED[key] = table
    return _LOADED[key]


def clear_cache() -> None:
    """Forget the tables read so far (the next lookup reads the files again)."""
    _LOADED.clear()


@contextlib.contextmanager
def recording(table: TunedConfigs):
    """``with recording(table):`` every autotuned ``QuantLinear`` Triton call notes its chosen config in
    ``table`` (``make gpu-check`` records the configs a whole model's decode and evaluation chose)."""
    global _RECORDING
    old, _RECORDING = _RECORDING, table
    try:
        yield table
    finally:
        _RECORDING = old


def dequant_config(M: int, N: int, K: int, *, bits: int, group_size: int, symmetric: bool, dtype: torch.dtype,
                   param_dtype: torch.dtype, device: torch.device) -> dict | None:
    """The stored config of this ``dequant_matmul`` call on ``device``'s GPU, or ``None`` (autotune)."""
    table = for_device(device)
    if table is None or not len(table):
        return None
    return table.get(dequant_key(M, N, K, bits=bits, group_size=group_size, symmetric=symmetric, dtype=dtype,
                                 param_dtype=param_dtype, device=device))


def note_dequant(M: int, N: int, K: int, *, bits: int, group_size: int, symmetric: bool, dtype: torch.dtype,
                 param_dtype: torch.dtype, device: torch.device, table: TunedConfigs | None = None) -> str | None:
    """After an autotuned ``dequant_matmul`` call: store the config its variant's autotuner chose in
    ``table`` (default: the one being recorded, if any). Returns the key, or ``None`` when nothing was
    recorded."""
    table = table if table is not None else _RECORDING
    if table is None:
        return None
    variant, _ = dq.launch_plan(M, N, dtype, device)
    cfg = dq.chosen_config(variant)
    if cfg is None:
        return None
    key = dequant_key(M, N, K, bits=bits, group_size=group_size, symmetric=symmetric, dtype=dtype,
                      param_dtype=param_dtype, device=device)
    table.set(key, cfg)
    return key


def is_recording() -> bool:
    return _RECORDING is not None
