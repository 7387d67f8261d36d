"""Starts the real launcher as a subprocess on loopback and checks that it leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[2]
# The default model's dtype follows the CPU (bfloat16 where it multiplies bfloat16 natively, float32 on
# AVX2-only machines: shard/dtypes.py). Tests that compare its tokens between servers, or with transformers
# in float32, start it with these flags, so that they hold on every machine class.
FLOAT32 = ("--dtype", "float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``text-generation-launcher ARGS`` to its end (a refusal, --help), with its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@dataclass
class Launched:
    """A running ``text-generation-launcher``; ``stop()`` returns its exit code and checks for orphans."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    uds: str = field(default_factory=lambda: f"/tmp/tgi-test-{uuid.uuid4().hex[:8]}")
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    seen_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path) -> Launched:
        """Starts the launcher on loopback, on this object's port and socket prefix, with ``args``."""
        flags = ["--hostname", "127.0.0.1", "--port", str(self.port), "--shard-uds-path", self.uds]
        return self._start(log_dir, [*flags, *self.args])

    def start_as_written(self, log_dir: Path) -> Launched:
        """Starts ``text-generation-launcher ARGS`` with no flag added (``args`` and ``env`` must put it on
        this object's port and socket prefix)."""
        return self._start(log_dir, self.args)

    def _start(self, log_dir: Path, args: list[str]) -> Launched:
        self.log_path = log_dir / f"launcher-{self.port}.log"
        command = [sys.executable, "-m", "launcher", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **self.env}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def _remember_children(self) -> None:
        if self.process is None:
            return
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.seen_pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._remember_children()
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self._remember_children()
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.log()[-4000:]}")

    def children(self) -> list[psutil.Process]:
        self._remember_children()
        return [psutil.Process(pid) for pid in self.seen_pids if psutil.pid_exists(pid)]

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signals the launcher, waits for it, and returns its exit code."""
        self._remember_children()
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise

    def kill_all(self) -> None:
        for pid in [*self.seen_pids, *([self.process.pid] if self.process else [])]:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()

    def leftovers(self, wait: float = 10.0) -> list[int]:
        """Child pids still alive (zombies excluded) after ``wait`` seconds; also checks the sockets."""
        deadline = time.monotonic() + wait
        alive: list[int] = []
        while time.monotonic() < deadline:
            alive = []
            for pid in self.seen_pids:
                try:
                    if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                        alive.append(pid)
                except psutil.NoSuchProcess:
                    pass
            if not alive:
                break
            time.sleep(0.2)
        return alive

    def stale_sockets(self) -> list[str]:
        parent = Path(self.uds).parent
        return [str(p) for p in parent.glob(Path(self.uds).name + "-*")]


def metric(server: Launched, name: str) -> float:
    """The value of one unlabelled (or fully labelled) sample in the server's /metrics; it must be there."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))
