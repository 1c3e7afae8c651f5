"""Bad input and faults (the README's table, one test per row): one clear error line before any work,
nothing lost, nothing half-written that looks complete, resumable to the identical bytes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file
from conftest import FAST, ROOT, TINY_MODEL, digest, quantize

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def one_error_line(proc, *words, code=2, alone=True):
    """The run ended with exit `code` and one `error:` line holding `words`: the only line on stderr
    (refused before any work), or after the progress bars (`alone=False`); never a traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 or not alone, proc.stderr[-2000:]
    for w in words:
        assert w in lines[-1], lines[-1]


def tiny_copy(dst, edit=None, config=None):
    shutil.copytree(TINY_MODEL, dst)
    if edit:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        c = json.loads((dst / "config.json").read_text())
        c.update(config)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def llama(dst):
    from transformers import LlamaConfig

    dst.mkdir()
    LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=2048).save_pretrained(dst)
    return dst


BAD_MODELS = {  # row: (build the source, words the error line must hold)
    "missing path": (lambda d: d / "nope", ["model directory not found"]),
    "not a model": (lambda d: (d / "empty").mkdir() or d / "empty", ["no config.json"]),
    "dense model": (lambda d: tiny_copy(d / "dense", config={"first_k_dense_replace": 7}),
                    ["no MoE layers with routed experts"]),
    "unsupported architecture": (lambda d: llama(d / "llama"), ["unsupported architecture 'llama'", "deepseek_v3, kimi_k25"]),
    "truncated shard": (lambda d: truncated(tiny_copy(d / "t")), ["model.safetensors is truncated or corrupt"]),
    "corrupt shard": (lambda d: corrupt(tiny_copy(d / "c")), ["model.safetensors is truncated or corrupt"]),
}


def truncated(d):
    os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size - 1000)
    return d


def corrupt(d):
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    return d


