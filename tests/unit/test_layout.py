"""The layout's rules, checked: the job model loads no client library, the API loads no model code, shared/
imports neither the command line nor the worker, and no two modules import each other round a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.paths import REPO

PACKAGES = ("api", "cli", "shared", "worker")


def loaded_after(statement: str) -> set[str]:
    """The top-level packages a fresh interpreter has loaded after running `statement`."""
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_the_job_model_loads_no_redis_http_client_or_celery():
    assert not loaded_after("import shared.jobs") & {"httpx", "httpcore", "redis", "celery", "kombu", "torch"}


def test_the_api_loads_no_torch_no_worker_and_no_celery():
    loaded = loaded_after("from api import create_app; from shared.config import Settings; create_app(Settings())")
    assert not loaded & {"torch", "transformers", "worker", "cli", "celery", "kombu"}


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """Every project module and the project modules it imports, at any depth of its code (lazy imports too)."""
    modules = {module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def test_shared_imports_neither_the_command_line_nor_the_worker():
    wrong = {(module, target) for module, targets in project_imports().items() if module.startswith("shared")
             for target in targets if target.split(".")[0] in ("cli", "worker", "api")}
    assert not wrong


def test_the_api_and_the_worker_do_not_import_each_other_or_the_command_line():
    graph = project_imports()
    for side, others in (("api", ("worker", "cli")), ("worker", ("api", "cli"))):
        wrong = {(module, target) for module, targets in graph.items() if module.split(".")[0] == side
                 for target in targets if target.split(".")[0] in others}
        assert not wrong, side


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules round it, or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph[module]):
            # A package importing its own submodule is not a cycle in the sense that matters here.
            if target.startswith(module + "."):
                continue
            if state.get(target) == "open":
                return path[path.index(target):] + [target] if target in path else [module, target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(project_imports()) is None


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_the_cycle_check_finds_a_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_the_docker_image_copies_every_package():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert all(f"COPY {package} ./{package}" in dockerfile for package in PACKAGES)
