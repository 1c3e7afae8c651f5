"""`python -m gsq.eval --tasks`: a real lm-eval task (local YAML over local JSONL) through lm-eval's harness."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_MODEL

pytest.importorskip("lm_eval")

# Continuations of frequent WikiText phrases against byte soup: a trained LM must pick the phrase.
DOCS = [
    {"context": "He was born in the United", "choices": [" States", " qzxv"], "label": 0},
    {"context": "The song was released as a", "choices": [" jwpk", " single"], "label": 1},
    {"context": "During the Second World", "choices": [" War", " xqq"], "label": 0},
    {"context": "The game received positive reviews from", "choices": [" zzvb", " critics"], "label": 1},
]


def test_local_task_runs_through_lm_eval(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "gsq_tiny_mc.yaml").write_text(
        "task: gsq_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gsq.eval", "--model", str(TINY_MODEL), "--skip-ppl", "--device", "cpu",
         "--tasks", "gsq_tiny_mc", "--tasks-include", str(tmp_path), "--json"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "ppl" not in result
    assert result["tasks"]["gsq_tiny_mc"]["acc,none"] == 1.0


def test_unknown_task_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "gsq.eval", "--model", str(TINY_MODEL), "--skip-ppl", "--tasks", "no_such_task_xyz"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "error: unknown lm-eval task(s): no_such_task_xyz"
