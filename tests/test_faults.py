"""Bad input and faults (tests/README.md's table, one test per row): one clear error line before any work,
nothing lost, nothing half-written that looks complete, resumable to the identical bytes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file
from conftest import CALIB_DATA, FAST, ROOT, TINY_MODEL, WIKI_TEST, digest, quantize

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
    "config disagreeing with the weights": (lambda d: tiny_copy(d / "h", config={"hidden_size": 512}),
                                            ["config.json does not match the weights", "[2048, 256]", "[2048, 512]"]),
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
    "two width choices": (["--bits-budget", "2.5", "--target-size", "5MB"], ["--bits-budget and --target-size",
                                                                              "give one"]),
    "budget below 2 bits": (["--bits-budget", "2.0"], ["--bits-budget 2.0 is below 2.125 bits per weight"]),
    "size below 2 bits": (["--target-size", "1MB"], ["--target-size 1MB is below the smallest checkpoint"]),
    "batch not whole blocks": (["--batch-size", "6"], ["--batch-size must be a multiple of 4"]),
    "unknown flag": (["--bitz", "2"], ["unrecognized arguments"]),
    "no calibration windows": (["--num-samples", "0"], ["--num-samples must be at least 1, got 0"]),
    "negative window length": (["--seqlen", "-5"], ["--seqlen must be at least 1, got -5"]),
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
    out = tmp_path / "out"
    flags = ["--out", str(out), *FAST, "--eval-every", "0", "--finetune-scales", "0"]
    proc = quantize(*flags, model=src)
    one_error_line(proc, "model.layers.3.mlp.experts.2.up_proj.weight holds NaN or inf (model.safetensors) (the source "
                   f"model is broken, not gsq's run); the layers finished before it are kept in {out}.partial",
                   "once it is fixed (re-download that file), rerun with --overwrite", alone=False)
    assert not out.exists()  # stopped at layer 3
    shutil.copyfile(TINY_MODEL / "model.safetensors", src / "model.safetensors")  # fixed
    one_error_line(quantize(*flags, "--resume", model=src), "model.safetensors has changed", "--overwrite")
    assert quantize(*flags, "--overwrite", model=src).returncode == 0 and (out / "config.json").exists()


def faulty(kind, n, out, module="gsq.quantize", flags=FAST):
    return subprocess.run([sys.executable, str(ROOT / "tests" / "faulty_run.py"), kind, str(n), module,
                           "--model", str(TINY_MODEL), "--out", str(out), *flags], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)


# Files written with FAST on the 7-layer model: the resume point before layer 0 (4 blocks of calibration
# windows, 1 of perplexity-watch windows) is writes 1-5; then per layer i its shard, write 6 + 6i, and the
# resume point after it, writes 7 + 6i to 11 + 6i; the fine-tuned scales write 48, the 6 MoE layers' shards
# with them writes 49-54; the rest (embeddings, lm_head) write 55.
def shard_write(i):
    return 6 + 6 * i


FINETUNED, REST = 48, 55


@pytest.mark.parametrize("n", [shard_write(0), shard_write(2) + 3, FINETUNED, FINETUNED + 3],
                         ids=["layer-0-shard", "resume-point-2", "fine-tuned-scales", "fine-tuned-shard-3"])
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


FULL = {  # a full disk at each kind of file a run writes: (fault, N, the file named)
    "layer-2-shard": ("full", shard_write(2), "q.partial/model-layer00002-000.tmp"),
    "fine-tuned-scales": ("full", FINETUNED, "q.partial/.gsq-work/finetuned.tmp"),
    "rest": ("full", REST, "q.partial/model-rest-000.tmp"),
    "resume-point-0": ("full-text", 1, "q.partial/.gsq-work/state.json.tmp"),
    "index": ("full-text", 15, "q.partial/model.safetensors.index.json.tmp"),
}


@pytest.mark.parametrize("row", FULL)
def test_disk_full_is_one_line_and_resumable(row, quantized, tmp_path):
    """One line: the file, its size, the room left, the command that continues; exit 28 (ENOSPC). The resume
    gives the same bytes."""
    kind, n, name = FULL[row]
    out = tmp_path / "q"
    proc = faulty(kind, n, out)
    one_error_line(proc, f"no space left on the device while writing {tmp_path / name} (", "free there): free "
                   "at least", f"continue with: python -m gsq.quantize --model {TINY_MODEL} --out {out}", "--resume",
                   code=28, alone=False)
    assert not out.exists() and not (tmp_path / name).exists()  # the half-written file went
    resumed = quantize("--out", str(out), *FAST, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert digest(out) == digest(quantized)


def limited(cmd, kib):
    """`cmd` with the largest file it may write `kib` KiB (ulimit -f): writes past it fail with EFBIG."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, kib * 1024))

    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, preexec_fn=limit)


