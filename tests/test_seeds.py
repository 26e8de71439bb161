"""Calibration seeds: ``calib_seeds`` on a sweep point, the seed sweeps it makes, the runs they do (other
calibration windows, the same evaluation windows, own tables and point ids, resumable) and the spread
read back (``experiments.analysis.seeds``)."""
import csv
import json
import math

import pandas as pd
import pytest
import torch

from experiments.analysis.seeds import seed_rows, seed_spread
from experiments.core.results import ContextMismatch
from experiments.run.sweep import point_id, run_sweeps
from experiments.run.sweep_config import SWEEPS_DIR, load_sweep, resolve_sweeps
from tests.tiny_model import build_tiny

SEEDED = """\
name: s
settings: {seqlen: 32, eval_tokens: 128, calib_samples: 2, calib_seqlen: 32, seed: 0}
points:
  - {method: dense}
  - {method: gptq, bits: 4, group_size: 32, calib_seeds: [0, 1, 2]}
grid:
  - {method: [rtn, gptq], bits: [4], group_size: [32]}
quick:
  settings: {seqlen: 32, eval_tokens: 64, calib_samples: 2, calib_seqlen: 32, seed: 0}
  points:
    - {method: dense}
    - {method: wanda, pattern: "2:4", calib_seeds: [0, 3]}
"""


def _sweep(tmp_path, body=SEEDED, name="s.yaml"):
    f = tmp_path / name
    f.write_text(body)
    return f


def test_calib_seeds_make_one_seed_sweep_per_other_seed(tmp_path):
    sw = load_sweep(_sweep(tmp_path))
    # The base sweep is unchanged by the key: the point given in `points:` and by the grid is one point.
    assert [p.label() for p in sw.full_points] == ["dense", "gptq-w4-g32-asym", "rtn-w4-g32-asym"]
    seeds = {s.name: s for s in sw.seed_sweeps()}
    assert list(seeds) == ["s.seed1", "s.seed2", "s.seed3"]
    for k in (1, 2):
        s = seeds[f"s.seed{k}"]
        assert [p.label() for p in s.full_points] == ["gptq-w4-g32-asym"] and s.quick_points == []
        assert s.full_settings == {**sw.full_settings, "seed": k} and s.base == "s"
    s3 = seeds["s.seed3"]
    assert s3.full_points == [] and [p.label() for p in s3.quick_points] == ["wanda-2:4"]
    assert s3.quick_settings == {**sw.quick_settings, "seed": 3}
    # Each seed's points have their own ids (the seed is part of a point's settings).
    spec = sw.full_points[1]
    ids = {point_id(spec, s.full_settings, "m", {"corpus": "c"}) for s in (sw, seeds["s.seed1"], seeds["s.seed2"])}
    assert len(ids) == 3
    # resolve_sweeps puts each sweep's seed sweeps right after it.
    assert [s.name for s in resolve_sweeps(str(tmp_path / "s.yaml"))] == ["s", "s.seed1", "s.seed2", "s.seed3"]


