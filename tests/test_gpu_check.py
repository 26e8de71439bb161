"""The plumbing of ``make gpu-check`` (benchmarks/gpu_check.py), run on CPU under the interpreter.

On a GPU the same cases run compiled; here they run at small shapes to show that every case builds
its inputs, calls the kernel and its reference and judges the result, and that the judge fails on
a wrong or missing output (a check that cannot fail would be worthless on the GPU too).
"""
import csv

import pytest
import torch

from benchmarks import gpu_check


def test_cpu_correctness_plumbing_writes_all_ok(tmp_path):
    rc = gpu_check.main(["--device", "cpu", "--out-dir", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "correctness.csv")))
    assert rc == 0
    families = {r["family"] for r in rows}
    assert families == {"dequant", "sparse", "lowrank", "codebook"}
    assert {int(r["bits"]) for r in rows if r["family"] == "dequant"} == set(range(1, 9))
    assert {int(r["bits"]) for r in rows if r["family"] == "codebook"} == set(range(1, 9))
    assert {r["pattern"] for r in rows if r["family"] == "sparse"} == {"block", "nm", "unstructured", "activation"}
    assert all(r["status"] == "ok" for r in rows), [r["case"] for r in rows if r["status"] != "ok"]
    assert all(r["git_commit"] and r["torch"] for r in rows)
    summary = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [s["section"] for s in summary] == ["correctness", "compile", "decode"]
    compiled = list(csv.DictReader(open(tmp_path / "compile.csv")))
    assert {r["dtype"] for r in compiled} == {"fp16", "bf16"}
    assert all(r["status"] == "ok" and r["graphs"] == "1" for r in compiled), compiled
    # end-to-end decode of a tiny Llama: dense and each compressed format through the Triton backends
    decode = list(csv.DictReader(open(tmp_path / "decode.csv")))
    assert [r["label"] for r in decode] == ["dense", "rtn-w4-g32-asym", "rtn-w3-g32-asym", "magnitude-2:4"]
    assert all(r["status"] == "ok" and float(r["tokens_per_s"]) > 0 for r in decode), decode
    for r in decode[1:]:
        assert float(r["speedup_vs_dense"]) > 0 and "triton" in r["module_backends"], r


def test_gpu_case_grid_covers_every_bit_width_group_and_dtype():
    cases = gpu_check.dequant_cases("cuda")
    seen = {(c["bits"], c["group_size"]) for c in cases}
    assert {(b, g) for b in range(1, 9) for g in (16, 32, 64, 128, 256, -1)} <= seen
    assert {c["dtype"] for c in cases} == {"fp16", "bf16", "fp32"}
    assert {c["M"] for c in cases} >= {1, 16, 33}  # both kernel paths
    assert {(c["N"], c["K"]) for c in cases} >= {(28672, 8192), (8192, 28672)}


def test_judge_fails_on_wrong_or_missing_outputs():
    ref = torch.randn(4, 8)
    bound = torch.ones(4, 8)
    case = {"family": "dequant"}
    assert gpu_check._judge(case, ref.clone(), ref, bound, torch.float16, K=8)["status"] == "ok"
    off = ref.clone()
    off[1, 2] += 0.01  # 20x the fp16 bound at |bound| = 1
    assert gpu_check._judge(case, off, ref, bound, torch.float16, K=8)["status"] == "FAIL"
    nan = ref.clone()
    nan[3, 7] = float("nan")
    row = gpu_check._judge(case, nan, ref, bound, torch.float16, K=8)
    assert row["status"] == "FAIL" and row["nan_outputs"] == 1


def test_unknown_section_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu", "--only", "correctness,speed"])
    assert "--only: unknown section(s) ['speed']" in capsys.readouterr().err


def test_gpu_codebook_grid_covers_every_bit_width_table_and_scaling():
    cases = gpu_check.codebook_cases("cuda")
    assert {(c["bits"], c["shared"]) for c in cases} == {(b, sh) for b in range(1, 9) for sh in (True, False)}
    assert {c["scales"] for c in cases} == {"g", "pc", "none"}
    assert {c["dtype"] for c in cases} == {"fp16", "bf16", "fp32"}
    assert {c["M"] for c in cases} >= {1, 16, 33}  # both kernel paths
    assert (28672, 8192) in {(c["N"], c["K"]) for c in cases}


def test_codebook_benchmark_rows_on_cpu(monkeypatch):
    """The codebook section's plumbing, under the interpreter with a fake timer: every variant gets a
    row with its time relative to the uniform kernel at the same bits (the timings are made up here)."""
    times = {"linear": 2.0, "dequant_matmul": 1.0, "codebook_matmul": 1.05}

    def fake_bench(fn):
        name = next(k for k in times if k in fn.__code__.co_names)  # the function the lambda calls
        return {"median_ms": times[name], "p20_ms": times[name], "p80_ms": times[name]}

    saved = []
    rows = gpu_check.run_codebook(torch.device("cpu"), 100.0, float("inf"), saved.append, shapes=[(40, 96)],
                                  bits_list=(4,), m_values=(1, 17), bench=fake_bench)
    variants = {(r["variant"], r["M"]) for r in rows}
    assert variants == {(v, M) for M in (1, 17) for v in ("dense_fp16", "int4_g128_asym", "codebook4_shared_g128",
                                                          "codebook4_rows_pc", "codebook4_shared_g128_load",
                                                          "codebook4_rows_pc_load")}
    cbr = [r for r in rows if r["variant"].startswith("codebook")]
    assert all(r["time_vs_uniform"] == 1.05 and r["speedup_vs_fp16"] == round(2.0 / 1.05, 3) for r in cbr)
    assert all(r["lookup"] == ("load" if r["variant"].endswith("_load") else "gather") for r in cbr)
    # weight bytes: 4-bit codes + the table + the scales, at 16 bits
    shared = next(r for r in cbr if r["table"] == "shared_g128")
    headline = gpu_check._codebook_headline(rows + [dict(shared, shape="28672x8192")])
    assert "4b shared_g128 M=1: x1.05 of uniform" in headline
    assert shared["weight_bytes"] == 40 * 96 // 2 + 16 * 2 + 40 * 1 * 2
    rows_pc = next(r for r in cbr if r["table"] == "rows_pc")
    assert rows_pc["weight_bytes"] == 40 * 96 // 2 + 40 * 16 * 2 + 40 * 2
    assert saved and saved[-1] is rows
