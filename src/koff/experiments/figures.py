"""Saving the report's figures: PNG, written to a temporary name and renamed into place."""

from __future__ import annotations

import os
from pathlib import Path

from koff.core.atomic import clean_leftovers, temp_name


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically (temporary file, then rename)."""
    clean_leftovers(path, only_dead=True)
    tmp = temp_name(path)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
