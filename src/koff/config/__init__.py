"""The configuration of a decomposition: `MemoryConfig`, `TrainConfig`, `DecomposeConfig`, and
their YAML form."""

from koff.config.recipe import *  # noqa: F403
from koff.config.recipe import __all__  # noqa: F401
