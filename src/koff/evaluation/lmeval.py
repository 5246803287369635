"""An EleutherAI lm-evaluation-harness model for koff runs: a run's backbone with one memory (or
none), scored by lm-eval's own task pipeline.

    koff lm-eval RUN --memory fr --tasks arc_challenge_koff piqa_koff [--limit 100]

or, from Python (lm-eval 0.4.13 has no plugin discovery, so importing this module registers
`koff` with lm-eval's model registry):

    import lm_eval, koff.lmeval
    lm_eval.simple_evaluate(model="koff", model_args="run=runs/enfres,memory=fr",
                            tasks=["arc_challenge_koff"],
                            task_manager=lm_eval.tasks.TaskManager(include_path=str(koff.lmeval.write_tasks(dir))))

No hub is reachable from koff's machines, so `write_tasks` writes lm-eval task YAMLs that read the
bundled general-domain files (ARC-Challenge, PIQA, OpenBookQA, COPA; the shared data folder) as
local JSON datasets; lm-eval's hub tasks work too where a network is. Log-likelihoods come from
`koff.tasks.continuation_scores`, the scorer behind koff's own task numbers, so lm-eval and
`koff evaluate --tasks` agree on the same questions (tests/evaluation/test_lmeval.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from koff.core.compat.lm_eval import registered_model
from koff.core.errors import ConfigError
from koff.core.runtime import Runtime
from koff.data.text import data_root
from koff.evaluation.generation import generate
from koff.evaluation.tasks import continuation_scores
from koff.model.koff_model import lm_loss
from koff.storage.run_dir import build_model, load_run

LOCAL_TASKS = {
    "arc_challenge_koff": "arc_challenge.jsonl",
    "piqa_koff": "piqa.jsonl",
    "openbookqa_koff": "openbook_qa.jsonl",
    "copa_koff": "copa.jsonl",
}
"""lm-eval task name -> bundled file (fields query / choices / gold)."""

_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{query}}}}{{% if query.startswith('Question:') %}}\\nAnswer:{{% endif %}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: koff (bundled copy of the llm-foundry local eval file)
"""


def write_tasks(folder: Path, root: Path | None = None) -> Path:
    """Write lm-eval task YAMLs over the bundled general-domain files into `folder` (for
    `TaskManager(include_path=...)` / `--include_path`); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    general = Path(root or data_root()).resolve() / "general"
    for task, fname in LOCAL_TASKS.items():
        path = general / fname
        if not path.is_file():
            raise ConfigError(f"lm-eval task {task}: {path} does not exist (set KOFF_DATA to the shared data folder)")
        (folder / f"{task}.yaml").write_text(_TASK_YAML.format(task=task, path=path))
    return folder


# long: it defines lm-eval's model class, created on first use because lm-eval is optional
def _model_class():
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    if registered_model("koff") is not None:
        return registered_model("koff")

    @register_model("koff")
    class KoffLM(LM):
        """lm-eval's view of a koff run: the backbone with one memory (`memory=none`: none)."""

        def __init__(self, run: str, memory: str | None = None, device: str = "cpu", dtype: str = "float32",
                     batch_size: int | str = 16, dense: bool | str = False, **_ignored):
            super().__init__()

            memory = None if memory in (None, "", "none", "None") else str(memory)
            self.km, self.tok = build_model(load_run(Path(run)), runtime=Runtime.from_env(device, dtype))
            if memory is not None and memory not in self.km.memory_names:
                raise ConfigError(f"lm-eval model_args memory={memory!r}: the run has {self.km.memory_names}")
            self.memory = memory
            self.use_gates = str(dense).lower() not in ("true", "1", "yes")
            self.batch_size = int(batch_size)
            self._device = next(self.km.model.parameters()).device

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:

            pairs = [tuple(r.args) for r in requests]
            scores = continuation_scores(self.km, self.tok, pairs, self.memory, self.batch_size, self.use_gates)
            return [(lp, greedy) for lp, _, greedy in scores]

        @torch.no_grad()
        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:

            window = int(getattr(self.km.model.config, "max_position_embeddings", 2048) or 2048)
            out = []
            for r in requests:
                ids = [self.tok.eos_token_id] + self.tok(r.args[0], add_special_tokens=False)["input_ids"]
                total, start = 0.0, 1
                while start < len(ids):  # each token scored once, with as much context as fits
                    end = min(start + window - 1, len(ids))
                    chunk = torch.tensor(ids[max(0, end - window): end], device=self._device)[None]
                    nll = lm_loss(self.km(chunk, memory=self.memory, use_gates=self.use_gates), chunk,
                                  reduction="none")[0]
                    total -= float(nll[-(end - start):].sum())
                    start = end
                out.append(total)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:

            out = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                text = generate(self.km, self.tok, [context], self.memory, max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                                temperature=float(kwargs.get("temperature", 0.0) or 0.0))[0]
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
            return out

    return KoffLM


KoffLM = None


def register() -> type:
    """Register koff with lm-eval's model registry (idempotent); returns the model class."""
    global KoffLM
    KoffLM = _model_class()
    return KoffLM


def evaluate(run: Path, tasks: list[str], memory: str | None = None, limit: int | None = None,
             device: str = "cpu", dtype: str = "float32", batch_size: int = 16, include: Path | None = None) -> dict:
    """Run lm-eval's `simple_evaluate` on a koff run with the bundled local tasks available."""
    import tempfile

    import lm_eval
    from lm_eval.tasks import TaskManager

    register()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tasks(Path(include) if include else Path(tmp))
        return lm_eval.simple_evaluate(model="koff", model_args={"run": str(run), "memory": memory or "none",
                                                                  "device": device, "dtype": dtype,
                                                                  "batch_size": batch_size},
                                       tasks=list(tasks), limit=limit, task_manager=TaskManager(include_path=str(folder)))


try:  # importing this module registers the model when lm-eval is installed
    register()
except ImportError:  # pragma: no cover - lm-eval is an optional dependency
    pass
