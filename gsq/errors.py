"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback."""

import argparse
import errno
import os
import shlex
import signal
import sys
from pathlib import Path


class InputError(Exception):
    """Bad input from the user (missing path, wrong kind of model, bad option): reported in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line (not the usage of fifty flags) and exit status 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def disk_full(exc: BaseException) -> bool:
    """No space (or quota) left, as an OSError or as safetensors' own error, which carries the OS code."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return type(exc).__name__ == "SafetensorError" and any(
        f"(os error {code})" in str(exc) for code in (errno.ENOSPC, errno.EDQUOT))


class Stopped(Exception):
    """Ctrl-C or SIGTERM, raised where the process is (for both, gsq's own exception rather than
    KeyboardInterrupt, which Python turns into death by SIGINT at exit)."""

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


def resume_hint(argv) -> str:
    """Where an interrupted run's resume point is and the exact command that continues it: every file a
    run writes is renamed into place whole, so wherever it stopped, the finished layers are kept."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = args[args.index("--out") + 1] if "--out" in args[:-1] else None
    partial = Path(f"{out}.partial") if out else None
    if partial is None or not partial.is_dir():
        return "nothing was written"
    module = getattr(sys.modules["__main__"].__spec__, "name", "gsq.quantize")  # gsq.quantize or gsq.prune
    again = [a for a in args if a != "--overwrite"] + ([] if "--resume" in args else ["--resume"])
    return f"the finished layers are kept in {partial}; continue with: python -m {module} {shlex.join(again)}"


def run_cli(main, argv=None) -> None:
    """Run a CLI entry point: an InputError becomes `error: ...` on stderr and exit status 2; a full
    disk exit status 3, with what to do (the run's partial output stays resumable); Ctrl-C and SIGTERM
    one line saying how to continue, exit status 130 and 143."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    try:
        main(argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Stopped as exc:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C while this is said changes nothing
        from tqdm import tqdm

        for bar in list(tqdm._instances):  # closed now, so nothing is drawn after the line below
            bar.close()
        print(f"\nerror: stopped by {exc.signum.name}: {resume_hint(argv)}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except Exception as exc:
        if not disk_full(exc):
            raise
        print(f"error: no space left on the device while writing ({str(exc).splitlines()[0]}): free space, then "
              "rerun the same command with --resume", file=sys.stderr)
        sys.exit(3)
