"""CI perplexity regression on both bundled models: each, quantized with a CI-sized budget, must stay within
the stated tolerance of the committed baseline (eval/baseline.json) in KL to the original and in perplexity,
and GSQ must keep beating its GPTQ init. The numbers are printed (pytest -s, or on failure).

To see it fail, quantize with the levers switched off: GSQ_CI_EXTRA="--token-weights uniform --finetune-scales 0"
make test (eval/baseline.json records what that gives)."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import QWEN_MODEL, ROOT, TINY_DATA, TINY_MODEL, WIKI_TEST, quantize

BASELINE = json.loads((ROOT / "eval" / "baseline.json").read_text())
MODELS = {"tiny-deepseek-v3": TINY_MODEL, "tiny-qwen3-moe": QWEN_MODEL}
_measured = {}


def evaluate(out, model):
    proc = subprocess.run([sys.executable, "-m", "gsq.eval", "--model", str(out), "--reference", str(model),
                           "--data-file", str(WIKI_TEST), "--seqlen", "256", "--max-windows", "64", "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def measured(name, tmp_path_factory) -> dict:
    """{method: eval result} of one model, quantized once per test process."""
    if name not in _measured:
        root = tmp_path_factory.mktemp(f"regression-{name}")
        extra = {"gsq": shlex.split(os.environ.get("GSQ_CI_EXTRA", "")), "gptq": ["--method", "gptq"]}
        result = {}
        for method, args in extra.items():
            proc = quantize("--out", str(root / method), *TINY_DATA, *BASELINE["budget"], *args, model=MODELS[name])
            assert proc.returncode == 0, proc.stderr[-3000:]
            result[method] = evaluate(root / method, MODELS[name])
        _measured[name] = result
    return _measured[name]


@pytest.mark.parametrize("name,method", [(name, method) for name in MODELS for method in ("gsq", "gptq")])
def test_no_regression_against_baseline(name, method, tmp_path_factory):
    got, base, tol = measured(name, tmp_path_factory)[method], BASELINE["models"][name][method], BASELINE["tolerance"]
    print(f"\n{name} {method}: KL {got['kl']:.5f} (baseline {base['kl']:.5f}, +{100 * tol['kl']:.0f}% allowed), "
          f"ppl {got['ppl']:.3f} (baseline {base['ppl']:.3f}, +{100 * tol['ppl']:.0f}% allowed)")
    assert got["kl"] <= base["kl"] * (1 + tol["kl"]), f"{name} {method} KL regressed: {got['kl']:.5f} vs {base['kl']:.5f}"
    assert got["ppl"] <= base["ppl"] * (1 + tol["ppl"]), \
        f"{name} {method} ppl regressed: {got['ppl']:.3f} vs {base['ppl']:.3f}"


@pytest.mark.parametrize("name", list(MODELS))
def test_gsq_beats_its_gptq_init(name, tmp_path_factory):
    result = measured(name, tmp_path_factory)
    gsq, gptq = result["gsq"]["kl"], result["gptq"]["kl"]
    print(f"\n{name}: KL to the original: GSQ {gsq:.5f}, GPTQ init {gptq:.5f} (ratio {gsq / gptq:.3f})")
    assert gsq < 0.9 * gptq, f"{name}: GSQ ({gsq:.5f}) no longer beats its GPTQ init ({gptq:.5f}) by 10%"
