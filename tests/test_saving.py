"""Save/reload of compressed models (experiments.run.saving): bit-exact round trips for every family,
clear errors for damaged directories or another base model, atomic writes."""
import copy
import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import triton_kernels.nn  # noqa: F401  (kernels decorated now, while conftest's TRITON_INTERPRET=1 holds)
from experiments.methods.compress import compress_model, parse_spec
from experiments.run.saving import (BASE_FILE, LAYERS_FILE, MANIFEST, SERIALIZERS, CompressedFormatError,
                                load_compressed, read_manifest, save_compressed)
from tests.test_compress import tiny_llama

# One spec per family and per storage layout that differs (sparse: each pattern has its own buffers).
SPECS = [
    {"method": "dense"},
    {"method": "rtn", "bits": 4, "group_size": 32},
    {"method": "rtn", "bits": 3, "group_size": -1, "symmetric": True},
    {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True},
    {"method": "magnitude", "sparsity": 0.5, "pattern": "unstructured"},
    {"method": "magnitude", "sparsity": 0.9, "pattern": "unstructured"},  # CSR backend on CPU (_PREFER)
    {"method": "wanda", "pattern": "2:4"},
    {"method": "magnitude", "sparsity": 0.75, "pattern": "block:16x16"},  # BSR backend on CPU (_PREFER)
    {"method": "svd", "ratio": 0.5},
    {"method": "nf", "bits": 4, "group_size": 32},  # CodebookLinear: one shared table + group scales
    {"method": "kmeans", "bits": 3, "group_size": -1},  # CodebookLinear: a table per row, no scales
    {"method": "hqq", "bits": 3, "group_size": 32},  # QuantLinear with fractional fp16 zero-points
    {"method": "combo", "steps": [{"method": "sparsegpt", "pattern": "2:4"}, {"method": "rtn", "bits": 4, "group_size": 32}]},
]


@pytest.fixture(autouse=True)
def _cpu_backends(monkeypatch):
    # The modules pick their CPU backends (torch ops, CSR/BSR, dense) unless a test asks for Triton's
    # storage layouts: triton_usable() reads TRITON_INTERPRET at each call.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (4, 16), generator=g), torch.randint(0, 128, (2, 20), generator=g)


_CACHE: dict = {}


# SparseLinear's CPU backend is chosen by timing (triton_kernels.nn._backend.measured_choice); a
# deterministic timer pins it so every CPU storage layout is covered on any machine: these specs take
# their sparse CPU kernel's layout, every other spec the dense one.
_PREFER = {"magnitude-unstructured-0.9": "torch_csr", "magnitude-block:16x16-0.75": "torch_bsr"}


