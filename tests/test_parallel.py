"""Data and expert parallelism under torchrun (gloo on the CPU): each rank holds half of the layer inputs,
the checkpoint is byte-identical to the single-process run's, and an interrupted parallel run resumes to the
same bytes."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import FAST, ROOT, TINY_MODEL, digest, kill_after_layer

from gsq import dist

# torchrun gives each rank one intra-op thread; the single-process reference gets the same, because
# CPU float reductions (matmuls) round differently when split over a different number of threads.
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}


def run(*args, ranks=1, wait=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks > 1 else [sys.executable]
    cmd = [*launcher, "-m", "gsq.quantize", "--model", str(TINY_MODEL), *FAST, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)


def kill_all(marker: str):
    """SIGKILL every process whose command line mentions `marker`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep") / "one"
    proc = run("--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"digest": digest(out, RECORDS), "resident": resident(proc.stdout)}


# What a run measured: gsq_run.json, and the card's perplexity trajectory (each rank's windows pass the layers in
# batches of another make-up, which may move a perplexity in its last bits); the checkpoint itself is compared whole.
RECORDS = ("gsq_run.json", "README.md")


def resident(stdout: str) -> dict:
    """{rank: calibration windows it holds}, from the run's memory-plan line."""
    line = next(l for l in stdout.splitlines() if l.startswith("memory plan:"))
    return {int(m[0]): int(m[1]) for m in re.findall(r"rank (\d+) holds (\d+) of 16 calibration windows", line)}


def test_two_ranks_give_the_single_process_bytes(single, tmp_path):
    out = tmp_path / "two"
    proc = run("--out", str(out), ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert single["resident"] == {0: 16} and resident(proc.stdout) == {0: 8, 1: 8}  # each rank holds half
    record = json.loads((out / "gsq_run.json").read_text())
    assert {l["ranks"] for l in record["layers"] if l["moe"]} == {2}
    assert digest(out, RECORDS) == single["digest"]


def test_parallel_run_resumes_after_kill(single, tmp_path):
    out = tmp_path / "two"
    state = tmp_path / "two.partial" / ".gsq-work" / "state.json"
    # the launcher and both ranks (torchrun starts ranks in sessions of their own)
    kill_after_layer(run("--out", str(out), ranks=2, wait=False), state, 3, kill=lambda: kill_all(str(out)))
    assert not out.exists()
    refused = run("--out", str(out), "--resume", "--seed", "1", ranks=2)  # refused on rank 0, the partial run kept
    assert refused.returncode != 0 and f"error: cannot resume {out}.partial: this run has --seed 1" in refused.stderr
    assert str(ROOT / "gsq") not in refused.stderr, refused.stderr[-3000:]  # (torchrun adds its own trace)
    refused = run("--out", str(out), "--resume")  # one process
    assert refused.returncode == 2 and "it ran with ranks 2, this run has 1" in refused.stderr
    resumed = run("--out", str(out), "--resume", ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert digest(out, RECORDS) == single["digest"]


def test_assignment_balances_tokens():
    counts = [900, 100, 500, 500, 300, 700, 0, 50]
    for ranks in (1, 2, 3, 8):
        parts = dist.assign(counts, [e for e in range(8) if counts[e]], ranks)
        assert sorted(e for p in parts for e in p) == [0, 1, 2, 3, 4, 5, 7]  # each expert exactly once
        loads = [sum(counts[e] for e in p) for p in parts]
        assert max(loads) - min(loads) <= max(counts)  # greedy largest-first bound
    assert dist.assign(counts, list(range(8)), 2) == [[0, 1, 3, 7], [2, 4, 5, 6]]  # loads 1550, 1500


def test_groups_and_placement_do_not_change_the_bytes(single, tmp_path):
    # experts trained 3 at a time (3 groups) with the layer inputs in files: the same checkpoint
    out = tmp_path / "grouped"
    proc = run("--out", str(out), "--experts-per-batch", "3", "--activations", "disk")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layer inputs on disk, 3 experts per batch" in proc.stdout
    assert {l["groups"] for l in json.loads((out / "gsq_run.json").read_text())["layers"] if l["moe"]} == {3}
    assert digest(out, RECORDS) == single["digest"]


def test_two_ranks_measure_a_budget_like_one(tmp_path):
    """--bits-budget: each rank measures its share of the wider models and GPTQs its share of every layer's
    experts at 2 bits; the gathered sensitivities and the allocation are the single process's, to the bit."""
    flags = ["--bits-budget", "2.625", "--method", "gptq", "--eval-every", "0"]
    for name, ranks in (("one", 1), ("two", 2)):
        proc = run("--out", str(tmp_path / name), *flags, ranks=ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ((tmp_path / name / "gsq_bits.json").read_text() for name in ("one", "two"))
    assert one == two and len(json.loads(one)["layers"]) == 6
