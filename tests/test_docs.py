"""The documentation: its generated reference pages match the code, every public object of the
Python API has a docstring, and the site builds with warnings as errors (broken internal links and
anchors included)."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import koff
from koff.cli import reference

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.mark.parametrize("name", reference.PAGES)
def test_generated_reference_pages_match_the_code(name):
    committed = (DOCS / "reference" / name).read_text(encoding="utf-8")
    assert committed == reference.pages()[name], (
        f"docs/reference/{name} is out of date: run `python -m koff.cli.reference docs/reference`")


def test_every_flag_and_config_key_is_on_its_reference_page():
    import dataclasses

    from koff.cli import make_parser
    from koff.config.recipe import TrainConfig
    cli = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    config = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    sub = next(a for a in make_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    for name, parser in sub.choices.items():
        assert f"## `koff {name}`" in cli
        for action in parser._actions:
            for flag in (f for f in action.option_strings if f not in ("-h", "--help")):
                assert f"`{flag}`" in cli, f"koff {name} {flag} is not in docs/reference/cli.md"
    for f in dataclasses.fields(TrainConfig):
        assert f"`train.{f.name}`" in config


def _public_objects():
    for name in koff.__all__:
        obj = getattr(koff, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield f"koff.{name}", obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and (inspect.isfunction(member) or isinstance(member, property)):
                        yield f"koff.{name}.{attr}", member


def test_every_public_object_has_a_docstring():
    missing = [name for name, obj in _public_objects() if not (inspect.getdoc(obj) or "").strip()]
    assert not missing, "public objects without a docstring:\n" + "\n".join(missing)


def test_the_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings")
    if not shutil.which("mkdocs") and not (Path(sys.executable).parent / "mkdocs").exists():
        pytest.skip("no mkdocs command")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()
