"""compressed-tensors export/import: the library's own decompression gives exactly the toolkit's weights,
and checkpoints the library wrote import as QuantLinear layers with exactly its weights."""
import json

import pytest
import torch

import triton_kernels.nn  # noqa: F401  (kernels decorated under conftest's TRITON_INTERPRET=1)
from experiments.methods.compress import compress_model
from tests.test_compress import tiny_llama

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor as PQC  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from experiments.io.export_ct import export_compressed_tensors, import_compressed_tensors  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_backends(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


SPECS = [
    {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
    {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
    {"method": "gptq", "bits": 8, "group_size": -1, "symmetric": True},
    {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": False},
    {"method": "rtn", "bits": 3, "group_size": 16, "symmetric": False},
]
IDS = ["w4-g32-sym", "w4-g32-asym", "w8-channel-sym", "w8-channel-asym", "w3-g16-asym"]


def _quantized(spec):
    model = tiny_llama()
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    compress_model(model, spec, calib, progress=False)
    return model


def _qlayers(model):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"}


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_library_decompresses_to_the_toolkit_weights(tmp_path, spec):
    model = _quantized(spec)
    out = tmp_path / "ct"
    report = export_compressed_tensors(model, out)
    assert report["layers"] == 14 and report["schemes"] == 1
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    scheme = next(iter(QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "quant_method"})
                       .config_groups.values()))
    assert scheme.weights.strategy == ("channel" if spec["group_size"] == -1 else "group")
    assert scheme.weights.symmetric is spec["symmetric"] and scheme.weights.num_bits == spec["bits"]
    state = load_file(str(out / "model.safetensors"))
    for name, mod in _qlayers(model).items():
        sd = {k.rpartition(".")[2]: v for k, v in state.items() if k.rpartition(".")[0] == name}
        w = PQC.decompress(sd, scheme)["weight"]
        assert torch.equal(w, mod.dequantize()), f"{name}: max diff {(w - mod.dequantize()).abs().max():.3g}"
    # And back: the import rebuilds the same codes, scales and zeros, hence the same logits.
    back = import_compressed_tensors(out)
    for name, mod in _qlayers(model).items():
        got = back.get_submodule(name)
        assert type(got).__name__ == "QuantLinear"
        assert torch.equal(got.packed, mod.packed) and torch.equal(got.scales, mod.scales.float())
        assert (got.zeros is None) == (mod.zeros is None)
        if mod.zeros is not None:
            assert torch.equal(got.zeros, mod.zeros.float())
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("spec", SPECS[:1] + SPECS[2:3], ids=["w4-g32-sym", "w8-channel-sym"])
def test_transformers_compressed_tensors_loader_gives_the_same_logits(tmp_path, spec):
    from transformers import AutoModelForCausalLM
    model = _quantized(spec)
    export_compressed_tensors(model, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = loaded(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), f"max abs err {(got - want).abs().max():.3g}"


def test_refusals(tmp_path):
    model = _quantized({"method": "rtn", "bits": 4, "group_size": 64})  # K=96: partial last group
    with pytest.raises(ValueError, match=r"group_size=64 does not divide K=96; compressed-tensors has no partial"):
        export_compressed_tensors(model, tmp_path / "a")
    model = _quantized({"method": "svd", "ratio": 0.5})
    with pytest.raises(ValueError, match=r"is a LowRankLinear: compressed-tensors export writes weight-only"):
        export_compressed_tensors(model, tmp_path / "b")
    assert not any(tmp_path.iterdir())


def _library_checkpoint(path, *, symmetric, strategy, group_size, bits):
    """A checkpoint written by compressed-tensors itself: apply_quantization_config, min/max qparams
    (calculate_qparams), ModelCompressor.compress_model, update_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file
    model = tiny_llama()
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    for _, mod in model.named_modules():
        if getattr(mod, "quantization_scheme", None) is not None:
            w = mod.weight.data
            wr = w.reshape(w.shape[0], -1, group_size) if group_size else w.reshape(w.shape[0], 1, -1)
            s, z = calculate_qparams(wr.amin(-1), wr.amax(-1), args)
            mod.weight_scale.data.copy_(s.reshape(mod.weight_scale.shape))
            mod.weight_zero_point.data.copy_(z.reshape(mod.weight_zero_point.shape))
    comp = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    comp.compress_model(model)
    path.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    comp.update_config(path)
    return args


@pytest.mark.parametrize("symmetric, strategy, group_size, bits", [
    (True, "group", 32, 4), (False, "group", 32, 4), (False, "channel", None, 8), (True, "channel", None, 8)],
    ids=["w4a16-g32-sym", "w4a16-g32-asym", "w8a16-channel-asym", "w8a16-channel-sym"])
def test_import_of_library_written_checkpoints(tmp_path, symmetric, strategy, group_size, bits):
    from compressed_tensors.quantization import QuantizationScheme
    path = tmp_path / "lib"
    args = _library_checkpoint(path, symmetric=symmetric, strategy=strategy, group_size=group_size, bits=bits)
    model = import_compressed_tensors(path)
    state = load_file(str(path / "model.safetensors"))
    layers = _qlayers(model)
    assert len(layers) == 14
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    for name, mod in layers.items():
        assert (mod.bits, mod.symmetric, mod.group_size) == (bits, symmetric, group_size or -1)
        sd = {k.rpartition(".")[2]: v for k, v in state.items() if k.rpartition(".")[0] == name}
        want = PQC.decompress(sd, scheme)["weight"]
        assert torch.equal(mod.dequantize(), want.float()), name
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_full_disk_leaves_nothing_and_a_rerun_succeeds(tmp_path, monkeypatch):
    """The disk fills while the weights are written (simulated: half of the bytes, then OSError(ENOSPC),
    which names no file): no directory at the path and no temporary one beside it, the error names the
    path, and the rerun writes a checkpoint that imports."""
    import errno
    import os

    import experiments.io.export_ct as E
    model = _quantized(SPECS[0])
    out = tmp_path / "ct"
    real = E.write_file

    def full_disk(path, data):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(E, "write_file", full_disk)
    with pytest.raises(OSError) as e:
        export_compressed_tensors(model, out)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(E, "write_file", real)
    export_compressed_tensors(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]
    assert len(_qlayers(import_compressed_tensors(out))) == 14


def test_a_leftover_temporary_directory_does_not_block_an_export(tmp_path):
    """What an export killed mid-write left (the fixed temporary name the export used to take) does
    not make the next export fail: each export takes a temporary name of its own."""
    (tmp_path / ".ct.tmp").mkdir()
    (tmp_path / ".ct.tmp" / "model.safetensors").write_bytes(b"half")
    export_compressed_tensors(_quantized(SPECS[0]), tmp_path / "ct")
    assert (tmp_path / "ct" / "config.json").is_file()
