"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback."""

import argparse
import errno
import os
import shlex
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path


class InputError(Exception):
    """Bad input from the user (missing path, wrong kind of model, bad option): reported in one line."""


class BrokenSource(InputError):
    """A source tensor found unusable when its layer is read (NaN or inf: scanning 1 TB before the run is too slow)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line (not the usage of fifty flags) and exit status 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# A write that failed for want of room: no space, a quota, or the largest file this process may write (ulimit -f).
ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
        errno.EFBIG: "the file is over the largest this process may write (ulimit -f)"}


def out_of_room(exc: BaseException) -> int | None:
    """The errno of ROOM that `exc` carries (an OSError, or safetensors' own error, which names the OS code), or None."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in ROOM else None
    if type(exc).__name__ == "SafetensorError":
        return next((code for code in ROOM if f"(os error {code})" in str(exc)), None)
    return None


def size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


class WriteFailed(Exception):
    """A file gsq was writing did not fit (`writing`): said in one line with the file, its size and the room left;
    the exit status is the errno."""

    def __init__(self, path: Path, nbytes: int, code: int):
        self.code = code
        try:
            free = f"{size(shutil.disk_usage(path.parent).free)} free there"
        except OSError:
            free = "free space unknown"
        need = f"free at least {size(nbytes)}" if code != errno.EFBIG else "raise the limit (ulimit -f unlimited)"
        super().__init__(f"{ROOM[code]} while writing {path} ({size(nbytes)}; {free}): {need}")


@contextmanager
def writing(path: Path, nbytes: int):
    """Around the write of one file of about `nbytes`: when it does not fit, what was written of it goes (it frees
    the room; every file gsq writes is renamed into place whole, or rewritten by a resume) and WriteFailed says so."""
    try:
        yield
    except Exception as exc:
        code = out_of_room(exc)
        if code is None:
            raise
        Path(path).unlink(missing_ok=True)
        raise WriteFailed(Path(path), nbytes, code) from exc


def tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_text(path: Path, text: str):
    """`path` written whole or not at all (a temporary beside it, renamed), a full disk said as WriteFailed."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with writing(tmp, len(text.encode())):
        tmp.write_text(text)
    os.replace(tmp, path)


class Stopped(BaseException):
    """Ctrl-C or SIGTERM, raised where the process is (for both, gsq's own exception rather than
    KeyboardInterrupt, which Python turns into death by SIGINT at exit). A BaseException, as KeyboardInterrupt
    is: a library's `except Exception` (torch's load_state_dict, a reader's error wrapper) must not turn the
    signal into an error of its own."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signal.Signals(signum)


def _stop(signum, frame):
    raise Stopped(signum)


def quiet_start(name: str):
    """Called by a CLI module before its heavy imports (torch takes seconds): when it is the program
    (`name == "__main__"`), Ctrl-C or SIGTERM until `run_cli` takes over exits at once in one line; nothing
    was written yet."""
    def leave(signum, frame):
        print(f"error: stopped by {signal.Signals(signum).name}: nothing was written", file=sys.stderr)
        os._exit(128 + signum)

    if name == "__main__":
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, leave)


def partial_dir(argv) -> Path | None:
    """The run's `OUT.partial`, where the command line names an --out and it exists."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = args[args.index("--out") + 1] if "--out" in args[:-1] else None
    return Path(f"{out}.partial") if out and Path(f"{out}.partial").is_dir() else None


def broken_hint(argv) -> str:
    """After BrokenSource: the source is at fault, what was kept, and how to start again once it is fixed."""
    partial = partial_dir(argv)
    kept = f"; the layers finished before it are kept in {partial}, but a fixed source is a changed source, which " \
           "cannot be resumed: once it is fixed (re-download that file), rerun with --overwrite" if partial else ""
    return f" (the source model is broken, not gsq's run){kept}"


def resume_hint(argv) -> str:
    """Where an interrupted run's resume point is and the exact command that continues it: every file a
    run writes is renamed into place whole, so wherever it stopped, the finished layers are kept."""
    args = list(sys.argv[1:] if argv is None else argv)
    partial = partial_dir(argv)
    if partial is None:
        return "nothing was written"
    module = getattr(sys.modules["__main__"].__spec__, "name", "gsq.quantize")  # gsq.quantize or gsq.prune
    again = [a for a in args if a != "--overwrite"] + ([] if "--resume" in args else ["--resume"])
    return f"the finished layers are kept in {partial}; continue with: python -m {module} {shlex.join(again)}"


def run_cli(main, argv=None) -> None:
    """Run a CLI entry point: an InputError becomes `error: ...` on stderr and exit status 2; a write that did not
    fit (a full disk, a quota, ulimit -f) one line naming the file, its size, the room left and the command that
    continues, exit status the errno (28, 122, 27); Ctrl-C and SIGTERM one line saying how to continue, exit
    status 130 and 143."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    try:
        main(argv)
    except InputError as exc:
        print(f"error: {exc}{broken_hint(argv) if isinstance(exc, BrokenSource) else ''}", file=sys.stderr)
        sys.exit(2)
    except Stopped as exc:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C while this is said changes nothing
        from tqdm import tqdm

        for bar in list(tqdm._instances):  # closed now, so nothing is drawn after the line below
            bar.close()
        print(f"\nerror: stopped by {exc.signum.name}: {resume_hint(argv)}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except WriteFailed as exc:
        print(f"error: {exc}; {resume_hint(argv)}", file=sys.stderr)
        sys.exit(exc.code)
    except Exception as exc:  # a write not made through `writing` (a copy, a rename)
        code = out_of_room(exc)
        if code is None:
            raise
        print(f"error: {ROOM[code]} while writing ({str(exc).splitlines()[0]}): {resume_hint(argv)}", file=sys.stderr)
        sys.exit(code)
