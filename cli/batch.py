"""`visionq batch SOURCE`: a server-side batch (POST /v1/batches) of a folder of images (uploaded first), a local
JSONL manifest (uploaded), or an s3:// manifest or prefix; a progress bar fed by the batch's counts; the results
file written once it has ended. `visionq batch status|results|errors|cancel|retry ID` act on one batch.

Running the same command again resumes the same batch: a state file beside the results (<out>.batch.json) keeps the
batch's id, and, until the batch exists, the uploads already made (reused until they are about to expire); the batch
is created with an Idempotency-Key derived from the input and the options, so a batch is never made twice.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from cli.client import ApiError, Client, batch_ended

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
ACTIONS = ("status", "results", "errors", "cancel", "retry")
INLINE_MAX = 1000  # lines sent in the request itself; more go up as a JSONL upload
UPLOADS_PER_REQUEST = 8
UPLOAD_BYTES = 16 * 1024 * 1024  # of images per upload request (the server's default body bound is 20 MiB)
UPLOAD_MARGIN_S = 600  # an upload about to expire within this is made again
POLL_S = 1.0


@dataclass(frozen=True)
class Ask:
    """The batch's options, as given on the command line."""

    task: str | None = None
    question: str | None = None
    max_new_tokens: int | None = None
    model: str | None = None
    priority: str | None = None
    strict: bool | None = None
    webhook: str | None = None

    def options(self) -> dict:
        return {"task": self.task, "question": self.question, "max_new_tokens": self.max_new_tokens,
                "model": self.model, "priority": self.priority, "strict": self.strict or None,
                "webhook": {"url": self.webhook} if self.webhook else None}


@dataclass
class State:
    """What a run leaves for the next one (<out>.batch.json)."""

    source: str = ""
    ask: dict = field(default_factory=dict)
    batch_id: str | None = None
    uploads: dict[str, dict] = field(default_factory=dict)  # a folder's file -> {ref, sha256, expires_at}

    @classmethod
    def load(cls, path: Path) -> State:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return cls()

    def save(self, path: Path) -> None:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(asdict(self)))
        partial.replace(path)


def add_arguments(command) -> None:
    """The arguments of `visionq batch`."""
    command.add_argument("target", help="a folder of images, a JSONL manifest, s3://bucket/key.jsonl or "
                         "s3://bucket/prefix/; or one of: " + ", ".join(ACTIONS))
    command.add_argument("id", nargs="?", help="the batch (after status, results, errors, cancel or retry)")
    command.add_argument("--task", choices=["describe", "ocr", "compare"],
                         help="every item's task (needed for a folder or a prefix)")
    command.add_argument("--question")
    command.add_argument("--max-new-tokens", type=int)
    command.add_argument("--model", help="one of the server's models (default: its default model)")
    command.add_argument("--priority", choices=["high", "normal", "low"], help="default: low")
    command.add_argument("--strict", action="store_true", help="refuse the whole batch if a line is refused")
    command.add_argument("--webhook", help="URL to POST the batch's end to (signed)")
    command.add_argument("--out", help="the results file (JSONL; default batch-results.jsonl, or stdout for "
                         "`results`); refused lines go to <out>.errors.jsonl")
    command.add_argument("--no-wait", action="store_true", help="create the batch and print its id")


def run(client: Client, args) -> int:
    """`visionq batch ...`; the exit code (0 when every item succeeded and no line was refused)."""
    if args.target in ACTIONS:
        if not args.id:
            print(f"error: `visionq batch {args.target}` needs the batch's id", file=sys.stderr)
            return 2
        return run_action(client, args.target, args.id, Path(args.out) if args.out else None)
    if not args.target.startswith("s3://") and not Path(args.target).expanduser().exists():
        print(f"error: {args.target} is neither a folder, a file nor an s3:// URI", file=sys.stderr)
        return 2
    if Path(args.target).is_dir() and not any(image_files(Path(args.target))):  # a batch of nothing would fail
        print(f"error: no images in {args.target} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, in subfolders too)",
              file=sys.stderr)
        return 1
    ask = Ask(args.task, args.question, args.max_new_tokens, args.model, args.priority, args.strict, args.webhook)
    return run_source(client, args.target, ask, Path(args.out or "batch-results.jsonl"), wait=not args.no_wait)


def run_action(client: Client, action: str, batch_id: str, out: Path | None) -> int:
    if action in ("results", "errors"):
        if out is not None:
            print(f"{client.save_batch_file(batch_id, action, out)} lines written to {out}")
        else:
            for line in (client.batch_results if action == "results" else client.batch_errors)(batch_id):
                print(json.dumps(line))
        return 0
    call = {"status": client.batch, "cancel": client.cancel_batch, "retry": client.retry_batch}[action]
    print(json.dumps(call(batch_id), indent=2))
    return 0


def run_source(client: Client, source: str, ask: Ask, out: Path, wait: bool = True) -> int:
    """Create (or find again) the batch of `source`, follow it, write its results."""
    state_path = out.with_name(out.name + ".batch.json")
    state = State.load(state_path)
    if state.source != source or state.ask != asdict(ask):
        state = State(source=source, ask=asdict(ask))
    batch = resumed(client, state)
    if batch is not None:
        print(f"resuming batch {batch['id']}, made by an earlier run of this command (its state: {state_path})",
              flush=True)
    else:
        body, key = prepare(client, source, ask, state, state_path)
        batch = client.create_batch(**body, **ask.options(), idempotency_key=key)
        state.batch_id, state.uploads = batch["id"], {}
        state.save(state_path)
    print(f"batch {batch['id']}: {batch['status']}", flush=True)
    if not wait:
        return 0
    try:
        batch = follow(client, batch)
    except KeyboardInterrupt:
        print(f"\nstopped following: batch {batch['id']} goes on in the server; run the same command again to "
              "resume", flush=True)
        return 130
    return write_outputs(client, batch, out)