FILE_LIMIT = {  # ulimit -f (KiB) at which each writer's first file is too large: (extra flags, KiB, file named)
    "activations on disk": (["--activations", "disk"], 100, ".gsq-work/acts-0.tmp/calib-000000.safetensors"),
    "layer shard": ([], 600, "model-layer00000-000.tmp"),
}


@pytest.mark.parametrize("row", FILE_LIMIT)
def test_a_file_size_limit_is_one_line_and_resumable(row, quantized, tmp_path):
    flags, kib, name = FILE_LIMIT[row]
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "gsq.quantize", "--model", str(TINY_MODEL), "--out", str(out), *FAST, *flags]
    one_error_line(limited(cmd, kib), f"over the largest this process may write (ulimit -f) while writing "
                   f"{out}.partial/{name}", "raise the limit", "--resume", code=27, alone=False)
    assert not out.exists()
    resumed = quantize("--out", str(out), *FAST, *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert digest(out) == digest(quantized)


def test_prune_at_a_file_size_limit_is_one_line_and_resumable(tmp_path):
    out, again = tmp_path / "p", tmp_path / "p-whole"
    flags = ["--model", str(TINY_MODEL), "--keep", "4", *CALIB_DATA, "--num-samples", "8", "--seqlen", "128"]
    one_error_line(limited([sys.executable, "-m", "gsq.prune", "--out", str(out), *flags], 600),
                   f"while writing {out}.partial/model-layer00000-000.tmp", "python -m gsq.prune", "--resume",
                   code=27, alone=False)
    for cmd in (["--out", str(out), "--resume"], ["--out", str(again)]):
        proc = subprocess.run([sys.executable, "-m", "gsq.prune", *flags, *cmd], cwd=ROOT, env=ENV, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert digest(out, skip=("gsq_prune.json",)) == digest(again, skip=("gsq_prune.json",))


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

    out = tmp_path / "q"  # the layer inputs in files (the kill rows above hold them in memory): the same bytes
    proc = quantize("--out", str(out), *FAST, "--activations", "disk", wait=False)
    kill_after_layer(proc, out.with_name("q.partial") / ".gsq-work" / "state.json", 2,
                     kill=lambda: proc.send_signal(signal.SIGTERM))
    err = proc.stderr.read()
    lines = err.strip().splitlines()
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert lines[-1].startswith(f"error: stopped by SIGTERM: the finished layers are kept in {out}.partial; "
                                "continue with: python -m gsq.quantize ")
    command = shlex.split(lines[-1].split("continue with: ", 1)[1])
    assert command[-1] == "--resume" and command[:2] == ["python", "-m"]
    # a resume of another run is refused in one line naming what differs, and leaves the partial run intact
    before = tree_digest(out.with_name("q.partial"))
    other = tiny_copy(tmp_path / "other", lambda t: t.update({k: v * 1.5 for k, v in t.items() if "experts" in k}))
    for flags, words in ((["--bits", "3", "--container", "4"], "this run has --bits 3, it was started with --bits 2"),
                         (["--seed", "1"], "this run has --seed 1, it was started with --seed 0"),
                         (["--model", str(other)], f"this run has --model {other}, it was started with --model")):
        refused = subprocess.run([sys.executable, *command[1:], *flags], cwd=ROOT, env=ENV, capture_output=True, text=True)
        one_error_line(refused, f"cannot resume {out}.partial: {words}", "--overwrite")
        assert tree_digest(out.with_name("q.partial")) == before and not out.exists()
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert digest(out) == digest(quantized)


def test_a_signal_inside_a_library_call_still_says_how_to_continue(tmp_path):
    """SIGTERM landing inside torch's load_state_dict (which wraps any Exception in a RuntimeError of its own,
    as it did once in CI while a layer streamed in) still ends in the one stop line and exit status 143."""
    script = """
import os, signal, sys, torch
from gsq.errors import run_cli

class Signalled(torch.Tensor):  # copying it into a parameter sends this process SIGTERM
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # the handler runs here, inside load_state_dict's copy
        return super().__torch_function__(func, types, args, kwargs or {})

def main(argv):
    torch.nn.Linear(2, 2).load_state_dict({"weight": torch.zeros(2, 2).as_subclass(Signalled), "bias": torch.zeros(2)})

run_cli(main, ["--out", sys.argv[1]])
"""
    (tmp_path / "q.partial").mkdir()
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "q")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 143 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: stopped by SIGTERM: the finished layers are kept in {tmp_path / 'q.partial'}; continue with: ")


def tree_digest(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_changed_source_is_not_resumed(tmp_path):
    """The resume point holds the source's identity: a shard rewritten in place (same names, shapes and size,
    other values) or a changed config.json is named."""
    from gsq import partial
    from gsq.config import Config

    src = tiny_copy(tmp_path / "src")
    cfg = Config(model=str(src), out=str(tmp_path / "out"))
    before = partial.identity(cfg, src, 1, "cpu")
    assert partial.difference(partial.identity(cfg, src, 1, "cpu"), before) is None
    tensors = load_file(src / "model.safetensors")
    save_file({k: v * 1.5 for k, v in tensors.items()}, src / "model.safetensors", metadata={"format": "pt"})
    assert partial.difference(partial.identity(cfg, src, 1, "cpu"), before) == \
        "the source model's model.safetensors has changed since it was started"
    assert partial.difference(partial.identity(cfg, src, 2, "cpu"), partial.identity(cfg, src, 1, "cpu")) == \
        "it ran with ranks 1, this run has 2"


def test_two_runs_on_one_out_end_with_one_refusal_and_one_checkpoint(quantized, tmp_path):
    """Started together, one plain and one with --overwrite: the lock admits one; the other is refused in one
    line (--overwrite never deletes a live run's partial output), and the winner's checkpoint is whole."""
    out = tmp_path / "q"
    runs = [quantize("--out", str(out), *FAST, *extra, wait=False) for extra in ([], ["--overwrite"])]
    errors = [p.stderr.read() for p in runs]
    codes = [p.wait() for p in runs]
    assert sorted(codes) == [0, 2], errors
    loser = errors[codes.index(2)].strip().splitlines()
    assert loser[-1].startswith("error: a live run (pid ") and f"is writing {out}.partial" in loser[-1], loser
    assert "Traceback" not in errors[codes.index(2)]
    assert digest(out) == digest(quantized) and not out.with_name("q.partial").exists()
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("after", [1, 3])  # importing torch (seconds on a loaded machine), or planning
def test_ctrl_c_before_any_output_says_nothing_was_written(after, tmp_path):
    import signal
    import time

    proc = quantize("--out", str(tmp_path / "out"), *FAST, wait=False)
    time.sleep(after)
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


def run_tool(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True)


EVAL = ["--data-file", WIKI_TEST, "--seqlen", "32", "--max-windows", "1", "--device", "cpu"]


@pytest.mark.parametrize("row", ["config disagreeing with the weights", "truncated shard"])
def test_prune_and_eval_refuse_a_bad_model_alike(row, tmp_path):
    build, words = BAD_MODELS[row]
    src = build(tmp_path)
    one_error_line(run_tool("gsq.prune", "--model", src, "--out", tmp_path / "p", "--keep", "4", *CALIB_DATA), *words)
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()
    one_error_line(run_tool("gsq.eval", "--model", src, *EVAL), *words)


def mixed(q, dst):
    """A copy of checkpoint `q` whose config says 4-bit codes where its tensors hold 2-bit ones."""
    shutil.copytree(q, dst)
    c = json.loads((dst / "config.json").read_text())
    c["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def foreign(dst):
    """The tiny model saying it is AWQ-quantized (a format neither gsq nor this transformers reads)."""
    return tiny_copy(dst, config={"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}})


READERS = {  # row: (build from the quantized checkpoint and a path, words of gsq.inspect's line, of gsq.eval's)
    "truncated shard": (lambda q, d: truncated_shard(shutil.copytree(q, d), "model-00003-of-00008.safetensors"),
                        *[["model-00003-of-00008.safetensors is truncated or corrupt"]] * 2),
    "mixed bit widths": (mixed, *[["int32 words per row, but the 4-bit codes", "do not have the bit width"]] * 2),
    "foreign format": (lambda q, d: foreign(d), *[["source quantization 'awq' is not supported"]] * 2),
    "not a checkpoint": (lambda q, d: d.mkdir() or d, ["is not a checkpoint directory (no config.json)"],
                         ["not a model directory (no config.json)"]),
}


def truncated_shard(d, name):
    os.truncate(d / name, (d / name).stat().st_size // 2)
    return d


def test_eval_of_a_model_whose_forward_fails_is_one_line(tmp_path):
    # transformers loads it (8 experts in 3 groups is no shape error to its loader), then its router cannot split
    # the experts into the groups; gsq's own reader builds the same modules and fails the same way
    src = tiny_copy(tmp_path / "groups", config={"n_group": 3})
    proc = run_tool("gsq.eval", "--model", src, *EVAL)
    one_error_line(proc, f"cannot run the model in {src}: ", alone=False)
    assert "transformers cannot run" in proc.stderr


@pytest.mark.parametrize("row", READERS)
def test_readers_refuse_a_broken_checkpoint_in_one_line(row, quantized, tmp_path):
    build, inspect_words, eval_words = READERS[row]
    ckpt = build(quantized, tmp_path / "ckpt")
    one_error_line(run_tool("gsq.inspect", ckpt), *inspect_words)
    one_error_line(run_tool("gsq.eval", "--model", ckpt, *EVAL), *eval_words)


def outside_index(dst, where):
    """A copy of the tiny model whose index maps one tensor to a shard outside its folder (`where`: '..' or the
    absolute path), the shard really there, so only the check stops the read."""
    tiny_copy(dst)
    outside = dst.parent / "other"
    outside.mkdir()
    shutil.move(dst / "model.safetensors", outside / "model.safetensors")
    from safetensors import safe_open

    with safe_open(outside / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    file = "../other/model.safetensors" if where == ".." else str(outside / "model.safetensors")
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, file)}))
    return dst


@pytest.mark.parametrize("where", ["..", "absolute"])
def test_an_index_pointing_outside_the_model_is_refused_by_every_tool(where, tmp_path):
    src = outside_index(tmp_path / "m", where)
    words = ["model.safetensors.index.json maps", "a shard must be a file name in the model directory"]
    for tool, args in [("gsq.quantize", ["--out", tmp_path / "q", *FAST]),
                       ("gsq.prune", ["--out", tmp_path / "q", "--keep", "4", *CALIB_DATA]),
                       ("gsq.eval", EVAL)]:
        one_error_line(run_tool(tool, "--model", src, *args), *words)
        assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()
    one_error_line(run_tool("gsq.inspect", src), *words)


def test_symlinked_shards_as_in_the_hub_cache_are_read(quantized, tmp_path):
    """The Hugging Face cache keeps snapshots/REV/<file> as links to ../../blobs/<hash>: inside the folder by
    name, elsewhere on disk. Every tool reads such a model."""
    snapshot = tmp_path / "hub" / "snapshots" / "abc123"
    blobs = tmp_path / "hub" / "blobs"
    for src, dst in [(TINY_MODEL, snapshot / "tiny"), (quantized, snapshot / "w2")]:
        dst.mkdir(parents=True)
        blobs.mkdir(exist_ok=True)
        for f in src.iterdir():
            blob = blobs / f"{dst.name}-{f.name}"
            shutil.copyfile(f, blob)
            (dst / f.name).symlink_to(os.path.relpath(blob, dst))
    proc = run_tool("gsq.eval", "--model", snapshot / "w2", "--reference", snapshot / "tiny", *EVAL, "--no-card")
    assert proc.returncode == 0 and "KL" in proc.stdout, proc.stderr[-2000:]
    proc = run_tool("gsq.inspect", snapshot / "w2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_tool("gsq.quantize", "--model", snapshot / "tiny", "--out", tmp_path / "q", *FAST, "--eval-every", "0",
                    "--finetune-scales", "0", "--min-steps", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]


def no_tokenizer(dst, keep_config=False):
    tiny_copy(dst)
    for f in ["tokenizer.json", *([] if keep_config else ["tokenizer_config.json"])]:
        (dst / f).unlink()
    return dst


@pytest.mark.parametrize("keep_config", [False, True], ids=["no tokenizer files", "tokenizer_config.json alone"])
def test_a_model_without_a_tokenizer_is_one_line_and_tokenizer_names_one(keep_config, tmp_path):
    src = no_tokenizer(tmp_path / "m", keep_config)
    words = [f"{src} has no tokenizer (looked for tokenizer.json" if not keep_config else
             f"cannot load the tokenizer in {src}: ", "pass --tokenizer DIR"]
    for tool, args in [("gsq.quantize", ["--out", tmp_path / "q", *FAST]),
                       ("gsq.prune", ["--out", tmp_path / "q", "--keep", "4", *CALIB_DATA]),
                       ("gsq.eval", EVAL)]:
        one_error_line(run_tool(tool, "--model", src, *args), *words)
        assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()
    if keep_config:
        return
    proc = run_tool("gsq.eval", "--model", src, *EVAL, "--tokenizer", TINY_MODEL, "--no-card")
    assert proc.returncode == 0 and "ppl" in proc.stdout, proc.stderr[-2000:]
    out = tmp_path / "q"
    proc = run_tool("gsq.quantize", "--model", src, "--out", out, *FAST, "--eval-every", "0", "--finetune-scales", "0",
                    "--tokenizer", TINY_MODEL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "tokenizer.json").read_bytes() == (TINY_MODEL / "tokenizer.json").read_bytes()  # servable
