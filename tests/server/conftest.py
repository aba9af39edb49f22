"""Real HTTP for serving tests: uvicorn on a free loopback port, in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from plrd.factorize import count_parameters, factorize


RUNNING: dict[str, uvicorn.Server] = {}  # base URL → server, so a test can kill one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app, port: int | None = None):
    """Run `app` under uvicorn on 127.0.0.1; yield its base URL; stop it afterwards."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    RUNNING[url] = server
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        RUNNING.pop(url, None)


@pytest.fixture(scope="session")
def tiny_member_dir(tiny_parent_dir, tmp_path_factory) -> Path:
    """A low-rank member of the tiny parent (plain SVD at 0.7 of its parameters), saved with the tokenizer."""
    parent = AutoModelForCausalLM.from_pretrained(tiny_parent_dir, dtype=torch.float32)
    member = factorize(parent, 0.7, count_parameters(parent), grams=None, allocation="uniform", progress=False)
    out = tmp_path_factory.mktemp("tiny-member")
    member.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_parent_dir).save_pretrained(out)
    return out
