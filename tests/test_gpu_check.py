"""The plumbing of ``make gpu-check`` (benchmarks/gpu_check.py), run on CPU under the interpreter.

On a GPU the same cases run compiled; here they run at small shapes to show that every case builds
its inputs, calls the kernel and its reference and judges the result, and that the judge fails on
a wrong or missing output (a check that cannot fail would be worthless on the GPU too).
"""
import csv

import pytest
import torch

from benchmarks import gpu_check
from triton_kernels.provenance import KERNEL_REVISION


def test_cpu_correctness_plumbing_writes_all_ok(tmp_path, capsys):
    rc = gpu_check.main(["--device", "cpu", "--out-dir", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "correctness.csv")))
    assert rc == 0
    families = {r["family"] for r in rows}
    assert families == {"dequant", "sparse", "lowrank", "codebook"}
    assert {int(r["bits"]) for r in rows if r["family"] == "dequant"} == set(range(1, 9))
    assert {int(r["bits"]) for r in rows if r["family"] == "codebook"} == set(range(1, 9))
    assert {r["pattern"] for r in rows if r["family"] == "sparse"} == {"block", "nm", "unstructured", "activation"}
    assert all(r["status"] == "ok" for r in rows), [r["case"] for r in rows if r["status"] != "ok"]
    assert all(r["git_commit"] and r["torch"] and r["kernel_revision"] == str(KERNEL_REVISION) for r in rows)
    summary = list(csv.DictReader(open(tmp_path / "summary.csv")))
    # the sections that run on CPU, in priority order, each with the estimate it was admitted with
    assert [s["section"] for s in summary] == ["correctness", "harness", "compile", "decode"]
    assert all(float(s["estimate_s"]) > 0 for s in summary)
    out = capsys.readouterr().out
    assert out.index("gpu_check plan on cpu") < out.index("[correctness]")  # the plan first
    compiled = list(csv.DictReader(open(tmp_path / "compile.csv")))
    assert {r["dtype"] for r in compiled} == {"fp16", "bf16"}
    assert all(r["status"] == "ok" and r["graphs"] == "1" for r in compiled), compiled
    # the harness end to end on the device (here: the interpreter): each family through its Triton module
    # against its reference path, then latency --quick into its own table
    harness = list(csv.DictReader(open(tmp_path / "harness.csv")))
    assert [r["method"] for r in harness] == ["gptq", "sparsegpt", "squeezellm", "whitened_svd", "latency"]
    assert all(r["status"] == "ok" for r in harness), harness
    for r, module in zip(harness, ("QuantLinear", "SparseLinear", "CodebookLinear", "LowRankLinear")):
        assert r["triton_backends"] == f"{module}:triton"
        assert r["reference_backends"] == f"{module}:{gpu_check.REFERENCE_BACKENDS[module]}"
        assert float(r["ppl_rel_diff"]) <= gpu_check.HARNESS_RTOL and float(r["logits_rel_diff"]) <= 1e-3
        # the compression itself moved the perplexity by far more than the tolerance: an error of that
        # size in a kernel could not pass
        assert float(r["ppl_rel_vs_dense"]) > 10 * gpu_check.HARNESS_RTOL, r
    latency = list(csv.DictReader(open(tmp_path / "latency_cpu.csv")))
    assert latency and int(harness[-1]["latency_rows"]) == len(latency)
    assert {r["method"] for r in latency} >= {"rtn", "magnitude", "svd"}
    # end-to-end decode of a tiny Llama: dense and each compressed format through the Triton backends
    decode = list(csv.DictReader(open(tmp_path / "decode.csv")))
    assert [r["label"] for r in decode] == ["dense", "rtn-w4-g32-asym", "rtn-w3-g32-asym", "magnitude-2:4"]
    assert all(r["status"] == "ok" and float(r["tokens_per_s"]) > 0 for r in decode), decode
    for r in decode[1:]:
        assert float(r["speedup_vs_dense"]) > 0 and "triton" in r["module_backends"], r
    assert not (tmp_path / "configs").exists()  # tuned configs are a GPU's: none from the interpreter


def test_harness_fails_when_a_triton_path_is_wrong(tmp_path, monkeypatch):
    """A Triton path 1% off its reference (every QuantLinear output scaled) fails the harness check
    (RTN: no calibration pass, so the cheapest point that runs QuantLinear's Triton path)."""
    from triton_kernels import dequant_matmul as dq
    right = dq.dequant_matmul
    monkeypatch.setattr(dq, "dequant_matmul", lambda *a, **k: right(*a, **k) * 1.01)
    spec = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}
    rows = gpu_check.run_harness(torch.device("cpu"), float("inf"), tmp_path, specs=(spec,), latency=False)
    assert len(rows) == 1 and rows[0]["status"] == "FAIL", rows
    assert max(rows[0]["ppl_rel_diff"], rows[0]["logits_rel_diff"]) > gpu_check.HARNESS_RTOL


