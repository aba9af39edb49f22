"""The low-rank Llama loads with transformers alone and, at full rank, is the parent."""

import torch
from transformers import AutoModelForCausalLM

from family.lowrank import LowRankLinear, LowRankLlamaForCausalLM, lowrank_config_from


def test_factored_member_round_trips_through_transformers(tiny_parent_dir, tmp_path):
    parent = AutoModelForCausalLM.from_pretrained(tiny_parent_dir)
    ranks = {"model.layers.0.mlp.down_proj": 8, "model.layers.1.self_attn.q_proj": 4}
    member = LowRankLlamaForCausalLM(lowrank_config_from(parent.config, ranks))
    member.save_pretrained(tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, LowRankLinear)
    assert loaded.model.layers[0].mlp.down_proj.rank == 8
    assert isinstance(loaded.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert loaded.config.ranks == ranks
    x = torch.randint(0, parent.config.vocab_size, (1, 12))
    torch.testing.assert_close(loaded(x).logits, member(x).logits)
