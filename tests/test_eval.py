"""`gsq.eval`: the perplexity protocol, KL and top-1 against hand-computed values, and the CLI."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY_MODEL, WIKI_TEST

from gsq.eval import eval_windows, evaluate


class Bigram(torch.nn.Module):
    """A causal LM whose next-token logits depend only on the current token: logits = table[token]."""

    def __init__(self, probs):
        super().__init__()
        self.table = torch.tensor(probs, dtype=torch.float64).log()

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def test_wikitext_rows_match_the_hub_split(wiki_rows):
    # ../shared/data/README.md: the Hub's test split has 4358 rows, 1467 of them empty.
    assert len(wiki_rows) == 4358
    assert sum(row == "" for row in wiki_rows) == 1467
    assert all(row.endswith("\n") for row in wiki_rows if row)


def test_perplexity_kl_and_top1_match_hand_computation():
    model = Bigram([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    reference = Bigram([[0.6, 0.2, 0.2], [0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    windows = torch.tensor([[0, 1, 2, 2], [2, 0, 0, 1]])
    # Predicted positions (current -> next): 0->1, 1->2, 2->2, 2->0, 0->0, 0->1.
    nll = -(math.log(0.25) + math.log(0.3) + math.log(0.6) + math.log(0.2) + math.log(0.5) + math.log(0.25)) / 6
    kl_row = {  # KL(reference row || model row) for each current token
        0: 0.6 * math.log(0.6 / 0.5) + 0.2 * math.log(0.2 / 0.25) * 2,
        1: 0.5 * math.log(0.5 / 0.1) + 0.25 * math.log(0.25 / 0.6) + 0.25 * math.log(0.25 / 0.3),
        2: 0.1 * math.log(0.1 / 0.2) * 2 + 0.8 * math.log(0.8 / 0.6),
    }
    current = [0, 1, 2, 2, 0, 0]
    kl = sum(kl_row[c] for c in current) / 6
    # Argmax per current token: model 0,1,2; reference 0,0,2 -> they disagree only after token 1.
    top1 = 5 / 6

    got = evaluate(model, windows, reference, progress=False)
    assert got["tokens"] == 6 and got["windows"] == 2
    assert got["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert got["kl"] == pytest.approx(kl, rel=1e-6)
    assert got["top1"] == pytest.approx(top1)


def test_kl_of_a_model_against_itself_is_zero():
    model = Bigram([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    got = evaluate(model, torch.tensor([[0, 1, 2, 1, 0]]), model, progress=False)
    assert got["kl"] == 0.0 and got["top1"] == 1.0


def test_windows_are_the_joined_text_tokenized_once(tiny, wiki_rows):
    _, tokenizer = tiny
    ids = tokenizer("\n\n".join(wiki_rows), add_special_tokens=False).input_ids
    windows = eval_windows(tokenizer, wiki_rows, seqlen=256)
    assert windows.shape == (len(ids) // 256, 256)  # non-overlapping, last partial window dropped
    assert windows.flatten().tolist() == ids[: windows.numel()]
    assert eval_windows(tokenizer, wiki_rows, seqlen=256, max_windows=3).shape == (3, 256)


def run_eval(*args):
    return subprocess.run([sys.executable, "-m", "gsq.eval", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_against_itself_gives_zero_kl_and_the_in_process_perplexity(tiny, wiki_rows):
    proc = run_eval("--model", str(TINY_MODEL), "--reference", str(TINY_MODEL), "--data-file", str(WIKI_TEST),
                    "--seqlen", "128", "--max-windows", "3", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["kl"] == 0.0 and got["top1"] == 1.0
    assert got["windows"] == 3 and got["tokens"] == 3 * 127
    model, tokenizer = tiny
    expected = evaluate(model, eval_windows(tokenizer, wiki_rows, 128, 3), progress=False)
    assert got["ppl"] == pytest.approx(expected["ppl"], rel=1e-6)


def assert_clear_error(proc, *fragments):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_model_directory(tmp_path):
    assert_clear_error(run_eval("--model", str(tmp_path / "nope"), "--data-file", str(WIKI_TEST)),
                       "model directory not found", "nope")


def test_directory_without_config(tmp_path):
    assert_clear_error(run_eval("--model", str(tmp_path), "--data-file", str(WIKI_TEST)), "no config.json")


def test_model_that_is_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config.save_pretrained(tmp_path)
    assert_clear_error(run_eval("--model", str(tmp_path), "--data-file", str(WIKI_TEST)),
                       "'vit'", "not a causal language model")


def test_causal_lm_config_without_weights(tmp_path):
    from transformers import AutoConfig

    AutoConfig.from_pretrained(TINY_MODEL).save_pretrained(tmp_path)
    assert_clear_error(run_eval("--model", str(tmp_path), "--data-file", str(WIKI_TEST)), "no safetensors weights")


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert_clear_error(run_eval("--model", str(tmp_path), "--data-file", str(WIKI_TEST)), "cannot read")


def test_missing_data_file(tmp_path):
    assert_clear_error(run_eval("--model", str(TINY_MODEL), "--data-file", str(tmp_path / "wiki.test.raw")),
                       "data file not found")


def test_missing_reference_directory(tmp_path):
    assert_clear_error(run_eval("--model", str(TINY_MODEL), "--reference", str(tmp_path / "orig"),
                                "--data-file", str(WIKI_TEST)), "model directory not found")


def test_offline_hub_default_points_to_data_file():
    # The test environment is offline (conftest), so the Hub default must fail with a way out.
    assert_clear_error(run_eval("--model", str(TINY_MODEL)), "--data-file")
