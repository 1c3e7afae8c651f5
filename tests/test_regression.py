"""CI perplexity regression: the bundled tiny model, quantized with a CI-sized budget, must stay within
the stated tolerance of the committed baseline (eval/baseline.json) in KL to the original and in
perplexity, and GSQ must keep beating its GPTQ init. The numbers are printed (pytest -s, or on failure).

To see it fail, quantize with a deliberately broken budget: GSQ_CI_EXTRA="--min-steps 0" make test
(no GSQ steps: the codes stay GPTQ's)."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_DATA, TINY_MODEL, WIKI_TEST, quantize

BASELINE = json.loads((ROOT / "eval" / "baseline.json").read_text())


def evaluate(out):
    proc = subprocess.run([sys.executable, "-m", "gsq.eval", "--model", str(out), "--reference", str(TINY_MODEL),
                           "--data-file", str(WIKI_TEST), "--seqlen", "256", "--max-windows", "64", "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("regression")
    extra = {"gsq": shlex.split(os.environ.get("GSQ_CI_EXTRA", "")), "gptq": ["--method", "gptq"]}
    result = {}
    for method, args in extra.items():
        proc = quantize("--out", str(root / method), *TINY_DATA, *BASELINE["budget"], *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result[method] = evaluate(root / method)
    return result


@pytest.mark.parametrize("method", ["gsq", "gptq"])
def test_no_regression_against_baseline(measured, method):
    got, base, tol = measured[method], BASELINE[method], BASELINE["tolerance"]
    print(f"\n{method}: KL {got['kl']:.5f} (baseline {base['kl']:.5f}, +{100 * tol['kl']:.0f}% allowed), "
          f"ppl {got['ppl']:.3f} (baseline {base['ppl']:.3f}, +{100 * tol['ppl']:.0f}% allowed)")
    assert got["kl"] <= base["kl"] * (1 + tol["kl"]), f"{method} KL regressed: {got['kl']:.5f} vs {base['kl']:.5f}"
    assert got["ppl"] <= base["ppl"] * (1 + tol["ppl"]), f"{method} ppl regressed: {got['ppl']:.3f} vs {base['ppl']:.3f}"


def test_gsq_beats_its_gptq_init(measured):
    gsq, gptq = measured["gsq"]["kl"], measured["gptq"]["kl"]
    print(f"\nKL to the original: GSQ {gsq:.5f}, GPTQ init {gptq:.5f} (ratio {gsq / gptq:.3f})")
    assert gsq < 0.9 * gptq, f"GSQ ({gsq:.5f}) no longer beats its GPTQ init ({gptq:.5f}) by 10%"