def _compressed(spec, calib, triton=False):
    from triton_kernels.nn import _backend
    spec = parse_spec(spec)
    key = (spec.label(), triton)
    if key not in _CACHE:
        model = tiny_llama()
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if triton else "0"
        prefer = _PREFER.get(spec.label(), "dense")
        _backend.clear_choices()
        _backend.set_timer(lambda name, fn: 0.0 if name == prefer else 1.0)
        try:
            report = compress_model(model, spec, calib, progress=False)
        finally:
            os.environ["TRITON_INTERPRET"] = old
            _backend.set_timer(None)
            _backend.clear_choices()
        _CACHE[key] = model, report
    return _CACHE[key]


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def _assert_same_model(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> None:
    types_a = {n: type(m).__name__ for n, m in a.named_modules()}
    types_b = {n: type(m).__name__ for n, m in b.named_modules()}
    assert types_a == types_b
    sa, sb = _buffers(a), _buffers(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    for (n, ma), mb in zip(a.named_modules(), b.modules()):
        if hasattr(ma, "extra_repr") and types_a[n] in SERIALIZERS:
            assert ma.extra_repr() == mb.extra_repr(), n
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


@pytest.mark.parametrize("include_base", [False, True], ids=["with-base", "self-contained"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: parse_spec(s).label())
def test_round_trip_is_bit_exact(tmp_path, data, spec, include_base):
    calib, ids = data
    model, report = _compressed(spec, calib)
    out = save_compressed(model, report, tmp_path / "m", calibration={"calib_samples": 4, "calib_seqlen": 16},
                          include_base=include_base)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, LAYERS_FILE] + ([BASE_FILE] if include_base else []))
    loaded = load_compressed(out, base=None if include_base else tiny_llama())
    _assert_same_model(model, loaded, ids)
    m = loaded.compressed_manifest
    assert m["spec"] == parse_spec(spec).to_dict() and m["label"] == parse_spec(spec).label()
    assert m["calibration"] == {"calib_samples": 4, "calib_seqlen": 16}
    assert m["provenance"]["git_commit"] and m["report"]["bytes"] == report.bytes
    # Every compressed layer's format is recorded with its size, and the sizes add up to the report's.
    # (combo's size is a model of a format no module stores yet: its SparseLinear holds dequantized values.)
    if spec["method"] not in ("dense", "combo"):
        assert sum(e["memory_bytes"] for e in m["layers"].values()) == report.bytes
    # The loaded model's layers are the compressed modules, not dense copies.
    kinds = {e["type"] for e in m["layers"].values()}
    assert kinds == {{"dense": "Linear", "quant": "QuantLinear", "sparse": "SparseLinear", "lowrank": "LowRankLinear",
                      "combo": "SparseLinear", "codebook": "CodebookLinear",
                      "hqq": "QuantLinear"}[parse_spec(spec).family]}


# The Triton storage layouts of SparseLinear (what it keeps where Triton runs: CUDA, or the interpreter).
TRITON_SPECS = [
    {"method": "magnitude", "sparsity": 0.5, "pattern": "unstructured"},
    {"method": "wanda", "pattern": "2:4"},
    {"method": "magnitude", "sparsity": 0.5, "pattern": "block:16x16"},
]


@pytest.mark.parametrize("spec", TRITON_SPECS, ids=lambda s: parse_spec(s).label())
def test_round_trip_triton_storage(tmp_path, data, spec, monkeypatch):
    calib, ids = data
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, report = _compressed(spec, calib, triton=True)
    assert {m.backend for m in model.modules() if type(m).__name__ == "SparseLinear"} == {"triton"}
    loaded = load_compressed(save_compressed(model, report, tmp_path / "m"), base=tiny_llama())
    _assert_same_model(model, loaded, ids[:1, :8])


def test_sparse_backends_covered(data):
    # The specs above exercise every CPU storage layout SparseLinear has without Triton.
    calib, _ = data
    seen = set()
    for spec in SPECS:
        model, _ = _compressed(spec, calib)
        seen |= {(m.pattern, m.backend) for m in model.modules() if type(m).__name__ == "SparseLinear"}
    assert {("unstructured", "dense"), ("unstructured", "torch_csr"), ("nm", "dense"), ("block", "torch_bsr")} <= seen


@pytest.fixture
def saved(tmp_path, data):
    model, report = _compressed(SPECS[1], data[0])
    return save_compressed(model, report, tmp_path / "m"), model


def test_truncated_file_is_named(saved):
    out, _ = saved
    p = out / LAYERS_FILE
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CompressedFormatError, match=r"layers\.safetensors has \d+ bytes, the manifest says \d+: the file is truncated"):
        load_compressed(out, base=tiny_llama())


def test_tampered_file_is_named(saved):
    out, _ = saved
    p = out / LAYERS_FILE
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last tensor
    p.write_bytes(bytes(raw))
    with pytest.raises(CompressedFormatError, match=r"layers\.safetensors: SHA-256 .* differs from the manifest's .* modified after the save"):
        load_compressed(out, base=tiny_llama())