@pytest.mark.parametrize("row", BAD_MODELS)
def test_bad_model_is_refused_before_any_work(row, tmp_path):
    build, words = BAD_MODELS[row]
    src = build(tmp_path)
    proc = quantize("--out", str(tmp_path / "out"), *FAST, model=src)
    one_error_line(proc, *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


BAD_FLAGS = {
    "group size off the expert dims": (["--group-size", "256"], ["moe_intermediate_size 128 is not divisible"]),
    "group size not a power of two": (["--group-size", "96"], ["power of two"]),
    "bits out of range": (["--bits", "5"], ["--bits", "invalid choice"]),
    "container too small": (["--bits", "3"], ["--container 4"]),
    "batch not whole blocks": (["--batch-size", "6"], ["--batch-size must be a multiple of 4"]),
    "unknown flag": (["--bitz", "2"], ["unrecognized arguments"]),
}


@pytest.mark.parametrize("row", BAD_FLAGS)
def test_bad_flags_are_one_line(row, tmp_path):
    flags, words = BAD_FLAGS[row]
    one_error_line(quantize("--out", str(tmp_path / "out"), *FAST, *flags), *words)
    assert not (tmp_path / "out.partial").exists()


def test_nan_tensor_is_refused_by_name(tmp_path):
    def poison(t):
        t["model.layers.3.mlp.experts.2.up_proj.weight"][5, 7] = float("inf")

    src = tiny_copy(tmp_path / "nan", poison)
    proc = quantize("--out", str(tmp_path / "out"), *FAST, "--eval-every", "0", model=src)
    one_error_line(proc, "model.layers.3.mlp.experts.2.up_proj.weight holds NaN or inf", alone=False)
    assert not (tmp_path / "out").exists()  # stopped at layer 3, resumable once the shard is fixed


def faulty(kind, n, out):
    return subprocess.run([sys.executable, str(ROOT / "tests" / "faulty_quantize.py"), kind, str(n),
                           "--model", str(TINY_MODEL), "--out", str(out), *FAST], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)


# Files written with FAST on the 7-layer model: the resume point before layer 0 (4 blocks of calibration
# windows, 1 of perplexity-watch windows) is writes 1-5; then per layer i its shard, write 6 + 6i, and the
# resume point after it, writes 7 + 6i to 11 + 6i; the rest (embeddings, lm_head) write 48.
def shard_write(i):
    return 6 + 6 * i


@pytest.mark.parametrize("n", [shard_write(0), shard_write(2) + 3, shard_write(4), 48],
                         ids=["layer-0-shard", "resume-point-2", "layer-4-shard", "rest"])
def test_kill_during_a_write_then_resume(n, quantized, tmp_path):
    out = tmp_path / "q"
    proc = faulty("kill", n, out)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()  # nothing looks complete
    one_error_line(quantize("--out", str(out), *FAST), "--resume")  # and a plain rerun will not start over
    resumed = quantize("--out", str(out), *FAST, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert digest(out) == digest(quantized)
    assert not list(out.glob("*.tmp")) and not (out / ".gsq-work").exists()


@pytest.mark.parametrize("n", [shard_write(2), 48], ids=["layer-2-shard", "rest"])
def test_disk_full_is_clear_and_resumable(n, quantized, tmp_path):
    out = tmp_path / "q"
    proc = faulty("full", n, out)
    one_error_line(proc, "no space left on the device", "--resume", code=3, alone=False)
    assert not out.exists()
    resumed = quantize("--out", str(out), *FAST, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert digest(out) == digest(quantized)


def test_small_calibration_set_is_reported(tmp_path):
    from transformers import AutoTokenizer

    from gsq.calib import calibration_ids

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    data = tmp_path / "c.jsonl"
    data.write_text('{"text": "The cat sat on the mat and looked at the dog."}\n\n{"text": ""}\n'
                    '{"text": "A short line."}\n{"text": "   "}\n')
    ids, note = calibration_ids(tokenizer, str(data), "text", 4, 8, 0)
    assert ids.shape == (4, 8)
    assert "windows overlap" in note and "2 empty document(s) skipped" in note
    joined = tokenizer(tokenizer.eos_token.join(["The cat sat on the mat and looked at the dog.", "A short line."]),
                       add_special_tokens=False).input_ids
    for row in ids.tolist():  # short documents are joined, every window is a slice of the joined text
        assert any(joined[s : s + 8] == row for s in range(len(joined) - 7))
    with pytest.raises(Exception, match="fewer than one --seqlen"):
        calibration_ids(tokenizer, str(data), "text", 4, 4096, 0)


def test_not_utf8_calibration_is_one_line(tmp_path):
    data = tmp_path / "calib.txt"
    data.write_bytes("The cat sat on the mat. ".encode() * 50 + b"\xff\xfe bad bytes")
    one_error_line(quantize("--out", str(tmp_path / "out"), *FAST, "--dataset", str(data)), "is not UTF-8 text")
    assert not (tmp_path / "out.partial").exists()


def test_seqlen_beyond_the_context_is_refused(tmp_path):
    one_error_line(quantize("--out", str(tmp_path / "out"), *FAST, "--seqlen", "100000"),
                   "--seqlen 100000 is longer than the model's context (max_position_embeddings 4096)")
    assert not (tmp_path / "out.partial").exists()


def test_out_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    one_error_line(quantize("--out", str(tmp_path / "out"), *FAST, "--overwrite"), "is a file, not a directory")
    assert not (tmp_path / "out.partial").exists() and (tmp_path / "out").read_text() == "not a directory"


def test_unreadable_config_is_one_line(tmp_path):
    src = tiny_copy(tmp_path / "src")
    (src / "config.json").write_text('{"model_type": "deepseek_v3", ')
    one_error_line(quantize("--out", str(tmp_path / "out"), *FAST, model=src), "cannot read", "config.json")
    assert not (tmp_path / "out.partial").exists()


def test_sigterm_says_how_to_continue_and_that_resumes_to_the_same_bytes(quantized, tmp_path):
    import shlex
    import signal

    from conftest import kill_after_layer

    out = tmp_path / "q"
    proc = quantize("--out", str(out), *FAST, wait=False)
    kill_after_layer(proc, out.with_name("q.partial") / ".gsq-work" / "state.json", 2,
                     kill=lambda: proc.send_signal(signal.SIGTERM))
    err = proc.stderr.read()
    lines = err.strip().splitlines()
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert lines[-1].startswith(f"error: stopped by SIGTERM: the finished layers are kept in {out}.partial; "
                                "continue with: python -m gsq.quantize ")
    command = shlex.split(lines[-1].split("continue with: ", 1)[1])
    assert command[-1] == "--resume" and command[:2] == ["python", "-m"]
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert digest(out) == digest(quantized)


def test_ctrl_c_before_any_output_says_nothing_was_written(tmp_path):
    import signal
    import time

    proc = quantize("--out", str(tmp_path / "out"), *FAST, wait=False)
    time.sleep(3)  # still importing or planning
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    err = proc.stderr.read()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] in ("error: stopped by SIGINT: nothing was written", ) or \
        err.strip().splitlines()[-1].startswith("error: stopped by SIGINT: the finished layers are kept in")


@pytest.mark.parametrize("tool", ["gsq.quantize", "gsq.prune"])
def test_bad_calibration_leaves_nothing_and_the_rerun_starts(tool, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    extra = ["--keep", "4"] if tool == "gsq.prune" else ["--eval-every", "0"]
    cmd = [sys.executable, "-m", tool, "--model", str(TINY_MODEL), "--out", str(out), *extra,
           "--num-samples", "8", "--seqlen", "64"]
    one_error_line(subprocess.run([*cmd, "--dataset", str(empty)], cwd=ROOT, env=ENV, capture_output=True, text=True))
    assert not out.exists() and not out.with_name("out.partial").exists()  # so a rerun is not "interrupted"
    if tool == "gsq.prune":  # (quantize's rerun with good data is every other test)
        good = subprocess.run([*cmd, *FAST[:2]], cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert good.returncode == 0, good.stderr[-2000:]
