"""Shared paths: the bundled tiny model and the offline WikiText-2 copy in ../shared/data."""

import os
from pathlib import Path

import pytest
import torch

# Tests never reach a hub: everything loads from local paths.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels run in the interpreter; the decorator reads this at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "models" / "tiny-deepseek-v3"
DATA = ROOT.parent / "shared" / "data"
WIKI_TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def tiny():
    """The bundled tiny MoE and its tokenizer, loaded once (bf16, CPU, eval mode)."""
    from gsq.eval import load_model

    return load_model(str(TINY_MODEL))


@pytest.fixture(scope="session")
def wiki_rows():
    from gsq.eval import wikitext_rows

    return wikitext_rows(str(WIKI_TEST))
