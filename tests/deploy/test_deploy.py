"""Deployment files are checked statically (no Docker engine here): they must refer to what the repository has,
and CI must run exactly the README's test command."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tests.fixture_paths import REPO as ROOT


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def test_dockerfile_copies_only_what_exists_and_runs_llmpress():
    instructions = dockerfile_instructions()
    assert instructions[0][0] in {"FROM", "ARG"}
    assert sum(op == "FROM" for op, _ in instructions) == 2, "a venv stage and the runtime stage"
    # COPY --from=<stage> copies from a build stage, not from the repository.
    copies = [args.split() for op, args in instructions if op == "COPY" and not args.startswith("--from=")]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which the repository lacks"
    entry = next(args for op, args in instructions if op == "ENTRYPOINT")
    assert entry == '["llmpress"]'
    env = " ".join(args for op, args in instructions if op == "ENV")
    fixtures = re.search(r"LLMPRESS_FIXTURES=(\S+)", env).group(1)
    # Only the bundled demo model and texts, under the folder LLMPRESS_FIXTURES names.
    fixture_dests = [dest for *sources, dest in copies if any(s.startswith("tests/") for s in sources)]
    assert fixture_dests and all(d.startswith("./tests/fixtures/") for d in fixture_dests)
    assert fixtures.endswith("tests/fixtures")
    assert any(op == "USER" and args != "root" for op, args in instructions), "the image must not run as root"


def test_compose_builds_this_dockerfile():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("api", "ray-head", "ray-worker"):
        service = compose["services"][name]
        assert service["image"] == "llmpress:latest" and (ROOT / service["build"] / "Dockerfile").exists()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(.+?)\n```", readme)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci
    run_lines = [line for line in ci.splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert run_lines == [test_command]


def test_shell_scripts_parse():
    for script in (ROOT / "deploy" / "setup.sh", ROOT / "deploy" / "test-latest.sh", ROOT / ".ci" / "run"):
        subprocess.run(["bash", "-n", str(script)], check=True)


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def test_constraints_pin_every_dependency_inside_pyprojects_ranges():
    """deploy/constraints.txt is the tested set: each dependency (bar torch, which setup.sh picks per machine) is
    pinned once, inside the range pyproject.toml declares, so the two cannot drift apart."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    assert "torch" not in pins
    for spec in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} is a dependency but deploy/constraints.txt does not pin it"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"deploy/constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement.specifier}"


def test_setup_and_the_image_install_with_the_constraints():
    assert "deploy/constraints.txt" in (ROOT / "deploy" / "setup.sh").read_text()
    runs = [args for op, args in dockerfile_instructions() if op == "RUN"]
    assert any("-c deploy/constraints.txt" in args and "pip install" in args for args in runs)


@pytest.mark.skipif(os.environ.get("LLMPRESS_CONSTRAINTS") == "none",
                    reason="deploy/test-latest.sh runs the suite on the newest releases on purpose")
def test_this_environment_is_the_tested_one():
    """What deploy/setup.sh installed is what deploy/constraints.txt says: the README's commands give the tested
    environment on any machine (a pin the installer skipped, or a package upgraded by hand, shows here)."""
    if sys.version_info[:2] != (3, 11):
        pytest.skip("deploy/constraints.txt is for CPython 3.11")
    differ = {}
    for name, version in _pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency of a dependency that this machine does not need
        if installed != version:
            differ[name] = f"{installed} installed, {version} pinned"
    assert not differ, differ
