"""The engine on the bundled SmolLM2-135M: continuous batching of three memories, in float32, gives
every request what `generate` gives it alone (a real model has closer logits than a tiny one)."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.integration


def test_continuous_batching_on_the_real_model_equals_generate_alone():
    from koff.evaluation.generation import generate
    from koff.model.base_model import load_base
    from koff.model.koff_model import KoffModel
    from koff.model.memory import KVMemory, lora_config
    from koff.serve.loading import StoredMemory
    from koff.serve.scheduler import Engine, EngineConfig, Job, Sampling

    from .test_scheduler import Collect

    base, tok, _ = load_base("smollm2-135m")
    km = KoffModel(base)
    torch.manual_seed(0)
    for name, text in (("en", "The city council met on Tuesday"), ("fr", "Le conseil municipal s'est réuni"),
                       ("es", "El ayuntamiento se reunió el martes")):
        k, v = km.capture_kv(torch.tensor(tok(text)["input_ids"]))
        km.add_memory(name, lora=lora_config(8), kv=KVMemory(k, v))
    with torch.no_grad():
        for n, p in km.parts.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    prompts = [("The capital of France is", "en", 12), ("La capitale de l'Espagne est", "fr", 6),
               ("El río más largo de Europa es", "es", 10), ("Once upon a time", None, 8),
               ("Les enfants jouent dans", "fr", 12), ("My favourite food is", "es", 5)]
    alone = [generate(km, tok, [p], m, max_new_tokens=n)[0] for p, m, n in prompts]
    stored = [StoredMemory(n, km.snapshot_memory(n), "test") for n in ("en", "fr", "es")]
    for n in ("en", "fr", "es"):
        km.remove_memory(n)
    engine = Engine(km, tok, EngineConfig(max_batch=4)).start(stored)
    try:
        got = []
        for p, m, n in prompts:
            c = Collect()
            engine.submit([Job(tok(p, add_special_tokens=False)["input_ids"], m, Sampling(max_tokens=n), c)])
            got.append(c)
            time.sleep(0.05)
        assert all(c.done.wait(300) for c in got)
    finally:
        engine.stop()
    assert [c.text for c in got] == alone
    assert engine.max_rows_seen > 1
