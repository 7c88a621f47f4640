"""The import graph, computed from the source: no cycles between modules or between packages
(imports under TYPE_CHECKING and inside functions count), and nothing below the public API
imports the benchmark zoo. A compression run on a user's own model and data never loads it."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import allot

SOURCE = Path(allot.__file__).parent
# The public surface and what sits beside it may use the zoo (lazily); the engine below may not.
ABOVE_THE_ENGINE = ("allot", "allot.api", "allot.io", "allot.source", "allot.cli")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SOURCE.rglob("*.py"):
        parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every allot module each module imports, wherever the import statement stands."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
                graph[name] |= {t if t in modules else node.module for t in targets}
            elif isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names}
        graph[name] = {t for t in graph[name] if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_finds_a_cycle_when_there_is_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_back() -> None:
    assert _cycle(_imports(_modules())) is None


def test_no_package_imports_itself_back() -> None:
    graph = _imports(_modules())
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module == "allot":
            continue
        source = _package(module)
        packages.setdefault(source, set())
        packages[source] |= {_package(t) for t in targets if _package(t) not in (source, "allot")}
    assert _cycle(packages) is None


def test_nothing_below_the_api_imports_the_zoo() -> None:
    graph = _imports(_modules())
    engine = [m for m in graph if m not in ABOVE_THE_ENGINE and _package(m) != "allot.zoo"]
    offenders = {m: sorted(t for t in graph[m] if _package(t) == "allot.zoo") for m in engine}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_a_users_model_and_dataloader_compress_without_loading_the_zoo() -> None:
    """A model the project never saw, its data as a DataLoader and a custom loss, through
    `allot.compress`; the zoo is not even imported."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
        import allot

        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv1d(2, 6, 3), nn.GELU(), nn.Flatten(), nn.Linear(6 * 10, 3))
        x = torch.randn(48, 2, 12)
        y = torch.randn(48, 3)
        loader = DataLoader(TensorDataset(x, y), batch_size=16)

        def loss(outputs, batch):
            return torch.nn.functional.smooth_l1_loss(outputs, batch[1])

        data = allot.Data(loader, loss)
        result = allot.compress(
            model, data, "output-error-quant", allot.Budget("ratio", 6), progress=False
        )
        assert result.plan.ratio >= 6, result.plan.ratio
        assert "allot.zoo" not in sys.modules, sorted(m for m in sys.modules if "zoo" in m)
        print("ok", round(result.plan.ratio, 2))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")
