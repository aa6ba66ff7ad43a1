"""`visionq workers`: one solo worker process per GPU of this host, pinned with CUDA_VISIBLE_DEVICES, named
`gpu<N>@<host>`, watched and restarted when it exits; SIGTERM stops them warmly, SIGHUP restarts them one by one.

Workers on other hosts join by running the same command against the same Redis: nothing here is shared but Redis.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cli.stack import worker_command, worker_is_ready
from shared.config import Settings
from shared.store.connection import connect
from shared.store.workers import WorkerRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process to keep running: its Celery node name and what its environment adds."""

    name: str
    env: dict[str, str]


def visible_gpus(requested: str, visible: str | None, detected: Callable[[], int]) -> list[str]:
    """The GPU indices to run a worker on: `all` (those CUDA_VISIBLE_DEVICES shows, else every GPU nvidia-smi
    lists) or a comma-separated list such as `0,1`."""
    if requested != "all":
        gpus = [gpu.strip() for gpu in requested.split(",") if gpu.strip()]
        if not gpus or len(set(gpus)) != len(gpus):
            raise ValueError(f"--gpus wants 'all' or distinct indices such as 0,1; got {requested!r}")
        return gpus
    if visible is not None and visible.strip():
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    count = detected()
    if count == 0:
        raise ValueError("no GPU found on this host; use --cpu-workers N to run workers on the CPU")
    return [str(index) for index in range(count)]


def nvidia_gpu_count() -> int:
    """How many GPUs `nvidia-smi -L` lists; without the tool, how many torch sees (0 without a driver)."""
    if shutil.which("nvidia-smi") is None:
        try:
            import torch
        except ImportError:
            return 0
        return torch.cuda.device_count()
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines()) if listing.returncode == 0 else 0


def gpu_workers(gpus: list[str], settings: Settings, host: str | None = None) -> list[WorkerSpec]:
    """A worker per GPU, seeing only that GPU (as cuda:0)."""
    host = host or socket.gethostname()
    return [WorkerSpec(f"gpu{gpu}@{host}", {"CUDA_VISIBLE_DEVICES": gpu, **metrics_env(settings, index)})
            for index, gpu in enumerate(gpus)]


def cpu_workers(count: int, settings: Settings, host: str | None = None) -> list[WorkerSpec]:
    """`count` workers on the CPU (hosts without GPUs, tests): no GPU is visible to them."""
    host = host or socket.gethostname()
    return [WorkerSpec(f"cpu{index}@{host}", {"CUDA_VISIBLE_DEVICES": "", **metrics_env(settings, index)})
            for index in range(count)]


def metrics_env(settings: Settings, index: int) -> dict[str, str]:
    """The N-th worker of a host serves its metrics on metrics_port + N (none when the port is 0)."""
    return {"VISIONQ_METRICS_PORT": str(settings.metrics_port + index)} if settings.metrics_port else {}


@dataclass
class Child:
    """A running worker and its restart bookkeeping."""

    spec: WorkerSpec
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    quick_exits: int = 0  # exits soon after starting, in a row: they lengthen the wait before the next start
    next_start_at: float = 0.0
    restarts: int = 0
    given_up: bool = False


