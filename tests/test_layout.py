"""The package layout: imports flow one way (cli -> apps -> eval -> infer -> export -> train ->
model -> leaves), and every stage package says what it does and what it may import."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mlx_qlora

PKG = Path(mlx_qlora.__file__).parent
# Top of the flow first. A module may import its own stage or any stage after it, never before.
ORDER = ["top", "apps", "eval", "infer", "export", "train", "model", "leaf"]
LEAVES = {"errors", "atomic"}


def stage_of(dotted: str) -> str:
    parts = dotted.split(".")[1:]          # drop "mlx_qlora"
    if not parts:
        return "top"
    if parts[0] in ORDER:
        return parts[0]
    return "leaf" if parts[0] in LEAVES else "top"


def module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_pkg else parts), is_pkg


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every mlx_qlora module a file imports (relative ones resolved), with the line number."""
    name, is_pkg = module_name(path)
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mlx_qlora":
                continue
            out.append((target, node.lineno))
            # "from . import x" names submodules: judge each by its own stage
            out += [(f"{target}.{a.name}", node.lineno) for a in node.names
                    if (PKG.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                    or (PKG.parent / f"{target}.{a.name}".replace(".", "/")).is_dir()]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "mlx_qlora"]
    return out


def back_edges() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        name, _ = module_name(path)
        here = ORDER.index(stage_of(name))
        for target, line in imports_of(path):
            if target == "mlx_qlora" and stage_of(name) in ("top", "model"):
                continue                     # the package root (its __version__, the BLAS loader)
            there = ORDER.index(stage_of(target))
            if there < here:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({stage_of(name)}) imports "
                           f"{target} ({stage_of(target)})")
    return bad


def test_no_back_edges():
    assert back_edges() == []


def test_back_edge_detector_fires(tmp_path, monkeypatch):
    """The walker must see a planted back edge (model importing infer), else the test above proves nothing."""
    fake = tmp_path / "mlx_qlora"
    (fake / "model").mkdir(parents=True)
    (fake / "infer").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "model" / "__init__.py").write_text("")
    (fake / "infer" / "__init__.py").write_text("")
    (fake / "model" / "bad.py").write_text("from ..infer import chat\nfrom ..errors import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    assert back_edges() == ["mlx_qlora/model/bad.py:1 (model) imports mlx_qlora.infer (infer)"]


def test_stage_packages_document_themselves():
    for stage in ORDER[1:-1]:
        init = PKG / stage / "__init__.py"
        if not init.exists():
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc.startswith(f"Stage ``{stage}``"), init
        assert "May import" in doc, init


def test_no_flat_modules_left():
    """Only the command line and the leaves sit at the top; everything else lives in a stage."""
    top = {p.stem for p in PKG.glob("*.py")}
    assert top <= {"__init__", "cli", "demo", "doctor", "lean_imports"} | LEAVES, top


def test_cli_import_stays_light():
    code = "import sys, mlx_qlora.cli; print(sorted(m for m in ('mlx.core', 'numpy', 'mlx_lm', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
