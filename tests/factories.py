"""Tiny models, tokenizers and texts built in-process: nothing is downloaded.

>>> folder = make_checkpoint(tmp_path / "gpt2")        # config.json, model.safetensors, tokenizer
>>> files = checkpoint_files(folder)                    # [("config.json", b"..."), ...]
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
CORPUS = (DATA / "corpus.txt").read_text()
CONTEXT = 128


@lru_cache
def tokenizer():
    """A byte-level BPE tokenizer (about 400 tokens) trained on the test corpus."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CORPUS], vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=CONTEXT,
    )


def make_model(arch: str = "gpt2", seed: int = 0):
    """A random tiny causal LM whose vocabulary matches ``tokenizer()``."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              OPTConfig, OPTForCausalLM)

    torch.manual_seed(seed)
    vocab = len(tokenizer())
    if arch == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=CONTEXT,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config).eval()
    if arch == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                             max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_id=0)
        return LlamaForCausalLM(config).eval()
    if arch == "opt":
        config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=vocab, max_position_embeddings=CONTEXT, word_embed_proj_dim=64,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return OPTForCausalLM(config).eval()
    raise ValueError(arch)


def make_checkpoint(folder: Path, arch: str = "gpt2", with_tokenizer: bool = True, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> Path:
    """``make_model(arch, seed)`` saved in ``dtype`` (``torch.bfloat16``: a bf16 upload)."""
    folder.mkdir(parents=True, exist_ok=True)
    make_model(arch, seed).to(dtype).save_pretrained(folder, safe_serialization=True)
    if with_tokenizer:
        tokenizer().save_pretrained(folder)
    return folder


def checkpoint_files(folder: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()]
