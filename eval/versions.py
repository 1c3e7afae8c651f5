"""The versions this Python runs gsq with, and where they differ from the lock CI tested.

    python eval/versions.py requirements/lock.txt requirements/torch-cpu.txt

`make test-latest` prints this for the venv of the newest releases pyproject allows; the lines that
differ are what tomorrow's fresh install gets that CI has not tested yet.
"""

import argparse
import importlib.metadata
import re

KEY = ["torch", "triton", "transformers", "kernels", "compressed-tensors", "safetensors", "datasets", "lm-eval"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(paths) -> dict:
    """{package: version} of pip-freeze lines `name==version` (comments skipped)."""
    pins = {}
    for path in paths:
        for line in open(path):
            name, sep, version = line.split("#")[0].strip().partition("==")
            if sep:
                pins[canonical(name)] = version
    return pins


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("locks", nargs="+", help="pip constraint files (name==version per line)")
    args = parser.parse_args()
    locked = read_lock(args.locks)
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    installed.pop("gsq", None)
    print("ran with: " + ", ".join(f"{name} {installed[name]}" for name in KEY if name in installed))
    release = {name: version.split("+")[0] for name, version in installed.items()}  # 2.13.0+cpu is 2.13.0
    changed = [f"  {name}: {locked.get(name, '(not locked)')} -> {release.get(name, '(not installed)')}"
               for name in sorted(set(locked) | set(release)) if locked.get(name) != release.get(name)]
    print(f"differs from the lock ({len(changed)}):" if changed else "the same versions as the lock")
    print("\n".join(changed))


if __name__ == "__main__":
    main()
