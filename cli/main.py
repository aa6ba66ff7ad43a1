"""The `visionq` command: run the parts (up, api, worker, webhooks worker, demo), talk to the API (submit, get,
cancel, batch), manage API keys, receive webhooks locally, build tiny models."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shared.config import get_settings


class CliError(Exception):
    """A refusal by the command itself: a one-line message and a hint."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


class Stopped(Exception):
    """SIGTERM or SIGHUP arrived: stop as on Ctrl-C."""


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise Stopped, once, in the main thread, so that `up` stops every child as on Ctrl-C
    (the default action would end this process alone and orphan Redis, the API and the workers). Later ones are
    ignored so that they cannot cut the stopping short."""
    import signal

    def interrupt(signum, _frame):
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def up_model(args, settings) -> str:
    """The model `up` serves: --tiny builds the random tiny one, else --model or VISIONQ_MODEL; checked to be
    loadable (a local folder, or a Hugging Face model reachable or cached) before anything starts."""
    if args.tiny:
        from cli.tiny_model import build_tiny_model

        return str(build_tiny_model(settings.data_dir / "tiny-llava").resolve())
    model = args.model or settings.model
    if Path(model).is_dir():
        return str(Path(model).resolve())
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(model, "config.json")  # small; cached afterwards, and found in the cache offline
    except Exception as exc:  # offline, unknown model, gated: all mean the worker could not load it
        raise CliError(f"model {model} cannot be loaded ({type(exc).__name__})",
                       "point --model (or VISIONQ_MODEL) at a local model folder, or run `visionq up --tiny` "
                       "for the random tiny model (no internet needed)") from None
    return model


def cmd_up(args) -> int:
    from cli.stack import Stack

    stop_on_signals()
    settings = get_settings()
    env = {"VISIONQ_MODEL": up_model(args, settings)}
    if args.tiny:
        print("serving the tiny model: random weights, so its text is gibberish (it tests the path, not the model)")
    from cli.local_state import read_state, write_state

    reuse = read_state(settings.data_dir).get("key")
    try:
        with Stack(settings, env=env, api_port=args.port, redis_port=args.redis_port, api_key=reuse) as stack:
            stack.keep_alive()
            state = write_state(settings.data_dir, api_url=stack.api_url, redis_url=stack.redis_url,
                                key=stack.api_key)
            print(f"visionq is up: API {stack.api_url}, Redis {stack.redis_url}, a worker and a webhook delivery "
                  f"worker; logs in {stack.log_dir}. Ctrl-C stops.", flush=True)
            print(f"local API key: {stack.api_key} (kept in {state}, where the client commands find it and the "
                  f"API's address); the web console: {stack.api_url}/console", flush=True)
            stack.processes["api"].wait()  # the others are restarted when they exit
    except (KeyboardInterrupt, Stopped):
        print("stopped", flush=True)
    return 0


def cmd_api(args) -> int:
    from cli.stack import api_command

    command = api_command(get_settings(), args.port)
    os.execv(command[0], command)


def cmd_worker(args) -> int:
    from cli.stack import default_worker_name, worker_command

    command = worker_command(get_settings(), args.name or default_worker_name())
    os.execv(command[0], command)


def cmd_webhooks(args) -> int:
    if args.webhooks_command == "secret":
        print(client_of(args).webhook_secret())
        return 0
    if args.webhooks_command == "listen":
        from cli.webhook_listener import listen

        return listen(args.host, args.port, args.secret or os.environ.get("VISIONQ_WEBHOOK_SECRET"))
    from cli.stack import default_webhooks_name, webhooks_command

    command = webhooks_command(get_settings(), args.name or default_webhooks_name())
    os.execv(command[0], command)
def cmd_workers(args) -> int:
    from cli.gpu_locks import NoFreeGpu
    from cli.supervisor import Supervisor, cpu_workers, gpu_workers

    settings = get_settings()
    try:
        specs = cpu_workers(args.cpu_workers, settings) if args.cpu_workers is not None else gpu_workers(
            chosen_gpus(args), settings)
    except (ValueError, NoFreeGpu) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"starting {', '.join(spec.name for spec in specs)} for {settings.model}", flush=True)
    return Supervisor(settings, specs, log_dir=Path(args.log_dir) if args.log_dir else None).start().run()


_held_locks: list = []  # the lock files of claimed GPUs, open for the life of the process


def chosen_gpus(args) -> list[str]:
    """The GPUs --gpus names, or the one of them this replica claimed (--one-gpu-per-replica)."""
    from cli.gpu_locks import claim_gpu
    from cli.supervisor import nvidia_gpu_count, visible_gpus

    gpus = visible_gpus(args.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"), nvidia_gpu_count)
    if not args.one_gpu_per_replica:
        return gpus
    gpu, lock = claim_gpu(Path(args.one_gpu_per_replica), gpus)
    _held_locks.append(lock)
    return [gpu]


def cmd_demo(args) -> int:
    from cli.demo import run_demo

    return run_demo(get_settings(), max_new_tokens=args.max_new_tokens)


def client_of(args):
    from cli.client import Client

    return Client(args.url, key=args.key)


def cmd_submit(args) -> int:
    from cli.client import image_arg_to_ref

    client = client_of(args)
    refs = [image_arg_to_ref(a) for a in checked_images(args.images, args.server_paths)]
    webhook = {"url": args.webhook} if args.webhook else None
    job = client.submit(args.task, refs, args.question, args.max_new_tokens, idempotency_key=args.idempotency_key,
                        webhook=webhook, model=args.model, priority=args.priority,
                        start_within_s=args.start_within, num_crops=args.num_crops)
    if args.wait:
        job = client.wait(job["id"], timeout_s=args.timeout)
    print(json.dumps(job, indent=2))
    return 0 if job["status"] in ("queued", "running", "succeeded") else 1


def checked_images(images: list[str], server_paths: bool) -> list[str]:
    """The image arguments, once each plain path names a local file (unless they name the server's own)."""
    missing = [arg for arg in images if "://" not in arg and not arg.startswith("data:") and not Path(arg).is_file()]
    if missing and not server_paths:
        raise CliError(f"no such file: {missing[0]}",
                       "give a local image file, an https:// or s3:// URL, or --server-paths to name files under the "
                       "server's VISIONQ_IMAGE_ROOT")
    return images


def cmd_jobs(args) -> int:
    page = client_of(args).list(status=args.status, limit=args.limit)
    if not page["jobs"]:  # say so: an empty output reads like a hang or a wrong key
        which = f"{args.status} jobs" if args.status else "jobs"
        print(f"no {which} for this key", file=sys.stderr)
    for job in page["jobs"]:
        print(f"{job['id']}  {job['status']:<9}  {job['task']:<8}  {job.get('created_at', '')}")
    if page.get("next_cursor"):
        print(f"(more: --limit up to 100; newest {len(page['jobs'])} shown)")
    return 0


def cmd_get(args) -> int:
    job = client_of(args).get(args.id, wait_s=args.wait)
    print(json.dumps(job, indent=2))
    if job.get("queue"):  # a queued job: where it stands, in a line on stderr (stdout stays JSON)
        place = job["queue"]
        eta = f"about {place['eta_s']:g} s" if place["eta_s"] is not None else "unknown"
        print(f"queued: {place['position']} jobs ahead, eta {eta}, waiting: {place['waiting_reason']}",
              file=sys.stderr)
    return 0


def cmd_cancel(args) -> int:
    print(json.dumps(client_of(args).cancel(args.id), indent=2))
    return 0


def cmd_batch(args) -> int:
    from cli.batch import run

    return run(client_of(args), args)


def cmd_batches(args) -> int:
    from cli.stack import batches_command, default_batches_name

    command = batches_command(get_settings(), args.name or default_batches_name())
    os.execv(command[0], command)


def cmd_keys(args) -> int:
    from cli.local_state import read_state
    from shared.store.api_keys import KeyStore
    from shared.store.connection import connect

    settings = get_settings()
    if not settings.redis_url:  # the local stack's embedded Redis, if `up` ran here
        settings = settings.model_copy(update={"redis_url": read_state(settings.data_dir).get("redis_url", "")})
    keys = KeyStore(connect(settings))
    if args.keys_command == "create":
        buckets = [b.strip() for b in (args.s3_buckets or "").split(",") if b.strip()]
        secret, key = keys.create(args.name, rate_per_s=args.rate, burst=args.burst,
                                  max_active_jobs=args.max_active_jobs, s3_buckets=buckets, weight=args.weight,
                                  admin=args.admin or None)
        print(f"key id {key.id} ({key.name}); the secret below is shown once and not stored:\n{secret}")
    elif args.keys_command == "revoke":
        if not keys.revoke(args.id):
            print(f"no key with id {args.id}", file=sys.stderr)
            return 1
        print(f"revoked {args.id}")
    else:
        for key in keys.list():
            print(json.dumps(key.model_dump(mode="json")))
    return 0


def cmd_tiny_model(args) -> int:
    from cli.tiny_model import build_tiny_model, build_tiny_phi3v

    build = {"llava": build_tiny_model, "phi3v": build_tiny_phi3v}[args.arch]
    print(build(Path(args.path), seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="embedded Redis (unless VISIONQ_REDIS_URL), API and one worker")
    up.add_argument("--port", type=int, default=None, help="the API's port (default VISIONQ_API_PORT, 8000)")
    up.add_argument("--redis-port", type=int, default=None, help="the embedded Redis's port (default: a free one)")
    up.add_argument("--model", help="a local model folder or a Hugging Face id (default VISIONQ_MODEL)")
    up.add_argument("--tiny", action="store_true", help="the random tiny model: no download, no GPU")
    up.set_defaults(func=cmd_up)
    api = sub.add_parser("api", help="serve the API with gunicorn")
    api.add_argument("--port", type=int, default=None)
    api.set_defaults(func=cmd_api)
    worker = sub.add_parser("worker", help="one solo Celery worker (one per GPU)")
    worker.add_argument("--name", help="Celery node name, e.g. gpu0@%%h")
    worker.set_defaults(func=cmd_worker)
    add_workers_command(sub)
    demo = sub.add_parser("demo", help="run describe, OCR and compare jobs on a tiny local model")
    demo.add_argument("--max-new-tokens", type=int, default=32)
    demo.set_defaults(func=cmd_demo)
    add_client_commands(sub)
    add_key_commands(sub)
    add_webhook_commands(sub)
    tiny = sub.add_parser("tiny-model", help="build a tiny random-weight vision-language model")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--arch", choices=["llava", "phi3v"], default="llava",
                      help="LLaVA (CLIP + Llama) or the native Phi-3-vision port")
    tiny.set_defaults(func=cmd_tiny_model)
    return parser


def add_workers_command(sub) -> None:
    workers = sub.add_parser("workers", help="one supervised worker per GPU of this host (SIGHUP: rolling restart)")
    which = workers.add_mutually_exclusive_group(required=True)
    which.add_argument("--gpus", help="'all' or GPU indices such as 0,1: one worker per GPU, named gpu<N>@<host>")
    which.add_argument("--cpu-workers", type=int, metavar="N", help="N workers on the CPU, named cpu<i>@<host>")
    workers.add_argument("--one-gpu-per-replica", metavar="LOCK_DIR",
                         help="run one worker, on the first of the --gpus no other replica holds (a lock file per GPU "
                              "in LOCK_DIR, a folder all replicas share): for docker compose --scale")
    workers.add_argument("--log-dir", help="one log file per worker here (default: this process's output)")
    workers.set_defaults(func=cmd_workers)


def add_server_arguments(command: argparse.ArgumentParser) -> None:
    """--url and --key: a flag, else VISIONQ_URL / VISIONQ_API_KEY, else what the last `up` here wrote."""
    from cli.local_state import read_state

    settings = get_settings()
    state = read_state(settings.data_dir)
    default_url = state.get("api_url") or f"http://{settings.api_host}:{settings.api_port}"
    command.add_argument("--url", default=os.environ.get("VISIONQ_URL") or default_url,
                         help="the API (or VISIONQ_URL; default: the local stack's, else :8000)")
    command.add_argument("--key", default=os.environ.get("VISIONQ_API_KEY") or state.get("key"),
                         help="API key (or VISIONQ_API_KEY; default: the local stack's)")


def client_parser(sub, name: str, help_text: str, func) -> argparse.ArgumentParser:
    command = sub.add_parser(name, help=help_text)
    add_server_arguments(command)
    command.set_defaults(func=func)
    return command


def add_job_options(command) -> None:
    command.add_argument("--task", required=True)
    command.add_argument("--question")
    command.add_argument("--max-new-tokens", type=int)


def add_client_commands(sub) -> None:
    submit = client_parser(sub, "submit", "submit a job (local files are sent inline)", cmd_submit)
    submit.add_argument("images", nargs="+")
    add_job_options(submit)
    submit.add_argument("--idempotency-key")
    submit.add_argument("--server-paths", action="store_true",
                        help="plain paths that are not local files name files under the server's VISIONQ_IMAGE_ROOT")
    submit.add_argument("--webhook", help="URL to POST the job's end to (signed; see `visionq webhooks listen`)")
    submit.add_argument("--model", help="one of the server's models (default: its default model)")
    submit.add_argument("--priority", choices=["high", "normal", "low"], help="among this key's jobs (default normal)")
    submit.add_argument("--start-within", type=float, help="fail the job if it has not started within N seconds")
    submit.add_argument("--num-crops", type=int, help="Phi-3-vision models: crops per image, 1..16 (4 fast, 16 fine)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end")
    submit.add_argument("--timeout", type=float, default=600.0)
    jobs = client_parser(sub, "jobs", "list this key's jobs, newest first", cmd_jobs)
    jobs.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "canceled"])
    jobs.add_argument("--limit", type=int, default=20)
    get = client_parser(sub, "get", "show a job", cmd_get)
    get.add_argument("id")
    get.add_argument("--wait", type=float, default=0, help="seconds to wait for the job to end (at most 60)")
    cancel = client_parser(sub, "cancel", "cancel a queued or running job", cmd_cancel)
    cancel.add_argument("id")
    from cli.batch import add_arguments

    add_arguments(client_parser(sub, "batch", "a server-side batch of a folder of images, a JSONL manifest or "
                                "s3://...; or status|results|errors|cancel|retry ID", cmd_batch))
    batches = sub.add_parser("batches", help="the batch worker (CPU: reads batch inputs, admits their items)")
    batches.set_defaults(func=cmd_batches)
    batches_sub = batches.add_subparsers(dest="batches_command", required=True)
    batches_sub.add_parser("worker", help="the batch worker (a pool of threads; no model)").add_argument(
        "--name", help="Celery node name, e.g. batches@%%h")


