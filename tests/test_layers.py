"""The package's shape, read from its source: every module sits in one layer, imports only from its own
layer or below, and no imports go round in a circle; modules and functions stay short.

The layer order is written once, here (docs/architecture.md explains it). A new module must be given a
layer below, so that where it belongs is decided, not drifted into.
"""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llama"

# low -> high: a module may import from its own layer and from every layer before it
LAYERS: List[List[str]] = [
    # leaves: nothing of ours below them
    ["llama.args", "llama.validation", "llama.distributed", "llama.registry", "llama.atomic", "llama.memory",
     "llama.demo", "llama.cli", "llama.parallel_layers"],
    # the model and what it reads and writes
    ["llama.model", "llama.kv_cache", "llama.tokenizer"],
    # what is built on tokens and logits alone
    ["llama.chat_format", "llama.sampling", "llama.structured"],
    # how the model is run on this device: dtype and kernel policy, probes, compiled graphs
    ["llama.runtime"],
    # what is stored: sharding rules, quantized formats and modules, checkpoints, conversion, the loader
    ["llama.weights"],
    # requests -> steps: scheduler, runner, speculative decoding
    ["llama.engine"],
    # the Llama facade
    ["llama.generation"],
    # what users run: the server, evaluation, the interactive chat, the commands' shared start-up
    ["llama.serve", "llama.eval", "llama.chat", "llama.launch", "llama.train"],
    # the package's public names
    ["llama"],
]

# modules longer than MAX_MODULE_LINES that are one idea read top to bottom (docs/architecture.md says why)
LONG_MODULES: Dict[str, str] = {}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> Optional[int]:
    """The layer of the longest prefix of `name` the table names (llama.engine.runner -> llama.engine)."""
    best, where = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name == prefix or (prefix != "llama" and name.startswith(prefix + "."))
            if inside and len(prefix) > best:
                best, where = len(prefix), i
    return where


def imported(name: str, path: Path, known: Set[str]) -> Set[str]:
    """Our modules that `name` imports anywhere in its file (in functions and TYPE_CHECKING blocks too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # `from llama import distributed` imports the module llama.distributed
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # llama.engine.Request -> llama.engine
                t = t.rpartition(".")[0]
            if t and t != name and (t == "llama" or t.startswith("llama.")):
                out.add(t)
    return out


def import_graph() -> Dict[str, Set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    missing = [m for m in modules() if layer_of(m) is None]
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def test_no_import_from_a_higher_layer():
    upward = []
    for name, targets in import_graph().items():
        for t in sorted(targets):
            if t == "llama" and name != "llama":
                upward.append(f"{name} imports the package's __init__ (import the module that defines the name)")
            elif layer_of(t) is not None and layer_of(name) is not None and layer_of(t) > layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}) imports {t} (layer {layer_of(t)})")
    assert not upward, "imports that climb the layers:\n" + "\n".join(upward)


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of the graph as a list of its modules, or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(n: str) -> Optional[List[str]]:
        state[n] = 1
        path.append(n)
        for t in sorted(graph.get(n, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_see_what_they_check():
    """The checks above fail on a climbing import and on a cycle (so they cannot pass vacuously)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("llama.engine.runner") > layer_of("llama.model") > layer_of("llama.args")
    graph = import_graph()
    assert "llama.model" in graph["llama.generation"] or any(t.startswith("llama.") for t in graph["llama.generation"])
    assert len(graph) > 20


def _long_functions(path: Path) -> List[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            doc = node.body[0]
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                n -= doc.end_lineno - doc.lineno + 1  # a command's Args: section is its --help, not its logic
            if n > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


SOURCES = sorted([*PACKAGE.rglob("*.py"), *ROOT.glob("*.py"), *ROOT.glob("scripts/*.py"),
                  *ROOT.glob("benchmarks/*.py"), *ROOT.glob("recipes/**/*.py")])


def test_short_modules():
    long = []
    for p in SOURCES:
        n = len(p.read_text(encoding="utf-8").splitlines())
        rel = str(p.relative_to(ROOT))
        if n > MAX_MODULE_LINES and rel not in LONG_MODULES:
            long.append(f"{rel} ({n} lines)")
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them, or name them in LONG_MODULES with why): {long}"


def test_short_functions():
    long = [f for p in SOURCES for f in _long_functions(p)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
