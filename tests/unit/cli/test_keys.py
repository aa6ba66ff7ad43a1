"""`visionq keys create --admin`: the key is stored marked admin (the web console's view of every key)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from shared.config import Settings
from shared.store.api_keys import KeyStore
from shared.store.connection import connect


def test_keys_create_admin_stores_the_flag_with_the_key(redis_server, tmp_path):
    env = {**os.environ, "VISIONQ_REDIS_URL": redis_server.url}
    visionq = Path(sys.executable).parent / "visionq"
    made = subprocess.run([str(visionq), "keys", "create", "--name", "ops", "--admin"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=60)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.split()[-1]
    plain = subprocess.run([str(visionq), "keys", "create", "--name", "user"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=60)
    keys = KeyStore(connect(Settings(redis_url=redis_server.url)))
    assert keys.lookup(secret).admin is True
    assert keys.lookup(plain.stdout.split()[-1]).admin is False
