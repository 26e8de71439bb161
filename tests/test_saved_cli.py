"""``python -m experiments compress`` / ``eval`` on the tiny model of test_cli: a saved point evaluates
to exactly the perplexity the sweep measured for it, and bad input is one ``error:`` line, exit 2."""
import json

from tests.test_cli import cli, rows, tiny  # noqa: F401  (tiny is a fixture)

ONE_POINT = """\
name: one
description: one calibrated point
settings: {seqlen: 32, eval_tokens: 256, calib_samples: 4, calib_seqlen: 32, seed: 0}
points:
  - {method: gptq, bits: 4, group_size: 32, act_order: true}
quick:
  settings: {seqlen: 32, eval_tokens: 64, calib_samples: 2, calib_seqlen: 32, seed: 0}
  points: [{method: gptq, bits: 4, group_size: 32, act_order: true}]
"""


def test_compress_then_eval_equals_the_sweep_row(tiny, tmp_path):  # noqa: F811
    model, text, _ = tiny
    sweep = tmp_path / "one.yaml"
    sweep.write_text(ONE_POINT)
    r = cli("run", sweep, "--model", model, "--text-file", text, "--out-dir", tmp_path / "run", "--quick",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    (row,) = rows(tmp_path / "run" / "quick" / "sweep_one.csv")

    out = tmp_path / "saved"
    r = cli("compress", row["point"], "--sweep", sweep, "--model", model, "--text-file", text, "--quick",
            "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["label"] == row["point"] == "gptq-w4-g32-asym-act"
    assert manifest["calibration"]["calib_samples"] == 2 and manifest["base_model"]["spec"] == str(model)

    refs = tmp_path / "refs"
    r = cli("eval", out, "--text-file", text, "--quick", "--no-progress", "--reference-dir", refs)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    # Same calibration, same compression, same windows: the same number the sweep wrote.
    assert got["ppl"] == float(row["ppl"]) and got["eval_tokens"] == int(row["eval_tokens"])
    assert got["bits_per_weight"] == float(row["bits_per_weight"])
    assert "QuantLinear" in got["module_backends"]
    # ... and the same interval, per-window NLL and paired metrics against the dense base model.
    for col in ("ppl_lo", "ppl_hi", "kl", "kl_lo", "kl_hi", "top1", "top1_lo", "top1_hi", "dnll", "dnll_lo", "dnll_hi"):
        assert got[col] == float(row[col]), col
    assert got["window_nll"] == json.loads(row["window_nll"]) and got["kl"] > 0
    assert got["ppl2"] is None and got["evaluation_text2"] is None   # --text-file: no second text
    assert "dense reference computed" in r.stderr and len(list(refs.glob("*.pt"))) == 1
    r = cli("eval", out, "--text-file", text, "--quick", "--no-progress", "--reference-dir", refs)
    assert r.returncode == 0 and "dense reference computed" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["kl"] == got["kl"]
    r = cli("eval", out, "--text-file", text, "--quick", "--no-progress", "--no-dense")
    assert r.returncode == 0, r.stderr
    nodense = json.loads(r.stdout)
    assert nodense["kl"] is None and nodense["ppl_lo"] == got["ppl_lo"]


def test_bad_input_is_one_error_line(tiny, tmp_path):  # noqa: F811
    model, text, _ = tiny
    r = cli("compress", "gptq-w5-g7", "--model", model, "--out", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: point 'gptq-w5-g7' is not the label of a point")
    assert "labels of that method: gptq-" in r.stderr
    r = cli("compress", '{"method": "rtn", "bits": 11}', "--model", model, "--out", tmp_path / "x")
    assert r.returncode == 2 and "error: point: bits=11 must be an integer in 1..8" in r.stderr
    (tmp_path / "exists").mkdir()
    r = cli("compress", '{"method": "rtn", "bits": 4}', "--model", model, "--out", tmp_path / "exists")
    assert r.returncode == 2 and "already exists; choose another directory or pass --overwrite" in r.stderr
    r = cli("eval", tmp_path / "exists", "--text-file", text)
    assert r.returncode == 2 and "has no manifest.json" in r.stderr
    assert not (tmp_path / "x").exists()


def test_export_gguf_and_compressed_tensors(tiny, tmp_path):  # noqa: F811
    import gguf
    model, text, _ = tiny
    saved = tmp_path / "saved"
    r = cli("compress", '{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": true}', "--model", model,
            "--out", saved, "--no-progress")
    assert r.returncode == 0, r.stderr
    r = cli("export", saved, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stderr.strip().splitlines()[-1])["exact"] is True
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors if t.name.startswith("blk.")
             and not t.name.endswith("norm.weight")}
    assert types == {"Q4_0"}
    r = cli("export", saved, "--format", "compressed-tensors", "--out", tmp_path / "ct")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    r = cli("export", saved, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.returncode == 2 and "already exists" in r.stderr

    sparse = tmp_path / "sparse"
    assert cli("compress", '{"method": "magnitude", "pattern": "2:4"}', "--model", model, "--out", sparse).returncode == 0
    r = cli("export", sparse, "--format", "gguf", "--out", tmp_path / "s.gguf")
    assert r.returncode == 2 and "is a SparseLinear: GGUF stores dense" in r.stderr
    assert not (tmp_path / "s.gguf").exists()


def test_export_gguf_untouched_type(tiny, tmp_path):  # noqa: F811
    """``--untouched-type``: the embedding in F16 by default (this base model is no GGUF file), F32 on request;
    ``source`` needs a GGUF base model (one error line, no file)."""
    import gguf
    model, _text, _ = tiny
    saved = tmp_path / "saved"
    r = cli("compress", '{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": true}', "--model", model,
            "--out", saved, "--no-progress")
    assert r.returncode == 0, r.stderr
    sizes = {}
    for flag in ([], ["--untouched-type", "f32"]):
        out = tmp_path / f"m{len(flag)}.gguf"
        r = cli("export", saved, "--format", "gguf", "--out", out, *flag)
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stderr.strip().splitlines()[-1])
        assert summary["untouched"] == (flag[-1] if flag else "auto") and summary["passed_through"] == 0
        assert summary["file_bytes"] == out.stat().st_size
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
        assert types["token_embd.weight"] == ("F32" if flag else "F16") and types["output_norm.weight"] == "F32"
        sizes[bool(flag)] = summary["file_bytes"]
    assert sizes[True] > sizes[False]
    r = cli("export", saved, "--format", "gguf", "--out", tmp_path / "s.gguf", "--untouched-type", "source")
    assert r.returncode == 2 and r.stderr.strip().startswith(
        "error: --untouched-type source: the base model") and "is not a GGUF file" in r.stderr, r.stderr
    assert not (tmp_path / "s.gguf").exists()


TWO_POINTS = """\
name: two
description: a calibrated point and a plain one
settings: {seqlen: 32, eval_tokens: 128, calib_samples: 2, calib_seqlen: 32, seed: 0}
points:
  - {method: gptq, bits: 3, group_size: 32}
  - {method: rtn, bits: 4, group_size: 32}
"""


def test_sweep_reuses_saved_points(tiny, tmp_path):  # noqa: F811
    """``run --saved-dir``: the first run compresses and saves each point, a second run (another
    run directory) loads them instead of compressing, and writes the same rows."""
    model, text, _ = tiny
    sweep = tmp_path / "two.yaml"
    sweep.write_text(TWO_POINTS)
    saved = tmp_path / "saved"
    runs = []
    for name in ("first", "second"):
        r = cli("run", sweep, "--model", model, "--text-file", text, "--out-dir", tmp_path / name,
                "--saved-dir", saved, "--no-progress")
        assert r.returncode == 0, r.stderr
        runs.append((r.stderr, rows(tmp_path / name / "sweep_two.csv")))
    (err1, rows1), (err2, rows2) = runs
    assert "not recompressed" not in err1 and err2.count("not recompressed") == 2
    assert sorted(p.name for p in saved.iterdir()) == sorted(r["point_id"] for r in rows1)
    for a, b in zip(rows1, rows2):
        for col in ("point", "ppl", "nll", "bits_per_weight", "bytes", "weight_rel_error", "compress_seconds"):
            assert a[col] == b[col], col

    # A saved directory that holds another point is refused by name, not silently evaluated.
    pid = rows1[0]["point_id"]
    other = json.loads((saved / rows1[1]["point_id"] / "manifest.json").read_text())["spec"]
    m = json.loads((saved / pid / "manifest.json").read_text())
    m["spec"] = other
    (saved / pid / "manifest.json").write_text(json.dumps(m))
    r = cli("run", sweep, "--model", model, "--text-file", text, "--out-dir", tmp_path / "third",
            "--saved-dir", saved, "--no-progress")
    assert r.returncode != 0 and "saved for spec" in r.stderr
