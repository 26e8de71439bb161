"""``python -m experiments lm-eval`` (experiments/io/lm_eval_cli.py), offline.

A multiple-choice task of our own (a YAML with ``dataset_path: json`` over a JSONL file in tmp_path,
found through ``--include-path``) runs through lm-eval on the tiny random Llama saved by ``compress``, with
the Hugging Face libraries offline and any network access sent to a dead proxy. The row's ``acc`` must be
what a hand computation of lm-eval's scoring gives on the same saved model (the choice with the highest
summed log-probability of its tokens after the context; ``acc_norm`` divides by the choice's length in
characters), with lm-eval's standard error (sample standard deviation / sqrt(n)) and provenance.
Without lm-eval installed, the command is one ``error:`` line naming the extra.
"""
import csv
import json
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_model import WORDS, build_tiny

REPO = Path(__file__).resolve().parent.parent

TASK_YAML = """\
task: tkr_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""


def offline_env(tmp_path: Path) -> dict:
    """The Hub and datasets offline, their caches in tmp_path, and any HTTP(S) request sent to a closed
    port: a test that reached the network would fail, not pass by downloading."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="",
               TQDM_DISABLE="1", TKR_RUNS_DIR=str(tmp_path / "runs"))
    env.pop("TRITON_INTERPRET", None)  # the modules' CPU backends, as a user's CLI runs them
    return env


def cli(env: dict, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "experiments", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def hand_scores(model, tokenizer, docs):
    """Per doc: the summed log-probability of each choice's tokens after its context (lm-eval's
    loglikelihood of ``context`` + ``" " + choice``: no BOS here, the tokenizer adds none)."""
    out = []
    with torch.no_grad():
        for d in docs:
            ctx = tokenizer(d["context"], add_special_tokens=False)["input_ids"]
            lls = []
            for c in d["choices"]:
                whole = tokenizer(d["context"] + " " + c, add_special_tokens=False)["input_ids"]
                assert whole[:len(ctx)] == ctx
                logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
                lls.append(sum(float(logp[j - 1, whole[j]]) for j in range(len(ctx), len(whole))))
            out.append(lls)
    return out


def test_lm_eval_on_a_local_task_equals_a_hand_computation(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from experiments.lm import models
    from experiments.run.saving import load_compressed

    env = offline_env(tmp_path)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_DATASETS_CACHE"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # same backends in this process as in the CLI's
    model_dir, _text, _ = build_tiny(tmp_path / "tiny", "name: unused\n", eos_token="</s>")
    saved = tmp_path / "saved"
    r = cli(env, "compress", '{"method": "rtn", "bits": 4, "group_size": 32}', "--model", model_dir,
            "--out", saved, "--no-progress")
    assert r.returncode == 0, r.stderr

    # Six documents; the labels are set from the saved model's own scores so that exactly 4 of the first
    # 5 are right (the 6th lies beyond --limit 5, so a limit that scored it would change the count).
    rng = random.Random(0)
    words = [w for w in WORDS if w.isalpha()]
    docs = [{"context": " ".join(rng.choice(words) for _ in range(4)),
             "choices": [" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(3)]}
            for _ in range(6)]
    tok = models.load_tokenizer(str(model_dir))
    lls = hand_scores(load_compressed(saved).eval(), tok, docs)
    for i, (d, ll) in enumerate(zip(docs, lls)):
        best, worst = max(range(3), key=ll.__getitem__), min(range(3), key=ll.__getitem__)
        assert ll[best] - sorted(ll)[-2] > 1e-3, "a near tie: choose other documents"
        d["label"] = worst if i in (1, 5) else best
    correct = [float(max(range(3), key=ll.__getitem__) == d["label"]) for d, ll in zip(docs, lls)][:5]
    norm = [float(max(range(3), key=lambda j: ll[j] / len(d["choices"][j])) == d["label"])
            for d, ll in zip(docs, lls)][:5]
    assert sum(correct) == 4

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data))

    r = cli(env, "lm-eval", saved, "--tasks", "tkr_tiny_choice", "--include-path", tasks, "--limit", 5,
            "--batch-size", 2, "--run", "lmtest")
    assert r.returncode == 0, r.stderr[-3000:]
    table = tmp_path / "runs" / "lmtest" / "lm_eval_cpu.csv"
    assert r.stdout.strip() == str(table)
    with open(table, newline="") as f:
        rows = {row["metric"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["acc", "acc_norm"]
    acc = rows["acc"]
    assert float(acc["value"]) == pytest.approx(statistics.mean(correct), abs=1e-12)
    assert float(acc["stderr"]) == pytest.approx(statistics.stdev(correct) / math.sqrt(5), rel=1e-9)
    assert float(rows["acc_norm"]["value"]) == pytest.approx(statistics.mean(norm), abs=1e-12)
    manifest = json.loads((saved / "manifest.json").read_text())
    assert acc["task"] == "tkr_tiny_choice" and acc["filter"] == "none" and acc["task_version"] == "2.0"
    assert acc["n_samples"] == "5" and acc["limit"] == "5" and acc["num_fewshot"] == "0"
    assert acc["label"] == manifest["label"] == "rtn-w4-g32-asym"
    assert acc["model_sha256"] == manifest["files"]["layers.safetensors"]["sha256"]
    assert acc["base_spec"] == str(model_dir) and acc["module_backends"] == "QuantLinear:dequant"
    import lm_eval
    assert acc["lm_eval"] == lm_eval.__version__
    for col in ("device_type", "device", "torch", "transformers", "git_commit", "timestamp", "cpu_model"):
        assert acc[col], col
    assert json.loads(acc["seeds"])["random_seed"] == 0
    assert "tkr_tiny_choice acc (none): " in r.stderr

    # An unknown task: one error line naming --tasks and the near name, before any model loads; the table
    # is left as it was.
    before = table.read_bytes()
    r = cli(env, "lm-eval", saved, "--tasks", "tkr_tiny_choise", "--include-path", tasks, "--run", "lmtest")
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: --tasks: 'tkr_tiny_choise' (did you mean tkr_tiny_choice") and "--include-path" in err
    assert table.read_bytes() == before


BLOCK_LM_EVAL = r"""
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "lm_eval":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from experiments.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_the_extra_one_line_names_it(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", BLOCK_LM_EVAL, "lm-eval", str(tmp_path / "saved"), "--tasks",
                           "arc_easy", "--out-dir", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: lm-eval is not installed"), proc.stderr
    assert lines[0].endswith("pip install -e '.[lmeval]'"), lines[0]
    assert proc.stdout == "" and not out.exists()


def test_bad_options_name_the_option():
    from experiments.io.lm_eval_cli import parse_batch_size, parse_tasks
    assert parse_tasks(" arc_easy, hellaswag,arc_easy ,") == ["arc_easy", "hellaswag"]
    assert parse_batch_size("auto") == "auto" and parse_batch_size("8") == 8
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match=f"--batch-size '{bad}' must be a positive integer or 'auto'"):
            parse_batch_size(bad)
    with pytest.raises(ValueError, match="--tasks ' , ' names no task"):
        parse_tasks(" , ")
