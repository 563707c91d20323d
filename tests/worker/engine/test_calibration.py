import json

import pytest
import torch

from worker.engine.calibration import calibration_batches, read_texts, token_stream


def test_read_texts_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one document\n\nwith two paragraphs\n")
    assert read_texts(tmp_path / "a.txt") == ["one document\n\nwith two paragraphs\n"]

    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "second"})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    assert read_texts(tmp_path / "b.jsonl") == ["first", "second"]

    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        read_texts(tmp_path / "c.jsonl")
    (tmp_path / "d.csv").write_text("text\nx\n")
    with pytest.raises(ValueError):
        read_texts(tmp_path / "d.csv")


def test_token_stream_joins_documents_and_stops_at_max_tokens(tokenizer):
    texts = ["the quick brown fox", "jumps over the lazy dog"]
    stream = token_stream(tokenizer, texts)
    assert stream.dtype == torch.long and stream.dim() == 1
    joined = "the quick brown fox\n\njumps over the lazy dog"
    assert stream.tolist() == tokenizer(joined)["input_ids"]
    assert token_stream(tokenizer, texts, max_tokens=3).tolist() == stream[:3].tolist()

    many = ["the quick brown fox"] * 1000
    prefix = token_stream(tokenizer, many, max_tokens=10)
    assert prefix.tolist() == token_stream(tokenizer, many)[:10].tolist()


def test_calibration_batches_are_random_windows_fixed_by_the_seed(tokenizer):
    texts = ["a small model is a fast model and a fast model is a cheap model"] * 20
    stream = token_stream(tokenizer, texts)
    batches = calibration_batches(tokenizer, texts, samples=5, seq_len=16, seed=0)

    assert len(batches) == 5 and all(b.shape == (1, 16) for b in batches)
    windows = {tuple(stream[i : i + 16].tolist()) for i in range(stream.numel() - 15)}
    assert all(tuple(b[0].tolist()) in windows for b in batches)
    again = calibration_batches(tokenizer, texts, samples=5, seq_len=16, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = calibration_batches(tokenizer, texts, samples=5, seq_len=16, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))


def test_a_short_stream_gives_one_window_of_all_of_it(tokenizer):
    batches = calibration_batches(tokenizer, ["the lazy dog"], samples=8, seq_len=64, seed=0)
    assert len(batches) == 1 and batches[0].shape == (1, 3)


@pytest.mark.parametrize("piece", [400, 1000])  # longer than any line of the corpus
def test_text_is_tokenized_in_pieces_that_give_the_whole_texts_ids(piece, monkeypatch):
    """Pieces end after a newline: for a byte-level BPE the ids are those of one call on the
    whole text (which would hold ~700 bytes per token of it at once)."""
    from tests.factories import CORPUS, tokenizer
    from worker.engine import calibration

    monkeypatch.setattr(calibration, "PIECE_CHARACTERS", piece)
    pieces = list(calibration._pieces(CORPUS, piece))
    assert "".join(pieces) == CORPUS and len(pieces) > 1
    assert all(len(p) <= piece and p.endswith("\n") for p in pieces[:-1])
    whole = tokenizer()(CORPUS, verbose=False)["input_ids"]
    assert calibration._encode(tokenizer(), CORPUS).tolist() == whole
