"""One place for defaults shared by the offline tools, the workers and the gateway."""

from __future__ import annotations

import os
from pathlib import Path

# Where runs write parents, families and caches unless told otherwise.
RUNS_DIR = Path(os.environ.get("FAMILY_RUNS_DIR", "runs"))
DEFAULT_PARENT_DIR = RUNS_DIR / "parent-smollm2-135m"
DEFAULT_FAMILY_DIR = RUNS_DIR / "family-smollm2-135m"

# The shared WikiText-2 text: valid.txt for calibration and healing, test.txt for evaluation only.
SHARED_DATA = Path(os.environ.get("FAMILY_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
WIKITEXT_DIR = SHARED_DATA / "wikitext-2"
CALIB_TEXT = WIKITEXT_DIR / "valid.txt"
EVAL_TEXT = WIKITEXT_DIR / "test.txt"

# The registry file at the root of a family folder.
REGISTRY_FILE = "family.json"

# Default family name (the routed model id in the API) and member naming.
FAMILY_NAME = "smollm2-135m"

# Perplexity windows: the reference figure in DESIGN.md is over the first 40 windows of 512 tokens.
EVAL_WINDOWS = 40
EVAL_SEQ_LEN = 512

# Sampling defaults applied by every engine, so members of one family answer alike.
DEFAULT_MAX_TOKENS = 128
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
SEED = 0

# Serving.
GATEWAY_PORT = 8000
WORKER_BASE_PORT = 8100
MAX_MODEL_LEN = 2048
