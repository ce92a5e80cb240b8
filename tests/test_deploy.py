"""Deployment files are checked statically (no Docker engine here): they must refer to what the repository has,
and CI must run exactly the README's test command."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def test_dockerfile_copies_only_what_exists_and_runs_llmpress():
    instructions = dockerfile_instructions()
    assert instructions[0][0] in {"FROM", "ARG"}
    copies = [args.split() for op, args in instructions if op == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which the repository lacks"
    entry = next(args for op, args in instructions if op == "ENTRYPOINT")
    assert entry == '["llmpress"]'
    env = " ".join(args for op, args in instructions if op == "ENV")
    fixtures = re.search(r"LLMPRESS_FIXTURES=(\S+)", env).group(1)
    assert any(dest.rstrip("/") == "./tests/fixtures" for *_, dest in copies) and fixtures.endswith("tests/fixtures")
    assert any(op == "USER" and args != "root" for op, args in instructions), "the image must not run as root"


def test_compose_builds_this_dockerfile():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["llmpress"]
    assert (ROOT / service["build"]["context"] / "Dockerfile").exists()
    assert service["command"][0] in {"demo", "compress", "eval"}


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(.+?)\n```", readme)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci
    run_lines = [line for line in ci.splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert run_lines == [test_command]


def test_shell_scripts_parse():
    for script in (ROOT / "deploy" / "setup.sh", ROOT / ".ci" / "run"):
        subprocess.run(["bash", "-n", str(script)], check=True)
