"""`visionq demo`: the tiny model, embedded Redis, API and worker, then one job of each task through HTTP."""

from __future__ import annotations

import sys

from cli.client import Client, file_to_data_uri
from cli.embedded_redis import free_port
from cli.local_state import STATE_FILE, read_state, remember_key
from cli.samples import write_samples
from cli.stack import Stack
from shared.config import Settings


def demo_jobs(images: dict) -> list[tuple[str, list[str]]]:
    """One job per task; refs show both kinds: a path under the image root and an inline data URI."""
    return [
        ("describe", ["bar_chart.png"]),
        ("ocr", [file_to_data_uri(images["book_cover.png"])]),
        ("compare", ["street_day.png", "street_night.png"]),
    ]


def run_demo(settings: Settings, max_new_tokens: int = 32) -> int:
    """Run the demo; returns the process exit code (0 when every job succeeded)."""
    from cli.tiny_model import build_tiny_model  # the demo builds the model; the API never imports torch

    image_root = settings.data_dir / "demo-images"
    images = write_samples(image_root)
    model_path = build_tiny_model(settings.data_dir / "tiny-llava")
    print(f"tiny model at {model_path}; sample images in {image_root}")
    print("the tiny model has random weights: its text is gibberish; the demo shows the path (API, Redis, worker),"
          " not what a real model says (visionq up serves the real one)")
    env = {"VISIONQ_MODEL": str(model_path.resolve()), "VISIONQ_IMAGE_ROOT": str(image_root.resolve())}
    reuse = read_state(settings.data_dir).get("key")  # the local key `up` and earlier demos use: not one more
    with Stack(settings, env=env, api_port=free_port(), batches=False, api_key=reuse) as stack:  # :8000 may be taken
        remember_key(settings.data_dir, stack.api_key)
        print(f"API at {stack.api_url}, Redis at {stack.redis_url}, logs in {stack.log_dir}")
        print(f"local API key: {stack.api_key} (kept in {settings.data_dir / STATE_FILE} for `visionq up`)")
        client = Client(stack.api_url, key=stack.api_key)
        submitted = [client.submit(task, refs, max_new_tokens=max_new_tokens) for task, refs in demo_jobs(images)]
        finished = [client.wait(job["id"], timeout_s=120) for job in submitted]
    for job in finished:
        print_job(job)
    return 0 if all(job["status"] == "succeeded" for job in finished) else 1


def readable(text: str, limit: int = 200) -> str:
    """The text as a terminal shows it well: what cannot be printed (random tokens' control characters) as a
    middle dot, on one line, at most `limit` characters."""
    shown = "".join(c if c.isprintable() else "\u00b7" for c in text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def print_job(job: dict) -> None:
    print(f"\n== {job['task']} job {job['id']}: {job['status']}")
    if "result" in job:
        result = job["result"]
        print(f"text ({result['tokens']['completion']} tokens, prompt {result['tokens']['prompt']}): "
              f"{readable(result['text'])}")
        print("timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items()))
    if "error" in job:
        print(f"error: {job['error']['code']}: {job['error']['message']}", file=sys.stderr)
