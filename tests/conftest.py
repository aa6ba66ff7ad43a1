"""Session fixtures that start real servers once: an embedded Redis, the tiny model, a worker and the API."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from cli.embedded_redis import EmbeddedRedis, free_port
from cli.samples import write_samples
from cli.stack import Stack
from shared.config import Settings
from shared.store.connection import connect
from shared.store.jobs import JobStore

# A suite started in the background (`./run test &`, nohup) inherits SIGINT ignored, and so would every process
# it starts (an ignored signal stays ignored across exec): the Ctrl-C tests would then see a `visionq` that cannot
# be interrupted. A handler is reset at exec, so with one here each child Python installs its KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    from cli.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_samples(root)
    (root / "not_an_image.png").write_text("this is text, not a PNG")
    return root


RESULTS_BUCKET = "visionq-results"  # the stack's worker archives every succeeded job there
# boto3's standard credential chain reads these; moto accepts any. Set for this process and the stack's children.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server() -> str:
    """An S3-compatible server (moto in server mode) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    os.environ.update(S3_ENV)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=RESULTS_BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def settings(redis_server, tiny_model_path, image_root, s3_server, tmp_path_factory) -> Settings:
    from tests.http_server import NETWORK

    # Image URLs and webhooks: http, and the test HTTP server's own loopback address (tests/http_server.py), are
    # allowed.
    return Settings(redis_url=redis_server.url, model=str(tiny_model_path), image_root=image_root,
                    data_dir=tmp_path_factory.mktemp("data"), queue="visionq-test", allow_http=True,
                    url_allowed_networks=[NETWORK], webhook_allow_http=True, webhook_allowed_networks=[NETWORK],
                    s3_endpoint_url=s3_server,
                    results_s3_uri=f"s3://{RESULTS_BUCKET}/runs")


PARKED_MODEL = "parked-model"


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process the same settings."""
    return {
        "VISIONQ_REDIS_URL": settings.redis_url,
        "VISIONQ_MODEL": settings.model,
        "VISIONQ_IMAGE_ROOT": str(settings.image_root),
        "VISIONQ_DATA_DIR": str(settings.data_dir),
        "VISIONQ_QUEUE": settings.queue,
        "VISIONQ_API_WORKERS": "1",
        "VISIONQ_API_THREADS": "8",
        "VISIONQ_KEY_CACHE_S": "0",  # a revoked key stops working at once
        "VISIONQ_MODELS": PARKED_MODEL,  # accepted, served by no worker: its jobs stay queued
        "VISIONQ_ALLOW_HTTP": str(settings.allow_http).lower(),
        "VISIONQ_URL_ALLOWED_NETWORKS": json.dumps(settings.url_allowed_networks),
        "VISIONQ_WEBHOOK_ALLOW_HTTP": str(settings.webhook_allow_http).lower(),
        "VISIONQ_WEBHOOK_ALLOWED_NETWORKS": json.dumps(settings.webhook_allowed_networks),
        "VISIONQ_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "VISIONQ_RESULTS_S3_URI": settings.results_s3_uri,
        **S3_ENV,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


@pytest.fixture(scope="session")
def stack(settings, tmp_path_factory):
    """The API (gunicorn) and one GPU worker on the tiny model, against the session's Redis. Its webhook
    deliveries are sent by the delivery worker of tests/integration/test_webhooks.py (which lets them reach
    receivers on 127.0.0.1), so it starts none of its own."""
    with Stack(settings, env=settings_env(settings), api_port=free_port(),
               log_dir=tmp_path_factory.mktemp("logs"), webhooks=False) as running:
        yield running


@pytest.fixture(scope="session")
def api_url(stack) -> str:
    return stack.api_url


@pytest.fixture(scope="session")
def auth(stack) -> dict[str, str]:
    """The Authorization header of the key the stack created."""
    return {"Authorization": f"Bearer {stack.api_key}"}


@pytest.fixture(scope="session")
def client(stack):
    from cli.client import Client

    return Client(stack.api_url, key=stack.api_key, timeout_s=30)


@pytest.fixture
def store(settings) -> JobStore:
    return JobStore.from_settings(connect(settings), settings)


@pytest.fixture
def make_client(stack, settings):
    """A client with a fresh API key of its own (limits may be given)."""
    from cli.client import Client
    from shared.store.api_keys import KeyStore

    def make(**limits) -> Client:
        secret, key = KeyStore(connect(settings)).create("test", **limits)
        client = Client(stack.api_url, key=secret, timeout_s=30)
        client.key_id, client.secret = key.id, secret
        return client

    return make


@pytest.fixture(scope="session")
def http_server():
    """A real HTTP server on 127.0.0.5 (tests/http_server.py) that tests register routes on."""
    from tests.http_server import LocalHttpServer

    with LocalHttpServer() as server:
        yield server