@dataclass
class Supervisor:
    """Keeps one process per WorkerSpec running; see the module docstring for the signals."""

    settings: Settings
    specs: list[WorkerSpec]
    log_dir: Path | None = None  # None: children write to our stdout (container logs)
    command: Callable[[Settings, str], list[str]] = worker_command  # a worker's command line, from its name
    env: dict[str, str] = field(default_factory=dict)
    min_uptime_s: float = 30.0  # a child that dies sooner counts as a quick exit
    max_quick_exits: int = 5  # then it is given up (a model that cannot load will not load on the 6th try)
    backoff_s: float = 1.0
    poll_s: float = 0.2
    children: dict[str, Child] = field(default_factory=dict)
    _stopping: bool = False
    _rolling: bool = False

    def start(self) -> Supervisor:
        """Start every worker."""
        for spec in self.specs:
            self.children[spec.name] = child = Child(spec)
            self._spawn(child)
        return self

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (warm stop) or until every worker was given up; the exit status."""
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_rolling_restart)
        try:
            return self._loop()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        while not self._stopping:
            if self._rolling:
                self._rolling = False
                self.rolling_restart()
            self.check()
            if all(child.given_up for child in self.children.values()):
                log.error("every worker was given up")
                return 1
            time.sleep(self.poll_s)
        self.stop()
        return 0

    def check(self) -> None:
        """Restart the workers that have exited, waiting longer after each quick exit."""
        now = time.monotonic()
        for child in self.children.values():
            if child.given_up or self._stopping:
                continue
            if child.process is not None and child.process.poll() is not None:
                self._note_exit(child, now)
            if child.process is None and not child.given_up and now >= child.next_start_at:
                child.restarts += 1
                self._spawn(child)

    def rolling_restart(self, timeout_s: float = 600.0) -> None:
        """Restart the workers one at a time, each warmly, and wait until each new one has loaded its model,
        so that the others keep serving meanwhile."""
        for child in self.children.values():
            if self._stopping:
                return
            if child.given_up or child.process is None:
                continue
            self._stop_child(child, signal.SIGTERM, timeout_s)
            self._spawn(child)
            try:
                self.wait_ready(child.spec.name, timeout_s)
            except RuntimeError:
                log.error("worker %s did not come back; the rolling restart stops here", child.spec.name)
                return

    def wait_ready(self, name: str, timeout_s: float = 120.0) -> None:
        """Wait until this worker's current process has loaded its model and said so in Redis."""
        registry = WorkerRegistry(connect(self.settings))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            process = self.children[name].process
            if process is not None and worker_is_ready(registry.info(name), process.pid):
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker {name} did not become ready in {timeout_s:g} s")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float | None = None) -> None:
        """Signal every worker (SIGTERM: finish the current job, take no new one) and wait for them."""
        self._stopping = True
        for child in self.children.values():
            self._signal(child, sig)
        for child in self.children.values():
            self._wait_child(child, timeout_s)

    def _stop_child(self, child: Child, sig: int, timeout_s: float | None) -> None:
        self._signal(child, sig)
        self._wait_child(child, timeout_s)

    @staticmethod
    def _signal(child: Child, sig: int) -> None:
        if child.process is not None and child.process.poll() is None:
            child.process.send_signal(sig)

    @staticmethod
    def _wait_child(child: Child, timeout_s: float | None) -> None:
        process = child.process
        if process is None:
            return
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("worker %s did not stop in %s s; killing it", child.spec.name, timeout_s)
            process.kill()
            process.wait()
        child.process = None

    def _note_exit(self, child: Child, now: float) -> None:
        code = child.process.returncode
        quick = now - child.started_at < self.min_uptime_s
        child.quick_exits = child.quick_exits + 1 if quick else 0
        child.process = None
        if child.quick_exits > self.max_quick_exits:
            child.given_up = True
            log.error("worker %s exited %d times in a row within %g s of starting (last status %s); given up",
                      child.spec.name, child.quick_exits, self.min_uptime_s, code)
            return
        child.next_start_at = now + (self.backoff_s * 2 ** (child.quick_exits - 1) if quick else 0.0)
        log.warning("worker %s exited with %s; restarting it", child.spec.name, code)

    def _spawn(self, child: Child) -> None:
        env = {**os.environ, **self.env, **child.spec.env, "VISIONQ_REDIS_URL": self.settings.broker_url}
        output = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_dir / f"{child.spec.name}.log", "ab")  # noqa: SIM115 (the child holds it)
        child.process = subprocess.Popen(self.command(self.settings, child.spec.name), env=env, stdout=output,
                                         stderr=subprocess.STDOUT if output else None, stdin=subprocess.DEVNULL,
                                         start_new_session=True)  # signals reach workers only through us
        if output is not None:
            output.close()
        child.started_at = time.monotonic()

    def _on_stop(self, _signum, _frame) -> None:
        self._stopping = True

    def _on_rolling_restart(self, _signum, _frame) -> None:
        self._rolling = True
