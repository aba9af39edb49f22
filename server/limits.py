"""Limits applied before any work is spent on a request: body size, prompt characters.

Why before: a 10 MB body used to be parsed and tokenized (12.5 s of gateway CPU on a 2-core machine)
only to be refused as too long for every member. Here it is refused while it is read:

- `BodyLimit` is an ASGI middleware that answers 413 (OpenAI's error shape) as soon as a request's
  declared Content-Length, or the bytes read so far of a chunked body, pass `max_body_bytes`; nothing
  past the limit is buffered (uvicorn discards the rest of the upload, so the client reads its 413
  instead of a reset connection). It also runs the per-request finalizers that the route registers
  (`on_finish`): a streamed response outlives the route's own `finally`, and only this layer sees when
  it ends or its caller leaves (how a key's concurrency slot is given back).
- `check_prompt_chars` refuses a prompt longer than the longest context times a generous number of
  characters per token before it is tokenized: such a prompt cannot fit any member.

What is left is tokenizing a prompt that may fit; `server.tokens` does that off the event loop when
it is large.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: the longest prompt a 2k-context member takes is ~64k characters
CHARS_PER_TOKEN = 32  # generous: English averages ~4 characters per token; long runs of spaces or digits more
FINALIZERS = "family.on_finish"  # scope key: callables run once the response is sent (or abandoned)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_prompt_chars: int = 2048 * CHARS_PER_TOKEN

    @classmethod
    def for_context(cls, max_model_len: int, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> "Limits":
        """A prompt longer than the longest context × CHARS_PER_TOKEN characters cannot fit."""
        return cls(max_body_bytes=max_body_bytes, max_prompt_chars=max_model_len * CHARS_PER_TOKEN)


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than {limit} bytes", param=None, code="request_too_large")


class BodyLimit:
    """ASGI middleware: read a request body up to `max_bytes` and hand it on whole; 413 past that."""

    def __init__(self, app, max_bytes: int, on_refuse: Callable[[str], None] | None = None):
        self.app, self.max_bytes, self.on_refuse = app, max_bytes, on_refuse or (lambda _reason: None)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        finalizers: list[Callable[[], None]] = []
        scope[FINALIZERS] = finalizers
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read(scope, receive)
                if body is None:
                    self.on_refuse("request_too_large")
                    await too_large(self.max_bytes).response()(scope, receive, send)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            for fn in finalizers:
                fn()

    async def _read(self, scope, receive) -> bytes | None:
        """The whole body, or None as soon as it is known to be over the limit."""
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    if int(value) > self.max_bytes:
                        return None
                except ValueError:
                    pass  # uvicorn refuses a malformed Content-Length before we are called
                break
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see an empty body
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for a disconnect, as the app expects

    return replay


def on_finish(scope: dict, fn: Callable[[], None]) -> None:
    """Run `fn` once the response to this request is sent or abandoned (see BodyLimit)."""
    scope[FINALIZERS].append(fn)


def prompt_chars(body: ChatCompletionRequest | CompletionRequest) -> tuple[int, str]:
    """(characters of the prompt, the param that holds most of them)."""
    if isinstance(body, CompletionRequest):
        return len(body.prompt), "prompt"
    sizes = [len(m.text()) for m in body.messages]
    biggest = max(range(len(sizes)), key=sizes.__getitem__)
    return sum(sizes), f"messages.{biggest}.content"


def check_prompt_chars(body: ChatCompletionRequest | CompletionRequest, limits: Limits) -> int:
    """400 before tokenizing when the prompt cannot fit any member; else its characters."""
    chars, param = prompt_chars(body)
    if chars > limits.max_prompt_chars:
        raise APIError(400, f"prompt too long: {chars} characters; no member's context holds more than "
                            f"{limits.max_prompt_chars} characters ({CHARS_PER_TOKEN} per token at most)",
                       param=param, code="context_length_exceeded")
    return chars
