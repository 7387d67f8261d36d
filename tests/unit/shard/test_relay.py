"""shard/relay.py with real processes on gloo: rank 0's calls reach every follower in order, a stop ends
them, and a rank that died or stopped receiving is named."""

from __future__ import annotations

import os
import time

import pytest

from tests.e2e.harness import free_port
from tests.processes import run_ranks

pytestmark = pytest.mark.timeout(240)

MESSAGES = [("Warmup", b"first"), ("Step", b""), ("Step", bytes(range(256)) * 400)]


def _node(rank: int, world: int, port: int, scenario: str, queue) -> None:
    import torch.distributed as td

    from shard.relay import PeerLostError, Relay

    def report(value: object) -> None:  # flushed at once: some ranks leave with os._exit
        queue.put((rank, value))
        queue.close()
        queue.join_thread()

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    relay = Relay(rank, world)
    if scenario == "order":
        if relay.leader:
            relay.wait_followers()
            for method, payload in MESSAGES:
                relay.send(method, payload)
                relay.ping()
            relay.stop()
            report("stopped")
        else:
            relay.ready()
            got: list[tuple[str, bytes]] = []
            relay.follow(lambda method, payload: got.append((method, payload)))
            report(got)
    elif scenario == "dead":  # rank 2 dies after the first message, then rank 0 leaves
        if relay.leader:
            relay.send(*MESSAGES[0])
            time.sleep(1.0)
            try:
                relay.ping()
            except PeerLostError as e:
                report((e.rank, str(e)))
            os._exit(0)
        elif rank == 2:
            relay.receive()
            os._exit(9)
        else:
            try:
                relay.follow(lambda method, payload: None)
            except PeerLostError as e:
                report((e.rank, str(e)))
    elif scenario == "hung":  # rank 1 takes one message, then stops receiving
        if relay.leader:
            relay.send(*MESSAGES[0])
            try:
                relay.send("Ping", timeout=1.0)
            except PeerLostError as e:
                report((e.rank, str(e)))
            os._exit(0)
        else:
            relay.receive()
            time.sleep(60)


def _run(world: int, scenario: str, reporting: int) -> dict[int, object]:
    """Runs ``scenario`` on ``world`` processes; returns what the ``reporting`` ranks that report said."""
    return run_ranks(_node, world, (world, free_port(), scenario), reporting)


def test_followers_run_rank_0s_calls_in_order_until_it_stops() -> None:
    assert _run(2, "order", 2) == {0: "stopped", 1: MESSAGES}


def test_a_dead_rank_is_named_by_rank_0_and_rank_0s_death_by_the_others() -> None:
    results = _run(3, "dead", 2)
    assert results[0][0] == 2 and "lost rank 2" in results[0][1] and "closed" in results[0][1]
    assert results[1][0] == 0 and "lost rank 0" in results[1][1]


def test_a_rank_that_stops_receiving_is_named_after_the_timeout() -> None:
    results = _run(2, "hung", 1)
    assert results[0][0] == 1 and "Timed out" in results[0][1]
