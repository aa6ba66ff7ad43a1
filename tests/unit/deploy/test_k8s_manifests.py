"""deploy/k8s cannot run here (no cluster): check that the manifests parse, run real visionq commands, reserve a
GPU each, and that KEDA watches the queue the API actually routes the default model's jobs to."""

from __future__ import annotations

import re

import pytest
import yaml

from api.metrics import StoreCollector
from cli.main import build_parser
from shared.config import DEFAULT_MODEL, Settings
from shared.routing import queue_for
from tests.paths import REPO

K8S = REPO / "deploy" / "k8s"


def load(name: str) -> dict:
    (document,) = list(yaml.safe_load_all((K8S / name).read_text()))
    return document


@pytest.fixture(scope="module")
def deployment() -> dict:
    return load("worker.yaml")


@pytest.fixture(scope="module")
def worker_container(deployment) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_every_manifest_parses_and_has_a_kind():
    documents = [doc for path in K8S.glob("*.yaml") for doc in yaml.safe_load_all(path.read_text())]
    assert len(documents) == 2 and all(doc["apiVersion"] and doc["kind"] for doc in documents)


def test_worker_pod_runs_the_supervisor_on_its_one_gpu(deployment, worker_container):
    command = worker_container["command"]
    assert command[:2] == ["visionq", "workers"]
    args = build_parser().parse_args(command[1:])
    assert args.gpus == "all" and args.func.__name__ == "cmd_workers"
    assert worker_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_worker_pod_gets_its_settings_and_time_to_finish_a_job(deployment, worker_container):
    env = {item["name"]: item for item in worker_container["env"]}
    assert env["VISIONQ_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"
    assert env["VISIONQ_MODEL"]["value"] == DEFAULT_MODEL
    port = int(env["VISIONQ_METRICS_PORT"]["value"])
    assert {p["containerPort"] for p in worker_container["ports"]} == {port}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= Settings().job_timeout_s  # SIGTERM lets the job finish


def test_keda_scales_the_worker_deployment_on_its_models_whole_backlog_from_zero(deployment):
    scaled = load("keda-scaledobject.yaml")
    assert scaled["kind"] == "ScaledObject" and scaled["apiVersion"].startswith("keda.sh/")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    match = re.fullmatch(r'max\((\w+)\{model="([^"]+)"\}\)', trigger["metadata"]["query"])
    assert match is not None, trigger["metadata"]["query"]
    metric, model = match.groups()
    assert model == DEFAULT_MODEL
    # The metric it names is the API's, labelled by model, and counts every queued job, not only the list's.
    (family,) = StoreCollector._queues({queue_for(Settings(), model): 5}, [model])
    assert family.name == metric and family.samples[0].labels["model"] == model
    assert "waiting" in family.documentation
    assert int(trigger["metadata"]["threshold"]) > 0 and int(trigger["metadata"]["activationThreshold"]) == 0
    assert 0 == scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
