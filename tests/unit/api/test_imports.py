"""The API process never imports torch, transformers or the worker."""

import subprocess
import sys


def test_api_app_imports_no_torch_and_no_worker():
    code = (
        "import sys; from api import create_app; from shared.config import Settings; "
        "create_app(Settings()); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'worker'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
