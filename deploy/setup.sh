#!/usr/bin/env bash
# Install llmpress into the current Python environment.
#   bash deploy/setup.sh          # the engine and CLI
#   bash deploy/setup.sh --test   # plus what the test suite needs
# torch is installed first and only when missing, so an existing CPU or CUDA build is kept and pip never
# replaces it with the multi-GB CUDA wheel on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_VERSION="${LLMPRESS_TORCH_VERSION:-2.13.0}"

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found: installing torch $TORCH_VERSION with CUDA"
  "$PY" -m pip install "torch==$TORCH_VERSION"
else
  echo "setup: no GPU: installing the CPU build of torch $TORCH_VERSION"
  # A local wheel or mirror first (pip's find-links / index settings), then PyTorch's CPU index.
  "$PY" -m pip install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
    || "$PY" -m pip install "torch==$TORCH_VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi

extras=""
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
  # The job-store tests start a throwaway PostgreSQL from Debian's binaries; without them those tests skip.
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null; } \
      || echo "setup: warning: could not install PostgreSQL; its tests will be skipped"
  fi
  # The dashboard's browser tests drive Debian's Chromium with Playwright (never `playwright install`'s download).
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
      || echo "setup: warning: could not install Chromium; the dashboard's browser tests will be skipped"
  fi
fi
"$PY" -m pip install --quiet -e ".$extras"
# pyenv only puts new console scripts (llmpress) on PATH after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
echo "setup: done ($("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
