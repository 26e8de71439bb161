"""experiments.measure (formats, layer_latency, decode_speed, the latency CLI): spec -> format, layer shapes
from the model, well-formed upserted rows, decode speed.

Nothing here asserts on speed (timed tests flake on a shared machine): only on the rows' structure,
the ratio arithmetic within one run, and the device/backend bookkeeping.
"""
import json
import math
import os

import pytest
import torch

from experiments.core import results
from experiments.core.provenance import provenance
from experiments.measure import decode_speed, formats, latency, layer_latency

TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.mark.parametrize("spec, expected", [
    ({"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False},
     {"kind": "quant", "bits": 4, "group_size": 64, "symmetric": False}),
    # GPTQ on the same grid is timed as the same format: latency does not depend on the values.
    ({"method": "gptq", "bits": 4, "group_size": 64, "symmetric": False, "act_order": True},
     {"kind": "quant", "bits": 4, "group_size": 64, "symmetric": False}),
    ({"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True},
     {"kind": "quant", "bits": 8, "group_size": -1, "symmetric": True}),
    ({"method": "rtn", "bits": 3}, {"kind": "quant", "bits": 3, "group_size": 128, "symmetric": False}),
    ({"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}, {"kind": "sparse", "pattern": "nm", "n": 2, "m": 4}),
    ({"method": "sparsegpt", "pattern": "4:8"}, {"kind": "sparse", "pattern": "nm", "n": 4, "m": 8}),
    ({"method": "magnitude", "sparsity": 0.7}, {"kind": "sparse", "pattern": "unstructured", "sparsity": 0.7}),
    ({"method": "wanda", "sparsity": 0.5, "pattern": "block:16x32"},
     {"kind": "sparse", "pattern": "block", "sparsity": 0.5, "block": (16, 32)}),
    ({"method": "svd", "ratio": 0.5}, {"kind": "lowrank", "ratio": 0.5}),
    ({"method": "whitened_svd", "rank": 64}, {"kind": "lowrank", "rank": 64}),
    ({"method": "combo", "steps": [{"method": "sparsegpt", "pattern": "2:4"}, {"method": "gptq", "bits": 4}]},
     {"kind": "sparse", "pattern": "nm", "n": 2, "m": 4}),
    ({"method": "dense"}, {"kind": "dense"}),
    ({"method": "rtn", "bits": 5, "group_size": 128, "cache_dequantized": True},
     {"kind": "quant", "bits": 5, "group_size": 128, "symmetric": False, "cache_dequantized": True}),
], ids=["rtn4g64", "gptq-same-grid", "rtn8pc-sym", "rtn3-default-group", "wanda2:4", "sparsegpt4:8",
        "magnitude70", "wanda-block16x32", "svd-ratio", "wsvd-rank", "combo-2:4+gptq", "dense", "rtn5-dense-cache"])
def test_format_of(spec, expected):
    assert formats.format_of(spec) == expected


@pytest.mark.parametrize("spec, exc, words", [
    ({"method": "svd", "energy": 0.9}, ValueError, "energy"),
    ({"method": "magnitude", "sparsity": 0.5, "pattern": "diagonal"}, ValueError, "pattern"),
    ({"bits": 4}, TypeError, "method"),
    ({"method": "mystery"}, ValueError, "no known format"),
], ids=["energy-needs-real-weights", "bad-pattern", "no-method", "unknown"])
def test_format_of_rejects(spec, exc, words):
    with pytest.raises(exc, match=words):
        formats.format_of(spec)


@pytest.mark.parametrize("N, K, ratio", [(576, 576, 0.5), (192, 576, 0.3), (11008, 4096, 0.25)],
                         ids=["576x576", "192x576", "11008x4096"])
def test_rank_for_ratio_keeps_at_most_ratio_of_the_parameters(N, K, ratio):
    r = formats.rank_for(N, K, {"kind": "lowrank", "ratio": ratio})
    assert r * (N + K) <= ratio * N * K < (r + 1) * (N + K)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY_LLAMA)
    return transformers.LlamaForCausalLM(cfg).eval(), cfg


def test_model_layer_shapes_come_from_the_model():
    model, cfg = _tiny_llama()
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    got = {(N, K): set(names.split(",")) for names, N, K in layer_latency.model_layer_shapes(model)}
    assert got == {(h, h): {"q_proj", "o_proj"}, (kv, h): {"k_proj", "v_proj"},
                   (i, h): {"gate_proj", "up_proj"}, (h, i): {"down_proj"}}


# ------------------------------------------------------------------------------------- rows

TINY_SHAPES = [("tiny_a", 48, 64), ("tiny_b", 40, 96)]
TINY_M = [1, 3]
TINY_SPECS = [
    {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
    {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False},  # same format as the RTN point
    {"method": "magnitude", "sparsity": 0.5, "pattern": "2:4"},
    {"method": "svd", "rank": 8},
    # the same quant format with the opt-in dense cache: a separate row, its resident bytes shown
    {"method": "rtn", "bits": 6, "group_size": 32, "symmetric": False, "cache_dequantized": True},
]


_MODULE_OF = {"quant": "triton_kernels.nn.quant", "sparse": "triton_kernels.nn.sparse",
              "lowrank": "triton_kernels.nn.lowrank"}


def _available_specs():
    """The tiny specs whose module has landed (the modules are written in parallel with this file)."""
    import importlib.util
    pytest.importorskip("experiments.core.timing")
    specs = [s for s in TINY_SPECS
             if importlib.util.find_spec(_MODULE_OF[formats.format_of(s)["kind"]]) is not None]
    if not specs:
        pytest.skip("no compressed-layer module (triton_kernels.nn.*) importable yet")
    return specs


@pytest.fixture(scope="module")
def _tiny_table(tmp_path_factory):
    specs = _available_specs()
    out = tmp_path_factory.mktemp("latency") / "latency_cpu.csv"
    rows = layer_latency.run_latency(specs, TINY_SHAPES, TINY_M, device="cpu", min_run_time=0.001,
                               out=out, log=lambda s: None)
    return out, rows, specs


@pytest.fixture()
def tiny_run(_tiny_table, tmp_path):
    """One timed run shared by the tests; each gets its own copy of the table to rerun into."""
    out, rows, specs = _tiny_table
    mine = tmp_path / out.name
    mine.write_bytes(out.read_bytes())
    return mine, rows, specs


def test_rows_are_well_formed(tiny_run):
    out, rows, specs = tiny_run
    on_disk = results.read_rows(out)
    assert len(on_disk) == len(rows) == len(TINY_SHAPES) * len(TINY_M) * (2 + len(specs))
    prov = provenance("cpu")
    for r in on_disk:
        assert r["status"] == "ok", r["status"]
        assert r["device_type"] == "cpu" and r["device"] == prov["device"]
        assert r["weights"] == layer_latency.WEIGHTS_NOTE
        assert "benchmark" in r["timer"].lower(), r["timer"]  # torch.utils.benchmark on CPU
        assert r["backend"] not in ("", "auto", "unknown", "triton"), r["backend"]
        p20, med, p80 = float(r["p20_ms"]), float(r["median_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= med <= p80 and math.isfinite(p80)
        assert float(r["memory_bytes"]) > 0 and float(r["resident_bytes"]) > 0
        spec = json.loads(r["spec"])
        if spec.get("pattern") == "2:4":
            # The sparse format (16-bit values + 2-bit indices), not the masked dense fp32 weight the
            # CPU backend keeps while timing (that one is resident_bytes).
            assert float(r["bits_per_weight"]) == 9.0 and r["backend"] == "dense"
            assert int(r["resident_bytes"]) == 4 * int(r["N"]) * int(r["K"])
        kind = formats.format_of(spec)["kind"]
        assert r["kind"] == kind
        if kind == "dense":
            assert r["act_dtype"] == spec["dtype"] and r["backend"] == "torch"
        elif kind == "quant":
            assert r["act_dtype"] == "bf16"  # weight-only CPU kernels run with bf16 activations
            N, K = int(r["N"]), int(r["K"])
            if spec.get("cache_dequantized"):
                assert r["format"].endswith("+dense cache")
                if r["backend"] == "dequant":  # auto chose the dense bf16 copy: its bytes are resident
                    assert int(r["resident_bytes"]) >= 2 * N * K
            else:  # the compressed paths only: no dense copy resident
                assert r["backend"] in ("torch_int4", "torch_int4x2", "torch_int8"), r["backend"]
                assert int(r["resident_bytes"]) < 2 * N * K
        assert float(r["load_avg_1m"]) >= 0
        for col in ("cpu_model", "cpu_isa", "torch_cpu_capability"):
            assert r[col] == prov[col]
    assert {r["act_dtype"] for r in on_disk if r["kind"] == "dense"} == {"fp32", "bf16"}
    # The interpreter was hidden only while timing (conftest sets it for the kernel tests).
    assert os.environ.get("TRITON_INTERPRET") == "1"


def test_speedup_is_the_ratio_to_dense_of_the_same_run(tiny_run):
    out, _, _ = tiny_run
    rows = results.read_rows(out)
    assert len({r["run_id"] for r in rows}) == 1
    dense = {(r["N"], r["M"], json.loads(r["spec"])["dtype"]): float(r["median_ms"])
             for r in rows if r["kind"] == "dense"}
    compressed = [r for r in rows if r["kind"] != "dense"]
    assert compressed
    for r in compressed:
        for dt in ("fp32", "bf16"):
            d = dense[(r["N"], r["M"], dt)]
            assert float(r[f"dense_{dt}_median_ms"]) == pytest.approx(d, rel=1e-12)
            assert float(r[f"speedup_vs_dense_{dt}"]) == pytest.approx(d / float(r["median_ms"]), rel=1e-9)


def test_interleaved_ratios_are_medians_of_per_round_ratios(tmp_path, monkeypatch):
    """interleave=R: each point and the dense layers are timed in R alternating rounds; the speedup is
    the median of the per-round ratios (not a ratio of medians), and the rows say so."""
    from experiments.core import timing
    specs = _available_specs()[:1]
    seen = []
    real = timing.time_interleaved

    def spy(fns, device, *, rounds, min_run_time):
        out = real(fns, device, rounds=rounds, min_run_time=min_run_time)
        seen.append((list(fns), out))
        return out
    monkeypatch.setattr(timing, "time_interleaved", spy)
    out = tmp_path / "latency_cpu.csv"
    rows = layer_latency.run_latency(specs, TINY_SHAPES[:1], TINY_M[:1], device="cpu", min_run_time=0.001, out=out,
                               interleave=3, log=lambda s: None)
    compressed = [r for r in rows if r["kind"] != "dense"]
    assert compressed and len(seen) == len(compressed)
    for r, (names, ts) in zip(compressed, seen):
        assert names == ["dense_fp32", "dense_bf16", "format"]
        assert r["ratio_method"] == "interleaved: median over 3 rounds of dense/format"
        assert all(len(t["rounds_ms"]) == 3 for t in ts.values())
        assert r["median_ms"] == ts["format"]["median_ms"]
        for dt in ("fp32", "bf16"):
            per_round = sorted(d / f for d, f in zip(ts[f"dense_{dt}"]["rounds_ms"], ts["format"]["rounds_ms"]))
            assert r[f"speedup_vs_dense_{dt}"] == pytest.approx(per_round[1], rel=1e-12)
            assert r[f"dense_{dt}_median_ms"] == ts[f"dense_{dt}"]["median_ms"]
    with pytest.raises(ValueError, match="interleave"):
        layer_latency.run_latency(specs, TINY_SHAPES[:1], TINY_M[:1], device="cpu", out=out, interleave=-1)


def test_time_interleaved_alternates_and_checks_rounds():
    from experiments.core import timing
    order = []
    out = timing.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, "cpu",
                                  rounds=2, min_run_time=0.002)
    assert set(out) == {"a", "b"} and all(len(v["rounds_ms"]) == 2 for v in out.values())
    # round 1 times a then b, round 2 again: the calls of b come between two blocks of a
    first_b = order.index("b")
    assert "a" in order[first_b:]
    assert "2 interleaved rounds" in out["a"]["timer"]
    with pytest.raises(ValueError, match="rounds"):
        timing.time_interleaved({"a": lambda: None}, "cpu", rounds=0, min_run_time=0.01)


def test_specs_of_one_format_share_one_timing(tiny_run):
    out, _, _ = tiny_run
    rows = results.read_rows(out)
    by = {}
    for r in rows:
        if r["method"] in ("rtn", "gptq"):
            by.setdefault((r["N"], r["M"], r["format"]), {})[r["method"]] = r["median_ms"]
    both = [v for v in by.values() if len(v) == 2]
    assert both and all(v["rtn"] == v["gptq"] for v in both)


def test_cpu_targets_preset_times_every_target_format_in_one_run(monkeypatch, tmp_path):
    """--formats cpu-targets: bits {2,3,4,5,6,8} x groups {32,64,128,-1} (+ dense-cache variants)
    at 4096x4096 and N=4096 x K=11008, M=1 and 16, in one run_latency call (ratios in one run)."""
    import argparse
    p = layer_latency.FORMAT_PRESETS["cpu-targets"]
    grid = {(s["bits"], s["group_size"]) for s in p["specs"] if not s.get("cache_dequantized")}
    assert grid == {(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128, -1)}
    assert {(n, k) for _, n, k in p["shapes"]} == {(4096, 4096), (4096, 11008)} and tuple(p["Ms"]) == (1, 16)
    calls = []
    monkeypatch.setattr(latency, "run_latency",
                        lambda specs, shapes, Ms, **kw: calls.append((specs, shapes, Ms, kw["interleave"])) or [])
    monkeypatch.setattr(latency, "default_model_shapes", lambda: pytest.fail("a preset needs no model"))
    ap = argparse.ArgumentParser()
    latency.add_arguments(ap)
    latency.main(ap.parse_args(["--formats", "cpu-targets", "--out", str(tmp_path / "latency_cpu.csv")]))
    # its ratios come from rounds interleaved with the dense layers; --interleave overrides
    assert calls == [(list(p["specs"]), list(p["shapes"]), list(p["Ms"]), p["interleave"])] and p["interleave"] > 1
    latency.main(ap.parse_args(["--formats", "cpu-targets", "--interleave", "0",
                                "--out", str(tmp_path / "latency_cpu.csv")]))
    assert calls[-1][3] == 0
    with pytest.raises(ValueError, match="--formats cpu-targets"):
        latency.main(ap.parse_args(["--formats", "cpu-targets", "--sweep", "quant",
                                    "--out", str(tmp_path / "latency_cpu.csv")]))


def test_rerun_upserts_instead_of_duplicating(tiny_run):
    out, first, specs = tiny_run
    second = layer_latency.run_latency(specs[:1], TINY_SHAPES[:1], TINY_M[:1], device="cpu",
                                 min_run_time=0.001, out=out, log=lambda s: None)
    rows = results.read_rows(out)
    assert len(rows) == len(first)
    keys = [tuple(r[k] for k in layer_latency.KEY) for r in rows]
    assert len(set(keys)) == len(keys)
    new_run = second[0]["run_id"]
    replaced = [r for r in rows if r["run_id"] == new_run]
    assert len(replaced) == len(second) == 3  # two dense baselines + the one point


def test_resume_skips_finished_points(tiny_run):
    out, first, specs = tiny_run
    again = layer_latency.run_latency(specs, TINY_SHAPES, TINY_M, device="cpu", min_run_time=0.001,
                                out=out, resume=True, log=lambda s: None)
    assert again == []
    assert len(results.read_rows(out)) == len(first)


def test_cuda_request_without_cuda_is_an_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="device"):
        layer_latency.run_latency(TINY_SPECS, TINY_SHAPES, TINY_M, device="cuda", out=tmp_path / "x.csv")


# ------------------------------------------------------------------------------------- decode

def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, TINY_LLAMA["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def test_decode_tokens_per_second_on_a_tiny_llama(tmp_path):
    model, cfg = _tiny_llama()
    model.generation_config.eos_token_id = 2  # a random model may emit it: min_new_tokens must hold the length
    tok = _tiny_tokenizer()
    r = decode_speed.decode_tokens_per_second(model, tok, prompt="w3 w4 w5 w6", new_tokens=7, repeats=2)
    assert r["new_tokens"] == 7 and r["prompt_tokens"] == 4 and r["repeats"] == 2
    assert r["seconds_min"] <= r["seconds_median"]
    assert r["tokens_per_s"] == pytest.approx(7 / r["seconds_median"])
    out = tmp_path / "decode_cpu.csv"
    decode_speed.record_decode(model, tok, label="dense", prompt="w3 w4 w5 w6", new_tokens=5, repeats=1, out=out)
    row = decode_speed.record_decode(model, tok, label="dense", prompt="w3 w4 w5 w6", new_tokens=5, repeats=1,
                                out=out, dense_tokens_per_s=100.0)
    rows = results.read_rows(out)
    assert len(rows) == 1 and rows[0]["device_type"] == "cpu" and rows[0]["dtype"] == "fp32"
    assert float(rows[0]["speedup_vs_dense"]) == pytest.approx(row["tokens_per_s"] / 100.0)


def test_decode_under_torch_compile_gives_the_eager_tokens(monkeypatch):
    """``compile=True``: static cache + fullgraph-compiled forward of a quantized tiny Llama (CPU
    backends); the tokens equal eager greedy decoding and the model's forward is restored after."""
    from experiments.methods.compress import compress_model, parse_spec
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU weight-only ops, not the interpreter
    model, _ = _tiny_llama()
    model.generation_config.eos_token_id = 2
    compress_model(model, parse_spec({"method": "rtn", "bits": 4, "group_size": 32}), None, progress=False)
    model.to(torch.bfloat16)
    ids = torch.arange(3, 9).unsqueeze(0)
    kw = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=1, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        eager = model.generate(ids, **kw)
    r = decode_speed.decode_tokens_per_second(model, None, input_ids=ids, new_tokens=4, repeats=1, progress=False,
                                         compile=True)
    assert r["compiled"] and r["compile_seconds"] > 0 and r["new_tokens"] == 4 and "torch.compile" in r["timer"]
    assert "forward" not in model.__dict__  # the compiled forward was removed again
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw, cache_implementation="static"), eager)


def test_step_decoder_gives_generate_s_greedy_tokens_eager_and_compiled(monkeypatch):
    """StepDecoder (the engine-style ``tg`` timing: prefill untimed, one-token steps, static cache): its greedy
    tokens equal ``generate``'s, eagerly (fp32) and with the step compiled (4-bit tiny Llama, bf16, the CPU
    weight-only ops), and a repeated call starts again from the prompt (the cache is reset)."""
    from experiments.methods.compress import compress_model, parse_spec
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, _ = _tiny_llama()
    model.generation_config.eos_token_id = 2
    ids = torch.arange(3, 9).unsqueeze(0)
    kw = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=1, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = model.generate(ids, **kw)[0, 6:].tolist()
    dec = decode_speed.StepDecoder(model, ids[0].tolist(), 5, compile=False)
    seconds, got = dec()
    assert got == want and dec.eager_tokens == want and seconds > 0 and dec.compile_seconds is None
    assert dec()[1] == want
    compress_model(model, parse_spec({"method": "rtn", "bits": 4, "group_size": 32}), None, progress=False)
    model.to(torch.bfloat16)
    with torch.no_grad():
        want = model.generate(ids, **kw, cache_implementation="static")[0, 6:].tolist()
    dec = decode_speed.StepDecoder(model, ids[0].tolist(), 5, compile=True, fuse=True)   # q/k/v, gate/up fused
    assert dec.fused == {"attention": 2, "mlp": 2, "left": 0}
    assert dec.compile_seconds > 0 and dec.eager_tokens == want and dec()[1] == want
    # Where the time goes: every category's milliseconds per token, summing to the profiled run's wall time.
    for compiled in (False, True):
        prof = decode_speed.profile_step(dec, compiled=compiled)
        wall = prof.pop("wall")
        assert wall > 0 and all(v >= 0 for v in prof.values())
        assert prof["linear layers"] > 0 and sum(prof.values()) == pytest.approx(wall, rel=0.05)
        assert (prof["compiled graph (fused kernels and glue)"] > 0) == compiled
    assert dec()[1] == want        # the compiled step is back after profiling the eager one
    with pytest.raises(ValueError, match="new_tokens=0 must be a positive int"):
        decode_speed.StepDecoder(model, [3, 4], 0)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        decode_speed.StepDecoder(model, [], 3)


def test_decode_from_token_ids_without_a_tokenizer():
    model, _ = _tiny_llama()
    model.generation_config.eos_token_id = 2
    ids = torch.arange(3, 9).unsqueeze(0)
    r = decode_speed.decode_tokens_per_second(model, None, input_ids=ids, new_tokens=5, repeats=1, progress=False)
    assert r["new_tokens"] == 5 and r["prompt_tokens"] == 6 and r["prompt"] == "<6 token ids>"
    with pytest.raises(ValueError, match="input_ids must be a \\(1, n\\) LongTensor"):
        decode_speed.decode_tokens_per_second(model, None, input_ids=torch.ones(2, 3, dtype=torch.long), new_tokens=2)


def test_sweep_specs_leave_out_model_level_families():
    """Structured pruning changes the model's shapes, not a layer's format: no layer timing rows for it."""
    specs = layer_latency.load_sweep_specs("structured", quick=False)
    assert specs == []
    assert layer_latency.load_sweep_specs("sparsity", quick=True)


@pytest.mark.parametrize("kw, words", [({"new_tokens": 0}, "new_tokens"), ({"repeats": 0}, "repeats")],
                         ids=["zero-tokens", "zero-repeats"])
def test_decode_rejects_bad_arguments(kw, words):
    model, _ = _tiny_llama()
    with pytest.raises(ValueError, match=words):
        decode_speed.decode_tokens_per_second(model, _tiny_tokenizer(), **kw)


# ------------------------------------------------------------------------------ one machine per table

def test_latency_into_a_table_of_another_machine_is_refused_before_timing(tiny_run):
    """The second-machine case: its rows must not be appended to the first machine's table."""
    out, first, specs = tiny_run
    rows = [{**r, "device": "CPU Intel(R) Xeon(R) (2 threads)"} for r in results.read_rows(out)]
    results.write_rows(out, rows)
    before = out.read_bytes()
    timed = []
    with pytest.raises(results.ContextMismatch, match=r"device: table has 'CPU Intel\(R\) Xeon\(R\) \(2 threads\)'"):
        layer_latency.run_latency(specs, TINY_SHAPES, TINY_M, device="cpu", min_run_time=0.001, out=out, resume=True,
                            log=timed.append)
    assert timed == [] and out.read_bytes() == before


def test_decode_resume_skips_finished_rows_without_loading_the_model(tmp_path, monkeypatch):
    """A rerun of reproduce's decode step with every row present measures nothing and loads no model."""
    from experiments.lm import models
    from experiments.methods.compress import parse_spec

    def no_load(*a, **k):
        raise AssertionError("the model was loaded although every decode row was done")

    monkeypatch.setattr(models, "load_model", no_load)
    specs = [{"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False},
             {"method": "gptq", "bits": 4, "group_size": 64}]  # calibrated: never decoded
    prov = provenance("cpu")
    out = tmp_path / "decode_cpu.csv"
    done = []
    for label, spec in (("dense", {"method": "dense"}), (parse_spec(specs[0]).label(), parse_spec(specs[0]).to_dict())):
        for dt in ("fp32", "bf16"):
            done.append({**prov, "label": f"{label} {dt}", "spec": json.dumps(spec, sort_keys=True), "dtype": dt,
                         "new_tokens": 8, "prompt": decode_speed.DEFAULT_PROMPT, "tokens_per_s": 10.0})
    results.write_rows(out, done)
    before = out.read_bytes()
    log = []
    assert decode_speed.run_decode(specs, device=torch.device("cpu"), new_tokens=8, out=out, resume=True,
                              log=log.append) == []
    assert log == [f"[decode cpu] {parse_spec(specs[0]).label()}: already in {out}"] and out.read_bytes() == before
    # A table of another machine is refused before anything is measured.
    results.write_rows(out, [{**r, "device": "CPU other (2 threads)"} for r in done])
    with pytest.raises(results.ContextMismatch, match="device"):
        decode_speed.run_decode(specs, device=torch.device("cpu"), new_tokens=8, out=out, resume=True, log=log.append)


def test_decode_speedups_against_the_fastest_dense_dtype_of_the_same_run(tmp_path, monkeypatch):
    """Issue 25.3: every decode row also carries its speed over the fastest dense dtype measured in the same
    run (synthetic speeds: dense fp32 decodes faster than dense bf16, as on the Intel/AMX machine), never
    over a dense row of another run (resumed from the table), and compiled rows only over compiled dense."""
    from experiments.lm import models
    speeds = {"dense fp32": 30.0, "dense bf16": 25.0, "svd-ratio0.5 fp32": 20.0, "svd-ratio0.5 bf16": 27.0,
              "magnitude-2:4 bf16": 24.0, "magnitude-2:4 fp32": 12.0, "rtn-w4-g32-asym bf16": 40.0,
              "dense bf16 compiled": 35.0, "rtn-w4-g32-asym bf16 compiled": 70.0}

    def fake_speed(model, tokenizer, *, label, compile=False, **kw):
        return {"tokens_per_s": speeds[label.removeprefix("decode ")], "new_tokens": kw["new_tokens"],
                "prompt": decode_speed.DEFAULT_PROMPT, "compiled": compile}
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_tiny_llama()[0], None, {}))
    monkeypatch.setattr(decode_speed, "decode_tokens_per_second", fake_speed)
    out = tmp_path / "decode_cpu.csv"
    cpu = torch.device("cpu")
    svd, mag, rtn = ({"method": "svd", "ratio": 0.5}, {"method": "magnitude", "pattern": "2:4"},
                     {"method": "rtn", "bits": 4, "group_size": 32})

    first = decode_speed.run_decode([svd], device=cpu, new_tokens=8, out=out, log=lambda s: None)
    by = {r["label"]: r for r in first}
    assert set(by) == {"dense fp32", "dense bf16", "svd-ratio0.5 fp32", "svd-ratio0.5 bf16"}
    for label, r in by.items():
        assert r["fastest_dense_dtype"] == "fp32" and r["fastest_dense_tokens_per_s"] == 30.0
        assert r["speedup_vs_fastest_dense"] == pytest.approx(speeds[label] / 30.0)
    assert by["svd-ratio0.5 bf16"]["speedup_vs_dense"] == pytest.approx(27 / 25)   # the same-dtype ratio stays
    table = {r["label"]: r for r in results.read_rows(out)}
    assert float(table["dense bf16"]["speedup_vs_fastest_dense"]) == pytest.approx(25 / 30)
    assert float(table["svd-ratio0.5 bf16"]["speedup_vs_fastest_dense"]) == pytest.approx(27 / 30)

    # reproduce's second call, bf16 only: still against the fp32 dense model the first call measured.
    (row,) = decode_speed.run_decode([mag], device=cpu, new_tokens=8, out=out, resume=True, dtypes=(torch.bfloat16,),
                                     dense_measured=first, log=lambda s: None)
    assert row["fastest_dense_dtype"] == "fp32" and row["speedup_vs_fastest_dense"] == pytest.approx(24 / 30)
    # Another run resuming the table: its dense rows are not this run's, so no fastest-dense columns.
    (row,) = decode_speed.run_decode([rtn], device=cpu, new_tokens=8, out=out, resume=True, dtypes=(torch.bfloat16,),
                                     log=lambda s: None)
    assert row["speedup_vs_dense"] == pytest.approx(40 / 25)
    assert not set(decode_speed.FASTEST_DENSE_COLUMNS) & set(row)
    assert results.read_rows(out)[-1]["speedup_vs_fastest_dense"] == ""
    # Compiled rows: over the compiled dense model only, never the eager fp32 one.
    rows = decode_speed.run_decode([rtn], device=cpu, new_tokens=8, out=out, dtypes=(torch.bfloat16,), compile=True,
                                   dense_measured=first, log=lambda s: None)
    assert [r["fastest_dense_dtype"] for r in rows] == ["bf16", "bf16"]
    assert rows[1]["speedup_vs_fastest_dense"] == pytest.approx(70 / 35)


def test_decode_reports_progress_on_stderr(capsys, monkeypatch):
    """Issue 8: decode timing was silent for ~60 s per model; it now prints a line per generate call
    (in a redirected log: plain lines, see experiments.core.progress)."""
    monkeypatch.setenv("TKR_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    model, _ = _tiny_llama()
    decode_speed.decode_tokens_per_second(model, _tiny_tokenizer(), prompt="w3 w4", new_tokens=2, repeats=2,
                                     label="decode tiny fp32")
    cap = capsys.readouterr()
    err = cap.err.splitlines()
    assert cap.out == ""
    assert err[0] == "[decode tiny fp32] 0/3 generate call"
    assert err[1].startswith("[decode tiny fp32] 1/3 generate call")
    assert err[-1].startswith("[decode tiny fp32] done: 3/3 generate call")


def test_decode_only_and_decode_dtypes(monkeypatch, tmp_path):
    """--decode --decode-only skips the layer table; --decode-dtypes picks the decode dtypes; both are
    checked before anything runs."""
    import argparse
    calls = []
    monkeypatch.setattr(latency, "run_latency", lambda *a, **k: calls.append("layers") or [])
    monkeypatch.setattr(latency, "run_decode", lambda specs, **k: calls.append(("decode", k["dtypes"])))
    monkeypatch.setattr(latency, "default_model_shapes", lambda: [("tiny", 8, 8)])
    ap = argparse.ArgumentParser()
    latency.add_arguments(ap)
    out = str(tmp_path / "latency_cpu.csv")
    latency.main(ap.parse_args(["--sweep", "quant", "--decode", "--decode-only", "--decode-dtypes", "bf16",
                                "--out", out]))
    assert calls == [("decode", (torch.bfloat16,))]
    latency.main(ap.parse_args(["--sweep", "quant", "--decode", "--out", out]))
    assert calls[1:] == ["layers", ("decode", (torch.float32, torch.bfloat16))]
    for argv, words in ((["--decode-only"], "--decode-only"),
                        (["--decode", "--decode-dtypes", "int8"], "--decode-dtypes"),
                        (["--decode", "--decode-dtypes", ","], "--decode-dtypes")):
        with pytest.raises(ValueError, match=words):
            latency.main(ap.parse_args(["--sweep", "quant", *argv, "--out", out]))
    assert len(calls) == 3
