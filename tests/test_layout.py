"""The pack's layout rules, read from the source with ``ast`` (nothing is imported):

- no import cycle among the pack's modules, counting imports inside functions;
- ``pipeline/`` imports nothing of ComfyUI, and ``pipeline/fal/`` nothing of ``pipeline/local/``
  (the remote path needs no diffusers);
- no source file in ``pipeline/`` or ``nodes/`` over 500 lines;
- relative imports only for the pack's own modules (inside ComfyUI, ``nodes`` is ComfyUI's own module).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "nodes")
MAX_LINES = 500
COMFY_MODULES = {"comfy", "comfy_extras", "folder_paths", "server", "execution", "nodes", "latent_preview", "comfy_api"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files() -> list[Path]:
    files = [ROOT / "__init__.py"]
    for pkg in PACKAGES:
        files += sorted((ROOT / pkg).rglob("*.py"))
    return files


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, absolute) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path).split(".") if module_name(path) else []
    package = here if is_package(path) else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno, True) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append((node.module, node.lineno, True))
                continue
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                out.append((target, node.lineno, False))
            else:  # from . import a, b: each name may be a module
                out += [(".".join(base + [alias.name]), node.lineno, False) for alias in node.names]
    return out


def graph() -> dict[str, set[str]]:
    files = source_files()
    modules = {module_name(f) for f in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for f in files:
        for target, _line, absolute in imports_of(f):
            if absolute:
                continue
            # "pipeline.local.models.loading" or a name imported from a package ("pipeline.local" + "loading")
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module_name(f):
                edges[module_name(f)].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            # a package's __init__ importing its own modules is how packages work, not a cycle
            if state.get(n) == 1 and not m.startswith(n + "."):
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_imports_inside_functions():
    edges = graph()
    # loading.py imports model_hooks inside a function; that edge must be counted
    assert "pipeline.local.request_models.locate" in edges["pipeline.local.models.loading"]
    assert "pipeline.fal.client" in edges["nodes.fal_node"]


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = graph()
    edges["pipeline.local.memory.devices"] = edges["pipeline.local.memory.devices"] | {"pipeline.local.models.loading"}
    assert find_cycle(edges) is not None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_file_over_500_lines():
    long = {str(f.relative_to(ROOT)): n for f in source_files()
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_pipeline_imports_nothing_of_comfyui_and_fal_nothing_of_local():
    bad = []
    for f in (ROOT / "pipeline").rglob("*.py"):
        mod = module_name(f)
        for target, line, absolute in imports_of(f):
            top = target.split(".")[0]
            if absolute and top in COMFY_MODULES:
                bad.append(f"{mod}:{line} imports {target}")
            if mod.startswith("pipeline.fal") and target.startswith("pipeline.local"):
                bad.append(f"{mod}:{line} imports {target}")
            if not absolute and target.startswith("nodes"):
                bad.append(f"{mod}:{line} imports {target}")
    assert not bad, bad


def test_pack_modules_are_imported_relatively():
    own = {"pipeline", "nodes", "sdxl_controlnet_img2img"}
    bad = [f"{module_name(f)}:{line} imports {target}" for f in source_files()
           for target, line, absolute in imports_of(f) if absolute and target.split(".")[0] in own]
    assert not bad, bad


def test_layout_has_the_three_parts():
    for d in ("pipeline", "pipeline/local", "pipeline/fal"):
        assert (ROOT / d / "__init__.py").is_file(), d
    shared = {p.stem for p in (ROOT / "pipeline").glob("*.py")}
    assert {"request", "sizes", "images", "canny", "result", "errors", "request_log", "cli"} <= shared
