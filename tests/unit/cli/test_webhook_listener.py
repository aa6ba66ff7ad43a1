"""`visionq webhooks listen`: a real process that receives, verifies and prints events."""

from __future__ import annotations

import subprocess
import sys

import requests

from cli.embedded_redis import free_port
from shared.webhooks.events import new_secret, payload, signed_headers


def test_listen_verifies_and_prints_events_and_refuses_bad_signatures():
    secret, port = new_secret(), free_port()
    command = [sys.executable, "-m", "cli.main", "webhooks", "listen", "--port", str(port), "--secret", secret]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "listening for webhooks" in process.stdout.readline()
        body = payload({"id": "j1", "status": "succeeded", "finished_at": "2026-01-01T00:00:00Z"})
        url = f"http://127.0.0.1:{port}/"
        good = requests.post(url, data=body, headers=signed_headers(secret, "msg_j1", body), timeout=5)
        bad = requests.post(url, data=body, headers=signed_headers(new_secret(), "msg_j2", body), timeout=5)
        assert (good.status_code, bad.status_code) == (204, 401)
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0]
    assert "--- msg_j1 (verified)" in output and '"type": "job.succeeded"' in output
    assert "--- msg_j2 (SIGNATURE DOES NOT VERIFY)" in output
