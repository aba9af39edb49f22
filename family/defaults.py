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

# Building a family (`family build`, scripts/run_default.sh): the default recipe. plrd's configs and
# the CLI both read these, so the command and the library agree.
TARGETS = "0.9,0.8,0.7"
HEAL_TOKENS = 20_000  # distillation tokens per member
HEAL_SEQ_LEN = 256
HEAL_BATCH = 4  # sequences per micro-batch
HEAL_GRAD_ACCUM = 1  # distillation from a refit start wants many small steps, not few large ones
HEAL_LR = 1e-4  # 3e-4 made the KL to the parent rise on SmolLM2-135M (0.60 → 1.22 in 4 steps); 1e-4 lowered it
HEAL_TRAIN = "blocks"
ON_POLICY_TOKENS = 0  # distillation tokens on the member's own answers, after the corpus (plrd/onpolicy.py)
CALIB_SEQUENCES = 64
# Ranks by each direction's measured effect on the loss (plrd/sensitivity.py), not by its share of its own
# matrix's output energy: on SmolLM2-135M at 0.9, refit start, chat agreement 0.58 → 0.65, KL 1.13 →
# 0.72, held-out perplexity 3.2× → 2.2× the parent (benchmarks/kd_scaling.py --allocation both).
ALLOCATION = "sensitivity"
# How members are cut (plrd/build.py METHODS): MLP width pruning (plrd/width.py) beat sensitivity-allocated
# whitened SVD at every size of the default family, same refit and distillation (chat agreement
# 0.678 / 0.602 / 0.516 against 0.649 / 0.562 / 0.434 at 0.9 / 0.8 / 0.7; docs/results/faithfulness.md, "Width pruning").
METHOD = "width"
# The family's vocabulary (plrd/vocab.py): every member keeps the N tokens the parent uses most on its
# own corpus (closed under BPE merges), rows of the tied embedding / LM head, nothing else. The size was chosen by measured cost per parameter removed
# (benchmarks/vocab_trim.py, docs/results/faithfulness.md, "Vocabulary trimming"): down to half of SmolLM2's 49,152 tokens the
# vocabulary costs the parent's chat agreement about a third of what MLP width costs per parameter;
# below that it costs more than width does, so the members below p90 are cut in width.
VOCAB_SIZE = 24_576
VOCAB_USAGE_TOKENS = 80_000  # the tokens the parent's usage is counted on: its whole default corpus (~71k), a sample of larger sources
CALIB_SEQ_LEN = 256

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

# Serving memory (issue 11): a member's own need is its weights at the serving dtype plus its KV cache
# at the worker's batch and context; the runtime (interpreter, torch, thread pools) is recorded apart
# and, on a host where one engine process serves several members, paid once. The KV cache is counted
# at this batch (the torch worker's --max-batch) and this context per row (a chat turn: a prompt of a
# few hundred tokens and DEFAULT_MAX_TOKENS out); `family profile --kv-batch/--kv-context` override it.
SERVING_BATCH = 16
KV_CONTEXT = 512
# The torch engine's KV cache and attention dtype, whatever its weights' (server/decoder.py): torch's
# CPU attention at bf16 took 5-10x float32's time at decode shapes. vLLM caches at the model's dtype.
TORCH_KV_DTYPE = "float32"

# Device classes never profiled (issue 11): a latency profile is predicted from the device's memory
# bandwidth and compute (published specs in family/devices.py, or measured by `family profile`) and
# the member's bytes. Stated assumptions, not measurements: decode reaches this share of the
# bandwidth, prefill this share of the dense matmul peak. The router corrects each worker's
# prediction with what it observes, and `family profile` on the device replaces it.
PREDICTED_BANDWIDTH_EFFICIENCY = 0.5
PREDICTED_COMPUTE_EFFICIENCY = 0.3

# The STREAM-like bandwidth read (family/bandwidth.py): best of this many passes over the buffer.
BANDWIDTH_REPEATS = 10
