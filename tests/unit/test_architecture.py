"""The package's shape: no import cycles (function-local imports included), one home for the task table,
and runtime code that never imports the tools (test models, docs generation, demo)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "lorafit"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module → lorafit modules it imports anywhere (module level or inside functions)."""
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != mod and name.startswith("lorafit") and name != "lorafit":
                    graph[mod].add(name)
    return graph


def test_no_import_cycles():
    graph = _imports()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles


def test_the_graph_sees_function_local_imports():
    graph = _imports()
    assert "lorafit.pipeline" in graph["lorafit.cli"]  # imported inside the train command


def test_runtime_code_never_imports_the_tools():
    offenders = {m: deps for m, deps in _imports().items()
                 if not m.startswith("lorafit.tools") and any(d.startswith("lorafit.tools") for d in deps)}
    assert not offenders


# Modules outside lorafit/cli.py and lorafit/commands/ that still import a command: moving (their owner removes
# each entry once the import is gone).
COMMAND_IMPORTS_MOVING: set[str] = set()


def test_only_the_cli_and_the_commands_import_commands():
    """A command is the CLI's thin wrapper: what a server, an exporter or a stage needs of it lives in core/ or
    stages/ (load_for_inference in core.models, the classifier's forward pass in stages.predict)."""
    offenders = {m: sorted(d for d in deps if d.startswith("lorafit.commands")) for m, deps in _imports().items()
                 if m != "lorafit.cli" and not m.startswith("lorafit.commands") and m not in COMMAND_IMPORTS_MOVING
                 and any(d.startswith("lorafit.commands") for d in deps)}
    assert not offenders, f"modules importing a command (move what they need into core/ or stages/): {offenders}"


def test_the_task_table_is_the_only_place_naming_task_classes():
    pattern = re.compile(r"AutoModelFor\w+|AutoPeftModelFor\w+|\b(CAUSAL_LM|SEQ_CLS|TOKEN_CLS|SEQ_2_SEQ_LM)\b")
    found = {}
    for path in PKG.rglob("*.py"):
        hits = sorted({m.group(0) for m in pattern.finditer(path.read_text(encoding="utf-8"))})
        if hits:
            found[str(path.relative_to(PKG))] = hits
    assert list(found) == ["core/tasks.py"], found


# Files of the commands that landed beside this rule (serve, export, sweep) still comparing task names, with how
# many: their owners move each question into core/tasks.py. A count may only go down.
TASK_NAMES_NOT_YET_MOVED: dict[str, int] = {}


def test_the_task_table_is_the_only_place_naming_tasks():
    """Every task question (its formats, head, whether it generates, packs, labels words ...) is asked of core/tasks.py:
    no `task == "seq_cls"`, no `task in ("seq_cls", "token_cls")`, no default "causal_lm" anywhere else."""
    from lorafit.core.tasks import TASKS

    names = "|".join(TASKS)
    quoted = re.compile(rf"""(['"])({names})\1""")
    found = {}
    for path in PKG.rglob("*.py"):
        rel = str(path.relative_to(PKG))
        hits = quoted.findall(path.read_text(encoding="utf-8"))
        if rel != "core/tasks.py" and len(hits) > TASK_NAMES_NOT_YET_MOVED.get(rel, 0):
            found[rel] = sorted({name for _, name in hits})
    assert not found, f"task names outside core/tasks.py (ask the task table instead): {found}"


def _layout_paths() -> set[str]:
    """The paths README's Layout names: `name/` opens a folder, `name.py` a module, nested by indentation."""
    readme = (PKG.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    entry = re.compile(r"^( *)(\S+?(?:/|\.py))(?:\s|$)")
    paths, stack = set(), []  # stack: (indent, folder)
    for line in block.splitlines():
        m = entry.match(line)
        if not m:
            continue  # a description's second line
        indent, name = len(m[1]), m[2]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "/".join([f for _, f in stack] + [name.rstrip("/")])
        paths.add(path)
        if name.endswith("/"):
            stack.append((indent, name.rstrip("/")))
    return paths


def test_readme_layout_names_every_module():
    """README's Layout names every module, each on a line of its own (a package by its folder)."""
    named = _layout_paths()
    modules = {str(p.relative_to(PKG.parent).parent if p.name == "__init__.py" else p.relative_to(PKG.parent))
               for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(modules - named)
    assert not missing, f"README's Layout does not name: {missing}"
    gone = sorted(p for p in named if p.startswith("lorafit") and p.endswith(".py") and p not in modules)
    assert not gone, f"README's Layout names modules that do not exist: {gone}"
