"""The repository stands on its own: nothing in it cites a file outside it (the design notes the
code relies on are docs/design.md)."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("DESIGN.md", "shared/paper")


def test_nothing_cites_a_file_outside_the_repository():
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    hits = []
    for rel in files:
        path = ROOT / rel
        if path.suffix not in (".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh") and path.name != "run":
            continue
        if rel == "tests/test_repository.py":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        hits += [f"{rel}: {needle}" for needle in OUTSIDE if needle in text]
    assert not hits, "files that cite something outside the repository:\n" + "\n".join(hits)


def test_no_function_is_over_60_lines_without_a_reason_beside_it():
    """A long function says why on the line above its `def` (`# long: ...`); most should be split."""
    import ast

    long = []
    for path in sorted((ROOT / "src" / "koff").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
                if not (first > 0 and lines[first - 1].strip().startswith("# long: ")):
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                                f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "functions over 60 lines with no '# long: <why>' line above them:\n" + "\n".join(long)
