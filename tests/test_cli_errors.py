"""Failures the command line promises to report as one ``error:`` line (never a traceback), with a
non-zero exit and nothing half-written: a full disk during ``run`` and ``compress`` (simulated: fsync
raises ENOSPC after the bytes were written), saved directories that do not parse, a base model that
transformers refuses, a truncated GGUF model, ``--saved-dir`` given a file, a damaged ``steps.json``,
and a NaN perplexity from ``eval`` (which names the first layer whose output was not finite).

The CLI's ``main()`` runs in this process (``capsys`` reads its stderr), on the tiny model of test_cli.
"""
import errno
import hashlib
import json
import os
import re
import shutil

import pytest
import torch

from experiments.__main__ import main
from experiments.core.runs import LOCK_NAME
from tests.test_cli import tiny  # noqa: F401  (a fixture)

RTN = '{"method": "rtn", "bits": 4, "group_size": 32}'
SETTINGS = {"seqlen": 32, "eval_tokens": 64, "calib_samples": 2, "calib_seqlen": 32, "seed": 0}
ONE_POINT = """\
name: one
settings: {seqlen: 32, eval_tokens: 64, calib_samples: 2, calib_seqlen: 32, seed: 0}
points:
  - {method: rtn, bits: 4, group_size: 32}
"""


@pytest.fixture(autouse=True)
def _as_a_user(monkeypatch):
    # The modules' CPU backends (not the Triton interpreter conftest switches on), offline, no bars.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")


