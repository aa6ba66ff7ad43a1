"""What the kernel tests share: a report run in Triton's interpreter on the CPU, and the measure of a kernel that
rounds as the code it replaces (outputs equal but for rare one-unit differences in the order of an fp32 sum)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def report_in_interpreter(module: str, function: str, *args: str) -> dict:
    """`module.function(*args)`'s JSON-able report, computed with TRITON_INTERPRET=1 in a child process (the
    variable is read when Triton is first imported, which this process may have done)."""
    code = f"import json; from {module} import {function}; print(json.dumps({function}(*{list(args)!r})))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def rounding(got: torch.Tensor, expected: torch.Tensor) -> list[float]:
    """[fraction of elements that differ, largest difference in units of the dtype's eps, relative above 1]."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    diff = (got.double() - expected.double()).abs()
    scale = expected.double().abs().clamp_min(1.0) * torch.finfo(expected.dtype).eps
    return [float((got != expected).float().mean()), float((diff / scale).max())]


def check_rounding(report: dict[str, list[float]], cases: int, max_differ: float) -> None:
    assert len(report) == cases
    for name, (differ, units) in report.items():
        assert differ <= max_differ and units <= 1.0, f"{name}: {differ:.2%} of elements differ, up to {units:.2f} eps"
