"""The command line as a newcomer meets it, run as real processes: `visionq up --tiny` stopped by SIGTERM leaves
nothing behind; errors are one line and a hint, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cli.embedded_redis import free_port


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISIONQ_")}
    return {**env, "VISIONQ_API_WORKERS": "1", "VISIONQ_API_THREADS": "4", "OMP_NUM_THREADS": "1", **extra}


def visionq(*args: str, cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=cwd, env=clean_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def descendants(pid: int) -> set[int]:
    """Every process below pid, from /proc (children of children included)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit():
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_for_line(process: subprocess.Popen, text: str, timeout_s: float) -> list[str]:
    deadline, lines = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line or process.poll() is None, f"up exited: {''.join(lines)}"
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"never printed {text!r}: {''.join(lines)}")


def start_up(tmp_path: Path) -> tuple[subprocess.Popen, list[str], int, int]:
    port, redis_port = free_port(), free_port()
    up = subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--tiny", "--port", str(port),
                           "--redis-port", str(redis_port)], cwd=tmp_path, env=clean_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        return up, wait_for_line(up, "local API key", timeout_s=180), port, redis_port
    except BaseException:
        end(up)
        raise


def end(up: subprocess.Popen) -> None:
    """After a failed check: stop up the way that stops its children too (SIGKILL would orphan them)."""
    if up.poll() is None:
        up.terminate()
        up.communicate(timeout=60)


def stop_up(up: subprocess.Popen, port: int, redis_port: int, sig: int = signal.SIGTERM) -> None:
    """Send the signal and check that up, every process below it and both ports are gone."""
    children = descendants(up.pid)
    assert len(children) >= 5 and port_open(port) and port_open(redis_port)  # Redis, API, 3 workers
    up.send_signal(sig)
    rest = up.communicate(timeout=60)[0]
    assert up.returncode == 0 and "Traceback" not in rest, rest
    assert [pid for pid in children if alive(pid)] == []
    assert not port_open(port) and not port_open(redis_port)


def test_up_writes_its_state_for_the_client_commands_and_sigterm_stops_every_child(tmp_path):
    up, lines, port, redis_port = start_up(tmp_path)
    try:
        assert any("random weights" in line for line in lines)
        state = json.loads((tmp_path / ".visionq" / "local.json").read_text())
        assert state["api_url"] == f"http://127.0.0.1:{port}" and str(redis_port) in state["redis_url"]
        assert (tmp_path / ".visionq" / "local.json").stat().st_mode & 0o077 == 0  # it holds a key
        # No flag, no variable: the client commands find the local stack through the state file.
        assert visionq("jobs", cwd=tmp_path).returncode == 0
        assert visionq("webhooks", "secret", cwd=tmp_path).stdout.startswith("whsec_")
        assert [json.loads(line)["name"] for line in visionq("keys", "list", cwd=tmp_path).stdout.splitlines()] == [
            "local"]
        stop_up(up, port, redis_port)
    finally:
        end(up)
    again, _, port, redis_port = start_up(tmp_path)  # SIGHUP this time; the same key is reused
    try:
        assert json.loads((tmp_path / ".visionq" / "local.json").read_text())["key"] == state["key"]
        assert len(visionq("keys", "list", cwd=tmp_path).stdout.splitlines()) == 1  # no second "local" key
        stop_up(again, port, redis_port, signal.SIGHUP)
    finally:
        end(again)


