"""The HTTP contract under a long fuzz: tests/api/test_contract.py's schemathesis run, with more examples.

It runs that file's fuzzing tests under pytest (the same live app on 127.0.0.1, document, seed and checks, and
tests/conftest.py's DNS table for the webhook URLs schemathesis makes up), with ``--examples`` per operation for
schemathesis's fuzzing phase (its examples and coverage phases add their own cases, and each workflow of the
stateful test up to 6 calls), then prints what the server answered: the cases schemathesis generated, every
request (its checks' probes included), the 5xx, and the statuses an operation answered that the document does
not list for it.

    python3 bench/contract_fuzz.py                  # 1,000 examples per operation
    python3 bench/contract_fuzz.py --examples 200 --json /tmp/contract.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = ("tests/api/test_contract.py::test_the_app_keeps_its_documented_contract",
         "tests/api/test_contract.py::test_workflows_keep_the_documented_contract",
         "tests/api/test_contract.py::test_no_server_error_and_no_undocumented_status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000, help="schemathesis examples per operation")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "contract.json"
        env = {**os.environ, "LLMPRESS_CONTRACT_EXAMPLES": str(args.examples), "LLMPRESS_CONTRACT_REPORT": str(report)}
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=REPO,
                             env=env)
        seconds = time.perf_counter() - started
        if not report.exists():
            print("the run wrote no figures (see pytest's output above)", file=sys.stderr)
            return run.returncode or 1
        figures = {"examples_per_operation": args.examples, "seconds": round(seconds, 1),
                   "pytest_exit": run.returncode, **json.loads(report.read_text())}
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
