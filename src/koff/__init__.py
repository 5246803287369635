"""koff: knowledge offloading. Decompose a causal LLM into a sparse shared backbone and small,
swappable per-domain memories (LoRA adapters + a trainable KV cache).

The Python API mirrors the command line:

    koff.decompose(config)                  koff decompose
    koff.evaluate_run(run_dir)              koff evaluate RUN
    koff.export_run(run_dir, out)           koff export RUN OUT
    koff.load_backbone(out)                 the exported, physically smaller backbone
    koff.generate.generate(model, tok, ...) koff generate RUN --memory M PROMPT
    koff.add_domain(run_dir, domain)        koff add-domain RUN --name NAME
    koff.analyze_run(run_dir)               koff analyze RUN
    koff.compare.compare(grid)              koff compare GRID
    koff.report.report(results)             koff report RESULTS
    koff.load_run(run_dir)                  read and validate a run directory
    koff.build_model(run)                   the backbone + memories as a KoffModel, ready to run
"""

from koff.config.recipe import DecomposeConfig, MemoryConfig, TrainConfig, config_from_dict, load_config
from koff.core.errors import ArtifactError, ConfigError
from koff.core.version import __version__
from koff.data.text import Domain, bundled_domain
from koff.evaluation.perplexity import EvalSettings, evaluate_run
from koff.experiments.analysis import analyze_run
from koff.export import export_run, load_backbone
from koff.model.koff_model import KoffModel
from koff.storage.run_dir import Run, build_model, load_run
from koff.training.pipeline import add_domain, decompose

__all__ = ["__version__", "decompose", "evaluate_run", "export_run", "load_backbone", "add_domain", "analyze_run",
           "EvalSettings", "load_run", "build_model", "Run",
           "KoffModel", "DecomposeConfig", "MemoryConfig", "TrainConfig", "config_from_dict", "load_config",
           "Domain", "bundled_domain", "ArtifactError", "ConfigError"]
