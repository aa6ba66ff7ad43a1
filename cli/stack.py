"""Start visionq's processes for local runs and tests: embedded Redis, the API under gunicorn, a GPU worker, the
webhook delivery worker and the batch worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from cli.embedded_redis import EmbeddedRedis
from shared.config import Settings
from shared.routing import batch_queue, webhook_queue
from shared.store.api_keys import KeyStore
from shared.store.connection import connect
from shared.store.workers import WorkerRegistry


def api_command(settings: Settings, port: int | None = None) -> list[str]:
    """gunicorn serving the app; threads so that ?wait requests do not hold a whole process each."""
    return [
        sys.executable, "-m", "gunicorn", "api.wsgi:app", "--config", "python:api.gunicorn_conf",
        "--bind", f"{settings.api_host}:{port or settings.api_port}",
        "--workers", str(settings.api_workers), "--threads", str(settings.api_threads),
        "--worker-class", "gthread", "--graceful-timeout", "30", "--timeout", "120",
        "--keep-alive", str(settings.api_keepalive_s),
    ]


def worker_command(settings: Settings, name: str) -> list[str]:
    """One Celery worker process, prefork disabled: it owns the model and (on a GPU host) one GPU. Its pool, its
    threads and its queue come from the settings the process itself reads (worker/celery_app.py), so that the
    queue always matches the model it loads, whatever the parent's settings say."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-n", name, "--loglevel", settings.log_level, "--without-gossip", "--without-mingle",
    ]


def webhooks_command(settings: Settings, name: str) -> list[str]:
    """The webhook delivery worker: a CPU process with a pool of threads (sending is waiting on the network)."""
    return [
        sys.executable, "-m", "celery", "-A", "shared.webhooks.delivery_app", "worker",
        "-P", "threads", "-c", str(settings.webhook_concurrency), "-Q", webhook_queue(settings), "-n", name,
        "--loglevel", settings.log_level, "--without-gossip", "--without-mingle",
    ]


def batches_command(settings: Settings, name: str) -> list[str]:
    """The batch worker: a CPU process with a pool of threads (reading inputs, admitting items, ending batches)."""
    return [
        sys.executable, "-m", "celery", "-A", "shared.batches.worker_app", "worker",
        "-P", "threads", "-c", str(settings.batch_concurrency), "-Q", batch_queue(settings), "-n", name,
        "--loglevel", settings.log_level, "--without-gossip", "--without-mingle",
    ]


def default_batches_name() -> str:
    return f"batches@{socket.gethostname()}"


def default_webhooks_name() -> str:
    return f"webhooks@{socket.gethostname()}"


def env_for(settings: Settings, fields: tuple[str, ...]) -> dict[str, str]:
    """VISIONQ_* variables that give a child process these fields of the settings."""
    return {f"VISIONQ_{name.upper()}": str(getattr(settings, name)) for name in fields}


def worker_is_ready(info: dict, pid: int) -> bool:
    """Whether what a worker published says that the process `pid` has loaded its model."""
    return bool(info.get("loads")) and info.get("pid") == pid


def default_worker_name(index: int = 1) -> str:
    return f"worker{index}@{socket.gethostname()}"


