"""The minimal apps bench/load.py measures visionq against, served by the same gunicorn settings.

BENCH_APP picks one: `hset_lpush` (POST writes a hash and pushes a list entry, one pipeline), `send_task`
(POST publishes a Celery task) or `redis_get` (GET reads one Redis key).
"""

from __future__ import annotations

import os
import uuid

import redis
from celery import Celery
from flask import Flask, jsonify

REDIS_URL = os.environ["BENCH_REDIS_URL"]


def create_app() -> Flask:
    app = Flask(__name__)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    kind = os.environ["BENCH_APP"]
    if kind == "hset_lpush":
        @app.post("/submit")
        def submit():
            job_id = uuid.uuid4().hex
            pipe = client.pipeline(transaction=True)
            pipe.hset(f"bench:job:{job_id}", mapping={"status": "queued", "task": "describe"})
            pipe.lpush("bench:queue", job_id)
            pipe.execute()
            return jsonify(id=job_id, status="queued"), 202
    elif kind == "send_task":
        celery = Celery("bench", broker=REDIS_URL)

        @app.post("/submit")
        def submit():
            job_id = uuid.uuid4().hex
            celery.send_task("bench.noop", args=[job_id], queue="bench-celery", task_id=job_id)
            return jsonify(id=job_id, status="queued"), 202
    else:
        client.set("bench:doc", '{"id": "x", "status": "succeeded"}')

        @app.get("/poll")
        def poll():
            return app.response_class(client.get("bench:doc"), mimetype="application/json")
    return app


app = create_app()