def test_missing_tensor_is_named(saved):
    # A consistent file (size and digest updated in the manifest) that lacks one tensor.
    from safetensors.torch import load, save
    out, _ = saved
    tensors = load((out / LAYERS_FILE).read_bytes())
    del tensors["model.layers.1.mlp.down_proj.scales"]
    data = save(tensors)
    (out / LAYERS_FILE).write_bytes(data)
    m = json.loads((out / MANIFEST).read_text())
    import hashlib
    m["files"][LAYERS_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CompressedFormatError, match=r"layer model\.layers\.1\.mlp\.down_proj: tensor 'scales' .* is missing from"):
        load_compressed(out, base=tiny_llama())


def test_another_base_model_is_refused(saved):
    out, _ = saved
    with pytest.raises(CompressedFormatError, match=r"the base model does not match .* uncompressed tensor\(s\) differ .*model\.embed_tokens\.weight"):
        load_compressed(out, base=tiny_llama(seed=1))
    other = tiny_llama()
    other.model.layers = other.model.layers[:1]
    with pytest.raises(CompressedFormatError, match=r"uses block 1 of its base, which has only 1 blocks: another base model"):
        load_compressed(out, base=other)


def test_missing_manifest_and_wrong_paths(tmp_path, saved):
    out, _ = saved
    with pytest.raises(CompressedFormatError, match=r"is not a directory written by save_compressed"):
        load_compressed(tmp_path / "nothing")
    (out / MANIFEST).unlink()
    with pytest.raises(CompressedFormatError, match=r"has no manifest\.json: .* a save that did not finish"):
        load_compressed(out)


def test_unknown_module_type_is_named(saved):
    out, _ = saved
    m = json.loads((out / MANIFEST).read_text())
    next(iter(m["layers"].values()))["type"] = "FancyLinear"
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CompressedFormatError, match=r"module type 'FancyLinear' is unknown to this version"):
        load_compressed(out, base=tiny_llama())


def test_no_base_known_says_what_to_pass(saved):
    out, _ = saved
    with pytest.raises(CompressedFormatError, match=r"pass base= .* or save with include_base=True"):
        load_compressed(out)


def test_existing_directory_needs_overwrite(saved, data):
    out, model = saved
    spec = parse_spec(SPECS[1])
    with pytest.raises(FileExistsError, match="already exists; choose another directory or pass overwrite=True"):
        save_compressed(model, spec, out)
    save_compressed(model, spec, out, overwrite=True)
    assert read_manifest(out)["report"] is None  # the new save replaced the old one
    assert [p.name for p in out.parent.iterdir()] == ["m"]  # no temporary directory left


