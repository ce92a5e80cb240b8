# llmpress: the engine and CLI (the job API and workers arrive with the service).
# CPU image by default; for NVIDIA GPUs build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    LLMPRESS_FIXTURES=/opt/llmpress/tests/fixtures

WORKDIR /opt/llmpress
# torch first, from the chosen index, so the project install below keeps it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY deploy/constraints.txt ./deploy/constraints.txt
COPY service ./service
COPY workers ./workers
COPY api ./api
COPY tests/fixtures ./tests/fixtures
# The tested versions (deploy/constraints.txt), as deploy/setup.sh installs them.
RUN pip install -c deploy/constraints.txt . && useradd --create-home --uid 1000 llmpress && mkdir -p /data && chown llmpress /data
USER llmpress
WORKDIR /data
ENTRYPOINT ["llmpress"]
CMD ["--help"]
