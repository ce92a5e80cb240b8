# llmpress: one image for the job API (`llmpress serve`) and the Ray nodes (`ray start ...`), and the CLI.
# CPU build of torch by default; for NVIDIA GPUs:
#   docker build -t llmpress-cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# Layers go from what changes least to what changes most: torch, the pinned dependencies, then the code, so a code
# change rebuilds in seconds. deploy/wheels/ (empty in git) may hold every wheel, for a build with no index in
# reach (deploy/image-wheels.sh fills it); it is then used alone.
ARG BASE_IMAGE=python:3.11-slim

# The virtual environment is built in a stage of its own, so that the wheels it installs from stay out of the image.
FROM ${BASE_IMAGE} AS venv
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
WORKDIR /opt/llmpress
COPY deploy/wheels/ /tmp/wheels/
RUN set -eu; \
    if ls /tmp/wheels/*.whl >/dev/null 2>&1; then from="--no-index --find-links /tmp/wheels"; \
    else from="--index-url ${TORCH_INDEX}"; fi; \
    python3 -m venv /opt/venv; \
    pip install $from "torch==${TORCH_VERSION}"
COPY pyproject.toml ./
COPY deploy/constraints.txt ./deploy/constraints.txt
# The project's dependencies at the tested versions (deploy/constraints.txt), without the project itself.
RUN set -eu; \
    if ls /tmp/wheels/*.whl >/dev/null 2>&1; then from="--no-index --find-links /tmp/wheels"; else from=""; fi; \
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt; \
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))" \
        >> /tmp/requirements.txt; \
    pip install $from -c deploy/constraints.txt -r /tmp/requirements.txt

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LLMPRESS_FIXTURES=/opt/llmpress/tests/fixtures \
    LLMPRESS_HOST=0.0.0.0 \
    LLMPRESS_ARTIFACTS_ROOT=/data/artifacts \
    LLMPRESS_DATABASE_URL=sqlite:////data/llmpress.db
RUN useradd --create-home --uid 1000 llmpress && mkdir -p /data/artifacts && chown -R llmpress /data
COPY --from=venv /opt/venv /opt/venv
WORKDIR /opt/llmpress
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY api ./api
# The bundled demo model and texts (`llmpress demo`), with their licences; no other test file.
COPY tests/fixtures/SOURCE.md ./tests/fixtures/SOURCE.md
COPY tests/fixtures/models/stories260K ./tests/fixtures/models/stories260K
COPY tests/fixtures/data ./tests/fixtures/data
RUN pip install --no-deps --no-build-isolation .
USER llmpress
WORKDIR /data
EXPOSE 8000
# The API's liveness; a Ray node's container (`ray start ... --block`) sets its own check (docker-compose.yml).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LLMPRESS_PORT', '8000') + '/healthz', timeout=4)"
ENTRYPOINT ["llmpress"]
CMD ["serve"]