def add_key_commands(sub) -> None:
    keys = sub.add_parser("keys", help="manage API keys (talks to Redis: VISIONQ_REDIS_URL)")
    keys.set_defaults(func=cmd_keys)
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make a key; prints its secret once")
    create.add_argument("--name", required=True)
    create.add_argument("--rate", type=float, help="requests per second (default: VISIONQ_RATE_PER_S)")
    create.add_argument("--burst", type=int, help="burst size (default: VISIONQ_RATE_BURST)")
    create.add_argument("--max-active-jobs", type=int, help="jobs queued or running at once")
    create.add_argument("--s3-buckets", help="comma-separated S3 buckets this key's s3:// image refs may read")
    create.add_argument("--weight", type=float, help="its share of each model's queue against other keys' "
                        "(default 1: a key of weight 2 gets twice the turns)")
    create.add_argument("--admin", action="store_true", help="the web console shows this key every key's jobs")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id")
    keys_sub.add_parser("list", help="every key (never the secrets)")


def add_webhook_commands(sub) -> None:
    webhooks = sub.add_parser("webhooks", help="the webhook delivery worker; a local receiver for development")
    webhooks.set_defaults(func=cmd_webhooks)
    hooks_sub = webhooks.add_subparsers(dest="webhooks_command", required=True)
    worker = hooks_sub.add_parser("worker", help="the delivery worker (CPU, a pool of threads; no model)")
    worker.add_argument("--name", help="Celery node name, e.g. webhooks@%%h")
    secret = hooks_sub.add_parser("secret", help="the secret that signs events sent to jobs' own webhook URLs")
    add_server_arguments(secret)
    listen = hooks_sub.add_parser("listen", help="receive, verify and print webhooks locally")
    listen.add_argument("--host", default="127.0.0.1")
    listen.add_argument("--port", type=int, default=9000)
    listen.add_argument("--secret", help="whsec_... to verify signatures (or VISIONQ_WEBHOOK_SECRET)")


EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 1, 3, 130  # 2: a usage error (argparse)


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    try:
        parser = build_parser()  # its defaults read the settings
    except ValidationError as exc:
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        return report(exc, None)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line and a hint; the traceback only with --debug
        if args.debug:
            raise
        return report(exc, args)


def report(exc: Exception, args) -> int:
    """Print what went wrong and its hint (`explain`); the exit code."""
    message, hint, code = explain(exc, args)
    print(f"error: {message}" + (f"\nhint: {hint}" if hint else ""), file=sys.stderr)
    return code


def bad_settings(exc) -> str:
    """The variables a settings object could not be built from (pydantic's ValidationError), a line each; a check
    across several settings (no one variable to name) as its own message, which names them."""
    return "\nerror: ".join(f"VISIONQ_{'_'.join(map(str, e['loc'])).upper()}={e.get('input')!r}: {e['msg']}"
                             if e["loc"] else e["msg"].removeprefix("Value error, ") for e in exc.errors())


def explain(exc: Exception, args) -> tuple[str, str | None, int]:
    """What went wrong in one line, what to do about it, and the exit code."""
    import requests
    from pydantic import ValidationError
    from redis.exceptions import ConnectionError as RedisConnectionError

    from cli.client import ApiError

    if isinstance(exc, CliError):
        return exc.message, exc.hint, EXIT_REFUSED
    if isinstance(exc, ValidationError) and exc.title == "Settings":
        return bad_settings(exc), "fix or unset these environment variables (the README's Settings lists them)", \
            EXIT_REFUSED
    if isinstance(exc, ApiError):
        hint = "check the key (--key or VISIONQ_API_KEY)" if exc.status == 401 else None
        return str(exc), hint, EXIT_REFUSED
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        url = getattr(args, "url", "the API")
        return (f"cannot reach the API at {url}", "is `visionq up` running? Point --url (or VISIONQ_URL) at it",
                EXIT_UNREACHABLE)
    if isinstance(exc, RedisConnectionError):
        return (f"cannot reach Redis: {exc}", "is `visionq up` running? Point VISIONQ_REDIS_URL at its Redis",
                EXIT_UNREACHABLE)
    if isinstance(exc, OSError):
        import errno

        hint = "another process holds that port: pick another --port" if exc.errno == errno.EADDRINUSE else None
        return str(exc), hint, EXIT_REFUSED
    return f"{type(exc).__name__}: {exc}", "run again with --debug for the traceback", EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
