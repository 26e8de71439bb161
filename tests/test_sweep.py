"""Sweeps as data: the shipped YAML files parse, ids are stable, bad sweep files fail clearly.

No model is loaded here (see test_cli.py for runs on a tiny model).
"""
import json

import pytest

from experiments.methods.compress import parse_spec
from experiments.run.point import method_columns
from experiments.run.sweep import point_id
from experiments.run.sweep_config import SWEEPS_DIR, available_sweeps, load_sweep, resolve_sweeps

SHIPPED = ("quant", "sparsity", "lowrank", "combo", "nonuniform", "structured", "modern")
SETTINGS = {"seqlen": 512, "eval_tokens": 8192, "calib_samples": 16, "calib_seqlen": 512, "seed": 0}
CORPUS = {"corpus": "austen", "calibration": "a", "evaluation": "b"}


def test_shipped_sweeps_are_listed():
    assert set(SHIPPED) <= set(available_sweeps())
    assert "_defaults" not in available_sweeps()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sweep_parses_with_unique_points(name):
    sw = load_sweep(SWEEPS_DIR / f"{name}.yaml")
    for quick in (False, True):
        pts = sw.points(quick)
        assert pts, f"{name} quick={quick} has no points"
        ids = {point_id(p, sw.settings(quick), "m", CORPUS) for p in pts}
        assert len(ids) == len(pts), f"{name}: duplicate point ids"
    # Quick mode exists to be small: a few points and a small evaluation budget.
    assert len(sw.quick_points) <= 4
    assert sw.quick_settings["eval_tokens"] < sw.full_settings["eval_tokens"]


def test_quant_sweep_covers_the_grid():
    sw = load_sweep(SWEEPS_DIR / "quant.yaml")
    got = {(p.method, p.bits, p.group_size) for p in sw.full_points if p.method != "dense"}
    rtn = {("rtn", b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128, -1)}
    gptq = {("gptq", b, g) for b in (3, 4) for g in (64, -1)} | {("gptq", 2, 64)}
    assert got == rtn | gptq
    # Every GPTQ point has its RTN counterpart (same bits and group) to compare with.
    assert {("rtn", b, g) for _, b, g in gptq} <= rtn


def test_resolve_all_and_unknown_name():
    # Each sweep, followed by its seed sweeps (its points' other calibration seeds, tests/test_seeds.py).
    got = [s.name for s in resolve_sweeps("all")]
    assert [n for n in got if ".seed" not in n] == sorted(available_sweeps())
    assert got == [s.name for n in sorted(available_sweeps()) for s in [load_sweep(available_sweeps()[n]),
                                                                        *load_sweep(available_sweeps()[n]).seed_sweeps()]]
    with pytest.raises(ValueError, match=r"sweep='nope' is not known; choose one of .*quant"):
        resolve_sweeps("nope")


def test_point_id_is_stable_and_sensitive():
    a = parse_spec({"method": "gptq", "bits": 3, "group_size": 64, "act_order": True})
    b = parse_spec({"act_order": True, "group_size": 64, "bits": 3, "method": "gptq"})
    assert point_id(a, SETTINGS, "m", CORPUS) == point_id(b, SETTINGS, "m", CORPUS)
    assert point_id(a, SETTINGS, "m", CORPUS) != point_id(a, {**SETTINGS, "seed": 1}, "m", CORPUS)
    assert point_id(a, SETTINGS, "m", CORPUS) != point_id(a, SETTINGS, "other", CORPUS)
    assert point_id(a, SETTINGS, "m", CORPUS) != point_id(a, SETTINGS, "m", {**CORPUS, "evaluation": "c"})
    # Explicit defaults and omitted defaults are the same point.
    c = parse_spec({"method": "gptq", "bits": 3, "group_size": 64, "act_order": True, "symmetric": False, "damp": 0.01})
    assert point_id(a, SETTINGS, "m", CORPUS) == point_id(c, SETTINGS, "m", CORPUS)


def test_method_columns_flatten_a_combo():
    spec = parse_spec({"method": "combo", "steps": [{"method": "sparsegpt", "pattern": "2:4"},
                                                     {"method": "gptq", "bits": 4, "group_size": 64}]})
    cols = method_columns(spec)
    assert (cols["method"], cols["prune_method"], cols["quant_method"]) == ("combo", "sparsegpt", "gptq")
    assert (cols["bits"], cols["group_size"], cols["pattern"], cols["sparsity"]) == (4, 64, "2:4", 0.5)
    assert parse_spec(json.loads(cols["spec"])) == spec


@pytest.mark.parametrize("body, match", [
    ("name: x\npoints: [{method: rtn, bits: 9}]\n", r"points\[0\].*bits=9 must be an integer in 1\.\.8"),
    ("name: x\ngrid: [{method: [rtn], bits: [1, 0]}]\n", r"grid\[0\].*bits=0 must be an integer in 1\.\.8"),
    ("name: x\ngrid: [{method: [rtn], bits: [4], groupsize: [64]}]\n", r"grid\[0\].*unknown option.*groupsize"),
    ("name: x\npoints: [{method: dense}]\nsettings: {eval_tokenz: 10}\n", r"unknown setting 'eval_tokenz'"),
    ("name: x\npoints: [{method: dense}]\nsettings: {seqlen: 0}\n", r"seqlen=0 must be a positive integer"),
    ("name: x\npoints: [{method: dense}]\nsettings: {seqlen: 512, eval_tokens: 500}\n",
     r"eval_tokens=500 is smaller than seqlen=512, so no evaluation window fits"),
    ("name: x\npoint: [{method: dense}]\n", r"unknown key\(s\) \['point'\]"),
    ("name: x\n", r"no points"),
], ids=["bits", "bits-grid", "grid-option", "setting-name", "setting-value", "budget-below-seqlen", "top-key", "empty"])
def test_bad_sweep_file_names_the_problem(tmp_path, body, match):
    f = tmp_path / "x.yaml"
    f.write_text(body)
    with pytest.raises(ValueError, match=match):
        load_sweep(f)


def test_grid_expands_cartesian_product_and_dedups(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("name: g\npoints: [{method: rtn, bits: 4, group_size: 32}]\n"
                 "grid:\n  - {method: [rtn, gptq], bits: [3, 4], group_size: 32}\n")
    sw = load_sweep(f)
    assert [p.label() for p in sw.full_points] == [
        "rtn-w4-g32-asym", "rtn-w3-g32-asym", "gptq-w3-g32-asym", "gptq-w4-g32-asym"]


def test_accuracy_runs_turn_backend_timing_off_and_restore_it():
    """measure_point runs compress + perplexity under autotune(False): a timed backend choice would let a
    perplexity's last digits depend on the machine's load. The switch is restored, also after an error."""
    import inspect

    from experiments.run import point
    from triton_kernels.nn import _backend
    assert _backend.autotune_enabled()
    with pytest.raises(RuntimeError):
        with _backend.autotune(False):
            assert not _backend.autotune_enabled()
            assert _backend.measured_choice(("k",), {"a": lambda: None, "b": lambda: None}) == "a"
            raise RuntimeError
    assert _backend.autotune_enabled() and ("k",) not in _backend.cached_choices()
    src = inspect.getsource(point.measure_point)
    assert "with autotune(False):" in src and src.index("with autotune(False):") < src.index("_compressed_point(")
    assert "compress_model(" in inspect.getsource(point._compressed_point)
