"""Shared paths: the bundled tiny model and the offline WikiText-2 copy in ../shared/data."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tests never reach a hub: everything loads from local paths.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels run in the interpreter; the decorator reads this at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test` runs two workers on the two cores) each worker and every process it starts
# computes on one thread: two workers of two threads each would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# A user's usual umask: every file gsq writes is then readable by others (a server running as another user).
os.umask(0o022)

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "models" / "tiny-deepseek-v3"
QWEN_MODEL = ROOT / "models" / "tiny-qwen3-moe"  # the second bundled model: another routing shape
DATA = ROOT.parent / "shared" / "data"
WIKI_TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def tiny():
    """The bundled tiny MoE and its tokenizer, loaded once (bf16, CPU, eval mode)."""
    from gsq.eval import load_model

    return load_model(str(TINY_MODEL))


@pytest.fixture(scope="session")
def wiki_rows():
    from gsq.eval import wikitext_rows

    return wikitext_rows(str(WIKI_TEST))


# The local data a gsq run of the tiny model reads (the package itself knows no workspace paths).
CALIB_DATA = ["--dataset", str(DATA / "wikitext-2" / "wiki.valid.tokens")]
TINY_DATA = [*CALIB_DATA, "--eval-data", str(WIKI_TEST)]

# Small but real: GPTQ init + a few GSQ steps on every expert of all 6 MoE layers, 2 steps of the scale
# fine-tune; the perplexity watch on 4 windows of 128 tokens.
FAST = [*TINY_DATA, "--preset", "tiny", "--num-samples", "16", "--seqlen", "128", "--min-steps", "4", "--epochs", "0",
        "--batch-size", "4", "--scale-grid", "20", "--eval-windows", "4", "--eval-seqlen", "128", "--finetune-scales", "2"]


def quantize(*args, wait=True, model=TINY_MODEL):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # torch reference path on CPU
    cmd = [sys.executable, "-m", "gsq.quantize", "--model", str(model), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


VLLM_READING = ROOT / "eval" / "vllm" / "vllm-0.33.0.json"


def vllm_misses(path: Path) -> list:
    """What vLLM's model class for the checkpoint in `path` reads from its config and does not find (a key it
    reads without a default), or finds otherwise than every published model of that type states it (`key=value`):
    the keys as read from vLLM 0.33's source, recorded in eval/vllm/vllm-0.33.0.json."""
    import json

    from transformers import AutoConfig

    stated = json.loads((path / "config.json").read_text())
    model = json.loads(VLLM_READING.read_text())["models"][stated["model_type"]]
    config = AutoConfig.from_pretrained(path)
    if model.get("text_config"):
        stated, config = stated["text_config"], config.text_config
    misses = [key for key in model["reads"] if not hasattr(config, key)]
    return misses + [f"{key}={value}" for key, value in model.get("config_json", {}).items()
                     if key not in stated or value is not None and stated[key] != value]


def unreadable_by_others(directory: Path) -> list:
    """The files under `directory` that another user could not read (under the umask 022 set above)."""
    return [str(p) for p in Path(directory).rglob("*") if p.is_file() and p.stat().st_mode & 0o044 != 0o044]


def digest(directory, skip=("gsq_run.json",)):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file() and p.name not in skip}


@pytest.fixture(scope="session")
def source_digest():
    return digest(TINY_MODEL, skip=())


@pytest.fixture(scope="session")
def quantized(tmp_path_factory, source_digest):
    out = tmp_path_factory.mktemp("q") / "tiny-w2"
    proc = quantize("--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def kill_after_layer(proc, state, layer: int, kill=None):
    """Wait until the run `proc` has saved the resume point after `layer` layers (its `state` file),
    then kill it with SIGKILL (or with `kill()`), while it is still running."""
    import json
    import signal
    import time

    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["next_layer"] >= layer:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    (kill or (lambda: proc.send_signal(signal.SIGKILL)))()
    proc.wait()


def pytest_collection_modifyitems(items):
    """`make test` runs two xdist workers with --dist loadfile: a test file goes to one worker whole, so its
    module fixtures (and the regression's per-process measurements) are built once. (--dist loadgroup does
    not group under pytest 9.2: xdist 3.8 marks a group in `item._nodeid`, which pytest no longer reads.)
    The longest file goes first."""
    items.sort(key=lambda item: "test_regression" not in item.nodeid)
