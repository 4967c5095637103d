"""The shape of the package: imports point down with no cycle (lazy imports included), the
kernels sit apart, importing has no side effects, no private names cross modules, files stay
short, no hardware timings in code, the README stays short, and docs/config.md is current."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SUBPROCESS_ENV, load_docs_module

PACKAGE = REPO / "nb_finetune"
# Layers, lowest first: a module may import its own layer's modules or lower ones, never higher.
LAYERS = [
    {"errors", "redact", "distributed", "hardware", "quiet", "assets", "config", "config_rules", "render", "commands"},
    {"kernels"},
    {"data", "modeling"},
    {"training", "memory", "evaluation", "export"},
    {"probes", "runs"},
    {"pipeline", "sweep"},
    {"ui", "magics", "cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(name: str, path: Path, known: dict) -> set[str]:
    """The package's modules that `name` imports anywhere in its file, functions included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next((i for i, layer in enumerate(LAYERS) if top in layer), -1)


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_lazy_import_cycle(tmp_path):
    """The check itself, on a package whose two modules import each other, one inside a function."""
    pkg = tmp_path / "nb_finetune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    known = {"nb_finetune": pkg / "__init__.py", "nb_finetune.a": pkg / "a.py", "nb_finetune.b": pkg / "b.py"}
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert cycles(graph) == [["nb_finetune.a", "nb_finetune.b"]]


def test_imports_point_down_the_layers():
    upward = [(m, t) for m, targets in import_graph().items() for t in targets
              if m != "nb_finetune" and layer_of(t) > layer_of(m)]
    assert upward == []
    assert all(layer_of(m) >= 0 for m in modules() if m != "nb_finetune"), "every module has a layer"


def test_data_config_and_panels_never_import_the_kernels():
    graph = import_graph()
    kept_apart = [m for m in graph if m.split(".")[1:2] in (["data"], ["config"], ["ui"])]
    assert kept_apart
    assert [m for m in kept_apart if any(t.startswith("nb_finetune.kernels") for t in graph[m])] == []


@pytest.mark.slow  # a fresh interpreter importing every module and the whole stack
def test_importing_leaves_the_process_unchanged():
    """Every module of the package, imported after the libraries it uses (which may set their
    own state), leaves os.environ, the level of every logger there was before (those the
    package quiets for its work included), transformers' verbosity and progress bars, and
    warnings.filters as it found them."""
    code = (
        "import importlib, json, logging, os, pkgutil, sys, warnings\n"
        "import torch, transformers, peft, ipywidgets, IPython\n"
        "quieted = ['bitsandbytes', 'mlflow.store.db.utils']  # loggers nb_finetune.quiet raises for its work\n"
        "def state():\n"
        "    loggers = logging.root.manager.loggerDict\n"
        "    names = list(before['levels']) if 'before' in globals() else list(loggers) + quieted\n"
        "    return {'env': dict(os.environ), 'filters': [repr(f) for f in warnings.filters],\n"
        "            'levels': {n: logging.getLogger(n).level for n in names},\n"
        "            'transformers': [transformers.logging.get_verbosity(),\n"
        "                             transformers.logging.is_progress_bar_enabled()]}\n"
        "before = state()\n"
        "import nb_finetune\n"
        "names = [m.name for m in pkgutil.walk_packages(nb_finetune.__path__, 'nb_finetune.')\n"
        "         if not m.name.endswith('__main__')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "nb_finetune.Session\n"
        "after = state()\n"
        "changed = {k: sorted(n for n in before[k].keys() | after[k].keys() if before[k].get(n) != after[k].get(n))\n"
        "           for k in ('env', 'levels')}\n"
        "changed |= {k: after[k] for k in ('filters', 'transformers') if before[k] != after[k]}\n"
        "print(json.dumps({'modules': len(names), 'changed': {k: v for k, v in changed.items() if v}}))\n")
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["modules"] > 40
    assert found["changed"] == {}


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(path: Path) -> list[str]:
    """`from x import _name` and `alias._name`, where x or alias is one of the package's modules."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    aliases, found = set(), []
    for node in ast.walk(tree):
        ours = isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("nb_finetune"))
        if ours:
            found += [f"{name}: from {'.' * node.level}{node.module or ''} import {a.name}"
                      for a in node.names if private(a.name)]
            aliases |= {a.asname or a.name for a in node.names if not private(a.name)}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name.startswith("nb_finetune")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and private(node.attr):
            found.append(f"{name}: {node.value.id}.{node.attr}")
    return found


def test_no_private_name_is_used_across_modules():
    assert [use for path in modules().values() for use in private_uses(path)] == []


def test_no_file_is_over_450_lines():
    files = [*PACKAGE.rglob("*.py"), *(REPO / "tests").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


TIMINGS = re.compile(r"EPYC|Zen ?[0-9]|Xeon|H200|A100|[0-9.]+ ?ms\b|GFLOP|TFLOP|[0-9.]+ ?tokens/s|[0-9]+ minutes")


def test_no_hardware_timings_in_the_code():
    """Measurements belong in benchmark output (benchmarks/results/), not in the package."""
    files = [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.yaml")]
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
             for i, line in enumerate(p.read_text().splitlines(), 1) if TIMINGS.search(line)]
    assert found == []


def test_the_timing_check_finds_a_timing():
    assert TIMINGS.search("# 19 ms against 6 ms on a 2-core AMD EPYC")
    assert TIMINGS.search("# About 7 minutes in fp32 on a 2-core CPU")
    assert not TIMINGS.search("REDRAW_SECONDS = 1.0  # at most one plot per second")


def test_tests_mirror_the_package():
    """Each folder of tests/ is named after a package of nb_finetune, but for the integration tier
    (whole runs, notebooks, the browser), whose tests conftest marks `integration`."""
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    folders = {p.name for p in (REPO / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert "integration" in folders and folders - {"integration"} <= packages
    assert {"kernels", "data", "training", "evaluation", "probes", "ui"} <= folders


def test_the_readme_is_short_and_has_the_three_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text) <= 20_000
    for command in ('pip install torch==2.13.0 -e ".[test]"', "nb-finetune demo", "python -m pytest"):
        assert command in text
    for page in ("docs/config.md", "docs/speed.md", "docs/bias-probes.md", "docs/distributed.md",
                 "docs/colab-binder.md"):
        assert page in text and (REPO / page).is_file()
    assert "docs/images/studio.png" in text and (REPO / "docs/images/studio.png").is_file()


def test_ci_runs_the_readme_test_command_after_the_linter():
    ci = (REPO / ".ci" / "run").read_text()
    assert "ruff check" in ci and "python -m pytest" in ci
    assert ci.index("ruff check") < ci.index("python -m pytest")


def test_the_config_reference_is_current():
    import dataclasses

    from nb_finetune.config import RunConfig
    text = load_docs_module("config_reference").reference()
    assert (REPO / "docs" / "config.md").read_text(encoding="utf-8") == text + "\n", \
        "docs/config.md is stale: run python docs/config_reference.py"
    cfg = RunConfig()
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert f"`{f.name}`" in text


def test_the_integration_tier_holds_its_folder_and_the_browser_tests(request):
    """Every test in tests/integration is marked `integration` (a whole job elsewhere may be
    marked too), and every test with JupyterLab and the browser (the `lab` fixture) is in the
    folder. Judged on the tests this session collected."""
    tier = REPO / "tests" / "integration"
    for item in request.session.items:
        inside = item.path.is_relative_to(tier)
        assert not inside or item.get_closest_marker("integration") is not None, item.nodeid
        assert inside or "lab" not in item.fixturenames, item.nodeid
