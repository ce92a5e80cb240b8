#!/usr/bin/env bash
# Install llmpress into the current Python environment, at the versions it was tested with.
#   bash deploy/setup.sh          # the engine and CLI
#   bash deploy/setup.sh --test   # plus what the test suite needs
# torch is installed first and only when missing, so an existing CPU or CUDA build is kept and pip never
# replaces it with the multi-GB CUDA wheel on a machine without a GPU. Everything else is installed with the
# constraints file deploy/constraints.txt (tested versions, CPython 3.11); LLMPRESS_CONSTRAINTS=none installs the
# newest releases pyproject.toml allows instead (what deploy/test-latest.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_VERSION="${LLMPRESS_TORCH_VERSION:-2.13.0}"
CONSTRAINTS="${LLMPRESS_CONSTRAINTS:-deploy/constraints.txt}"

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
pins=()
if [ "$CONSTRAINTS" != "none" ]; then
  tested="$(sed -n 's/^# Tested versions .* for CPython \([0-9.]*\) on .*/\1/p' "$CONSTRAINTS")"
  running="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ -n "$tested" ] && [ "$running" != "$tested" ]; then
    # The pins name wheels for one Python; another one gets the newest releases in pyproject's ranges instead.
    echo "setup: warning: $CONSTRAINTS was tested on Python $tested, this is $running: installing without it"
  else
    pins=(-c "$CONSTRAINTS")
  fi
fi
"$PY" -m pip install --quiet "${pins[@]}" -e ".$extras"
# pyenv only puts new console scripts (llmpress) on PATH after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
echo "setup: done ($("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
