"""The package's shape holds: imports point down the layers of docs/architecture.md, no module
takes another's private names, no cycles; ``import clip_heads`` and ``clip-heads --help`` load
neither torch nor scikit-learn, and the lazy package still hands out the documented functions."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "clip_heads"
# The modules whose shape part A of issue 9 settled; part B extends the checks to every module.
CHECKED = {"clip_heads", "ablation", "backbone", "backbones", "calibration", "catalog", "compare", "crossval", "demo",
           "encode", "engines", "evaluate", "finetune", "finetune_config", "finetune_cv", "finetune_eval", "identity",
           "kinds", "label_maps", "loading", "metrics", "paper", "plots", "predict", "prompts", "ray_engine",
           "report_folder", "reproduce", "results", "retrieval", "runner", "scoring", "sharding", "tables", "wise_ft",
           "zeroshot"}


def layers() -> dict[str, int]:
    """``{module: layer}`` from the table in docs/architecture.md."""
    out = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        m = re.fullmatch(r"\| (\d) [\w -]+ \| ([\w, ]+) \|", line.strip())
        if m:
            out.update({name.strip(): int(m.group(1)) for name in m.group(2).split(",")})
    return out


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def room(module: str) -> str:
    """The name the layer table uses: ``clip_heads.heads.mlp`` -> ``heads``, the package -> ``clip_heads``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def declared_all(path: Path) -> set[str] | None:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                return set(ast.literal_eval(node.value))
            except ValueError:
                return None  # built at run time (the package's own __all__)
    return None


def imports(mods: dict[str, Path]) -> list[tuple[str, str, str | None, int]]:
    """Every import of a package module by a package module, at any depth of the file:
    ``(importer, imported module, imported name or None, line)``."""
    out = []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out += [(mod, a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "clip_heads"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "clip_heads":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    out.append((mod, sub, None, node.lineno) if sub in mods else (mod, target, a.name, node.lineno))
    return out


def test_the_layer_table_covers_the_checked_modules():
    table = layers()
    assert CHECKED <= set(table), sorted(CHECKED - set(table))
    assert set(table) <= {room(m) for m in modules()}, "docs/architecture.md names modules that do not exist"


def test_checked_modules_import_down_the_layers_and_no_private_names():
    table, mods = layers(), modules()
    problems = []
    for importer, target, name, line in imports(mods):
        if room(importer) not in CHECKED or target == importer:
            continue
        where = f"{mods[importer].relative_to(ROOT)}:{line}"
        if room(target) not in table:
            problems.append(f"{where} imports {target}, which has no layer in docs/architecture.md")
        elif table[room(target)] > table[room(importer)]:
            problems.append(f"{where}: {importer} (layer {table[room(importer)]}) imports {target} "
                            f"(layer {table[room(target)]}), a layer above it")
        if name is None or name.startswith("__"):
            continue
        public = declared_all(mods[target])
        if name.startswith("_") or (public is not None and name not in public):
            problems.append(f"{where}: {importer} imports {name} from {target}, not in its public interface")
    assert problems == []


def test_no_import_cycle_runs_through_a_checked_module():
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for importer, target, _, _ in imports(mods):
        if target in mods and target != importer:
            graph[importer].add(target)
    # Tarjan's strongly connected components; a component of two or more modules is a cycle.
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            comps.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    cycles = [sorted(c) for c in comps if len(c) > 1 and any(room(m) in CHECKED for m in c)]
    assert cycles == []


def _python(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


HEAVY = "sorted(m for m in ('torch', 'sklearn', 'transformers', 'h5py', 'matplotlib') if m in sys.modules)"


def test_import_clip_heads_loads_neither_torch_nor_sklearn():
    assert _python(f"import sys, clip_heads; print({HEAVY})").strip() == "[]"


def test_help_loads_neither_torch_nor_sklearn():
    out = _python(
        "import sys\n"
        "from clip_heads.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "try:\n    main(['train-head', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        f"print('HEAVY', {HEAVY})\n")
    assert "train-head" in out and "linear" in out and out.strip().splitlines()[-1] == "HEAVY []"


def test_the_lazy_package_hands_out_the_documented_functions():
    out = _python(
        "import sys, importlib\n"
        "import clip_heads.encode, clip_heads.finetune, clip_heads.reproduce  # the modules first\n"
        "import clip_heads as ch\n"
        "from clip_heads.encode import encode\n"
        "for name in ('encode', 'finetune', 'reproduce'):\n"
        "    assert getattr(ch, name) is getattr(sys.modules['clip_heads.' + name], name), name\n"
        "    assert callable(getattr(ch, name))\n"
        "assert ch.encode is encode\n"
        "missing = [n for n in ch.__all__ if not hasattr(ch, n)]\n"
        "assert not missing, missing\n"
        "assert set(ch.__all__) <= set(dir(ch))\n"
        "print(ch.Report.__module__, ch.cross_validate_finetune.__module__, ch.FinetuneConfig.__module__)\n")
    assert out.split() == ["clip_heads.results", "clip_heads.finetune_cv", "clip_heads.finetune_config"]
    import clip_heads

    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        clip_heads.nothing_here  # noqa: B018


def test_the_catalog_names_every_head():
    import importlib

    from clip_heads.catalog import HEAD_CLASSES, list_heads
    from clip_heads.heads import HEADS

    assert list_heads() == list(HEADS)
    for name, where in HEAD_CLASSES.items():
        module, cls = where.split(":")
        assert getattr(importlib.import_module(module), cls) is HEADS[name]


def test_readme_links_the_architecture():
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
