"""`make gpu-check` (eval/gpu_check.py) on this CPU at toy sizes: every part runs and records what it measured, a
failing part is recorded while the rest still run, and bad input is refused before any work. The GPU figures
come only from a GPU machine; this keeps the script working between the times one is at hand."""

import json
import subprocess
import sys

from conftest import ROOT

SCRIPT = [sys.executable, str(ROOT / "eval" / "gpu_check.py")]


def test_make_gpu_check_on_a_cpu_runs_every_part(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["make", "-s", "gpu-check", "DEVICE=cpu", f"OUT={out}", f"PYTHON={sys.executable}",
                           f"VENV={tmp_path / 'no-venv'}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "gpu-check.json").read_text())
    parts = record["parts"]
    assert record["complete"] and record["toy"] and list(parts) == ["env", "kernels", "quantize", "eval", "plan",
                                                                     "parallel", "resume"]
    assert {name: p["status"] for name, p in parts.items() if p["status"] != "ok"} == {}
    assert parts["env"]["torch"] and parts["env"]["gpu"] is None
    assert [r["op"] for r in parts["kernels"]["rows"]] == ["fake-quant fwd+bwd", "pack 2-bit"]
    assert parts["quantize"]["peak_rss_mb"] > 100 and parts["quantize"]["peak_gpu_mb"] is None
    assert 0 < parts["eval"]["kl"] < 1 and 0.5 < parts["eval"]["top1"] <= 1
    plan = parts["plan"]
    assert plan["where"] == "host" and 0 < plan["measured_bytes"] <= plan["planned_bytes"]
    assert parts["parallel"]["seconds_per_step"] > 0 and parts["parallel"]["plan_training_bytes"] > 0
    resume = parts["resume"]
    assert resume["identical"] and 2 <= resume["killed_after_layer"] < 7 and resume["files"] >= 10
    summary = (out / "summary.txt").read_text().splitlines()
    assert "cpu" in summary[0] and [line.split()[:2] for line in summary[1:]] == [[n, "ok"] for n in parts]


def test_a_failing_part_is_recorded_and_the_rest_still_run(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    out = tmp_path / "check"
    proc = subprocess.run([*SCRIPT, "--device", "cpu", "--out", str(out), "--model", str(empty),
                           "--parts", "env,quantize,eval,parallel"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr[-3000:]
    record = json.loads((out / "gpu-check.json").read_text())
    parts = record["parts"]
    assert record["complete"] and [p["status"] for p in parts.values()] == ["ok", "failed", "failed", "ok"]
    assert "config.json" in parts["quantize"]["line"] and "\n" not in parts["quantize"]["line"]
    assert parts["eval"]["line"] == "skipped: needs the quantize part, which did not pass"


def test_bad_input_is_refused_before_any_work(tmp_path):
    out = tmp_path / "check"
    for flags, words in [(["--data", str(tmp_path)], "has no wikitext-2/wiki.valid.tokens"),
                         (["--parts", "env,kernel"], "unknown kernel"),
                         (["--device", "tpu"], "--device 'tpu'")]:
        proc = subprocess.run([*SCRIPT, "--device", "cpu", "--out", str(out), *flags], cwd=ROOT, capture_output=True,
                              text=True)
        assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
        assert not out.exists()
