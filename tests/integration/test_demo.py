"""`visionq demo`, the README's main job, as a user runs it: a fresh folder, nothing configured."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_the_demo_runs_every_task_through_the_api(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISIONQ_")}
    done = subprocess.run([sys.executable, "-m", "cli.main", "demo"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for task in ("describe", "ocr", "compare"):
        assert f"== {task} job" in done.stdout and "succeeded" in done.stdout
    assert done.stdout.count(": succeeded") == 3
    assert "random weights" in done.stdout  # a newcomer is told why the text is gibberish
    texts = [line for line in done.stdout.splitlines() if line.startswith("text (")]
    assert len(texts) == 3 and not any("\\u" in line or "\\n" in line for line in texts)  # no escapes
    state = json.loads((tmp_path / ".visionq" / "local.json").read_text())  # the one local key, for `up` to reuse
    assert f"local API key: {state['key']} " in done.stdout and "api_url" not in state  # the demo's API is gone
