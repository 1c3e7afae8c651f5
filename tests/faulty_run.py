"""`python tests/faulty_run.py KIND N MODULE ARGS...`: `python -m MODULE ARGS` (gsq.quantize, gsq.prune) with
a fault at the N-th safetensors file it writes (layer shards, resume points, the fine-tuned scales, the
layer shards again with them, and the rest, in that order):
half of the file reaches the disk, then either the process is killed (`kill`, SIGKILL: nothing runs
after) or the disk is full (`full`: the error safetensors raises for ENOSPC); or (`term`) the file is
written whole and the process gets SIGTERM. `full-text`: the N-th small file gsq writes whole through a temporary
(`*.tmp`: the resume points, the index, config.json, the records) meets a full disk halfway (OSError ENOSPC)."""

import errno
import os
import pathlib
import runpy
import signal
import sys

import safetensors.torch
from safetensors import SafetensorError

kind, n, module, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
real_save = safetensors.torch.save_file
calls = 0


def faulty_save(tensors, path, metadata=None):
    global calls
    calls += 1
    real_save(tensors, path, metadata=metadata)
    if calls == n and kind == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif calls == n:
        os.truncate(path, os.path.getsize(path) // 2)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def faulty_text(path, text, *args, **kwargs):
    global calls
    if path.suffix == ".tmp":
        calls += 1
        if calls == n:
            real_text(path, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return real_text(path, text, *args, **kwargs)


if kind == "full-text":
    real_text = pathlib.Path.write_text
    pathlib.Path.write_text = faulty_text

import gsq.export  # noqa: E402  (patched where they call it)
import gsq.acts  # noqa: E402
import gsq.finetune  # noqa: E402

if kind != "full-text":
    gsq.export.save_file = gsq.acts.save_file = gsq.finetune.save_file = faulty_save
sys.argv = [f"python -m {module}", *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
