"""TRAWL: exact at full Tucker rank; compress keeps the factors as a servable low-rank member."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from family.errors import FamilyError
from family.lowrank import LowRankLlamaForCausalLM
from plrd.factorize import count_parameters
from plrd.trawl import TrawlConfig, parse_layers, parse_modules, parse_rank, trawl


def _fresh(tiny_parent_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_parent_dir, dtype=torch.float32).eval()


def test_full_rank_tucker_reproduces_the_weights(tiny_parent_dir):
    model = _fresh(tiny_parent_dir)
    before = {n: p.clone() for n, p in model.named_parameters()}
    cfg = TrawlConfig("tucker", rank=(2, 1000, 1000), strategy="cross-layer", modules=parse_modules("mlp"), layers=(0, 1))
    out, report = trawl(model, cfg, progress=False)
    assert max(report.values()) < 1e-6
    for n, p in out.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decomposition, rank", [("tucker", (16,)), ("cp", (12,))])
def test_compress_equals_denoise_and_saves_parameters(tiny_parent_dir, decomposition, rank):
    cfg = dict(decomposition=decomposition, rank=rank, strategy="layer", modules=parse_modules("gate_proj,up_proj"), layers=(0, 1))
    denoised, _ = trawl(_fresh(tiny_parent_dir), TrawlConfig(**cfg, mode="denoise"), progress=False)
    compressed, _ = trawl(_fresh(tiny_parent_dir), TrawlConfig(**cfg, mode="compress"), progress=False)
    assert isinstance(compressed, LowRankLlamaForCausalLM)
    assert count_parameters(compressed) < count_parameters(denoised)
    x = torch.randint(0, denoised.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(compressed(x).logits, denoised(x).logits, rtol=1e-3, atol=1e-4)


def test_parsers_refuse_bad_specs():
    assert parse_layers("last:2", 4) == (2, 3) and parse_layers("0-1", 4) == (0, 1)
    assert parse_modules("mlp") == ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    for bad in ("last:9", "x", "5"):
        with pytest.raises(FamilyError, match="--layers"):
            parse_layers(bad, 4)
    with pytest.raises(FamilyError, match="unknown module"):
        parse_modules("ffn")
    with pytest.raises(FamilyError, match="--rank"):
        parse_rank("1,2")


def test_the_trawl_command_writes_a_member_that_transformers_loads(tiny_parent_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from family.cli import _register, app

    _register()
    out = tmp_path / "trawled"
    args = ["trawl", "--model", str(tiny_parent_dir), "--out", str(out), "--decomposition", "tucker", "--rank", "16",
            "--strategy", "cross-layer", "--modules", "mlp", "--layers", "last:2", "--mode", "compress"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["method"] == "trawl-tucker-compress" and prov["parameters"] < prov["source_parameters"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, LowRankLlamaForCausalLM) and len(model.config.ranks) == 6