def test_client_errors_are_one_line_and_a_hint(tmp_path):
    nobody = f"http://127.0.0.1:{free_port()}"
    down = visionq("get", "some-job", "--url", nobody, cwd=tmp_path)
    assert down.returncode == 3 and "Traceback" not in down.stderr
    assert down.stderr.splitlines()[0] == f"error: cannot reach the API at {nobody}"
    assert "visionq up" in down.stderr
    keys = visionq("keys", "list", cwd=tmp_path, VISIONQ_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert keys.returncode == 3 and "Traceback" not in keys.stderr and "cannot reach Redis" in keys.stderr
    missing = visionq("submit", "--task", "ocr", "nosuch.png", "--url", nobody, cwd=tmp_path)
    assert missing.returncode == 1 and "no such file: nosuch.png" in missing.stderr
    assert "VISIONQ_IMAGE_ROOT" in missing.stderr and "Traceback" not in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = visionq("webhooks", "listen", "--port", str(taken.getsockname()[1]), cwd=tmp_path)
    assert busy.returncode == 1 and "Traceback" not in busy.stderr and "pick another --port" in busy.stderr
    debug = visionq("--debug", "get", "some-job", "--url", nobody, cwd=tmp_path)
    assert "Traceback" in debug.stderr
    bad = visionq("keys", "list", cwd=tmp_path, VISIONQ_MAX_BATCH="abc", VISIONQ_GEMV_MAX_ROWS="99")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.splitlines()[:2] == [
        "error: VISIONQ_MAX_BATCH='abc': Input should be a valid integer, unable to parse string as an integer",
        "error: VISIONQ_GEMV_MAX_ROWS='99': Input should be less than or equal to 16"]
    clash = visionq("keys", "list", cwd=tmp_path, VISIONQ_KV_CACHE_DTYPE="fp8", VISIONQ_KV_BLOCKS="false")
    assert clash.returncode == 1 and "Traceback" not in clash.stderr, clash.stderr
    assert clash.stderr.splitlines()[0] == \
        "error: kv_cache_dtype fp8 needs kv_blocks (the block kernels read and write fp8)"


def test_up_with_a_model_it_cannot_load_says_so_before_starting(tmp_path):
    done = visionq("up", "--model", "no-such-org/no-such-model", "--port", str(free_port()), cwd=tmp_path,
                   HF_HUB_OFFLINE="1")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "model no-such-org/no-such-model cannot be loaded" in done.stderr and "visionq up --tiny" in done.stderr
    assert not (tmp_path / ".visionq" / "redis").exists()  # nothing was started


def test_visionq_jobs_lists_by_status_and_webhooks_secret_shows_the_secret(stack, tmp_path):
    from cli.client import Client

    client = Client(stack.api_url, key=stack.api_key, timeout_s=30)
    done = client.wait(client.submit("describe", ["bar_chart.png"], max_new_tokens=2)["id"], 60)
    server = ("--url", stack.api_url, "--key", stack.api_key)
    listed = visionq("jobs", "--status", "succeeded", *server, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert done["id"] in listed.stdout and all("succeeded" in line for line in listed.stdout.splitlines()
                                               if not line.startswith("(more"))
    assert done["id"] not in visionq("jobs", "--status", "failed", *server, cwd=tmp_path).stdout
    secret = visionq("webhooks", "secret", *server, cwd=tmp_path)
    assert secret.returncode == 0 and secret.stdout.strip() == client.webhook_secret()
    refused = visionq("jobs", "--url", stack.api_url, "--key", "vq_wrong", cwd=tmp_path)
    assert refused.returncode == 1 and "401 unauthorized" in refused.stderr and "Traceback" not in refused.stderr


def test_visionq_jobs_says_so_when_a_key_has_no_jobs(stack, make_client, tmp_path):
    fresh = make_client()
    listed = visionq("jobs", "--url", stack.api_url, "--key", fresh.secret, cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout == "" and "no jobs for this key" in listed.stderr
    canceled = visionq("jobs", "--status", "canceled", "--url", stack.api_url, "--key", fresh.secret, cwd=tmp_path)
    assert "no canceled jobs for this key" in canceled.stderr


def test_ctrl_c_while_a_batch_is_followed_is_a_clean_stop_and_the_same_command_resumes_it(stack, tmp_path):
    from tests.conftest import PARKED_MODEL

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "one.png").write_bytes((Path(stack.settings.image_root) / "bar_chart.png").read_bytes())
    command = [sys.executable, "-m", "cli.main", "batch", "photos", "--task", "describe", "--model", PARKED_MODEL,
               "--out", "results.jsonl", "--url", stack.api_url, "--key", stack.api_key]
    follower = subprocess.Popen(command, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        first = wait_for_line(follower, "batch ", timeout_s=60)[-1]  # created; followed forever (no worker)
        time.sleep(1.5)  # a poll or two into the progress bar
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=30)
    finally:
        end(follower)
    assert follower.returncode == 130 and "Traceback" not in err, err
    assert "run the same command again to resume" in out
    batch_id = first.split()[1].rstrip(":")
    again = subprocess.Popen(command, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert f"resuming batch {batch_id}," in wait_for_line(again, "resuming batch", timeout_s=60)[-1]  # not twice
        again.send_signal(signal.SIGINT)
        again.communicate(timeout=30)
    finally:
        end(again)
    visionq("batch", "cancel", batch_id, "--url", stack.api_url, "--key", stack.api_key, cwd=tmp_path)


def test_a_batch_of_a_folder_without_images_is_refused_before_anything_is_made(stack, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    refused = visionq("batch", "empty", "--url", stack.api_url, "--key", stack.api_key, cwd=tmp_path)
    assert refused.returncode == 1 and "error: no images in empty" in refused.stderr, refused.stderr
    assert not (tmp_path / "batch-results.jsonl.batch.json").exists()  # no batch was started
