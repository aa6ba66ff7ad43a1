"""Which workers `visionq workers` starts: GPU lists, names, pinning and metrics ports (the processes themselves are
exercised in tests/integration/test_scale_out.py)."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from cli.supervisor import Supervisor, cpu_workers, gpu_workers, visible_gpus
from shared.config import Settings


def no_gpus() -> int:
    return 0


def test_explicit_gpus_are_taken_as_given():
    assert visible_gpus("0,1", None, no_gpus) == ["0", "1"]
    assert visible_gpus(" 3 , 1", "0", no_gpus) == ["3", "1"]


@pytest.mark.parametrize("bad", ["", ",", "0,0"])
def test_malformed_gpu_lists_are_refused(bad):
    with pytest.raises(ValueError):
        visible_gpus(bad, None, no_gpus)


def test_all_means_the_visible_devices_else_every_detected_gpu():
    assert visible_gpus("all", "2,3", no_gpus) == ["2", "3"]
    assert visible_gpus("all", None, lambda: 3) == ["0", "1", "2"]
    assert visible_gpus("all", "", lambda: 2) == ["0", "1"]


def test_all_without_a_gpu_points_at_cpu_workers():
    with pytest.raises(ValueError, match="--cpu-workers"):
        visible_gpus("all", None, no_gpus)


def test_each_gpu_worker_sees_only_its_gpu_and_is_named_after_it():
    specs = gpu_workers(["0", "3"], Settings(metrics_port=9400), host="box")
    assert [spec.name for spec in specs] == ["gpu0@box", "gpu3@box"]
    assert [spec.env["CUDA_VISIBLE_DEVICES"] for spec in specs] == ["0", "3"]
    assert [spec.env["VISIONQ_METRICS_PORT"] for spec in specs] == ["9400", "9401"]


def test_cpu_workers_see_no_gpu_and_serve_no_metrics_unless_asked():
    specs = cpu_workers(2, Settings(), host="box")
    assert [spec.name for spec in specs] == ["cpu0@box", "cpu1@box"]
    assert all(spec.env == {"CUDA_VISIBLE_DEVICES": ""} for spec in specs)


def stand_in(code: str):
    """A worker command line that runs this Python code instead of a worker (to provoke exits)."""
    return lambda _settings, _name: [sys.executable, "-c", code]


def test_a_worker_that_keeps_dying_at_once_is_restarted_with_backoff_then_given_up(tmp_path):
    supervisor = Supervisor(Settings(), cpu_workers(1, Settings(), host="box"), log_dir=tmp_path,
                            command=stand_in("import sys; sys.exit(3)"), backoff_s=0.01, max_quick_exits=2,
                            poll_s=0.01).start()
    assert supervisor.run() == 1  # nothing left to supervise
    (child,) = supervisor.children.values()
    assert child.given_up and child.restarts == 2 and child.quick_exits == 3


def test_a_worker_that_dies_after_running_a_while_is_restarted_at_once(tmp_path):
    supervisor = Supervisor(Settings(), cpu_workers(1, Settings(), host="box"), log_dir=tmp_path,
                            command=stand_in("import time; time.sleep(60)"), min_uptime_s=0.0).start()
    (child,) = supervisor.children.values()
    first = child.process.pid
    os.kill(first, signal.SIGKILL)
    child.process.wait()
    supervisor.check()
    assert child.process is not None and child.process.pid != first and child.restarts == 1
    supervisor.stop(timeout_s=10)
    assert child.process is None


def test_visionq_workers_on_a_host_without_gpus_says_to_use_cpu_workers(monkeypatch, capsys):
    from cli.main import main

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["workers", "--gpus", "all"]) == 2
    assert "--cpu-workers" in capsys.readouterr().err
