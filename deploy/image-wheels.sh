#!/usr/bin/env bash
# Fill deploy/wheels/ with every wheel the image installs (torch, the pinned dependencies, the build backend), so
# that `docker build` needs no package index: for machines whose builds cannot reach one, and for the stack test
# (tests/deploy/test_stack.py), which makes no request beyond loopback. The Dockerfile uses deploy/wheels/ alone
# whenever it holds a wheel. torch is the CPU build by default (LLMPRESS_TORCH_VERSION, TORCH_INDEX as in setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=deploy/wheels
torch_version="${LLMPRESS_TORCH_VERSION:-2.13.0}"
torch_index="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT
python3 - > "$requirements" <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(r for r in project["project"]["dependencies"] if not r.startswith("torch")))
print("\n".join(project["build-system"]["requires"]))
PY
mkdir -p "$out"
# torch first: the CPU build from PyTorch's index, or from pip's own sources where they hold it (a local wheel on
# machines with no route to that index); a CUDA build only when TORCH_INDEX names a CUDA index.
pip download --dest "$out" --only-binary=:all: --no-deps --index-url "$torch_index" "torch==${torch_version}" \
    || pip download --dest "$out" --only-binary=:all: --no-deps "torch==${torch_version}"
wheel="$(ls "$out"/torch-"${torch_version}"*.whl | head -1)"
case "$torch_index:$wheel" in
    *cpu*:*+cpu*|*cu[0-9]*:*) ;;
    *) echo "image-wheels.sh: $wheel is not the CPU build of torch; set TORCH_INDEX for a CUDA one" >&2; exit 1 ;;
esac
# Everything else, with torch held at that wheel (its own dependencies included), so nothing pulls another build.
echo "torch @ file://$(realpath "$wheel")" > "$requirements.torch"
pip download --dest "$out" --only-binary=:all: --find-links "$out" -c deploy/constraints.txt \
    -r "$requirements" -r "$requirements.torch"
rm -f "$requirements.torch"
echo "deploy/wheels: $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1)"
