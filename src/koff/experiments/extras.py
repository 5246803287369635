"""The research extra (`pip install 'koff[research]'`): matplotlib for the figures, scipy for the
statistics. The library does not need them; the research tools import them through these
functions, which say what to install when they are missing."""

from __future__ import annotations

from koff.core.errors import ConfigError

INSTALL = "pip install 'koff[research]'"


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(f"the figures need matplotlib: {INSTALL}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scipy_stats():
    """scipy.stats."""
    try:
        from scipy import stats
    except ImportError:
        raise ConfigError(f"the statistics need scipy: {INSTALL}") from None
    return stats
