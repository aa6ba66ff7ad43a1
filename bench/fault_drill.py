"""Fault drill: jobs through the real API, Redis and several worker processes while things break, then proof that
every accepted job ended in exactly one terminal state, none lost and none ended twice.

    .venv/bin/python -m bench.fault_drill --jobs 1000 [--workers 3] [--max-new-tokens 8]

Real parts on this machine: an embedded Valkey with AOF (everysec), the API under gunicorn, and `visionq workers`'s
supervisor running one worker process per "GPU" (`--gpus 0,1,2` with the device forced to the CPU), each on the
tiny random model. While the jobs are being submitted:

  (a) a worker is SIGKILLed in the middle of a long job (the supervisor restarts it; the job's lease runs out and
      another worker runs it again);
  (b) Redis is killed (SIGKILL, as a crash) and restarted from its append-only file on the same port;
  (c) a worker gets SIGTERM in the middle of a long job: it finishes that job, takes no new one, exits, and the
      supervisor starts it again.

Submissions refused while Redis is down (503) are retried with the same Idempotency-Key, so a submission whose
answer was lost is not made twice. At the end the drill reads every accepted job from Redis and every worker's
JSON log (one `job running` line per attempt started, one `job ended` line per outcome written, with whether the
compare-and-set applied) and what the webhook receiver got (every job carries a webhook: one signed event per
job, one webhook-id, retries of it counted) and prints the figures. Timeouts are short (3 s leases) so that it
runs in a minute; production uses 60 s leases, so there a killed worker's job waits about a minute before it runs
again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
from standardwebhooks import Webhook

from cli.client import ApiError, Client
from cli.embedded_redis import EmbeddedRedis, free_port
from cli.samples import write_samples
from cli.stack import Stack, env_for
from cli.supervisor import Supervisor, gpu_workers
from cli.webhook_listener import WebhookReceiver
from shared.config import Settings
from shared.store.api_keys import KeyStore
from shared.store.connection import connect
from shared.store.jobs import JobStore
from shared.store.keys import STATUS_COUNTS_KEY
from shared.store.workers import WorkerRegistry

DRILL_FIELDS = ("redis_url", "model", "image_root", "data_dir", "queue", "visibility_timeout_s", "heartbeat_s",
                "restore_interval_s", "max_attempts", "device", "api_workers", "api_threads")


@dataclass
class DrillConfig:
    jobs: int = 1000
    workers: int = 3
    max_new_tokens: int = 8
    submit_s: float = 30.0  # submissions are spread over this long, so that every fault lands among them
    long_tokens: int = 1024  # the interrupted jobs: long enough (about 1.5 s on the tiny model) to stop mid-run
    finish_timeout_s: float = 300.0


@dataclass
class Fault:
    """What one fault did: its kind, when, to which worker and which job was running there."""

    kind: str
    at_s: float  # since submissions began
    worker: str = ""
    job_id: str = ""
    pid: int = 0
    detail: str = ""
    at: str = field(default_factory=lambda: time.strftime("%H:%M:%S", time.gmtime()))  # UTC, as in the logs


    def describe(self) -> str:
        job = f" job {self.job_id}" if self.job_id else ""
        where = f"{self.worker} (pid {self.pid})" if self.pid else self.detail
        return f"fault {self.kind} at {self.at_s} s ({self.at} UTC): {where}{job}"


@dataclass
class Submissions:
    """What the submitters saw: accepted job ids (in order), refusals that were retried and those that were not."""

    accepted: list[str] = field(default_factory=list)
    retried: Counter = field(default_factory=Counter)
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def progress(self, share: str):
        """What a wait for `share` of the submissions says when it times out: the refusals that explain it."""
        return lambda: (f"{share} submitted ({len(self.accepted)} accepted; retried: {dict(self.retried) or 0}; "
                        f"refused: {self.refused[:1] or 'none'})")


class Drill:
    """The running system: Redis, the API and the supervised workers, and the faults done to them."""

    def __init__(self, config: DrillConfig, folder: Path, model: Path, image_root: Path):
        self.config, self.folder = config, folder
        self.redis = EmbeddedRedis(folder / "redis")
        self.settings = Settings(redis_url=self.redis.url, model=str(model), image_root=image_root,
                                 data_dir=folder, queue="drill", visibility_timeout_s=3, heartbeat_s=0.5,
                                 restore_interval_s=1, max_attempts=3, device="cpu", api_workers=1, api_threads=16)
        env = {**env_for(self.settings, DRILL_FIELDS), "OMP_NUM_THREADS": "1", "VISIONQ_RATE_PER_S": "100000",
               "VISIONQ_RATE_BURST": "100000",
               # Every job carries a webhook to the drill's receiver on loopback; retries come quickly.
               "VISIONQ_WEBHOOK_ALLOW_HTTP": "true", "VISIONQ_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
               "VISIONQ_WEBHOOK_RETRY_BASE_S": "0.5", "VISIONQ_WEBHOOK_RETRY_MAX_S": "2"}
        self.api = Stack(self.settings, env=env, api_port=free_port(), log_dir=folder / "logs", worker=False)
        self.supervisor = Supervisor(self.settings, gpu_workers([str(i) for i in range(config.workers)],
                                                                self.settings), log_dir=folder / "workers", env=env)
        self.receiver = WebhookReceiver()  # verifies once the key's secret is known (see `client`)
        self.faults: list[Fault] = []
        self.started = time.monotonic()
        self._supervising = threading.Event()

    def __enter__(self) -> Drill:
        self.receiver.start()
        self.redis.start()
        self.api.start().keep_alive()  # its webhook delivery worker comes back if a Redis restart ends it
        self.supervisor.start()
        threading.Thread(target=self._supervise, daemon=True).start()
        for spec in self.supervisor.specs:
            self.supervisor.wait_ready(spec.name, timeout_s=180)
        return self

    def __exit__(self, *_exc) -> None:
        self._supervising.set()
        self.supervisor.stop(timeout_s=30)
        self.api.stop()
        self.redis.stop()
        self.receiver.stop()

    def _supervise(self) -> None:
        while not self._supervising.wait(0.2):
            self.supervisor.check()

    def store(self) -> JobStore:
        return JobStore(connect(self.settings), self.settings.result_ttl_s)

    def client(self) -> Client:
        secret, _ = KeyStore(connect(self.settings)).create("drill", rate_per_s=100000, burst=100000,
                                                           max_active_jobs=10**6)
        client = Client(self.api.api_url, key=secret, timeout_s=30)
        self.receiver.verifier = Webhook(client.webhook_secret())
        client.webhook = {"url": self.receiver.url}
        return client

    def now_s(self) -> float:
        return round(time.monotonic() - self.started, 1)

    # --- faults ------------------------------------------------------------------------------------------------

    def interrupt_worker(self, client: Client, sig: int, kind: str) -> Fault:
        """Submit a long job, wait until a worker runs it, and signal that worker's process."""
        job_id = submit_until_accepted(client, self.config.long_tokens, f"drill-{kind}")
        store = self.store()
        while True:
            job = wait_for(lambda: running(store, job_id), timeout_s=120,
                           what=f"the {kind} job to start (as it stands: {store.get(job_id)!r})")
            pid = WorkerRegistry(store.redis).info(job.worker)["pid"]
            try:
                os.kill(pid, sig)
                break
            except ProcessLookupError:
                # That worker died on its own (kombu 5.7 exits a worker when Redis drops it, see README) and the
                # supervisor restarts it: aim again once the job runs in a live process.
                time.sleep(0.5)
        fault = Fault(kind, self.now_s(), worker=job.worker, job_id=job_id, pid=pid)
        self.faults.append(fault)
        return fault

    def restart_redis(self, down_s: float = 1.0) -> Fault:
        """Kill Redis as a crash would, and start it again from its AOF on the same port."""
        self.redis.kill()
        time.sleep(down_s)
        self.redis.start()
        fault = Fault("Redis killed, restarted from its AOF", self.now_s(), detail=f"down {down_s:g} s")
        self.faults.append(fault)
        return fault

    def wait_restarted(self, fault: Fault, timeout_s: float = 120) -> None:
        """Wait until the signalled worker's new process has loaded its model."""
        registry = WorkerRegistry(self.store().redis)
        wait_for(lambda: (registry.info(fault.worker).get("pid") not in (None, fault.pid)
                          and registry.info(fault.worker).get("loads")), timeout_s, f"{fault.worker} to restart")


