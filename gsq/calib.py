"""Calibration token windows from a local text/JSONL file or a Hub dataset.

A text file is one document; a JSONL file has one document per line, under `text_field` or, for
chat data, a `messages` list rendered through the model's chat template. A Hub dataset is named
`id[:config[:split]]` (split defaults to `train`). Documents are joined with the tokenizer's EOS,
tokenized, and `num_samples` windows of `seqlen` tokens are drawn at seeded random offsets.
"""

import json
from pathlib import Path

import torch

from gsq.errors import InputError


def _render(doc, text_field: str, tokenizer) -> str:
    if isinstance(doc.get("messages"), list) and text_field == "messages":
        if not tokenizer.chat_template:
            raise InputError("the dataset has chat messages but the model has no chat template")
        return tokenizer.apply_chat_template(doc["messages"], tokenize=False)
    if text_field not in doc:
        raise InputError(f"calibration record has no '{text_field}' field (fields: {', '.join(doc)})")
    return str(doc[text_field])


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"calibration file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc


def documents(dataset: str, text_field: str, tokenizer, enough_chars: int) -> list:
    path = Path(dataset)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        docs = []
        for n, line in enumerate(_text(path).splitlines(), 1):
            if line.strip():
                try:
                    docs.append(_render(json.loads(line), text_field, tokenizer))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{dataset}:{n}: not JSON ({exc.msg})") from exc
        return docs
    if path.is_file():
        return [_text(path)]
    if path.suffix in (".txt", ".jsonl", ".json", ".tokens", ".raw") or dataset.startswith(("/", ".", "~")):
        raise InputError(f"calibration file not found: {dataset}")
    name, config, split = (dataset.split(":") + [None, None])[:3]
    try:
        import datasets

        rows = datasets.load_dataset(name, config, split=split or "train", streaming=True)
    except Exception as exc:
        raise InputError(f"could not load calibration dataset '{dataset}' ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}); pass --dataset PATH to a local .txt or .jsonl file") \
            from exc
    docs, chars = [], 0
    for row in rows:
        text = _render(row, text_field, tokenizer)
        if text.strip():
            docs.append(text)
            chars += len(text)
        if chars >= enough_chars:
            break
    return docs


def calibration_ids(tokenizer, dataset: str, text_field: str, num_samples: int, seqlen: int, seed: int):
    """`[num_samples, seqlen]` token windows and a one-line description of where they came from."""
    found = documents(dataset, text_field, tokenizer, enough_chars=num_samples * seqlen * 8)
    docs = [d for d in found if d.strip()]
    if not docs:
        raise InputError(f"calibration dataset {dataset} holds no text")
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(docs), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < seqlen:
        raise InputError(f"calibration text has {ids.numel()} tokens, fewer than one --seqlen {seqlen} window")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (num_samples,), generator=gen)
    windows = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    note = f"{num_samples} windows of {seqlen} tokens from {dataset} ({ids.numel()} tokens, random offsets)"
    if num_samples * seqlen > ids.numel():
        note += (f"; only {ids.numel()} tokens for the {num_samples * seqlen} requested: windows overlap, "
                 "repeating text (add data or lower --num-samples)")
    if len(found) > len(docs):
        note += f"; {len(found) - len(docs)} empty document(s) skipped"
    return windows, note
