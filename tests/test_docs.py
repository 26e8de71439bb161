"""The README and docs/: short, generated tables equal to what the code makes of results/, links that resolve."""
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments.analysis import summary

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]

# Link targets another branch adds (docs/kernels.md: the kernel lessons). Once the file exists, this
# test fails until its entry is removed here, so the exception cannot outlive its reason.
PENDING: set = set()  # linked pages that do not exist yet (none now)


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_generated_tables_equal_what_the_code_makes_of_results():
    stale = [_rel(f) for f in DOCS if summary.render_docs(f.read_text(), where=_rel(f)) != f.read_text()]
    assert not stale, (f"generated tables in {stale} differ from results/: "
                       f"run `python -m experiments summary --write-docs`")
    assert summary.doc_files(ROOT) == DOCS


def test_every_generated_table_has_a_place():
    # Each table summary makes appears in the README or a docs page (nothing generated is dropped), and the
    # headline table is the README's.
    names = [m["name"] for f in DOCS for m in summary._BLOCK.finditer(f.read_text())]
    assert sorted(names) == sorted(summary.BLOCKS), names
    # and the README's GPU paragraph (which GPU numbers are of the current kernels) is generated too
    # and so are its claims tables (which orderings survive the noise, full and quick)
    assert [m["name"] for m in summary._BLOCK.finditer(README.read_text())] == ["headline", "gpu-status", "claims",
                                                                                "claims-quick"]


def test_readme_is_short_with_the_headline_first():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"
    begin = next(i for i, line in enumerate(lines) if line.startswith("<!-- summary:headline:begin"))
    end = next(i for i, line in enumerate(lines) if line == "<!-- summary:headline:end -->")
    rows = [line for line in lines[begin:end] if line.startswith("| ") and not line.startswith("| compression")]
    assert 0 < len(rows) <= 15, rows
    assert begin < 60, "the headline table belongs on the README's first screens"
    figure = next(i for i, line in enumerate(lines) if "results/figures/pareto.png" in line)
    assert end < figure < end + 5
    assert "make reproduce" in lines[:40].__str__() and "make test" in lines[:40].__str__()


def _without_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' dropped, spaces to '-'."""
    h = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m[1]) for m in re.finditer(r"^#{1,6} (.*)$", _without_code_blocks(path.read_text()), re.M)}


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _links(path: Path) -> list[str]:
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _without_code(path.read_text()))


def test_every_relative_link_and_image_resolves():
    broken, seen_pending = [], set()
    for f in DOCS:
        for target in _links(f):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (f.parent / path).resolve() if path else f
            if dest in PENDING:
                seen_pending.add(dest)
                continue
            if not dest.exists():
                broken.append(f"{_rel(f)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{_rel(f)}: {target} (no heading #{anchor} in {_rel(dest)})")
    assert not broken, "\n".join(broken)
    done = [_rel(p) for p in PENDING if p.exists()]
    assert not done, f"{done} exist now: remove them from PENDING in tests/test_docs.py"


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [here](missing.md), [ok](page.md#title), `[code](nope.md)`, "
                    "![img](fig.png)\n\n```\n[block](nope2.md)\n```\n")
    assert _links(page) == ["missing.md", "page.md#title", "fig.png"]
    assert _anchors(page) == {"title"}
    assert _slug("torch and Triton: what to install") == "torch-and-triton-what-to-install"
    assert _slug("GPU: compile check and `make gpu-check`") == "gpu-compile-check-and-make-gpu-check"


# --- the generator itself -------------------------------------------------------------------------------

def test_write_docs_rewrites_only_the_blocks(tmp_path):
    page = tmp_path / "page.md"
    text = ("# Page\n\nprose `<!-- summary:NAME:begin -->` stays\n\n"
            "<!-- summary:sweep-combo:begin (generated) -->\nstale table\n<!-- summary:sweep-combo:end -->\n\nafter\n")
    page.write_text(text)
    assert summary.write_docs([page], check=True) == [page]
    assert page.read_text() == text, "--check-docs must not write"
    assert summary.write_docs([page]) == [page]
    new = page.read_text()
    assert new.startswith("# Page\n\nprose `<!-- summary:NAME:begin -->` stays\n\n<!-- summary:sweep-combo:begin (generated) -->\n")
    assert new.endswith("<!-- summary:sweep-combo:end -->\n\nafter\n")
    assert "stale table" not in new and "| combo | sparsegpt-2:4+gptq-w4-g64-asym | 3.5 |" in new
    assert summary.write_docs([page]) == []  # idempotent


