"""The kernels folder installs as `gsq.kernels` and is never taken for Hugging Face's `kernels` package."""

import importlib.util

from conftest import ROOT


def test_kernels_folder_is_gsq_kernels():
    import gsq.kernels

    assert gsq.kernels.__file__ == str(ROOT / "kernels" / "__init__.py")


def test_transformers_does_not_mistake_it_for_hub_kernels():
    from transformers.utils import is_kernels_available

    # From the repo root the folder is importable as `kernels`; transformers must still see no hub kernels.
    spec = importlib.util.find_spec("kernels")
    assert spec is None or spec.origin == str(ROOT / "kernels" / "__init__.py")
    assert not is_kernels_available()


def imports_of(module: str) -> set:
    """The gsq modules `gsq/<module>.py` imports."""
    import ast

    found = set()
    for node in ast.walk(ast.parse((ROOT / "gsq" / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gsq"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_quantize_and_prune_share_the_walker_not_each_other():
    assert "gsq.prune" not in imports_of("pipeline")
    assert "gsq.walk" in imports_of("pipeline") and "gsq.walk" in imports_of("prune")
    assert not {"gsq.pipeline", "gsq.quantize"} & imports_of("prune")


def test_each_cli_lists_only_its_own_settings():
    import subprocess
    import sys

    def flags(tool):
        out = subprocess.run([sys.executable, "-m", f"gsq.{tool}", "--help"], capture_output=True, text=True).stdout
        return {word.strip("[],") for word in out.split() if word.startswith(("--", "[--"))}

    quantize, prune = flags("quantize"), flags("prune")
    assert not {"--keep", "--ratio", "--criterion"} & quantize and {"--epochs", "--bits", "--dry-run"} <= quantize
    assert {"--keep", "--ratio", "--criterion"} <= prune and not {"--epochs", "--bits", "--finetune-scales"} & prune


def test_the_package_knows_no_workspace():
    # data paths come from flags (the Makefile and the tests pass ../shared/data where it exists)
    for path in [*(ROOT / "gsq").glob("*.py"), *(ROOT / "kernels").glob("*.py")]:
        text = path.read_text()
        assert "shared/" not in text and "/work/" not in text, path
