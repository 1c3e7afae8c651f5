"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback."""

import sys


class InputError(Exception):
    """Bad input from the user (missing path, wrong kind of model, bad option): reported in one line."""


def run_cli(main, argv=None) -> None:
    """Run a CLI entry point; an InputError becomes `error: ...` on stderr and exit status 2."""
    try:
        main(argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
