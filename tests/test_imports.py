"""The import graph of llama_mlx, read from the source (lazy imports inside functions included):
no cycle, readers free of the model, tokenizer and checkpoints independent, the library free of the CLI."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llama_mlx", "llama_mlx_cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            parts = list(file.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = file
    return found


MODULES = _modules()


def _imports(name: str, file: Path) -> set[str]:
    """The project modules `name` imports; `from pkg import x` counts as pkg.x when that is a module."""
    is_package = file.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, file) for name, file in MODULES.items()}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_sees_the_project():
    assert {"llama_mlx.tokenizer", "llama_mlx.tokenizer.hf", "llama_mlx.checkpoints.gguf", "llama_mlx.config"} <= set(
        MODULES
    )
    assert "llama_mlx.gguf_file" in GRAPH["llama_mlx.checkpoints.gguf"]
    assert {"llama_mlx.tokenizer.base", "llama_mlx.tokenizer.bpe"} <= GRAPH["llama_mlx.tokenizer.hf"]
    assert "llama_mlx.tokenizer" in GRAPH["llama_mlx.loading"]


def test_no_import_cycle():
    done, path, cycles = set(), [], []

    def visit(node):
        if node in path:
            cycles.append(path[path.index(node) :] + [node])
            return
        if node in done:
            return
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(GRAPH):
        visit(node)
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)


def test_readers_and_tokenizers_import_neither_each_other_nor_the_model():
    for name, imported in GRAPH.items():
        if _within(name, "llama_mlx.checkpoints"):
            bad = {m for m in imported if _within(m, "llama_mlx.tokenizer") or _within(m, "llama_mlx.model")}
            assert not bad, f"{name} imports {sorted(bad)}"
        if _within(name, "llama_mlx.tokenizer"):
            bad = {m for m in imported if _within(m, "llama_mlx.checkpoints") or _within(m, "llama_mlx.model")}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_the_library_never_imports_the_cli():
    for name, imported in GRAPH.items():
        if _within(name, "llama_mlx"):
            bad = {m for m in imported if _within(m, "llama_mlx_cli")}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_the_neutral_modules_import_neither_side():
    for name in ("llama_mlx.gguf_file", "llama_mlx.tokenizer_source", "llama_mlx.config"):
        assert GRAPH[name] <= {"llama_mlx.errors"}, f"{name} imports {sorted(GRAPH[name])}"
