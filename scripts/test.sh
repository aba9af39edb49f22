#!/usr/bin/env bash
# Set up from scratch and run the whole test suite: the fast tests, then the slow ones (real model,
# real vLLM start-up, real healing, load and reliability scenarios) in their own step.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q tests
python -m pytest -q -m slow tests
