#!/usr/bin/env bash
# The test suite against the newest releases pyproject.toml allows, so an upstream break is found by us first.
#   bash deploy/test-latest.sh [pytest arguments]
# It builds a fresh virtual environment (.venv-latest, or LLMPRESS_LATEST_VENV) with deploy/setup.sh --test but
# without deploy/constraints.txt, lists every version that differs from the constraints, and runs the suite there.
# torch stays at deploy/setup.sh's version: set LLMPRESS_TORCH_VERSION to try another. After a green run,
# .venv-latest/freeze.txt holds what passed, for renewing deploy/constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LLMPRESS_LATEST_VENV:-.venv-latest}"
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
PYTHON="$VENV/bin/python" LLMPRESS_CONSTRAINTS=none bash deploy/setup.sh --test

"$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -E '^(torch|nvidia-|triton)' > "$VENV/freeze.txt"
echo "test-latest: releases newer than (or missing from) deploy/constraints.txt:"
"$VENV/bin/python" - "$VENV/freeze.txt" <<'PY'
import re, sys
def pins(path):
    out = {}
    for line in open(path):
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            out[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return out
tested, latest = pins("deploy/constraints.txt"), pins(sys.argv[1])
changed = [f"  {name}: {tested.get(name, '-')} -> {version}" for name, version in sorted(latest.items())
           if tested.get(name) != version]
print("\n".join(changed) or "  none")
PY
# The suite's own subprocesses (llmpress serve, Ray workers) must run in this environment too.
PATH="$(cd "$VENV/bin" && pwd):$PATH" LLMPRESS_CONSTRAINTS=none "$VENV/bin/python" -m pytest -q "$@"
