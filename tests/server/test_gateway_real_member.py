"""End to end on the real SmolLM2-135M: a member built with the default recipe (the parent's own
data, sequential refit, distillation) answers a chat question through the gateway with English, not
blank lines, `<unk>` or markup."""

import pytest

from family.degeneracy import degenerate_reason
from family.registry import load_family
from plrd.build import BuildConfig, build_family
from plrd.corpus import CorpusConfig
from plrd.heal import HealConfig
from tests.server.gateway_fixtures import fleet

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)
def test_a_real_member_answers_chat_through_the_gateway_without_degenerating(real_parent_dir, tmp_path):
    cfg = BuildConfig(
        parent=real_parent_dir, targets=[0.9], calib="parent", out=tmp_path / "family", name="smol",
        heal=HealConfig(tokens=4096, seq_len=256, batch_size=4, grad_accum=1, train="blocks", distill_weight=1.0, temperature=1.0),
        calib_sequences=32, corpus=CorpusConfig(max_prompts=64, max_openers=16, max_new_tokens=48), runs_dir=tmp_path / "runs",
        command="test",
    )
    build_family(cfg, progress=False)
    fam = load_family(tmp_path / "family", verify="full")
    assert fam.problems == {} and fam.registry.names() == ["smol-p100", "smol-p90"]
    with fleet(tmp_path / "family", {"smol-p90": 1}, worker_kwargs={"max_model_len": 512}) as (_gw, client, _specs):
        for model in ("smol-p90", "smol"):  # pinned, then routed by the family name
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "What is the capital of Japan?"}], max_tokens=48, temperature=0,
            )
            answer = r.choices[0].message.content
            assert degenerate_reason(answer) is None, (model, answer)
            assert sum(c.isalpha() for c in answer) >= 10, answer
