"""On the real SmolLM2-135M: a whitened, healed member at 0.8 of the parameters is a working model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from family import defaults
from family.accuracy import perplexity
from family.registry import load_family
from plrd.build import BuildConfig, build_family
from family.text import read_source, tokenize
from plrd.factorize import count_parameters, factorize
from plrd.heal import HealConfig

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)
def test_a_real_member_at_080_is_on_target_reloads_generates_and_beats_plain_svd(real_parent_dir, tmp_path):
    cfg = BuildConfig(
        parent=real_parent_dir, targets=[0.8], calib=str(defaults.WIKITEXT_VALID), out=tmp_path, name="smol",
        heal=HealConfig(tokens=2048, seq_len=128, batch_size=4, grad_accum=1, train="factors", lr=3e-4), calib_sequences=8,
        calib_seq_len=512, init="svd", method="whitened", command="test",
    )
    [member_dir] = build_family(cfg, progress=False)
    family = load_family(tmp_path, verify="full")
    assert family.problems == {}
    fraction = family.registry.member("smol-p80").parameters / family.registry.member("smol-p100").parameters
    assert abs(fraction - 0.8) <= 0.008

    member = AutoModelForCausalLM.from_pretrained(member_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(member_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = member.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]

    test_ids = tokenize(tok, read_source(defaults.EVAL_TEXT).text[:60_000])
    ppl_member = perplexity(member, test_ids, seq_len=512, max_windows=5, progress=False)
    parent = AutoModelForCausalLM.from_pretrained(real_parent_dir, dtype=torch.float32).eval()
    plain = factorize(parent, 0.8, count_parameters(parent), grams=None, allocation="uniform", progress=False)
    ppl_plain = perplexity(plain, test_ids, seq_len=512, max_windows=5, progress=False)
    assert ppl_member < 1000 and ppl_member * 1000 < ppl_plain