class Stack:
    """Redis (embedded unless settings name one), the API, one worker, the webhook delivery worker and the batch
    worker, started and stopped together."""

    def __init__(self, settings: Settings, *, env: dict[str, str] | None = None, api_port: int | None = None,
                 log_dir: Path | None = None, api: bool = True, worker: bool = True, webhooks: bool = True,
                 batches: bool = True, redis_port: int | None = None, api_key: str | None = None):
        self.settings = settings
        self.extra_env = env or {}
        self.api_port = api_port or settings.api_port
        self.log_dir = Path(log_dir or settings.data_dir / "logs")
        self.want_api, self.want_worker, self.want_webhooks, self.want_batches = api, worker, webhooks, batches
        self.redis: EmbeddedRedis | None = None
        self.redis_url = settings.redis_url
        self.redis_port = redis_port
        self.processes: dict[str, subprocess.Popen] = {}
        self.worker_name = default_worker_name()
        self.webhooks_name = default_webhooks_name()
        self.batches_name = default_batches_name()
        self.api_key: str | None = api_key  # reused if this Redis still knows it, else a new one is made
        self._stopping = threading.Event()

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.api_host}:{self.api_port}"

    def env(self) -> dict[str, str]:
        """The children's environment: ours, the Redis URL in use and the caller's overrides."""
        return {**os.environ, **self.extra_env, "VISIONQ_REDIS_URL": self.redis_url}

    def start(self, timeout_s: float = 120.0) -> Stack:
        """Start every part and return once the API answers and the worker has loaded its model."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.redis_url:
            self.redis = EmbeddedRedis(self.settings.data_dir / "redis", port=self.redis_port).start()
            self.redis_url = self.redis.url
        keys = KeyStore(self.redis_client())
        if self.api_key is None or keys.lookup(self.api_key) is None:
            self.api_key, _ = keys.create("local")
        if self.want_worker:
            self.start_worker()
        if self.want_webhooks:
            self.start_webhooks()
        if self.want_batches:
            self.start_batches()
        if self.want_api:
            self.spawn("api", api_command(self.settings, self.api_port))
            self.wait_for_api(timeout_s)
        if self.want_worker:
            self.wait_for_worker(self.worker_name, timeout_s)
        if self.want_webhooks:
            self.wait_for_webhooks(timeout_s)
        if self.want_batches:
            self.wait_for_batches(timeout_s)
        return self

    def start_worker(self) -> None:
        """(Re)start the worker process."""
        self.spawn("worker", worker_command(self.settings, self.worker_name))

    def start_webhooks(self) -> None:
        """(Re)start the webhook delivery worker."""
        self.spawn("webhooks", webhooks_command(self.settings, self.webhooks_name))

    def start_batches(self) -> None:
        """(Re)start the batch worker."""
        self.spawn("batches", batches_command(self.settings, self.batches_name))

    def keep_alive(self, every_s: float = 1.0) -> Stack:
        """Restart the worker and the webhook delivery worker when they exit on their own, until `stop` (kombu 5.7
        exits a Celery worker whose Redis connection drops, so a Redis restart would leave them down). Not for
        tests that stop and restart those processes themselves."""
        restart = {"worker": self.start_worker, "webhooks": self.start_webhooks, "batches": self.start_batches}

        def watch() -> None:
            while not self._stopping.wait(every_s):
                for name, start in restart.items():
                    process = self.processes.get(name)
                    if process is not None and process.poll() is not None and not self._stopping.is_set():
                        print(f"{name} exited with {process.returncode}; restarting it", flush=True)
                        start()

        threading.Thread(target=watch, name="visionq-keep-alive", daemon=True).start()
        return self

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(command, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        self.processes[name] = process
        return process

    def wait_for_api(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive("api")
            try:
                if requests.get(f"{self.api_url}/healthz", timeout=1).ok:
                    return
            except requests.RequestException:
                pass  # not listening yet, or listening while the app still imports
            time.sleep(0.1)
        raise RuntimeError(f"the API did not start; see {self.log_dir / 'api.log'}")

    def wait_for_worker(self, name: str, timeout_s: float) -> dict:
        """Wait until this worker process has loaded its model and said so in Redis."""
        return self._wait_until_published("worker", name, timeout_s, lambda info: bool(info.get("loads")))

    def wait_for_webhooks(self, timeout_s: float) -> dict:
        """Wait until the webhook delivery worker is consuming its queue."""
        return self._wait_until_published("webhooks", self.webhooks_name, timeout_s, lambda info: True)

    def wait_for_batches(self, timeout_s: float) -> dict:
        """Wait until the batch worker is consuming its queue."""
        return self._wait_until_published("batches", self.batches_name, timeout_s, lambda info: True)

    def _wait_until_published(self, process: str, name: str, timeout_s: float, ready) -> dict:
        registry = WorkerRegistry(self.redis_client())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive(process)
            info = registry.info(name)
            if info.get("pid") == self.processes[process].pid and ready(info):
                return info
            time.sleep(0.2)
        raise RuntimeError(f"the {process} process did not start; see {self.log_dir / (process + '.log')}")

    def redis_client(self):
        return connect(self.settings.model_copy(update={"redis_url": self.redis_url}))

    def _check_alive(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {self.log_dir / (name + '.log')}")

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        """Signal one process and wait for it (killing it if it will not stop)."""
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        """Stop the API and the worker, then Redis."""
        self._stopping.set()
        for name in list(self.processes):
            self.stop_process(name)
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_exc) -> None:
        self.stop()