def resumed(client: Client, state: State) -> dict | None:
    """The batch an earlier run of the same command made, if it still exists."""
    if not state.batch_id:
        return None
    try:
        return client.batch(state.batch_id)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def prepare(client: Client, source: str, ask: Ask, state: State, state_path: Path) -> tuple[dict, str]:
    """The batch's input as POST /v1/batches takes it (uploading local files), and its Idempotency-Key."""
    if source.startswith("s3://"):
        manifest = source.lower().endswith((".jsonl", ".ndjson"))
        return ({"input_file": source} if manifest else {"images": source}), idempotency_key(source, ask)
    path = Path(source).expanduser()
    if path.is_dir():
        return folder_input(client, path, ask, state, state_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"input_file": client.upload_jsonl(path)["ref"]}, idempotency_key(f"manifest:{digest}", ask)


def idempotency_key(identity: str, ask: Ask) -> str:
    digest = hashlib.sha256(json.dumps([identity, asdict(ask)], sort_keys=True).encode()).hexdigest()
    return f"batch-{digest}"


def image_files(folder: Path):
    return (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_input(client: Client, folder: Path, ask: Ask, state: State, state_path: Path) -> tuple[dict, str]:
    """Upload the folder's images (those not uploaded by an earlier run), then its lines: inline when few, else
    as a JSONL upload. custom_id: each file's path within the folder."""
    files = sorted(image_files(folder))
    names = [p.relative_to(folder).as_posix() for p in files]
    todo = [(name, path) for name, path in zip(names, files, strict=True) if not usable(state.uploads.get(name))]
    others = sum(1 for p in folder.rglob("*") if p.is_file()) - len(files)
    print(f"{len(files)} images in {folder} ({len(files) - len(todo)} already uploaded by an earlier run); "
          f"{others} other files skipped (not images: {', '.join(sorted(IMAGE_SUFFIXES))})", flush=True)
    with tqdm(total=len(files), initial=len(files) - len(todo), unit="image", desc="uploading") as bar:
        for group in upload_groups(todo):
            contents = [path.read_bytes() for _, path in group]
            for (name, _), data, upload in zip(group, contents, client.upload(contents), strict=True):
                state.uploads[name] = {"ref": upload["ref"], "sha256": hashlib.sha256(data).hexdigest(),
                                       "expires_at": upload["expires_at"]}
            state.save(state_path)
            bar.update(len(group))
    lines = [{"custom_id": name, "images": [state.uploads[name]["ref"]]} for name in names]
    key = idempotency_key(json.dumps([[name, state.uploads[name]["sha256"]] for name in names]), ask)
    if len(lines) <= INLINE_MAX:
        return {"requests": lines}, key
    jsonl = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return {"input_file": client.upload_jsonl(jsonl)["ref"]}, key


def upload_groups(files: list[tuple[str, Path]]) -> list[list[tuple[str, Path]]]:
    """The files in groups of one upload request each: at most UPLOADS_PER_REQUEST, and UPLOAD_BYTES together
    (the server's body bound) unless a file alone is larger."""
    groups: list[list[tuple[str, Path]]] = []
    size = 0
    for name, path in files:
        file_size = path.stat().st_size
        if not groups or len(groups[-1]) == UPLOADS_PER_REQUEST or size + file_size > UPLOAD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, path))
        size += file_size
    return groups


def usable(upload: dict | None) -> bool:
    """Whether an earlier run's upload will outlive the batch's admission of it (roughly)."""
    if not upload:
        return False
    return datetime.fromisoformat(upload["expires_at"]).timestamp() - time.time() > UPLOAD_MARGIN_S


def follow(client: Client, batch: dict) -> dict:
    """Poll the batch until it has ended, with a progress bar of its items' ends."""
    with tqdm(total=None, unit="item", desc=batch["id"]) as bar:
        def progress(current: dict) -> None:
            counts = current["counts"]
            bar.total = counts["items"] if current.get("input_done") else None
            bar.n = counts["succeeded"] + counts["failed"] + counts["canceled"]
            bar.set_postfix(status=current["status"], queued=counts["queued"], running=counts["running"],
                            failed=counts["failed"], refused=counts["refused"], refresh=False)
            bar.refresh()
        return client.wait_batch(batch["id"], timeout_s=float("inf"), poll_s=POLL_S, progress=progress) \
            if not batch_ended(batch) else batch


def write_outputs(client: Client, batch: dict, out: Path) -> int:
    """The results file (and the errors file when a line was refused); the exit code."""
    counts = batch["counts"]
    lines = client.save_batch_file(batch["id"], "results", out)
    errors = out.with_name(out.stem + ".errors.jsonl")
    if counts["refused"]:
        client.save_batch_file(batch["id"], "errors", errors)
    print(f"batch {batch['id']} {batch['status']}: {counts['succeeded']} succeeded, {counts['failed']} failed, "
          f"{counts['canceled']} canceled, {counts['refused']} lines refused; {lines} results in {out}"
          + (f", refused lines in {errors}" if counts["refused"] else ""), flush=True)
    if "error" in batch:
        print(f"the batch failed: {batch['error']['code']}: {batch['error']['message']}", flush=True)
    clean = batch["status"] == "completed" and counts["succeeded"] == counts["items"] and not counts["refused"]
    return 0 if clean else 1
