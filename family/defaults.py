"""One place for defaults shared by the offline tools, the workers and the gateway."""

from __future__ import annotations

import os
from pathlib import Path

# Where runs write parents, families and caches unless told otherwise.
RUNS_DIR = Path(os.environ.get("FAMILY_RUNS_DIR", "runs"))
DEFAULT_PARENT_DIR = RUNS_DIR / "parent-smollm2-135m"
DEFAULT_FAMILY_DIR = RUNS_DIR / "family-smollm2-135m"

# Text that ships with the package (family/data): what a fresh clone builds and evaluates with.
# Calibration and healing use the parent's own corpus (`--calib parent`, plrd/corpus.py); evaluation
# uses held-out chat prompts and a held-out plain text that neither ever sees.
_DATA = Path(__file__).resolve().parent / "data"
EVAL_TEXT = _DATA / "heldout.txt"  # held-out plain text (perplexity); also the profile's prompt text
EVAL_PROMPTS = _DATA / "eval_prompts.jsonl"  # held-out chat prompts (chat agreement, degeneracy)
EVAL_ANSWER_TOKENS = 64  # greedy tokens per held-out chat answer
CALIB_PARENT = "parent"  # `--calib parent`: the parent's own distillation corpus (the default)

# WikiText-2 on development and CI machines only (../shared/data): optional evaluation data for
# benchmarks and tests. Healing on it teaches members its markup, so nothing defaults to it.
SHARED_DATA = Path(os.environ.get("FAMILY_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
WIKITEXT_DIR = SHARED_DATA / "wikitext-2"
WIKITEXT_VALID = WIKITEXT_DIR / "valid.txt"
WIKITEXT_TEST = WIKITEXT_DIR / "test.txt"

# The registry file at the root of a family folder.
REGISTRY_FILE = "family.json"

# Default family name (the routed model id in the API) and member naming.
FAMILY_NAME = "smollm2-135m"

# Perplexity windows: the reference figure in DESIGN.md is over the first 40 windows of 512 tokens.
EVAL_WINDOWS = 40
EVAL_SEQ_LEN = 512

# Fitness: a member whose chat agreement with the parent (teacher-forced top-1 agreement with the
# parent's greedy answers on held-out chat prompts) is below this is kept from routed traffic (issue
# 10). A starting point, not a measured threshold: each family stores its own (`Family.set_fitness`).
MIN_CHAT_AGREEMENT = 0.5

# Sampling defaults applied by every engine, so members of one family answer alike.
DEFAULT_MAX_TOKENS = 128
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
SEED = 0

# Serving.
GATEWAY_PORT = 8000
WORKER_BASE_PORT = 8100
MAX_MODEL_LEN = 2048
