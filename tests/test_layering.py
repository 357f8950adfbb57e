"""The layers hold (README "Layout"): a module imports only from its own layer and the layers above it in LAYERS.

Every import statement counts, wherever it stands (module level, inside a function or a class, under ``if`` or
``try``), so a function-local import cannot hide an upward edge."""
from __future__ import annotations

import ast
from pathlib import Path

import arvision

# Top to bottom, as in the README's Layout. A name is a sub-package or a module directly under arvision/.
LAYERS = [
    ("files",),                   # readers of outside files: any layer may import it
    ("typed_config",),            # ConfigDict, the typed-dataclass config mechanism: any layer may import it
    ("models",),
    ("checkpoints",),             # the arvision format and the load policy, over the model families
    ("data",),
    ("objectives",),
    ("train",),
    ("metrics",),
    ("eval",),
    ("generate",),
    ("config", "configs"),
    ("tasks",),
    ("cli",),
    ("__init__", "__main__"),     # the package's public names and `python -m arvision`
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _layer(module: str, root: Path) -> str:
    """``arvision.x.y`` -> ``x``; the package itself (arvision/__init__.py) -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _targets(node: ast.AST, module: str, is_package: bool, root: Path) -> list[str]:
    """The arvision modules an import statement loads (``from pkg import sub`` names the sub-module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out = []
    for alias in node.names:
        sub = Path(root.parent, *f"{source}.{alias.name}".split("."))
        out.append(f"{source}.{alias.name}" if sub.with_suffix(".py").is_file() or sub.is_dir() else source)
    return out


def upward_imports(root: Path) -> list[str]:
    """'file:line imports module (layer b is below layer a)' for every import of a lower layer under ``root`` (the
    arvision package folder); also a line for each module whose layer is not in LAYERS."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        layer = _layer(module, root)
        where = path.relative_to(root.parent)
        if layer not in RANK:
            problems.append(f"{where}: layer {layer!r} is not in LAYERS (place it in tests/test_layering.py and the "
                            "README Layout)")
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in dict.fromkeys(_targets(node, module, path.name == "__init__.py", root)):
                if target != "arvision" and not target.startswith("arvision."):
                    continue
                other = _layer(target, root)
                if RANK.get(other, len(LAYERS)) > RANK[layer]:
                    problems.append(f"{where}:{node.lineno} imports {target} ({other} is below {layer})")
    return problems


def test_no_module_imports_a_lower_layer():
    problems = upward_imports(Path(arvision.__file__).parent)
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_function_local_and_relative_imports_are_seen(tmp_path):
    root = tmp_path / "arvision"
    for name in ("models", "train"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "files.py").write_text("")
    (root / "train" / "optim.py").write_text("")
    (root / "models" / "vit.py").write_text("from . import other\n\n\ndef f():\n    from ..train import optim\n")
    (root / "models" / "other.py").write_text("import arvision.train.optim\nfrom .. import files\n")
    (root / "odd").mkdir()
    (root / "odd" / "__init__.py").write_text("")
    assert upward_imports(root) == [
        "arvision/models/other.py:1 imports arvision.train.optim (train is below models)",
        "arvision/models/vit.py:5 imports arvision.train.optim (train is below models)",
        "arvision/odd/__init__.py: layer 'odd' is not in LAYERS (place it in tests/test_layering.py and the README "
        "Layout)",
    ]
