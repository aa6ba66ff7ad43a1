"""compose.yaml cannot run here (no Docker engine): check that it is well formed and names real entry points."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from cli.main import build_parser
from tests.paths import REPO

ROOT = REPO


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def subcommands() -> set[str]:
    parser = build_parser()
    return set(parser._subparsers._group_actions[0].choices)


def test_visionq_script_points_at_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["visionq"] == "cli.main:main"


@pytest.mark.parametrize("service", ["api", "worker", "webhooks", "batches"])
def test_each_built_service_runs_a_real_visionq_command(compose, service):
    spec = compose["services"][service]
    command = spec["command"]
    assert command[0] == "visionq" and command[1] in subcommands()
    build_parser().parse_args(command[1:])  # the arguments parse too
    targets = re.findall(r"^FROM \S+ AS (\S+)$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert spec["build"]["target"] in targets
    assert spec["environment"]["VISIONQ_REDIS_URL"] == "redis://redis:6379/0"


def test_worker_scales_with_one_gpu_per_replica_and_caches_models(compose):
    worker = compose["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == "all"
    args = build_parser().parse_args(worker["command"][1:])
    lock_dir = args.one_gpu_per_replica  # every replica sees every GPU and locks one of them
    assert args.gpus == "all" and any(volume.startswith("gpu-locks:") and volume.endswith(":" + lock_dir)
                                      for volume in worker["volumes"])
    # Nothing that two replicas could not share: a fixed container name or a host port.
    assert "container_name" not in worker and "ports" not in worker
    assert any(volume.startswith("hf-cache:") for volume in worker["volumes"])
    assert worker["environment"]["HF_HOME"] in worker["volumes"][0]


def test_redis_keeps_an_append_only_file_on_a_volume(compose):
    redis = compose["services"]["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert set(compose["volumes"]) == {"redis-data", "hf-cache", "gpu-locks"}


def test_webhook_deliveries_run_on_the_image_without_torch_and_reserve_no_gpu(compose):
    webhooks = compose["services"]["webhooks"]
    assert webhooks["build"]["target"] == "api" and "deploy" not in webhooks
    assert webhooks["command"][1:] == ["webhooks", "worker"]


def test_processes_come_back_after_they_exit(compose):
    for name in ("api", "webhooks", "worker"):
        assert compose["services"][name]["restart"] == "unless-stopped", name
