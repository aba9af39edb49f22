"""Prompt counting for routing (server.tokens): the gateway renders chat templates itself, directly
through the compiled Jinja template, and must count exactly what `apply_chat_template` and the
tokenizer give; members with identical tokenizers share one."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from family.registry import load_family
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.tokens import Tokenizers, _renderer, count_tokens
from tests.conftest import CHAT_TEMPLATE
from tests.server.gateway_fixtures import tiny_family  # noqa: F401  (fixture)

# SmolLM2's template shape: a default system message when none is given, and a special token used by name.
DEFAULT_SYSTEM = (
    "{{ bos_token }}{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of Japan?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a river."},
     {"role": "assistant", "content": "The Nile."}, {"role": "user", "content": "Another, please — in Europe."}],
]


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, DEFAULT_SYSTEM], ids=["plain", "default-system"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "multi-turn"])
def test_the_direct_render_counts_what_apply_chat_template_gives(tiny_parent_dir, template, messages):
    tok = AutoTokenizer.from_pretrained(tiny_parent_dir)
    tok.chat_template = template
    render = _renderer(tok)
    assert render is not None
    expected_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert render(messages) == expected_text
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": messages})
    assert count_tokens(tok, body, render) == len(tok(expected_text, add_special_tokens=False)["input_ids"])
    assert count_tokens(tok, body, None) == count_tokens(tok, body, render)  # apply_chat_template's own path


def test_a_tokenizer_without_a_chat_template_counts_the_joined_messages(tiny_parent_dir):
    tok = AutoTokenizer.from_pretrained(tiny_parent_dir)
    tok.chat_template = None
    assert _renderer(tok) is None
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": CONVERSATIONS[1]})
    joined = "\n".join(m["content"] for m in CONVERSATIONS[1])
    assert count_tokens(tok, body) == len(tok(joined, add_special_tokens=False)["input_ids"])


def test_members_with_one_tokenizer_share_it_and_get_the_same_count(tiny_family):
    fam = load_family(tiny_family)
    tokenizers = Tokenizers(fam)
    names = [m.name for m in fam.servable]
    assert tokenizers.distinct == 1
    body = CompletionRequest.model_validate({"model": "m", "prompt": "The tower is tall and the river is long"})
    counts = tokenizers.count(body, names)
    tok = AutoTokenizer.from_pretrained(fam.member_dir(names[0]))
    assert set(counts) == set(names)
    assert set(counts.values()) == {len(tok(body.prompt, add_special_tokens=False)["input_ids"])}