def _fake_section(name, estimate, clock, advance, calls, devices=("cuda", "cpu")):
    def run(ctx):
        calls.append(name)
        clock.t += advance
        ctx.save([{"x": 1}])
        return [{"x": 1}], "1/1 ok"
    return gpu_check.Section(name, f"fake {name}", run, lambda dev, w: estimate, devices=devices)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_budget_skips_a_section_whose_estimate_exceeds_what_is_left(tmp_path, capsys):
    clock, calls = FakeClock(), []
    registry = {"a": _fake_section("a", 10, clock, 10, calls), "b": _fake_section("b", 50, clock, 50, calls),
                "c": _fake_section("c", 10, clock, 10, calls)}
    args = ["--device", "cpu", "--out-dir", str(tmp_path), "--budget-s", "30"]
    assert gpu_check.main(args + ["--dry-run"], registry=registry) == 0
    plan = capsys.readouterr().out
    assert "skipped: estimate 50 s > 20 s left" in plan and "skipped by the budget: b" in plan
    assert calls == []  # a dry run runs nothing
    assert gpu_check.main(args, registry=registry, clock=clock) == 0
    assert calls == ["a", "c"]  # b would not fit after a; c, cheaper, still does
    summary = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [(s["section"], s["status"]) for s in summary] == [
        ("a", "1/1 ok"), ("b", "SKIPPED (estimate 50 s > 20 s left)"), ("c", "1/1 ok")]
    assert (tmp_path / "a.csv").exists() and not (tmp_path / "b.csv").exists()
    assert "[b] SKIPPED (estimate 50 s > 20 s left)" in capsys.readouterr().out


def test_watchdog_ends_a_call_that_overruns_the_budget(tmp_path, monkeypatch):
    """A section that does not return: GRACE_S past the budget the watchdog writes the summary (the
    section marked INTERRUPTED) and ends the call (here: a fake exit that records what was on disk)."""
    import threading
    monkeypatch.setattr(gpu_check, "GRACE_S", 0.0)
    fired, seen = threading.Event(), {}

    def hang(ctx):
        assert fired.wait(60), "the watchdog never fired"
        return [], "done"

    def fake_exit(code):
        seen["code"] = code
        seen["summary"] = list(csv.DictReader(open(tmp_path / "summary.csv")))
        fired.set()
    clock, calls = FakeClock(), []
    registry = {"quick": _fake_section("quick", 0.01, clock, 0, calls),
                "hang": gpu_check.Section("hang", "never returns", hang, lambda dev, w: 0.01, devices=("cpu",))}
    gpu_check.main(["--device", "cpu", "--out-dir", str(tmp_path), "--budget-s", "0.2"], registry=registry,
                   hard_exit=fake_exit)
    assert seen["code"] == 3
    assert [(s["section"], s["status"].split(" ")[0]) for s in seen["summary"]] == [("quick", "1/1"),
                                                                                     ("hang", "INTERRUPTED")]


def test_dry_run_lists_every_section_in_priority_order(capsys):
    assert gpu_check.main(["--dry-run", "--budget-s", "1000000"]) == 0  # no GPU needed
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out[2:-1]]
    assert [r[1] for r in rows] == list(gpu_check.SECTIONS)
    assert gpu_check.SECTIONS[:4] == ("correctness", "bandwidth", "decode4", "harness")  # what matters most first
    assert all(r[3] == "s" and float(r[2]) > 0 for r in rows)  # every section with its estimate
    assert {r[1] for r in rows if r[4] == "guess"} == {"harness", "gemlite", "compile", "decode"}
    assert out[-1].endswith("every section fits")
    assert gpu_check.main(["--dry-run", "--budget-s", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert all("skipped: estimate" in line for line in out[2:-1])
    assert out[-1].startswith("planned 0 s of 1 s; skipped by the budget: correctness, bandwidth")


def test_budget_and_workers_must_be_positive(capsys):
    for bad in (["--budget-s", "0"], ["--workers", "0"]):
        with pytest.raises(SystemExit):
            gpu_check.main(["--dry-run", *bad])
        assert bad[0] in capsys.readouterr().err


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
