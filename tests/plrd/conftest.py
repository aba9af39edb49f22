"""Fixtures for PLRD tests: the tiny parent loaded, and its calibration data."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from family import defaults
from family.text import pack, read_source, tokenize


@pytest.fixture(scope="module")
def tiny(tiny_parent_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_parent_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_parent_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def calib_ids(tiny):
    _, tokenizer = tiny
    return tokenize(tokenizer, read_source(defaults.WIKITEXT_VALID).text[:150_000])


@pytest.fixture(scope="module")
def calib_rows(calib_ids):
    return pack(calib_ids, 128, 16, seed=0)
