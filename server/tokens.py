"""Prompt lengths for routing, counted with each member's own tokenizer, loaded once at start-up.

Members cut from one parent usually keep its tokenizer: members whose tokenizers are identical
(same vocabulary, rules and chat template) share one, and a request's prompt is tokenized once per distinct tokenizer. A
member folder without tokenizer files uses the parent's. Counting uses the fast (Rust) tokenizer
directly; chat prompts are rendered with the tokenizer's chat template first, as the worker does.

Counting a long prompt takes milliseconds to seconds of CPU; on the event loop it would stall every
other request. `count_async` counts a short prompt inline (a thread hop costs more than the count)
and a long one on one dedicated thread, so long prompts queue behind each other, not in front of the
short ones. `server.limits` bounds how long a prompt can be before it gets here.

A chat prompt is rendered with the tokenizer's compiled Jinja chat template, called directly with what
`apply_chat_template` passes it (the messages, no tools or documents, the generation prompt, the
special tokens): the same text, without `apply_chat_template`'s argument handling, which cost as much
as the rendering itself for a short prompt (benchmarks/gateway_overhead.py). A tokenizer whose template
cannot be compiled that way keeps `apply_chat_template`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from transformers import AutoTokenizer

from family.registry import Family
from server.protocol import ChatCompletionRequest, CompletionRequest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
INLINE_CHARS = 4096  # prompts up to this many characters (plus 64 per message) are counted on the event loop


def _fingerprint(tokenizer) -> str:
    """What decides a prompt's token count: the vocabulary and rules, and the chat template."""
    fast = getattr(tokenizer, "backend_tokenizer", None)
    rules = fast.to_str() if fast is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{rules}\0{getattr(tokenizer, 'chat_template', None)}".encode()).hexdigest()


class Tokenizers:
    def __init__(self, family: Family):
        loaded: dict[str, object] = {}
        self._key: dict[str, str] = {}
        parent_dir = family.member_dir(family.registry.parent)
        for m in family.servable:
            folder = family.member_dir(m.name)
            if not any((folder / f).is_file() for f in TOKENIZER_FILES):
                folder = parent_dir
            tokenizer = AutoTokenizer.from_pretrained(folder)
            key = _fingerprint(tokenizer)
            loaded.setdefault(key, tokenizer)  # identical tokenizers: keep one
            self._key[m.name] = key
        self._tokenizers = loaded
        self._renderers = {key: _renderer(tok) for key, tok in loaded.items()}
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    @property
    def distinct(self) -> int:
        return len(self._tokenizers)

    def count(self, body: ChatCompletionRequest | CompletionRequest, members: Iterable[str]) -> dict[str, int]:
        """Prompt tokens of `body` for each member, tokenizing once per distinct tokenizer."""
        by_key: dict[str, int] = {}
        out = {}
        for name in members:
            key = self._key[name]
            if key not in by_key:
                by_key[key] = count_tokens(self._tokenizers[key], body, self._renderers[key])
            out[name] = by_key[key]
        return out


    async def count_async(self, body: ChatCompletionRequest | CompletionRequest, members: Iterable[str], chars: int) -> dict[str, int]:
        """`count`, on the tokenizing thread when the prompt (`chars` characters) is long."""
        cost = chars + 64 * len(getattr(body, "messages", ()))
        if cost <= INLINE_CHARS:
            return self.count(body, members)
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.count, body, list(members))


def _renderer(tokenizer) -> Callable[[list[dict]], str] | None:
    """The tokenizer's chat template as one call (messages → prompt text), or None: no template, or one
    `apply_chat_template` must handle itself."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = _compile_jinja_template(tokenizer.get_chat_template())
        special = dict(tokenizer.special_tokens_map)
    except Exception:  # a private helper that moved, a template set without a default: the public call
        return None
    return lambda messages: template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True, **special)


def count_tokens(tokenizer, body: ChatCompletionRequest | CompletionRequest,
                 render: Callable[[list[dict]], str] | None = None) -> int:
    if isinstance(body, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if render is not None:
            text = render(messages)
        elif getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "\n".join(m["content"] for m in messages)
    else:
        text = body.prompt
    fast = getattr(tokenizer, "backend_tokenizer", None)
    if fast is not None:  # encode_batch_fast skips the offsets `encode` computes: half the time for a short prompt
        return len(fast.encode_batch_fast([text], add_special_tokens=False)[0].ids)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