def running(store: JobStore, job_id: str):
    job = store.get(job_id)
    return job if job is not None and job.status.value == "running" and job.worker else None


def wait_for(check, timeout_s: float, what: str):
    """Poll `check` until it returns something true; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # Redis may be restarting
            value = None
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what() if callable(what) else what}")


def submit_until_accepted(client: Client, max_new_tokens: int, idempotency_key: str,
                          retried: Counter | None = None) -> str:
    """Submit one job, retrying refusals caused by the faults (503 while Redis is down) with the same key."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit("describe", ["bar_chart.png"], max_new_tokens=max_new_tokens,
                                 idempotency_key=idempotency_key, webhook=getattr(client, "webhook", None))["id"]
        except (ApiError, requests.RequestException) as exc:
            if isinstance(exc, ApiError) and exc.status < 500 and exc.status != 429:
                raise  # refused for the request itself (a bad setting of the drill), not by a fault
            if time.monotonic() > deadline:
                raise
            if retried is not None:
                retried[getattr(exc, "code", type(exc).__name__)] += 1
            time.sleep(0.2)


def submit_all(client: Client, config: DrillConfig, out: Submissions) -> None:
    """Submit config.jobs short jobs at an even pace over config.submit_s, eight at a time."""
    started, interval = time.monotonic(), config.submit_s / config.jobs

    def one(index: int) -> None:
        time.sleep(max(0.0, started + index * interval - time.monotonic()))
        try:
            job_id = submit_until_accepted(client, config.max_new_tokens, f"drill-{index}", out.retried)
        except ApiError as exc:
            out.refused.append(str(exc))
            raise
        with out.lock:
            out.accepted.append(job_id)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(config.jobs)))


