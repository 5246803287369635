"""mkdocs hook: serve the repository's results/ folder (measured tables and figures) under
results/ in the site, so the docs show the committed artifacts themselves instead of copies."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "results"
KINDS = (".png", ".md", ".svg")


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file() and path.suffix in KINDS and "cells" not in path.parts:
            rel = path.relative_to(RESULTS.parent).as_posix()
            files.append(File.generated(config, rel, abs_src_path=str(path)))
    return files
