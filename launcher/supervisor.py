"""Starts the shards and the router, supervises them, and stops them all together.

Every child runs in its own process group with a parent-death signal (Linux), so none outlives the
launcher. Any child that dies takes the server down: the launcher stops the rest and exits non-zero,
printing that child's last log lines. SIGINT/SIGTERM stop the router first (it drains), then the shards,
and exit 0; a second signal kills everything at once.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.cuda_graphs import parse_cuda_graphs
from common.flags import write_config
from common.lora import local_adapters, parse_lora_adapters
from common.tracing import shard_service_name
from router.chat import ChatWrapping, load_chat_template
from router.config import RouterConfig
from shard.config import ShardConfig

from .config import LauncherConfig
from .weights import ResolvedModel

log = logging.getLogger("launcher")

PR_SET_PDEATHSIG = 1
ROUTER_EXIT_MARGIN_S = 10.0
# After a child's death the server is going down: requests still in flight cannot finish, so the router
# gets only a moment to answer them with errors.
FAILURE_ROUTER_GRACE_S = 3.0
SHARD_GRACE_S = 10.0
TAIL_LINES = 40


class ShardStartError(RuntimeError):
    pass


def _child_setup() -> None:
    """In the child before exec: die with the launcher (Linux)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    """A supervised process whose output is relayed to the launcher's stderr and kept in a tail."""

    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_child_setup,
        )
        threading.Thread(target=self._relay, name=f"relay-{self.name}", daemon=True).start()

    def _relay(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.tail.append(line)
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)

    def wait(self, timeout: float) -> bool:
        """True when the process ended within ``timeout``."""
        if self.process is None:
            return True
        try:
            self.process.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps the whole process group."""
        self.signal(signal.SIGTERM)
        if not self.wait(grace):
            log.warning("%s did not stop within %.0f s: killing it", self.name, grace)
            self.signal(signal.SIGKILL)
            self.wait(5.0)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # stragglers in the group


class Supervisor:
    def __init__(self, config: LauncherConfig, model: ResolvedModel) -> None:
        self.config = config
        self.model = model
        # This node runs ranks node_rank * N .. node_rank * N + N - 1 of the server's world_size.
        self.local_shards = config.world_size()
        self.world_size = config.global_world_size()
        self.first_rank = config.node_rank * self.local_shards
        self.shards: list[Child] = []
        self.router: Child | None = None
        self.signals = 0
        self.failed = False
        self._stop_requested = threading.Event()
        # This run's private directory (0700, removed at shutdown): the shards' sockets and the children's
        # config files. Beside --shard-uds-path's prefix, under a name no other user can guess; created
        # when first needed (``run_dir``).
        uds = Path(self.config.shard_uds_path)
        self._run_dir = uds.parent / f"{uds.name}-{secrets.token_hex(6)}"
        self._run_dir_made = False

    def run_dir(self) -> Path:
        """The private directory, made on first use: a fresh one (never an existing one, which another
        user could have made), that only this user can enter."""
        if not self._run_dir_made:
            os.mkdir(self._run_dir, 0o700)
            os.chmod(self._run_dir, 0o700)  # whatever the umask
            self._run_dir_made = True
        return self._run_dir

    # -- commands ---------------------------------------------------------------------------------
    def socket_prefix(self) -> str:
        """The shards' socket prefix (``{prefix}-{rank}``), inside the private directory."""
        return str(self._run_dir / Path(self.config.shard_uds_path).name)

    def shard_socket(self, rank: int) -> str:
        return f"{self.socket_prefix()}-{rank}"

    def ranks(self) -> range:
        """The global ranks of this node's shards."""
        return range(self.first_rank, self.first_rank + self.local_shards)

    def shard_name(self, rank: int) -> str:
        local = rank - self.first_rank
        return f"shard-{local}" if self.config.nnodes == 1 else f"shard-{local} (rank {rank})"

    def shard_config(self, rank: int) -> ShardConfig:
        """The frozen config of the shard of global rank ``rank``."""
        c = self.config
        return ShardConfig(
            model_path=self.model.path,
            uds_path=self.socket_prefix(),
            dtype=c.dtype,
            quantize=c.quantize,
            trust_remote_code=c.trust_remote_code,
            backend=c.backend,
            rank=rank,
            world_size=self.world_size,
            fault_injection=c.fault_injection,
            disable_custom_kernels=c.disable_custom_kernels,
            ct2_threads=c.ct2_threads,
            ct2_max_batches=c.ct2_max_batches,
            cuda_graphs=None if c.cuda_graphs is None else parse_cuda_graphs(c.cuda_graphs),
            plugins=c.plugins,
            watermark_gamma=c.watermark_gamma,
            watermark_delta=c.watermark_delta,
            max_batch_total_tokens=c.max_batch_total_tokens,
            max_batch_prefill_tokens=c.max_batch_prefill_tokens,
            waiting_served_ratio=c.waiting_served_ratio,
            max_waiting_tokens=c.max_waiting_tokens,
            cuda_memory_fraction=c.cuda_memory_fraction,
            speculate=c.speculate,
            lora_adapters=()
            if c.lora_adapters is None
            else local_adapters(parse_lora_adapters(c.lora_adapters)),
            max_lora_rank=c.max_lora_rank,
            max_loras=c.max_loras,
            json_output=c.json_output,
            otlp_endpoint=c.otlp_endpoint,
            otlp_service_name=shard_service_name(c.otlp_service_name),
        )

    def shard_command(self, rank: int) -> list[str]:
        path = write_config(self.shard_config(rank), self.run_dir() / f"shard-{rank}.json")
        return [sys.executable, "-m", "shard", "serve", "--config", str(path)]

    def shard_env(self, rank: int) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("API_KEY", None)  # the shards have no use for it
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(rank - self.first_rank),
            MASTER_ADDR=self.config.master_addr,
            MASTER_PORT=str(self.config.master_port),
            PYTHONUNBUFFERED="1",
        )
        if self.config.huggingface_hub_cache:
            env["HUGGINGFACE_HUB_CACHE"] = env["HF_HUB_CACHE"] = str(self.config.huggingface_hub_cache)
        return env

    def router_config(self) -> RouterConfig:
        """The router's frozen config; its API key travels in its environment, not in the file."""
        c, m = self.config, self.model
        return RouterConfig(
            tokenizer_name=str(m.path),
            model_id=m.model_id,
            model_sha=m.sha,
            model_weights=m.weights,
            shard_uds_path=self.socket_prefix(),
            num_shard=self.world_size,
            hostname=c.hostname,
            port=c.port,
            max_concurrent_requests=c.max_concurrent_requests,
            max_best_of=c.max_best_of,
            max_stop_sequences=c.max_stop_sequences,
            max_top_n_tokens=c.max_top_n_tokens,
            max_input_length=c.input_length(),
            max_total_tokens=c.total_tokens(),
            waiting_served_ratio=c.waiting_served_ratio,
            max_batch_prefill_tokens=c.max_batch_prefill_tokens,
            max_batch_total_tokens=c.max_batch_total_tokens,
            max_waiting_tokens=c.max_waiting_tokens,
            validation_workers=c.validation_workers,
            cors_allow_origin=c.cors_allow_origin,
            json_output=c.json_output,
            otlp_endpoint=c.otlp_endpoint,
            otlp_service_name=c.otlp_service_name,
            served_model_names=c.served_model_name,
            chat_template=load_chat_template(c.chat_template),
            # TGICHAT_* from the launcher's environment: read once, here.
            chat_wrapping=ChatWrapping.from_env(os.environ),
            tool_call_parser=c.tool_call_parser,
            reasoning_parser=c.reasoning_parser,
            strict_model_name=c.strict_model_name,
            enable_lora_runtime_updates=c.enable_lora_runtime_updates,
            api_key=c.api_key,
            metrics_require_auth=c.metrics_require_auth,
            payload_limit=c.payload_limit,
            graceful_termination_timeout=c.graceful_termination_timeout,
            fault_injection=c.fault_injection,
            plugins=c.plugins,
        )

    def router_command(self) -> list[str]:
        path = write_config(self.router_config(), self.run_dir() / "router.json")
        return [sys.executable, "-m", "router", "--config", str(path)]

    def router_env(self) -> dict[str, str]:
        """The router's environment; the API key travels here, not on a command line others can read."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("API_KEY", None)
        if self.config.api_key:
            env["API_KEY"] = self.config.api_key
        return env

    # -- lifecycle ---------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals += 1
        if self.signals > 1:
            log.warning("Second signal: killing everything now")
            for child in self._children():
                child.signal(signal.SIGKILL)
            os._exit(130 if signum == signal.SIGINT else 143)
        log.info("Received %s: shutting down", signal.Signals(signum).name)
        self._stop_requested.set()

    def _children(self) -> list[Child]:
        return [*([self.router] if self.router else []), *self.shards]

    def run(self) -> int:
        """Runs the server until a signal (exit 0) or a child's death (exit 1)."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            return self._run()
        finally:
            self.shutdown()

    def _run(self) -> int:
        try:
            self.run_dir()  # the sockets' directory, before any shard binds in it
        except OSError as e:
            log.error("Cannot make the shards' socket directory beside --shard-uds-path: %s", e)
            return 1
        for rank in self.ranks():
            shard = Child(self.shard_name(rank), self.shard_command(rank), self.shard_env(rank))
            log.info("Starting shard %d", rank)
            shard.start()
            self.shards.append(shard)
        if not self._wait_shards_ready():
            return 0 if self._stop_requested.is_set() else 1
        if self.config.node_rank == 0:
            self.router = Child("router", self.router_command(), self.router_env())
            log.info("Starting router on http://%s:%d", self.config.hostname, self.config.port)
            self.router.start()
        else:  # the router on node 0 reaches these shards through rank 0 (shard/relay.py)
            log.info(
                "Node %d of %d serving ranks %s",
                self.config.node_rank,
                self.config.nnodes,
                list(self.ranks()),
            )
        while not self._stop_requested.wait(0.1):
            dead = self._dead_child()
            if dead is not None and self.config.node_rank > 0 and dead.exit_code() == 0:
                # Rank 0 told its followers to stop: node 0 was shut down on purpose.
                log.info("%s stopped: node 0 shut the server down", dead.name)
                return 0
            if dead is not None:
                self._report_death(dead)
                return 1
        return 0

    def _wait_shards_ready(self) -> bool:
        import grpc

        from proto import pb, pb_grpc

        started = time.monotonic()
        pending = set(self.ranks())
        last_note = started
        while pending:
            if self._stop_requested.is_set():
                return False
            dead = self._dead_child()
            if dead is not None:
                self._report_death(dead)
                return False
            for rank in sorted(pending):
                path = self.shard_socket(rank)
                if not Path(path).exists():
                    continue
                with grpc.insecure_channel(f"unix://{path}") as channel:
                    try:
                        pb_grpc.TextGenerationServiceStub(channel).Health(pb.HealthRequest(), timeout=1.0)
                    except grpc.RpcError:
                        continue
                log.info("Shard %d ready in %.1f s", rank, time.monotonic() - started)
                pending.discard(rank)
            if pending and time.monotonic() - last_note > 10:
                log.info("Waiting for shards %s", sorted(pending))
                last_note = time.monotonic()
            self._stop_requested.wait(0.1)
        return True

    def _dead_child(self) -> Child | None:
        for child in self._children():
            if child.exit_code() is not None:
                return child
        return None

    def _report_death(self, child: Child) -> None:
        self.failed = True
        time.sleep(0.2)  # let the relay thread print the child's last lines
        lines = "\n".join(f"  {line}" for line in child.tail)
        log.error("%s exited with code %s. Last output:\n%s", child.name, child.exit_code(), lines)
        # With several ranks, one's death soon ends the others (they lose it in a collective).
        for other in self._children():
            if other is not child and other.exit_code() is not None:
                log.error("%s exited with code %s too", other.name, other.exit_code())

    def shutdown(self) -> None:
        """Router first (it drains in-flight requests), then the shards; removes the sockets."""
        if self.router is not None:
            # The router drains for up to the graceful termination timeout, then needs a moment to exit.
            grace = self.config.graceful_termination_timeout + ROUTER_EXIT_MARGIN_S
            self.router.stop(FAILURE_ROUTER_GRACE_S if self.failed else grace)
        threads = [threading.Thread(target=s.stop, args=(SHARD_GRACE_S,)) for s in self.shards]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self._run_dir_made:  # the sockets and the config files
            shutil.rmtree(self._run_dir, ignore_errors=True)
        log.info("Shut down")
