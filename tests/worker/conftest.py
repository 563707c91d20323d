"""Tiny randomly initialised models and a tokenizer, built in-process (no downloads)."""

from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

VOCAB = 300

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a small model is a fast model and a fast model is a cheap model",
    "pruning removes weights while quantization stores them with fewer bits",
] * 20


def tiny_gpt2(width: int = 64, layers: int = 2) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=width, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=128,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama(tie_word_embeddings: bool = False) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tie_word_embeddings,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_opt() -> transformers.OPTForCausalLM:
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        word_embed_proj_dim=64, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
        pad_token_id=1,
    )
    return transformers.OPTForCausalLM(config).eval()


TINY_MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "opt": tiny_opt}


@pytest.fixture(scope="session")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer trained on CORPUS."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.fixture
def tiny_models() -> dict:
    """Factories of fresh tiny models: ``tiny_models["gpt2"]()``, ``tiny_models["llama"](True)``."""
    return TINY_MODELS
