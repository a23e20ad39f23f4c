"""The package's shape, checked: sub-packages, no module over 800 lines, no import cycle (imports inside functions
count), no private name imported across modules, no history narrated in the product."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "goldstick"
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every goldstick import, at any depth of the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "goldstick"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "goldstick":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            if submodules:  # `from goldstick.quant import recipe`: an import of the submodule
                found += [(m, [], node.lineno) for m in submodules]
                names = [n for n in names if f"{module}.{n}" not in modules]
            if names:
                found.append((module, names, node.lineno))
    return found


def test_sub_packages_and_module_sizes():
    modules = _modules()
    packages = [p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    assert len(packages) >= 4, packages
    too_long = {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in modules.items()}
    too_long = {n: k for n, k in too_long.items() if k > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_no_import_cycles_counting_imports_inside_functions():
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for module, _, _ in _imports(name, path, modules):
            target = module
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # a package's __init__ is imported on the way to its submodules; only edges to real code count
            if target and target != name and not (modules[target].name == "__init__.py"
                                                  and modules[target].stat().st_size < 400):
                graph[name].add(target)
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_imported_across_modules():
    modules = _modules()
    private = []
    files = list(modules.items()) + [(f"tests.{p.stem}", p) for p in (ROOT / "tests").glob("*.py")] + \
        [(f"benchmarks.{p.stem}", p) for p in (ROOT / "benchmarks").glob("*.py")]
    for name, path in files:
        for module, names, line in _imports(name, path, modules):
            private += [f"{path.relative_to(ROOT)}:{line}: {module}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


HISTORY = re.compile(r"\b(session|issue)[ -]?\d+\b", re.IGNORECASE)


def test_no_history_in_docs_code_or_tests():
    paths = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".toml", ".ipynb")
             and not {".venv", ".git", "node_modules"} & set(p.relative_to(ROOT).parts)]
    hits = []
    for path in paths:
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "history belongs in git log:\n" + "\n".join(hits)


LAYERS = ["errors", "model", "quant", "io", "testing", "engine", "evaluation", "serve", "cli"]
SIBLINGS = {frozenset({"evaluation", "serve"})}  # side by side: neither imports the other


def test_sub_packages_import_only_to_their_left():
    """README's layering: model ← quant ← io ← testing ← engine ← evaluation / serve ← cli."""
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        src = name.split(".")[1] if name.count(".") else "__init__"
        if src == "__init__":
            continue  # the public API's lazy table names everything
        for module, _, line in _imports(name, path, modules):
            dst = module.split(".")[1] if module.count(".") else "__init__"
            if dst == src or dst == "__init__":
                continue
            if frozenset({src, dst}) in SIBLINGS or LAYERS.index(dst) > LAYERS.index(src):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {module}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)
