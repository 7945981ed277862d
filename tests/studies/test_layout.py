"""Studies live outside the package: diffpo imports nothing from studies/ or benchmarks/, and the
studies use only diffpo's public names (no ``_private`` module or function), by parsing imports."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import statement in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.module, [alias.name for alias in node.names], node.lineno))
    return out


def test_the_package_imports_no_study():
    offending = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sorted((REPO / "diffpo").rglob("*.py"))
        for module, _, line in _imports(path)
        if module.split(".")[0] in ("studies", "benchmarks")
    ]
    assert not offending, "\n".join(offending)


def test_studies_use_only_public_diffpo_names():
    files = sorted((REPO / "studies").rglob("*.py"))
    assert {p.name for p in files} >= {"compare.py", "personalize.py", "sampler_sweep.py"}
    offending = [
        f"{path.relative_to(REPO)}:{line} imports {module} {names}"
        for path in files
        for module, names, line in _imports(path)
        if module.split(".")[0] == "diffpo" and (any(part.startswith("_") for part in module.split(".")) or any(n.startswith("_") for n in names))
    ]
    assert not offending, "\n".join(offending)
    assert not (REPO / "diffpo" / "toy" / "compare.py").exists() and not (REPO / "diffpo" / "toy" / "personalize.py").exists()