@dataclass
class Evidence:
    """What the workers' JSON logs say they did, per job."""

    started: Counter = field(default_factory=Counter)  # attempts started
    ended: Counter = field(default_factory=Counter)  # outcomes written (the compare-and-set applied)
    refused: Counter = field(default_factory=Counter)  # outcome writes the compare-and-set refused
    written: dict[str, str] = field(default_factory=dict)  # the status each applied outcome wrote
    attempts: dict[str, list[str]] = field(default_factory=dict)  # "time worker" of each attempt started

    def add(self, entry: dict) -> None:
        job_id = entry["job_id"]
        if entry["event"] == "running" and entry["applied"]:
            self.started[job_id] += 1
            self.attempts.setdefault(job_id, []).append(f"{entry['ts'][11:23]} {entry.get('worker', '?')}")
        elif entry["event"] == "ended" and entry["applied"]:
            self.ended[job_id] += 1
            self.written[job_id] = entry["status"]
        elif entry["event"] == "ended":
            self.refused[job_id] += 1


def worker_evidence(log_dir: Path) -> Evidence:
    """Read every worker's `visionq.jobs` log lines."""
    evidence = Evidence()
    for path in log_dir.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"visionq.jobs"' in line:
                evidence.add(json.loads(line))
    return evidence


def wait_all_terminal(store: JobStore, job_ids: list[str], timeout_s: float) -> dict[str, dict]:
    """Every job's hash once all have ended (or as they stand at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pipe = store.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(f"visionq:job:{job_id}")
        jobs = dict(zip(job_ids, pipe.execute(), strict=True))
        pending = [j for j, raw in jobs.items() if raw.get("status") not in ("succeeded", "failed", "canceled")]
        if not pending or time.monotonic() > deadline:
            return jobs
        time.sleep(0.5)


@dataclass
class DrillReport:
    accepted: int
    statuses: Counter
    lost: list[str]
    ended_not_once: list[str]
    mismatched: list[str]
    attempts_histogram: Counter
    refused_writes: int
    run_again: dict[str, list[str]]  # jobs Redis counts more than one attempt of: when and where each started
    redis_attempts: dict[str, int]  # those jobs' attempts as Redis counts them (a SIGKILL can beat a log line)
    faults: list[Fault]
    retried_submits: Counter
    status_counts: dict[str, int]
    wall_s: float
    events: Events

    def ok(self) -> bool:
        """None lost, none ended twice (or never), Redis and the workers agree on every outcome, and every job's
        end reached the webhook receiver as one event (one webhook-id, signed, of the job's final status)."""
        return not (self.lost or self.ended_not_once or self.mismatched or self.events.problems())

    def attempts_of(self, job_id: str) -> int:
        return self.redis_attempts.get(job_id, 1)

    def lines(self) -> list[str]:
        out = [f"accepted jobs: {self.accepted} (submissions retried: {dict(self.retried_submits) or 0})"]
        out += [fault.describe() for fault in self.faults]
        out += [f"  {f.kind} job ended after {self.attempts_of(f.job_id)} attempt(s)" for f in self.faults if f.job_id]
        out.append(f"final status: {dict(self.statuses)}")
        out.append(f"lost (not terminal): {len(self.lost)}")
        out.append(f"outcome written other than exactly once (worker logs): {len(self.ended_not_once)}")
        out.append(f"Redis status differs from the outcome the worker wrote: {len(self.mismatched)}")
        out.append("attempts started per job (worker logs): "
                   + ", ".join(f"{n}x: {count}" for n, count in sorted(self.attempts_histogram.items())))
        out.append(f"jobs started more than once: {len(self.run_again)}")
        out += [f"  {job_id}: {self.redis_attempts[job_id]} attempts in Redis; starts logged: {'; '.join(starts)}"
                for job_id, starts in self.run_again.items()]
        out.append(f"outcome writes refused by compare-and-set: {self.refused_writes}")
        out.append(f"Redis job counts by status (metrics hash): {self.status_counts}")
        out += self.events.lines()
        out.append(f"wall time {self.wall_s:.1f} s; {self.accepted / self.wall_s:.1f} jobs/s")
        out.append("RESULT: " + ("PASS" if self.ok() else "FAIL"))
        return out


@dataclass
class Events:
    """What the webhook receiver got, per job: requests, distinct webhook-ids, and whether each matched."""

    requests: Counter  # job id -> requests received (retries of one event included)
    ids: dict[str, set[str]]  # job id -> distinct webhook-ids
    unsigned: int  # requests whose signature did not verify
    wrong: list[str]  # jobs whose event type is not their final status
    missing: list[str]  # jobs with no event at all

    def problems(self) -> list[str]:
        twice = [job_id for job_id, ids in self.ids.items() if len(ids) != 1]
        return self.missing + self.wrong + twice + (["unsigned"] if self.unsigned else [])

    def lines(self) -> list[str]:
        repeats = Counter(self.requests.values())
        return [f"webhook events: {len(self.ids)} jobs with one, {len(self.missing)} missing, "
                f"{sum(len(ids) != 1 for ids in self.ids.values())} with more than one webhook-id, "
                f"{len(self.wrong)} of the wrong type, {self.unsigned} not verified; requests per job: "
                + ", ".join(f"{n}x: {count}" for n, count in sorted(repeats.items()))]


def webhook_events(receiver: WebhookReceiver, jobs: dict[str, dict], timeout_s: float) -> Events:
    """Wait (up to timeout_s) until every job's event has arrived, then tally what the receiver saw."""
    deadline = time.monotonic() + timeout_s
    while True:
        with receiver.lock:
            received = list(receiver.received)
        seen = {r.event["data"]["id"] for r in received if r.event}
        if seen >= set(jobs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    requests_seen, ids, wrong = Counter(), {}, set()
    for r in received:
        if not r.event:
            continue
        job_id = r.event["data"]["id"]
        requests_seen[job_id] += 1
        ids.setdefault(job_id, set()).add(r.webhook_id)
        if job_id in jobs and r.event["type"] != f"job.{jobs[job_id].get('status')}":
            wrong.add(job_id)
    return Events(requests_seen, ids, sum(r.verified is False for r in received), sorted(wrong),
                  [job_id for job_id in jobs if job_id not in ids])


def run_again(jobs: dict[str, dict]) -> dict[str, int]:
    """Jobs whose attempts (as Redis counts them) are more than one."""
    return {job_id: int(raw.get("attempts", 0)) for job_id, raw in jobs.items() if int(raw.get("attempts", 0)) > 1}


def report(drill: Drill, subs: Submissions, timeout_s: float) -> DrillReport:
    store = drill.store()
    jobs = wait_all_terminal(store, subs.accepted, timeout_s)
    evidence = worker_evidence(drill.folder / "workers")
    statuses = Counter(raw.get("status", "missing") for raw in jobs.values())
    lost = [j for j, raw in jobs.items() if raw.get("status") not in ("succeeded", "failed", "canceled")]
    return DrillReport(
        accepted=len(subs.accepted), statuses=statuses, lost=lost,
        ended_not_once=[j for j in subs.accepted if evidence.ended[j] != 1],
        mismatched=[j for j in subs.accepted if evidence.written.get(j) != jobs[j].get("status")],
        attempts_histogram=Counter(evidence.started[j] for j in subs.accepted),
        refused_writes=sum(evidence.refused.values()), faults=drill.faults,
        run_again={j: sorted(evidence.attempts.get(j, [])) for j in run_again(jobs)}, redis_attempts=run_again(jobs),
        retried_submits=subs.retried,
        status_counts={k: int(v) for k, v in store.redis.hgetall(STATUS_COUNTS_KEY).items()},
        wall_s=time.monotonic() - drill.started, events=webhook_events(drill.receiver, jobs, timeout_s))


def run_drill(config: DrillConfig, folder: Path, model: Path, image_root: Path) -> DrillReport:
    """Start everything, submit while doing the three faults, and report."""
    with Drill(config, folder, model, image_root) as drill:
        client, subs = drill.client(), Submissions()
        drill.started = time.monotonic()
        submitter = threading.Thread(target=submit_all, args=(client, config, subs))
        submitter.start()
        wait_for(lambda: len(subs.accepted) >= config.jobs * 0.2, config.submit_s * 2, subs.progress("20%"))
        killed = drill.interrupt_worker(client, signal.SIGKILL, "SIGKILL")
        with subs.lock:
            subs.accepted.append(killed.job_id)
        wait_for(lambda: len(subs.accepted) >= config.jobs * 0.45, config.submit_s * 2, subs.progress("45%"))
        drill.restart_redis()
        wait_for(lambda: len(subs.accepted) >= config.jobs * 0.7, config.submit_s * 2, subs.progress("70%"))
        termed = drill.interrupt_worker(client, signal.SIGTERM, "SIGTERM")
        with subs.lock:
            subs.accepted.append(termed.job_id)
        submitter.join()
        drill.wait_restarted(killed)
        drill.wait_restarted(termed)
        return report(drill, subs, config.finish_timeout_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--submit-s", type=float, default=30.0)
    args = parser.parse_args(argv)
    from cli.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="visionq-drill-") as tmp:
        folder = Path(tmp)
        write_samples(folder / "images")
        model = build_tiny_model(folder / "model")
        config = DrillConfig(args.jobs, args.workers, args.max_new_tokens, args.submit_s)
        result = run_drill(config, folder, model, folder / "images")
    print("\n".join(result.lines()))
    return 0 if result.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
