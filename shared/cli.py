"""The `visionq` command: run the parts (up, api, worker, demo), talk to the API (submit, get), build models."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shared.config import get_settings


def cmd_up(args) -> int:
    from shared.launcher import Stack

    with Stack(get_settings()) as stack:
        print(f"visionq is up: API {stack.api_url}, Redis {stack.redis_url}, logs in {stack.log_dir}. Ctrl-C stops.")
        try:
            for process in stack.processes.values():
                process.wait()
        except KeyboardInterrupt:
            print("stopping")
    return 0


def cmd_api(args) -> int:
    from shared.launcher import api_command

    command = api_command(get_settings(), args.port)
    os.execv(command[0], command)


def cmd_worker(args) -> int:
    from shared.launcher import default_worker_name, worker_command

    command = worker_command(get_settings(), args.name or default_worker_name())
    os.execv(command[0], command)


def cmd_demo(args) -> int:
    from shared.demo import run_demo

    return run_demo(get_settings(), max_new_tokens=args.max_new_tokens)


def cmd_submit(args) -> int:
    from shared.client import Client, image_arg_to_ref

    client = Client(args.url)
    job = client.submit(args.task, [image_arg_to_ref(a) for a in args.images], args.question, args.max_new_tokens)
    if args.wait:
        job = client.wait(job["id"], timeout_s=args.timeout)
    print(json.dumps(job, indent=2))
    return 0 if job["status"] in ("queued", "running", "succeeded") else 1


def cmd_get(args) -> int:
    from shared.client import Client

    print(json.dumps(Client(args.url).get(args.id, wait_s=args.wait), indent=2))
    return 0


def cmd_tiny_model(args) -> int:
    from worker.tiny_model import build_tiny_model

    print(build_tiny_model(Path(args.path), seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="embedded Redis (unless VISIONQ_REDIS_URL), API and one worker").set_defaults(
        func=cmd_up)
    api = sub.add_parser("api", help="serve the API with gunicorn")
    api.add_argument("--port", type=int, default=None)
    api.set_defaults(func=cmd_api)
    worker = sub.add_parser("worker", help="one solo Celery worker (one per GPU)")
    worker.add_argument("--name", help="Celery node name, e.g. gpu0@%%h")
    worker.set_defaults(func=cmd_worker)
    demo = sub.add_parser("demo", help="run describe, OCR and compare jobs on a tiny local model")
    demo.add_argument("--max-new-tokens", type=int, default=32)
    demo.set_defaults(func=cmd_demo)
    add_client_commands(sub)
    tiny = sub.add_parser("tiny-model", help="build a tiny random-weight vision-language model")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny_model)
    return parser


def add_client_commands(sub) -> None:
    default_url = f"http://{get_settings().api_host}:{get_settings().api_port}"
    submit = sub.add_parser("submit", help="submit a job (local files are sent inline)")
    submit.add_argument("images", nargs="+")
    submit.add_argument("--task", required=True)
    submit.add_argument("--question")
    submit.add_argument("--max-new-tokens", type=int)
    submit.add_argument("--wait", action="store_true", help="wait for the job to end")
    submit.add_argument("--timeout", type=float, default=600.0)
    submit.add_argument("--url", default=default_url)
    submit.set_defaults(func=cmd_submit)
    get = sub.add_parser("get", help="show a job")
    get.add_argument("id")
    get.add_argument("--wait", type=float, default=0, help="seconds to wait for the job to end (at most 60)")
    get.add_argument("--url", default=default_url)
    get.set_defaults(func=cmd_get)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # the client's errors are shown plainly, without a traceback
        from shared.client import ApiError

        if isinstance(exc, ApiError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
