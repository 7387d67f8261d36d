"""Rank 0 relays the model work it is asked for to the other ranks, through torch.distributed.

The router talks to rank 0 only (ranks on other machines have no socket it could reach). On its model
thread, before it runs a step or the warm-up itself, rank 0 sends the method and its protobuf bytes (a
``StepPlan``: the requests added and aborted since the last step, and whether a step runs) to every other
rank over a gloo group of its own (gloo carries CPU tensors even where the model's group is NCCL): a
length header, then the bytes. Each other rank follows on its model thread: it receives each message and
applies the same changes and runs the same step, in the same order, so every rank's scheduler decides
alike and every rank enters the model's collectives together; its outputs are dropped.

Failures end the server: rank 0 pings the followers every ``HEARTBEAT_S`` seconds when idle, so a rank
that died (gloo reports a closed connection at once) or stopped receiving (``SEND_TIMEOUT_S``) makes rank
0 exit, naming it; a follower whose rank 0 went away exits too. A clean stop of rank 0 (SIGTERM) tells
the followers to stop, and they exit 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

import torch

log = logging.getLogger(__name__)

PING, STOP, STEP, WARMUP, LORA = "Ping", "Stop", "Step", "Warmup", "Lora"
METHODS = (PING, STOP, WARMUP, STEP, LORA)
HEARTBEAT_S = 3.0
# How long rank 0 waits for a follower to take a message: a follower busy longer than any step is hung.
SEND_TIMEOUT_S = 120.0
# How long rank 0 waits at start-up for the followers to finish loading (they agreed on the KV pool size
# with it near the end of their loading already).
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 5.0
# Followers wait for rank 0's next message for as long as the server is idle.
IDLE_TIMEOUT = timedelta(days=365)


class PeerLostError(RuntimeError):
    """Another rank died or stopped answering: the group is broken and this shard must exit."""

    def __init__(self, rank: int, error: BaseException) -> None:
        super().__init__(f"lost rank {rank}: {error}")
        self.rank = rank
        self.cause = str(error)


def _wait(work: torch.distributed.Work | None, timeout_s: float) -> None:
    """Waits for a point-to-point operation of the control group."""
    if work is None:  # torch.distributed's answer for a rank outside the group: never one of ours
        raise ValueError("this rank is not in the control group")
    work.wait(timedelta(seconds=timeout_s))


class Relay:
    """This rank's end of the control channel (world size > 1 only)."""

    def __init__(self, rank: int, world_size: int) -> None:
        import torch.distributed as td

        self.rank = rank
        self.world_size = world_size
        # Every rank creates it in the same order, right after joining the model's group.
        self.group = td.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        # Set when this process is shutting down: a lost peer is expected then, not a failure.
        self.stopping = False

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # -- rank 0 ------------------------------------------------------------------------------------
    def send(self, method: str, payload: bytes = b"", timeout: float = SEND_TIMEOUT_S) -> None:
        """Sends one message to every follower, in rank order; PeerLostError names the one that failed."""
        header = torch.tensor([METHODS.index(method), len(payload)], dtype=torch.long)
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else None
        for rank in range(1, self.world_size):
            self._send(header, rank, timeout)
            if data is not None:
                self._send(data, rank, timeout)

    def _send(self, tensor: torch.Tensor, rank: int, timeout: float) -> None:
        import torch.distributed as td

        try:
            _wait(td.isend(tensor, dst=rank, group=self.group), timeout)
        except RuntimeError as e:
            raise PeerLostError(rank, e) from None

    def wait_followers(self) -> None:
        """Start-up: returns once every follower has loaded the model and is about to follow."""
        import torch.distributed as td

        for rank in range(1, self.world_size):
            try:
                _wait(td.irecv(torch.zeros(1), src=rank, group=self.group), READY_TIMEOUT_S)
            except RuntimeError as e:
                raise PeerLostError(rank, e) from None

    def ping(self) -> None:
        self.send(PING)

    def stop(self) -> None:
        """Tells the followers to stop (they exit 0); a follower already gone is fine now."""
        self.stopping = True
        try:
            self.send(STOP, timeout=STOP_TIMEOUT_S)
        except PeerLostError as e:
            log.info("Could not tell every follower to stop: %s", e)

    # -- the other ranks ---------------------------------------------------------------------------
    def ready(self) -> None:
        """Start-up: tells rank 0 this rank has loaded the model."""
        self._with_leader(lambda td: td.send(torch.ones(1), dst=0, group=self.group))

    def receive(self) -> tuple[str, bytes]:
        """Waits for rank 0's next message."""
        header = torch.zeros(2, dtype=torch.long)
        self._with_leader(lambda td: td.recv(header, src=0, group=self.group))
        method, length = METHODS[int(header[0])], int(header[1])
        if not length:
            return method, b""
        data = torch.empty(length, dtype=torch.uint8)
        self._with_leader(lambda td: td.recv(data, src=0, group=self.group))
        return method, data.numpy().tobytes()

    def _with_leader(self, op: Callable) -> None:
        import torch.distributed as td

        try:
            op(td)
        except RuntimeError as e:
            raise PeerLostError(0, e) from None

    def follow(self, run: Callable[[str, bytes], None]) -> None:
        """Runs rank 0's messages with ``run(method, payload)`` until it says stop."""
        while True:
            method, payload = self.receive()
            if method == STOP:
                log.info("Rank 0 stopped the server")
                return
            if method != PING:
                run(method, payload)
