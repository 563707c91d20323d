"""Text for the data-aware methods and the evaluation, as token ids.

A dataset is a ``.txt`` file (one document) or a ``.jsonl`` file (one document per line, in
its ``"text"`` field). Documents are joined with a blank line, tokenized once, and cut into
windows::

    texts = read_texts(Path("wiki.jsonl"))
    batches = calibration_batches(tokenizer, texts, samples=128, seq_len=512, seed=0)
    # 128 tensors [1, 512], the same for the same seed
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DOCUMENT_SEPARATOR = "\n\n"

# Calibration windows are drawn from the first tokens of the dataset only: tokenizing a large
# upload whole takes minutes and gives the few hundred windows nothing more.
CALIBRATION_TOKENS_PER_WINDOW = 16
CALIBRATION_MIN_TOKENS = 1 << 20


def read_texts(path: Path) -> list[str]:
    """The documents of a dataset file: a ``.txt`` is one document; a ``.jsonl`` holds one JSON
    object per line, whose ``"text"`` is a document (blank lines are skipped)."""
    path = Path(path)
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(
                        f"{path.name} line {number}: expected an object with a string 'text'"
                    )
                texts.append(record["text"])
        return texts
    raise ValueError(f"{path.name}: a dataset is a .txt or .jsonl file")


def token_stream(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """The documents joined with a blank line and tokenized: a 1-D LongTensor, at most
    ``max_tokens`` long.

    With ``max_tokens``, only as many whole documents as needed are tokenized: a prefix of the
    documents about 8 characters per wanted token long, doubled until it yields enough.
    """
    if max_tokens is None:
        return _encode(tokenizer, DOCUMENT_SEPARATOR.join(texts))
    characters = 8 * max_tokens
    while True:
        prefix, length = [], 0
        for text in texts:
            if length >= characters:
                break
            prefix.append(text)
            length += len(text) + len(DOCUMENT_SEPARATOR)
        ids = _encode(tokenizer, DOCUMENT_SEPARATOR.join(prefix))
        if ids.numel() >= max_tokens or len(prefix) == len(texts):
            return ids[:max_tokens].clone()  # a slice would keep the whole prefix alive
        characters *= 2


# Text is tokenized in pieces of about this many characters: a fast tokenizer keeps ~700 bytes
# per token of a call's text (strings, offsets, masks), so one call on 4 MB of text peaks near
# 800 MB, more than the block a job holds; pieces keep that to a few MB.
PIECE_CHARACTERS = 1 << 16


def _encode(tokenizer, text: str) -> torch.Tensor:
    """``tokenizer(text)``'s ids, computed piece by piece. Pieces end after a newline, where a
    byte-level BPE (GPT-2's, and most) splits words anyway, so the ids are the same as for the
    whole text; a tokenizer that marks the start of its input (SentencePiece's prefix space)
    differs at most in the first token of each piece. Special tokens (BOS) come once, first."""
    pieces = []
    for number, piece in enumerate(_pieces(text, PIECE_CHARACTERS)):
        # verbose=False: a stream longer than the model's context is intended, not worth a warning.
        ids = tokenizer(piece, verbose=False, add_special_tokens=number == 0)["input_ids"]
        pieces.append(torch.tensor(ids, dtype=torch.long))
    return torch.cat(pieces) if pieces else torch.tensor(tokenizer("", verbose=False)["input_ids"], dtype=torch.long)


def _pieces(text: str, size: int):
    """``text`` in consecutive pieces of at most ``size`` characters, each ending just after a
    newline where one is in reach (a line longer than ``size`` is cut where it must be)."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            if newline > start:
                end = newline + 1
        yield text[start:end]
        start = end


def calibration_batches(
    tokenizer, texts: list[str], samples: int, seq_len: int, seed: int
) -> list[torch.Tensor]:
    """``samples`` windows of ``seq_len`` tokens, each ``[1, seq_len]``, starting at random
    positions of the token stream (the same ones for the same seed). A stream shorter than
    ``seq_len`` gives a single window of all of it."""
    budget = max(CALIBRATION_TOKENS_PER_WINDOW * samples * seq_len, CALIBRATION_MIN_TOKENS)
    stream = token_stream(tokenizer, texts, max_tokens=budget)
    if stream.numel() == 0:
        raise ValueError("the calibration dataset has no tokens")
    if stream.numel() <= seq_len:
        return [stream.unsqueeze(0)]
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (samples,), generator=generator)
    return [stream[start : start + seq_len].unsqueeze(0) for start in starts.tolist()]