@pytest.mark.parametrize("body, match", [
    ("name: x\npoints: [{method: rtn, bits: 4, calib_seeds: [0, 1]}]\n",
     r"points\[0\]: calib_seeds on rtn-w4-g128-asym, which uses no calibration data"),
    ("name: x\npoints: [{method: gptq, bits: 4, calib_seeds: [1, 2]}]\n",
     r"points\[0\]: calib_seeds=\[1, 2\] must include the sweep's seed setting \(0\)"),
    ("name: x\npoints: [{method: gptq, bits: 4, calib_seeds: [0, 0]}]\n", r"at least two distinct non-negative"),
    ("name: x\npoints: [{method: gptq, bits: 4, calib_seeds: 3}]\n", r"calib_seeds=3 must be a list"),
    ("name: x\npoints: [{method: gptq, bits: 4, calib_seeds: [0]}]\n", r"calib_seeds=\[0\] must be a list of at least two"),
    ("name: x\npoints: [{method: gptq, bits: 4, calib_seeds: [0, -1]}]\n", r"non-negative integers"),
    ("name: x\ngrid: [{method: [gptq], bits: [4], calib_seeds: [0, 1]}]\n",
     r"grid\[0\]: calib_seeds belongs on a point under `points:`"),
    ("name: x\npoints: [{method: gptq, bits: 4, calib_seeds: [0, 1]}, {method: gptq, bits: 4, calib_seeds: [0, 2]}]\n",
     r"points\[1\]: gptq-w4-g128-asym is listed twice with different calib_seeds"),
    ("name: x.seed1\npoints: [{method: dense}]\n", r"name 'x.seed1'.* ends in .seed<N>"),
    ("name: x\nquick:\n  points: [{method: wanda, pattern: \"2:4\", calib_seeds: [1, 2]}]\npoints: [{method: dense}]\n",
     r"quick points\[0\]: calib_seeds=\[1, 2\] must include the sweep's seed setting \(0\)"),
], ids=["uncalibrated", "no-base-seed", "repeated", "not-a-list", "one-seed", "negative", "grid", "twice",
        "reserved-name", "quick"])
def test_bad_calib_seeds_name_the_problem(tmp_path, body, match):
    with pytest.raises(ValueError, match=match):
        load_sweep(_sweep(tmp_path, body, "x.yaml"))


def test_shipped_headline_points_carry_three_seeds_and_quick_stays_small():
    """Every shipped sweep marks points at three seeds; the quick reproduce adds at most 3 points per seed."""
    quick_extra = 0
    for sw in (load_sweep(p) for p in sorted(SWEEPS_DIR.glob("[!_]*.yaml"))):
        seeds = sw.seed_sweeps()
        assert [s.name for s in seeds] == [f"{sw.name}.seed1", f"{sw.name}.seed2"], sw.name
        for s in seeds:
            assert s.full_points and all(p.needs() for p in s.full_points), s.name
            assert {p.label() for p in s.full_points} <= {p.label() for p in sw.full_points}
        quick_extra += len(seeds[0].quick_points)
    assert 2 <= quick_extra <= 3


class Recorder:
    """An executor that measures nothing: it keeps the jobs and the token windows they would get."""

    name = "recorder"

    def __init__(self):
        self.jobs, self.inputs = [], {}

    def check_device(self, device):
        pass

    def provenance(self, device):
        from experiments.core.provenance import provenance
        return provenance(device)

    def run(self, jobs, run, inputs, *, on_row, on_failure, progress, is_done=None):
        self.jobs += jobs
        self.inputs.update(inputs)

    def close(self):
        pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), SEEDED)


