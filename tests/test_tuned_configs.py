"""Tuned configs as data (triton_kernels/nn/tuned.py): what the autotuner chose, recorded per (kernel variant,
shape bucket, GPU), saved as JSON, read back by QuantLinear on a GPU of that name, which then launches that
config without searching. On CPU under the interpreter, with a fake GPU name (the autotuner has one config
here, but it records and launches through the same code as on a GPU)."""
import json

import pytest
import torch

from benchmarks import gpu_check
from triton_kernels import dequant_matmul as dq
from triton_kernels.nn import QuantLinear, tuned

FAKE_GPU = "Fake GPU 9000 (80GB)"


def _fake_bench(fn):
    return {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0}


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """tuned.py sees the CPU as a GPU named FAKE_GPU and reads its tables from tmp_path."""
    monkeypatch.setattr(tuned, "gpu_name", lambda device: FAKE_GPU)
    monkeypatch.setattr(tuned, "CONFIG_DIR", tmp_path)
    tuned.clear_cache()
    yield tmp_path
    tuned.clear_cache()


def _count_autotuner_runs(monkeypatch):
    """Count the launches that went through an autotuner (a search, or its cache) rather than a given config."""
    calls = []
    for variant, autotuner in dq._AUTOTUNERS.items():
        def run(*args, _orig=autotuner.run, _variant=variant, **kwargs):
            calls.append(_variant)
            return _orig(*args, **kwargs)
        monkeypatch.setattr(autotuner, "run", run)
    return calls


def test_round_trip_gpu_check_records_and_quantlinear_skips_the_search(fake_gpu, monkeypatch):
    N, K = 48, 256
    table = tuned.TunedConfigs(FAKE_GPU)
    saved = []
    rows = gpu_check.run_dequant(torch.device("cpu"), 100.0, float("inf"), saved.append, shapes=[(N, K)],
                                 bits_list=(4,), m_values=(1, 20), tuned_table=table, bench=_fake_bench)
    assert {r["kernel_variant"] for r in rows if "kernel_variant" in r} == {"gemv_split", "matmul"}
    assert len(table) == 2  # one config per (variant, M bucket) of the calls made
    path = table.save(fake_gpu)
    assert path.name == "fake-gpu-9000-80gb.json"
    data = json.loads(path.read_text())
    assert data["gpu"] == FAKE_GPU and set(data["configs"]) == set(table.configs)

    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(K, N), bits=4, group_size=128, symmetric=False,
                                    backend="triton").to(torch.float16)
    calls = _count_autotuner_runs(monkeypatch)
    for M in (1, 20):
        x = torch.randn(M, K, dtype=torch.float16)
        key = tuned.dequant_key(M, N, K, bits=4, group_size=128, symmetric=False, dtype=x.dtype,
                                param_dtype=layer.scales.dtype, device=x.device)
        stored = table.get(key)
        assert stored is not None, key
        # a distinct config in the file, so that the one launched is the one read from it
        changed = dict(stored, BLOCK_N=stored["BLOCK_N"] * 2)
        table.set(key, changed)
        table.save(fake_gpu)
        tuned.clear_cache()
        calls.clear()
        y = layer(x)
        assert calls == [], f"M={M}: the stored config should skip the autotuner, it ran {calls}"
        direct = dq.dequant_matmul(x, layer.packed, layer.scales, layer.zeros, bits=4, group_size=128,
                                   symmetric=False, bias=layer.bias, config=changed)
        assert torch.equal(y, direct)
        assert calls == []
        dq.dequant_matmul(x, layer.packed, layer.scales, layer.zeros, bits=4, group_size=128, symmetric=False)
        assert calls == [key.split("/")[1]]  # the spy sees an autotuned launch


def test_another_gpus_table_is_not_used_and_off_switch(fake_gpu, monkeypatch):
    N, K = 48, 256
    other = tuned.TunedConfigs("Other GPU")
    layer = QuantLinear.from_linear(torch.nn.Linear(K, N), bits=4, group_size=128, backend="triton")
    x = torch.randn(1, K)
    key = tuned.dequant_key(1, N, K, bits=4, group_size=128, symmetric=False, dtype=x.dtype,
                            param_dtype=layer.scales.dtype, device=x.device)
    other.set(key, {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1})
    other.save(fake_gpu)  # other-gpu.json: not this GPU's file
    calls = _count_autotuner_runs(monkeypatch)
    layer(x)
    assert calls == ["gemv_split"]
    # this GPU's table, but lookups turned off
    mine = tuned.TunedConfigs(FAKE_GPU, other.configs)
    mine.save(fake_gpu)
    tuned.clear_cache()
    monkeypatch.setenv("TKR_TUNED_CONFIGS", "0")
    layer(x)
    assert calls == ["gemv_split", "gemv_split"]
    monkeypatch.delenv("TKR_TUNED_CONFIGS")
    layer(x)
    assert calls == ["gemv_split", "gemv_split"]  # now read: no autotuner


def test_recording_notes_what_a_model_chose(fake_gpu):
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), bits=3, group_size=32, backend="triton")
    table = tuned.TunedConfigs(FAKE_GPU)
    layer(torch.randn(1, 64))
    assert len(table) == 0  # not recording
    with tuned.recording(table):
        layer(torch.randn(1, 64))
        layer(torch.randn(1, 2, 64))
    assert sorted(k.split("/")[1:3] for k in table.configs) == [["gemv_split", "M1"], ["gemv_split", "M16"]]


def test_bad_tables_and_configs_are_clear_errors(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="x.json: not a tuned-config table"):
        tuned.TunedConfigs.load(bad)
    bad.write_text(json.dumps({"gpu": "g", "version": 1, "configs": {"k": {"BLOCK_N": "16"}}}))
    with pytest.raises(ValueError, match="config of 'k' must map names to ints"):
        tuned.TunedConfigs.load(bad)
    with pytest.raises(ValueError, match="gpu must be a GPU name"):
        tuned.TunedConfigs("--")
    q, s, z = dq.quantize_rtn(torch.randn(16, 64), 4, 32, False)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="config must be a dict with exactly the keys BLOCK_N, BLOCK_K, SPLIT_K"):
        dq.dequant_matmul(x, dq.pack(q, 4), s, z, bits=4, group_size=32, symmetric=False, config={"BLOCK_N": 16})
    cfg = {"BLOCK_N": 16, "BLOCK_K": 24, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1}
    with pytest.raises(ValueError, match=r"config\['BLOCK_K'\] must be a power of two"):
        dq.dequant_matmul(x, dq.pack(q, 4), s, z, bits=4, group_size=32, symmetric=False, config=cfg)
    with pytest.raises(ValueError, match="variant must be one of"):
        dq.chosen_config("gemm")
