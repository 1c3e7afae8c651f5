"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback."""

import argparse
import errno
import sys


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


def run_cli(main, argv=None) -> None:
    """Run a CLI entry point: an InputError becomes `error: ...` on stderr and exit status 2; a full
    disk exit status 3, with what to do (the run's partial output stays resumable)."""
    try:
        main(argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        if not disk_full(exc):
            raise
        print(f"error: no space left on the device while writing ({str(exc).splitlines()[0]}): free space, then "
              "rerun the same command with --resume", file=sys.stderr)
        sys.exit(3)
