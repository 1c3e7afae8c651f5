"""Calibration windows from local text, JSONL (text field or chat messages) and the Hub (offline here)."""

import json

import pytest
from conftest import DATA

from gsq.calib import calibration_ids
from gsq.errors import InputError

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny[1]


def test_text_file_windows_are_seeded_slices(tokenizer):
    path = DATA / "wikitext-2" / "wiki.valid.tokens"
    ids, note = calibration_ids(tokenizer, str(path), "text", 8, 64, seed=3)
    again, _ = calibration_ids(tokenizer, str(path), "text", 8, 64, seed=3)
    other, _ = calibration_ids(tokenizer, str(path), "text", 8, 64, seed=4)
    assert ids.shape == (8, 64) and (ids == again).all() and not (ids == other).all()
    full = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    text = " ".join(map(str, full))
    assert all(" ".join(map(str, row.tolist())) in text for row in ids)  # contiguous slices of the file
    assert "8 windows of 64 tokens" in note


def test_jsonl_text_and_chat_messages(tokenizer, tmp_path):
    rows = [{"text": f"document number {i} about quantization of experts"} for i in range(40)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ids, _ = calibration_ids(tokenizer, str(tmp_path / "t.jsonl"), "text", 4, 16, seed=0)
    assert ids.shape == (4, 16) and "document number" in tokenizer.decode(ids.flatten())

    chats = [{"messages": [{"role": "user", "content": f"question {i}?"},
                           {"role": "assistant", "content": f"answer {i}."}]} for i in range(40)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    with pytest.raises(InputError, match="no chat template"):
        calibration_ids(tokenizer, str(tmp_path / "c.jsonl"), "messages", 4, 16, seed=0)
    tokenizer.chat_template = CHAT
    try:
        ids, _ = calibration_ids(tokenizer, str(tmp_path / "c.jsonl"), "messages", 4, 32, seed=0)
    finally:
        tokenizer.chat_template = None
    text = tokenizer.decode(ids.flatten())
    assert "<|user|>" in text and "<|assistant|>" in text


def test_bad_calibration_inputs(tokenizer, tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(InputError, match="no 'text' field"):
        calibration_ids(tokenizer, str(tmp_path / "x.jsonl"), "text", 1, 4, seed=0)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(InputError, match="bad.jsonl:1: not JSON"):
        calibration_ids(tokenizer, str(tmp_path / "bad.jsonl"), "text", 1, 4, seed=0)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(InputError, match="fewer than one --seqlen"):
        calibration_ids(tokenizer, str(tmp_path / "short.txt"), "text", 1, 512, seed=0)
    with pytest.raises(InputError, match="calibration file not found"):
        calibration_ids(tokenizer, str(tmp_path / "missing.txt"), "text", 1, 4, seed=0)
    with pytest.raises(InputError, match="pass --dataset PATH to a local .txt or .jsonl file"):  # the Hub is offline here
        calibration_ids(tokenizer, "nonexistent-org/nonexistent-data:cfg:train", "text", 1, 4, seed=0)
