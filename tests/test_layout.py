"""The repository's layout: the kernels folder is `gsq.kernels` and the root shadows no installed package."""

import importlib.metadata
import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT


def test_kernels_folder_is_gsq_kernels():
    import gsq.kernels.pack

    assert importlib.util.find_spec("gsq.kernels").submodule_search_locations[0] == str(ROOT / "gsq" / "kernels")
    assert (ROOT / "gsq" / "kernels").resolve() == ROOT / "kernels"
    assert gsq.kernels.pack.__file__ == str(ROOT / "gsq" / "kernels" / "pack.py")


def test_the_root_holds_no_package_a_dependency_could_lose_to():
    # `python -m`, `python -c` and pytest put the working directory first on sys.path: a regular package or a
    # module there beats every installed one of that name. Folders without __init__.py never do (PEP 420).
    importable = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    importable |= {p.stem for p in ROOT.glob("*.py")}
    installed = {name for name, dists in importlib.metadata.packages_distributions().items()
                 if set(dists) != {"gsq"}}  # (gsq itself may be listed twice: the venv's and a gsq.egg-info here)
    assert not importable & installed
    assert importable <= {"gsq"}, importable


def test_hub_kernels_is_imported_from_the_root():
    # transformers >= 5.25 imports Hugging Face's `kernels` from transformers.activations; from the repository
    # root (where `make`, pytest and users run) that must be the installed package, not our kernels/ folder.
    try:
        hub = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    run = subprocess.run([sys.executable, "-c", "import kernels, transformers.activations; print(kernels.__file__)"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(hub)


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
