"""The package's shape holds: every module has a layer in docs/architecture.md and imports point
down the layers, no module takes another's private names, no import cycles; ``import clip_heads``
and ``clip-heads --help`` load neither torch nor scikit-learn, and the lazy package still hands
out the documented functions."""
from __future__ import annotations

import ast
import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "clip_heads"


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


def test_the_layer_table_covers_every_module():
    table = layers()
    rooms = {room(m) for m in modules()}
    assert rooms <= set(table), f"modules without a layer in docs/architecture.md: {sorted(rooms - set(table))}"
    assert set(table) <= rooms, f"docs/architecture.md names modules that do not exist: {sorted(set(table) - rooms)}"


def test_imports_point_down_the_layers_and_take_no_private_names():
    table, mods = layers(), modules()
    problems = []
    for importer, target, name, line in imports(mods):
        if target == importer:
            continue
        where = f"{mods[importer].relative_to(ROOT)}:{line}"
        if table[room(target)] > table[room(importer)]:
            problems.append(f"{where}: {importer} (layer {table[room(importer)]}) imports {target} "
                            f"(layer {table[room(target)]}), a layer above it")
        if name is None or name.startswith("__"):
            continue
        public = declared_all(mods[target])
        if name.startswith("_") or (public is not None and name not in public):
            problems.append(f"{where}: {importer} imports {name} from {target}, not in its public interface")
    assert problems == []


def module_aliases(tree: ast.AST, mod: str, is_pkg: bool, mods: dict[str, Path]) -> dict[str, str]:
    """Names a module binds to package modules (``import clip_heads.x as m``, ``from . import x``)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in mods and a.name != "clip_heads":
                    out[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = mod.split(".") if is_pkg else mod.split(".")[:-1]
            target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            for a in node.names:
                if f"{target}.{a.name}" in mods:
                    out[a.asname or a.name] = f"{target}.{a.name}"
    return out


def test_no_module_reads_another_modules_private_attributes():
    mods = modules()
    problems = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        aliases = module_aliases(tree, mod, path.name == "__init__.py", mods)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != mod):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {mod} uses {aliases[node.value.id]}.{node.attr}")
    assert problems == []


def test_no_import_cycle():
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
    assert [sorted(c) for c in comps if len(c) > 1] == []


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



def test_a_head_is_registered_in_the_catalog_alone(monkeypatch, tmp_path):
    """HEADS, get_head and loading a saved folder all resolve names through catalog.HEAD_CLASSES."""
    import numpy as np

    from clip_heads import catalog
    from clip_heads.heads import Head, LinearHead, UnknownHeadError, get_head, make_head

    with pytest.raises(UnknownHeadError, match="unknown head 'probe'"):
        get_head("probe")
    monkeypatch.setitem(catalog.HEAD_CLASSES, "probe", "clip_heads.heads.linear:LinearHead")
    assert get_head("probe") is LinearHead and make_head("probe", {"Cs": [1.0]}).Cs == [1.0]
    head = LinearHead(Cs=[1.0]).fit(np.eye(4, dtype=np.float32).repeat(3, 0), np.arange(4).repeat(3))
    head.set_backbone("m", "sha256:0")
    head.save_pretrained(tmp_path / "h")
    cfg = (tmp_path / "h" / "config.json").read_text().replace('"head": "linear"', '"head": "probe"')
    (tmp_path / "h" / "config.json").write_text(cfg)
    assert type(Head.from_pretrained(tmp_path / "h")) is LinearHead


def test_the_version_has_one_home():
    import clip_heads
    from clip_heads import version

    assert clip_heads.__version__ is version.__version__
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"] == "attr: clip_heads.version.__version__"
    written = [p.relative_to(ROOT) for p in PKG.rglob("*.py")
               if re.search(r"^__version__\s*=", p.read_text(), re.M)]
    assert written == [Path("clip_heads/version.py")]


def test_no_test_module_sets_torch_threads_at_import():
    """The suite runs at the machine's thread count; a test that needs one thread uses a fixture
    that sets and restores it (test_plateau checks determinism at 1 and 2 threads)."""
    problems = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # statements run at import (collection)
            if any(isinstance(n, ast.Attribute) and n.attr == "set_num_threads" for n in ast.walk(node)) \
                    and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                problems.append(f"{path.name}:{node.lineno}")
    assert problems == []


def test_readme_links_the_architecture():
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
