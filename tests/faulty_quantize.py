"""`python tests/faulty_quantize.py KIND N ARGS...`: `python -m gsq.quantize ARGS` with a fault at the
N-th safetensors file it writes (layer shards, resume points and the rest, in that order): half of
the file reaches the disk, then either the process is killed (`kill`, SIGKILL: nothing runs after)
or the disk is full (`full`: the error safetensors raises for ENOSPC)."""

import os
import runpy
import signal
import sys

import safetensors.torch
from safetensors import SafetensorError

kind, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real_save = safetensors.torch.save_file
calls = 0


def faulty_save(tensors, path, metadata=None):
    global calls
    calls += 1
    real_save(tensors, path, metadata=metadata)
    if calls == n:
        os.truncate(path, os.path.getsize(path) // 2)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


import gsq.export  # noqa: E402  (patched where they call it)
import gsq.acts  # noqa: E402

gsq.export.save_file = gsq.acts.save_file = faulty_save
sys.argv = ["python -m gsq.quantize", *args]
runpy.run_module("gsq.quantize", run_name="__main__")
