"""The router refuses to serve when the shards' KV cache cannot hold one request of --max-total-tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from proto import pb, pb_grpc
from tests.e2e.harness import REPO, free_port

pytestmark = pytest.mark.timeout(120)


class SmallPoolShard(pb_grpc.TextGenerationServiceServicer):
    """Answers start-up only: Info, Health, and a Warmup reporting a pool of ``pool`` tokens."""

    def __init__(self, pool: int) -> None:
        self.pool = pool
        self.prefills = 0

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        return pb.InfoResponse(
            dtype="float32", device_type="cpu", world_size=1, backend="paged", vocab_size=515
        )

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse()

    def Warmup(self, request: pb.WarmupRequest, context: grpc.ServicerContext) -> pb.WarmupResponse:
        return pb.WarmupResponse(max_supported_total_tokens=self.pool)


@pytest.fixture()
def shard_prefix() -> Iterator[str]:
    prefix = f"/tmp/tgi-small-pool-{uuid.uuid4().hex[:8]}"
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TextGenerationServiceServicer_to_server(SmallPoolShard(160), server)
    server.add_insecure_port(f"unix://{prefix}-0")
    server.start()
    try:
        yield prefix
    finally:
        server.stop(0)
        Path(f"{prefix}-0").unlink(missing_ok=True)


def test_a_pool_smaller_than_one_request_stops_the_router(shard_prefix: str, tiny_model_dir: Path) -> None:
    command = [
        sys.executable, "-m", "router", "--tokenizer-name", str(tiny_model_dir),
        "--shard-uds-path", shard_prefix, "--hostname", "127.0.0.1", "--port", str(free_port()),
        "--max-input-length", "100", "--max-total-tokens", "256", "--max-batch-prefill-tokens", "100",
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert (
        "the batch holds 160 tokens (max_batch_total_tokens: the KV cache the shards report), fewer than "
        "`max_total_tokens` (256): one request could never fit" in result.stderr
    )
    assert "Traceback" not in result.stderr
