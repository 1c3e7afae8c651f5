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
