"""koff: knowledge offloading. Decompose a causal LLM into a sparse shared backbone and small,
swappable per-domain memories (LoRA adapters + a trainable KV cache).

The Python API mirrors the command line:

    koff.decompose(config)          koff decompose
    koff.evaluate_run(run_dir)      koff evaluate RUN
    koff.load_run(run_dir)          read and validate a run directory
    koff.build_model(run)           the backbone + memories as a KoffModel, ready to run
"""

__version__ = "0.1.0"

from .artifact import ArtifactError, Run, build_model, load_run  # noqa: E402
from .config import (ConfigError, DecomposeConfig, MemoryConfig, TrainConfig, config_from_dict,  # noqa: E402
                     load_config)
from .data import Domain, bundled_domain  # noqa: E402
from .evaluate import EvalSettings, evaluate_run  # noqa: E402
from .model import KoffModel  # noqa: E402
from .train import decompose  # noqa: E402

__all__ = ["__version__", "decompose", "evaluate_run", "EvalSettings", "load_run", "build_model", "Run",
           "KoffModel", "DecomposeConfig", "MemoryConfig", "TrainConfig", "config_from_dict", "load_config",
           "Domain", "bundled_domain", "ArtifactError", "ConfigError"]