def test_failed_save_leaves_nothing(tmp_path, data, monkeypatch):
    import experiments.run.saving as S
    model, report = _compressed(SPECS[1], data[0])
    calls = []

    def boom(path, data_):
        calls.append(path.name)
        if path.name == MANIFEST:
            raise OSError("disk full")
        return real(path, data_)
    real = S.write_file
    monkeypatch.setattr(S, "write_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, report, tmp_path / "m")
    assert calls == [LAYERS_FILE, MANIFEST]
    assert list(tmp_path.iterdir()) == []


def test_full_disk_names_the_directory_leaves_nothing_and_keeps_the_old_save(tmp_path, data, monkeypatch):
    """A full disk while a file is written (simulated: the writer stores half its bytes, then raises
    OSError(ENOSPC), which names no file): an OSError naming the directory, nothing left beside it, an
    existing save (overwrite=True) untouched, and the rerun succeeds."""
    import experiments.run.saving as S
    model, report = _compressed(SPECS[1], data[0])
    out = tmp_path / "m"

    def full_disk(path, data_):
        with open(path, "wb") as f:
            f.write(data_[: len(data_) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real = S.write_file
    monkeypatch.setattr(S, "write_file", full_disk)
    with pytest.raises(OSError) as e:
        save_compressed(model, report, out)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(S, "write_file", real)
    save_compressed(model, report, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(S, "write_file", full_disk)
    with pytest.raises(OSError):
        save_compressed(model, parse_spec(SPECS[1]), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and list(tmp_path.iterdir()) == [out]
    monkeypatch.setattr(S, "write_file", real)
    _assert_same_model(model, load_compressed(out, base=tiny_llama()), data[1])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_directory_follows_the_umask(tmp_path, data, umask):
    """A saved directory gets the mode mkdir gives (0o777 less the umask), its files open()'s, as the
    result tables do (test_runs.test_tables_respect_the_umask); not tempfile's private 0o700."""
    model, report = _compressed(SPECS[1], data[0])
    old = os.umask(umask)
    try:
        out = save_compressed(model, report, tmp_path / "m")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask, oct(out.stat().st_mode)
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, (f.name, oct(f.stat().st_mode))


_KILL_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import experiments.run.saving as S
from experiments.methods.compress import compress_model
from tests.test_compress import tiny_llama
model = tiny_llama()
report = compress_model(model, {{"method": "rtn", "bits": 4, "group_size": 32}}, None, progress=False)
real = S.write_file
def write(path, data):
    real(path, data)
    if path.name == {file!r}:
        os.kill(os.getpid(), signal.SIGKILL)
S.write_file = write
S.save_compressed(model, report, {out!r})
"""


@pytest.mark.parametrize("file", [LAYERS_FILE, MANIFEST])
def test_killed_save_leaves_no_complete_directory(tmp_path, file):
    out = tmp_path / "m"
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT.format(root=root, file=file, out=str(out))],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".m.tmp-")  # only the temporary directory
    if file == LAYERS_FILE:
        with pytest.raises(CompressedFormatError, match="has no manifest.json"):
            load_compressed(left[0], base=tiny_llama())


def test_structured_like_model_round_trips(tmp_path, data):
    """Shapes, block count and head counts that differ from the base (what structured pruning does)
    are recorded and rebuilt: a model with a block dropped, a KV group removed and a narrower MLP."""
    calib, ids = data
    base = tiny_llama()
    model = copy.deepcopy(base)
    layers = model.model.layers
    model.model.layers = nn.ModuleList([layers[1]])
    model.model.layers[0].self_attn.layer_idx = 0
    model.config.num_hidden_layers = 1
    attn = model.model.layers[0].self_attn
    hd = attn.head_dim  # 24; 4 query heads in 2 KV groups: keep group 0 (query heads 0, 1)
    with torch.no_grad():
        def keep_rows(lin, rows):
            new = nn.Linear(lin.in_features, len(rows), bias=lin.bias is not None)
            new.weight.copy_(lin.weight[rows])
            return new
        def keep_cols(lin, cols):
            new = nn.Linear(len(cols), lin.out_features, bias=lin.bias is not None)
            new.weight.copy_(lin.weight[:, cols])
            return new
        q_rows = list(range(2 * hd))
        attn.q_proj = keep_rows(attn.q_proj, q_rows)
        attn.k_proj = keep_rows(attn.k_proj, list(range(hd)))
        attn.v_proj = keep_rows(attn.v_proj, list(range(hd)))
        attn.o_proj = keep_cols(attn.o_proj, q_rows)
        attn.num_key_value_groups = 2
        mlp = model.model.layers[0].mlp
        keep = list(range(0, 160, 2))
        mlp.gate_proj, mlp.up_proj = keep_rows(mlp.gate_proj, keep), keep_rows(mlp.up_proj, keep)
        mlp.down_proj = keep_cols(mlp.down_proj, keep)
    compress_model(model, {"method": "rtn", "bits": 4, "group_size": 16}, None, progress=False)

    class R:  # what the structured family's report carries
        kept_blocks = [1]
    from experiments.methods.compress import CompressionReport
    report = CompressionReport(spec=parse_spec({"method": "rtn", "bits": 4, "group_size": 16}))
    report.kept_blocks = R.kept_blocks
    for include in (False, True):
        out = save_compressed(model, report, tmp_path / f"s{include}", include_base=include)
        loaded = load_compressed(out, base=None if include else copy.deepcopy(base))
        _assert_same_model(model, loaded, ids)
        assert loaded.config.num_hidden_layers == 1
        assert read_manifest(out)["structure"]["source_blocks"] == [1]
