"""`visionq batch DIR`: every image of a folder through the API, with bounded concurrency and a progress bar.

Results go to a JSON-lines file as jobs end. Running it again resumes: files already written are skipped, and
the others are submitted with an idempotency key derived from their content, so no file is submitted twice.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from cli.client import TERMINAL_STATUSES, ApiError, Client, file_to_data_uri

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def idempotency_key_for(content: bytes, task: str, question: str | None, max_new_tokens: int | None) -> str:
    """The same file asked the same way gives the same key (and so the same job) on every run."""
    digest = hashlib.sha256(content)
    digest.update(json.dumps([task, question, max_new_tokens]).encode())
    return f"batch-{digest.hexdigest()}"


def already_done(out_path: Path) -> set[str]:
    """Files whose job has ended, as recorded in an earlier run's output."""
    if not out_path.exists():
        return set()
    done = set()
    for line in out_path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("status") in TERMINAL_STATUSES:
            done.add(record["file"])
    return done


def run_one(client: Client, path: Path, task: str, question: str | None, max_new_tokens: int | None) -> dict:
    content = path.read_bytes()
    try:
        job = client.submit(task, [file_to_data_uri(path)], question, max_new_tokens,
                            idempotency_key=idempotency_key_for(content, task, question, max_new_tokens))
        job = client.wait(job["id"], timeout_s=3600)
    except ApiError as exc:  # a rejected file is a result too, not the end of the batch
        return {"file": path.name, "status": "rejected", "error": {"code": exc.code, "message": exc.message}}
    return {"file": path.name, **{k: job[k] for k in ("id", "status", "result", "error") if k in job}}


def run_batch(client: Client, folder: Path, task: str, out_path: Path, *, concurrency: int = 8,
              question: str | None = None, max_new_tokens: int | None = None) -> int:
    """Process the folder; returns the exit code (0 when every file succeeded)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    done = already_done(out_path)
    todo = [path for path in files if path.name not in done]
    failures = 0
    with ThreadPoolExecutor(max_workers=concurrency) as pool, out_path.open("a") as out, \
            tqdm(total=len(files), initial=len(files) - len(todo), unit="image") as bar:
        futures = [pool.submit(run_one, client, path, task, question, max_new_tokens) for path in todo]
        for future in as_completed(futures):
            record = future.result()
            out.write(json.dumps(record) + "\n")
            out.flush()
            failures += record["status"] != "succeeded"
            bar.update()
    return 1 if failures else 0