def one_error_line(capsys) -> str:
    """The stderr of the command: no traceback, exactly one line starting with 'error:', and it is the last."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def _full_disk_fsync(monkeypatch):
    """Every fsync finds the disk full (the bytes were handed to the file first): the OSError of a full
    disk names no file, as write()/close() raise it."""
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk_during_run(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    model, text, _ = tiny
    sweep = tmp_path / "one.yaml"
    sweep.write_text(ONE_POINT)
    out = tmp_path / "run"
    _full_disk_fsync(monkeypatch)
    rc = main(["run", str(sweep), "--model", str(model), "--text-file", str(text), "--out-dir", str(out),
               "--no-progress"])
    line = one_error_line(capsys)
    assert rc == 1
    # The first file a run writes is the dense reference (experiments.run.sweep), then the table.
    assert re.match(rf"error: {re.escape(str(out / 'dense_reference'))}/[0-9a-f]+\.pt: No space left on device; "
                    r"nothing half-written", line), line
    assert "rerun the same command" in line
    # no table, no reference, no temporary file (the run directory's lock file stays by design:
    # experiments.core.runs; the reference's directory may stay, empty)
    assert [p.name for p in out.iterdir() if p.name not in (LOCK_NAME, "dense_reference")] == []
    assert not (out / "dense_reference").exists() or list((out / "dense_reference").iterdir()) == []

    monkeypatch.undo()   # space again: the rerun writes the row
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["run", str(sweep), "--model", str(model), "--text-file", str(text), "--out-dir", str(out),
                 "--no-progress"]) == 0
    # the table and the run's dense reference (one file)
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) == ["dense_reference", "sweep_one.csv"]
    assert len(list((out / "dense_reference").iterdir())) == 1


def test_full_disk_during_compress(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    model, _, _ = tiny
    out = tmp_path / "saved"
    _full_disk_fsync(monkeypatch)
    rc = main(["compress", RTN, "--model", str(model), "--out", str(out), "--no-progress"])
    line = one_error_line(capsys)
    assert rc == 1 and line.startswith(f"error: {out}: No space left on device"), line
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):  # noqa: F811
    """A model saved by `compress` (with the tiny settings, so `eval --quick` is quick)."""
    from experiments.lm import models
    from experiments.methods.compress import compress_model
    from experiments.run.saving import save_compressed
    model_dir, _, _ = tiny
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        m = models.load_model(str(model_dir), cache=False)[0]
        report = compress_model(m, json.loads(RTN), None, progress=False)
        out = tmp_path_factory.mktemp("saved") / "rtn"
        save_compressed(m, report, out, base_model=str(model_dir), extra={"settings": SETTINGS, "quick": True})
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    return out, m, report


def _rewrite(d, manifest_edit=None, layers_bytes=None):
    m = json.loads((d / "manifest.json").read_text())
    if layers_bytes is not None:
        (d / "layers.safetensors").write_bytes(layers_bytes)
        m["files"]["layers.safetensors"] = {"sha256": hashlib.sha256(layers_bytes).hexdigest(),
                                            "bytes": len(layers_bytes)}
    if manifest_edit is not None:
        manifest_edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _first_layer(m):
    return next(iter(m["layers"].values()))


DAMAGE = {
    # layers.safetensors replaced by bytes that are not safetensors, its size and digest updated: SafetensorError
    "safetensors": dict(layers_bytes=b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"),
    # entries missing or of another type: KeyError / AttributeError / TypeError deep in the load
    "no-files": dict(manifest_edit=lambda m: m.pop("files")),
    "layers-list": dict(manifest_edit=lambda m: m.__setitem__("layers", [])),
    "files-list": dict(manifest_edit=lambda m: m.__setitem__("files", [])),
    "structure-str": dict(manifest_edit=lambda m: m.__setitem__("structure", "x")),
    "tensor-without-dtype": dict(manifest_edit=lambda m: _first_layer(m)["tensors"]["scales"].pop("dtype")),
    "attention-strings": dict(manifest_edit=lambda m: m["structure"].__setitem__("attention", ["x", "y"])),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_saved_directory_that_does_not_parse(saved, tiny, tmp_path, capsys, damage):  # noqa: F811
    _, text, _ = tiny
    d = tmp_path / "damaged"
    shutil.copytree(saved[0], d)
    _rewrite(d, **DAMAGE[damage])
    rc = main(["eval", str(d), "--text-file", str(text), "--quick", "--no-progress"])
    line = one_error_line(capsys)
    assert rc == 2 and str(d) in line, line
    assert "save the model again" in line, line
    assert capsys.readouterr().out == ""


def test_eval_with_nan_outputs_fails_naming_the_layer(saved, tiny, tmp_path, capsys):  # noqa: F811
    """A saved model whose outputs are NaN (a NaN scale in one layer): no perplexity printed, exit 1, the
    first layer whose output was not finite named."""
    from experiments.run.saving import save_compressed
    model_dir, text, _ = tiny
    _, m, report = saved
    layer = m.model.layers[1].mlp.down_proj
    old = layer.scales.clone()
    try:
        with torch.no_grad():
            layer.scales[3, 0] = float("nan")
        save_compressed(m, report, tmp_path / "nan", base_model=str(model_dir),
                        extra={"settings": SETTINGS, "quick": True})
    finally:
        with torch.no_grad():
            layer.scales.copy_(old)
    rc = main(["eval", str(tmp_path / "nan"), "--text-file", str(text), "--quick", "--no-progress"])
    captured = capsys.readouterr()
    assert captured.out == ""   # no {"ppl": NaN} as a result
    lines = captured.err.strip().splitlines()
    assert rc == 1 and "Traceback" not in captured.err and len([x for x in lines if x.startswith("error:")]) == 1
    line = lines[-1]
    assert line.startswith(f"error: {tmp_path / 'nan'}: the perplexity is nan"), line
    assert "model.layers.1.mlp.down_proj (QuantLinear), from finite inputs" in line, line


def _bad_model(tiny, tmp_path, name, edit):  # noqa: F811
    d = tmp_path / name
    shutil.copytree(tiny[0], d)
    edit(d)
    return d


BAD_MODELS = {
    # weights that are not safetensors: SafetensorError
    "weights": lambda d: (d / "model.safetensors").write_bytes(b"not safetensors at all"),
    # a config transformers' validation refuses (StrictDataclassClassValidationError)
    "config": lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "hidden_size": 97})),
}


@pytest.mark.parametrize("bad", list(BAD_MODELS), ids=list(BAD_MODELS))
def test_base_model_that_transformers_refuses(tiny, tmp_path, capsys, bad):  # noqa: F811
    d = _bad_model(tiny, tmp_path, bad, BAD_MODELS[bad])
    rc = main(["compress", RTN, "--model", str(d), "--out", str(tmp_path / "out"), "--no-progress"])
    line = one_error_line(capsys)
    assert rc == 2 and line.startswith(f"error: could not load model spec {str(d)!r}"), line
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_model_names_the_file(tmp_path, capsys):
    from experiments.methods.compress import compress_model
    from experiments.io.export_gguf import export_gguf
    from tests.test_compress import tiny_llama
    m = tiny_llama()
    compress_model(m, json.loads(RTN.replace("}", ', "symmetric": true}')), None, progress=False)
    full = tmp_path / "full.gguf"
    export_gguf(m, full)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    rc = main(["compress", RTN, "--model", str(cut), "--out", str(tmp_path / "out"), "--no-progress"])
    line = one_error_line(capsys)
    assert rc == 2 and f"could not read the GGUF file {str(cut)!r}" in line, line
    assert not (tmp_path / "out").exists()


def test_saved_dir_given_a_file(tiny, tmp_path, capsys):  # noqa: F811
    model, text, _ = tiny
    sweep = tmp_path / "one.yaml"
    sweep.write_text(ONE_POINT)
    f = tmp_path / "a-file"
    f.write_text("x")
    out = tmp_path / "run"
    rc = main(["run", str(sweep), "--model", str(model), "--text-file", str(text), "--out-dir", str(out),
               "--saved-dir", str(f), "--no-progress"])
    line = one_error_line(capsys)
    assert rc == 2 and line.startswith(f"error: --saved-dir {str(f)!r} is a file, not a directory"), line
    assert not out.exists()


@pytest.mark.parametrize("content", ['["sweeps"]', '"sweeps"', '{"sweeps": null}', '{"sweeps": {"seconds": 1}}',
                                     '{"sweeps": '],
                         ids=["list", "string", "null-step", "no-inputs", "not-json"])
def test_damaged_steps_json(tmp_path, capsys, monkeypatch, content):
    """A steps.json that is not what `reproduce` writes: `promote` (which reads it to know the sweeps
    finished) and `reproduce`'s Steps refuse it with one line naming the file; nothing is promoted."""
    import experiments.analysis.promote as promote
    from experiments.core.runs import Steps
    run = tmp_path / "run"
    run.mkdir()
    (run / "sweep_x.csv").write_text("point_id,ppl\na,1.0\n")
    (run / "steps.json").write_text(content)
    ref = tmp_path / "reference"
    monkeypatch.setattr(promote, "reference_dir", lambda quick: ref)   # never the repository's results/
    rc = main(["promote", "--out-dir", str(run)])
    line = one_error_line(capsys)
    assert rc == 2 and line.startswith(f"error: {run / 'steps.json'}"), line
    assert "delete it" in line
    assert not ref.exists()
    with pytest.raises(ValueError, match="steps.json"):
        Steps(run).done("sweeps", "digest")


def _subcommands():
    import argparse

    from experiments.__main__ import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in _subcommands()])
def test_help_prints_for_every_command(argv, capsys):
    # argparse %-formats help strings: a bare "%" in one (it was "% of copy bandwidth") made every
    # `--help` a TypeError traceback.
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
