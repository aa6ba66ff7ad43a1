"""The worker's Prometheus metrics, served on VISIONQ_METRICS_PORT: jobs, batches, inference time, tokens, GPU
memory.

Per-worker throughput in tokens/s is `rate(visionq_worker_generated_tokens_total[1m])`; the histogram gives
each job's own decode speed. Counters move only when this worker's transition of a job applied.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from shared.jobs import JobResult

JOBS_STARTED = Counter("visionq_worker_jobs_started_total", "Jobs this worker started (redeliveries included)")
JOBS_REDELIVERED = Counter("visionq_worker_jobs_redelivered_total",
                           "Jobs this worker started again after an earlier attempt was interrupted")
JOBS_ENDED = Counter("visionq_worker_jobs_ended_total", "Jobs this worker ended, by status and error code",
                     ["status", "code"])
INFERENCE_SECONDS = Histogram("visionq_worker_inference_seconds", "Model time of each succeeded job",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
GENERATED_TOKENS = Counter("visionq_worker_generated_tokens_total", "Tokens generated for succeeded jobs")
PROMPT_TOKENS = Counter("visionq_worker_prompt_tokens_total", "Prompt tokens (image tokens included) of succeeded jobs")
TOKENS_PER_SECOND = Histogram("visionq_worker_job_tokens_per_second", "Generated tokens per inference second, per job",
                              buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500))
BATCH_ROWS = Histogram("visionq_worker_batch_rows", "Jobs decoded together in one batch",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256))
BATCH_SECONDS = Histogram("visionq_worker_batch_seconds", "GPU time of one batch, by phase", ["phase"],
                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
INFO = Gauge("visionq_worker_info", "The model this worker serves, and where", ["worker", "model", "device"])


def job_started(attempt: int) -> None:
    JOBS_STARTED.inc()
    if attempt > 1:
        JOBS_REDELIVERED.inc()


def job_succeeded(result: JobResult) -> None:
    JOBS_ENDED.labels("succeeded", "").inc()
    seconds = result.timings.inference_ms / 1000
    INFERENCE_SECONDS.observe(seconds)
    GENERATED_TOKENS.inc(result.tokens.completion)
    PROMPT_TOKENS.inc(result.tokens.prompt)
    if seconds > 0:
        TOKENS_PER_SECOND.observe(result.tokens.completion / seconds)


def batch_done(rows: int, prefill_s: float, decode_s: float) -> None:
    BATCH_ROWS.observe(rows)
    BATCH_SECONDS.labels("prefill").observe(prefill_s)
    BATCH_SECONDS.labels("decode").observe(decode_s)


def job_failed(code: str) -> None:
    JOBS_ENDED.labels("failed", code).inc()


class GpuMemoryCollector:
    """CUDA memory of this process, read at scrape time (nothing when the worker runs on the CPU)."""

    def collect(self):
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        readings = {"allocated": torch.cuda.memory_allocated, "reserved": torch.cuda.memory_reserved,
                    "max_allocated": torch.cuda.max_memory_allocated}
        for kind, read in readings.items():
            family = GaugeMetricFamily(f"visionq_worker_gpu_memory_{kind}_bytes", f"torch.cuda {kind} memory",
                                       labels=["device"])
            for index in range(torch.cuda.device_count()):
                family.add_metric([str(index)], float(read(index)))
            yield family


def serve(port: int, worker: str, model: str, device: str) -> None:
    """Serve /metrics on this port from a background thread."""
    INFO.labels(worker, model, device).set(1)
    REGISTRY.register(GpuMemoryCollector())
    start_http_server(port)