def test_write_docs_refuses_bad_markers_and_writes_nothing(tmp_path):
    good, bad = tmp_path / "a.md", tmp_path / "b.md"
    good.write_text("<!-- summary:decode:begin -->\nold\n<!-- summary:decode:end -->\n")
    bad.write_text("<!-- summary:sweep-nope:begin -->\nx\n<!-- summary:sweep-nope:end -->\n")
    with pytest.raises(ValueError, match="unknown generated block.*sweep-nope.*known: headline"):
        summary.write_docs([good, bad])
    assert "old" in good.read_text(), "a bad marker in one file must leave every file alone"
    bad.write_text("<!-- summary:decode:begin -->\nno end marker\n")
    with pytest.raises(ValueError, match="1 '<!-- summary:NAME:begin' markers but 0 complete blocks"):
        summary.write_docs([bad])


def test_headline_picks_the_best_point_of_each_setting(tmp_path):
    quant = pd.read_csv(summary.RESULTS / "sweep_quant.csv")
    quant.to_csv(tmp_path / "sweep_quant.csv", index=False)
    text = summary.headline_summary(False, tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| compression")]
    # Only the quant sweep: dense and the uniform rows; the other families' rows are left out.
    assert [r.split(" | ")[0] for r in rows] == [
        "| dense (fp16 storage)", "| 4-bit weights, uniform grid (RTN, GPTQ)", "| 3-bit weights, uniform grid (RTN, GPTQ)"]
    assert "| gptq-w3-g64-asym (quant) | 3.5 | 46.4 | 48.27 |" in rows[2]
    assert "no decode row" in text and "modelled size" not in text
    quant.loc[quant["point"] == "rtn-w3-g32-asym", "ppl"] = 1.5
    quant.to_csv(tmp_path / "sweep_quant.csv", index=False)
    assert "| rtn-w3-g32-asym (quant) | 4 | 53.1 | 1.5 |" in summary.headline_summary(False, tmp_path)
    assert summary.headline_summary(False, tmp_path / "empty") == "(no sweep tables yet)"


def _decode_rows(with_fastest: bool):
    """A synthetic decode table on the reference table's machine: dense fp32 30 tok/s is faster than dense
    bf16 25 (as on the Intel/AMX machine); rtn-w4-g64-asym bf16 40 tok/s carries the fastest-dense columns;
    rtn-w3-g64-asym bf16 42.5 tok/s is an older row without them (empty cells)."""
    template = pd.read_csv(summary.RESULTS / "decode_cpu.csv").iloc[-1].to_dict()
    rows = []
    for label, spec, dtype, tps in (("dense fp32", '{"method": "dense"}', "fp32", 30.0),
                                    ("dense bf16", '{"method": "dense"}', "bf16", 25.0),
                                    ("rtn-w4-g64-asym bf16", '{"bits": 4, "group_size": 64, "method": "rtn", '
                                     '"symmetric": false}', "bf16", 40.0),
                                    ("rtn-w3-g64-asym bf16", '{"bits": 3, "group_size": 64, "method": "rtn", '
                                     '"symmetric": false}', "bf16", 42.5)):
        r = {**template, "label": label, "spec": spec, "dtype": dtype, "tokens_per_s": tps,
             "speedup_vs_dense": tps / (30.0 if dtype == "fp32" else 25.0) if label[:5] != "dense" else "",
             "speedup_vs_fastest_dense": "", "fastest_dense_dtype": "", "fastest_dense_tokens_per_s": ""}
        if with_fastest and label != "rtn-w3-g64-asym bf16":
            r.update(speedup_vs_fastest_dense=tps / 30.0, fastest_dense_dtype="fp32", fastest_dense_tokens_per_s=30.0)
        rows.append(r)
    return pd.DataFrame(rows)


def test_readers_prefer_the_speedup_over_the_fastest_dense_dtype(tmp_path):
    """Issue 25.3: the summary and figures take ``speedup_vs_fastest_dense`` where a decode row has it, say
    so, and fall back to ``speedup_vs_dense`` (over dense in the same dtype) for rows without it."""
    from experiments.analysis import plots
    decode = _decode_rows(with_fastest=True)
    by_fmt = plots.decode_speedup_by_format(decode).set_index("dtype").reset_index()
    got = {f: (sp, b) for f, sp, b in zip(by_fmt["format"], by_fmt["decode_speedup"], by_fmt["decode_baseline"])}
    assert len(got) == 2   # the dense rows are the baseline, not a format
    assert sorted(got.values()) == [(40 / 30, "fastest dense (fp32)"), (42.5 / 25, "dense bf16")]

    quant = pd.read_csv(summary.RESULTS / "sweep_quant.csv")
    quant.to_csv(tmp_path / "sweep_quant.csv", index=False)
    decode.to_csv(tmp_path / "decode_cpu.csv", index=False)
    text = summary.headline_summary(False, tmp_path)
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    # Two baselines in one table: each cell names its own.
    assert rows["| 4-bit weights, uniform grid (RTN, GPTQ)"].endswith(f"| {40 / 30:.3g} (vs fastest dense (fp32)) |")
    assert rows["| 3-bit weights, uniform grid (RTN, GPTQ)"].endswith(f"| {42.5 / 25:.3g} (vs dense bf16) |")
    assert "each cell names its baseline" in text
    sweep = summary.sweep_summary(False, tmp_path)
    assert f"| {40 / 30:.3g} (bf16 vs fastest dense fp32) |" in sweep and f"| {42.5 / 25:.3g} (bf16) |" in sweep
    assert "vs fastest dense DTYPE" in sweep
    table = summary.decode_summary(False, root=tmp_path)
    assert f"| rtn-w4-g64-asym bf16 | 40 | 1.6 | {40 / 30:.3g} (fp32) |" in table
    assert "| rtn-w3-g64-asym bf16 | 42.5 | 1.7 | |" in table and "| dense bf16 | 25 |  | 0.833 (fp32) |" in table

    # One baseline, the fastest dense one: the caption names it, the cells stay bare.
    only4 = decode[decode["label"] != "rtn-w3-g64-asym bf16"]
    only4.to_csv(tmp_path / "decode_cpu.csv", index=False)
    text = summary.headline_summary(False, tmp_path)
    assert "speedup over the fastest dense model measured in the same decode run, fp32, the compressed models" in text
    assert f"| {40 / 30:.3g} |" in text and "(vs " not in text
    fig = plots.pareto_figure({"quant": quant}, decode=only4)
    assert "over fastest dense (fp32)" in fig.axes[1].get_xlabel()
    plots.plt.close(fig)

    # A table older than the columns (none of them): the same-dtype speedups, as before.
    _decode_rows(with_fastest=False).drop(columns=["speedup_vs_fastest_dense", "fastest_dense_dtype",
                                                   "fastest_dense_tokens_per_s"]).to_csv(tmp_path / "decode_cpu.csv",
                                                                                          index=False)
    text = summary.headline_summary(False, tmp_path)
    assert "speedup over the dense model, bf16, on" in text and f"| {40 / 25:.3g} |" in text
    assert "x vs fastest dense" not in summary.decode_summary(False, root=tmp_path)


def test_headline_of_the_reference_names_the_machine():
    text = summary.headline_summary()
    assert "on CPU AMD EPYC (2 threads)" in text
    assert len([line for line in text.splitlines() if line.startswith("| ")]) - 1 <= 15


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments", "summary", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_only_and_check_docs():
    r = _cli("--headline")
    assert r.returncode == 0 and r.stdout.strip() == summary.headline_summary().strip()
    r = _cli("--only", "sweep-lowrank")
    assert r.returncode == 0 and "| lowrank | whitened_svd-ratio0.5-damp0.001 |" in r.stdout and "| quant |" not in r.stdout
    r = _cli("--check-docs")
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_write_docs_refuses_another_results_dir():
    r = _cli("--write-docs", "--quick")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --write-docs / --check-docs regenerate README.md and docs/ from the reference results/ only: "
        "drop --quick, --run, --results-dir and --only"]