def test_seeds_get_other_calibration_windows_and_the_same_evaluation_windows(tiny, tmp_path):
    model, text, sweep = tiny
    rec = Recorder()
    run_sweeps(resolve_sweeps(str(sweep)), model=str(model), text_file=str(text), out_dir=tmp_path, progress=False,
               executor=rec, log=lambda s: None)
    assert [(j.sweep, j.spec.label(), j.settings["seed"]) for j in rec.jobs] == [
        ("s", "dense", 0), ("s", "gptq-w4-g32-asym", 0), ("s", "rtn-w4-g32-asym", 0),
        ("s.seed1", "gptq-w4-g32-asym", 1), ("s.seed2", "gptq-w4-g32-asym", 2)]
    assert [j.table.name for j in rec.jobs][-2:] == ["sweep_s.seed1.csv", "sweep_s.seed2.csv"]
    # The seed sweep of the quick-only seed 3 has no full point: it is not run, and makes no table.
    assert set(rec.inputs) == {"s", "s.seed1", "s.seed2"}
    (ev0, cal0), (ev1, cal1), (ev2, cal2) = (rec.inputs[n] for n in ("s", "s.seed1", "s.seed2"))
    ev0, ev1, ev2 = (e.windows for e in (ev0, ev1, ev2))   # experiments.run.point.Evaluation
    assert torch.equal(ev0, ev1) and torch.equal(ev0, ev2)
    assert cal0.shape == cal1.shape == cal2.shape
    assert not torch.equal(cal0, cal1) and not torch.equal(cal0, cal2) and not torch.equal(cal1, cal2)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_seed_tables_are_written_resumed_and_read_back_as_a_spread(tiny, tmp_path):
    model, text, sweep = tiny
    sweeps = resolve_sweeps(str(sweep))

    def run():
        return run_sweeps(sweeps, quick=True, model=str(model), text_file=str(text), out_dir=tmp_path,
                          progress=False, log=lambda s: None)

    paths = run()
    assert [p.name for p in paths] == ["sweep_s.csv", "sweep_s.seed3.csv"]
    base, seed3 = (_rows(p) for p in paths)
    assert [(r["point"], r["seed"]) for r in base] == [("dense", "0"), ("wanda-2:4", "0")]
    assert [(r["point"], r["seed"], r["sweep"]) for r in seed3] == [("wanda-2:4", "3", "s.seed3")]
    assert seed3[0]["point_id"] != base[1]["point_id"]
    assert seed3[0]["eval_tokens"] == base[1]["eval_tokens"]
    assert float(seed3[0]["ppl"]) != float(base[1]["ppl"])   # other calibration windows, another result
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert run() == paths and [p.stat().st_mtime_ns for p in paths] == mtimes   # resumed: nothing measured again

    spread = seed_spread(seed_rows("s", quick=True, root=tmp_path))
    assert list(spread["point"]) == ["dense", "wanda-2:4"]
    dense, wanda = spread.iloc[0], spread.iloc[1]
    assert dense["n_seeds"] == 1 and math.isnan(dense["std"]) and dense["mean"] == float(base[0]["ppl"])
    ppls = [float(base[1]["ppl"]), float(seed3[0]["ppl"])]
    assert wanda["n_seeds"] == 2 and wanda["seeds"] == "0;3" and wanda["sweep"] == "s"
    assert wanda["mean"] == pytest.approx(sum(ppls) / 2)
    assert (wanda["min"], wanda["max"]) == (min(ppls), max(ppls))
    assert wanda["std"] == pytest.approx(abs(ppls[0] - ppls[1]) / math.sqrt(2))


def _table(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)


def _row(point, seed, ppl, **ctx):
    return {"sweep": "q", "point": point, "spec": json.dumps({"method": point}), "seed": seed, "ppl": ppl,
            "model": "m", "device": "cpu", **ctx}


def test_seed_rows_refuse_tables_of_another_context_and_spread_refuses_duplicates(tmp_path):
    _table(tmp_path / "sweep_q.csv", [_row("gptq", 0, 10.0), _row("dense", 0, 5.0)])
    _table(tmp_path / "sweep_q.seed1.csv", [_row("gptq", 1, 12.0)])
    _table(tmp_path / "sweep_q.seed10.csv", [_row("gptq", 10, 11.0)])
    _table(tmp_path / "sweep_qq.seed1.csv", [_row("gptq", 1, 99.0)])   # another sweep: never read
    rows = seed_rows("q", quick=False, root=tmp_path)
    assert list(rows["table"]) == ["sweep_q.csv", "sweep_q.csv", "sweep_q.seed1.csv", "sweep_q.seed10.csv"]
    spread = seed_spread(rows).set_index("point")
    assert spread.loc["gptq", "seeds"] == "0;1;10" and spread.loc["gptq", "mean"] == pytest.approx(11.0)
    assert spread.loc["gptq", "std"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"point gptq has 2 rows but seeds \[0, 0\]"):
        seed_spread(pd.concat([rows.iloc[:1], rows.iloc[:1]]))
    with pytest.raises(ValueError, match=r"metric='acc' is not a column"):
        seed_spread(rows, metric="acc")
    _table(tmp_path / "sweep_q.seed2.csv", [_row("gptq", 2, 12.0, device="gpu")])
    with pytest.raises(ContextMismatch, match=r"differ in more than the seed \(device: 'cpu' vs 'gpu'\)"):
        seed_rows("q", quick=False, root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no sweep_nope.csv"):
        seed_rows("nope", quick=False, root=tmp_path)
