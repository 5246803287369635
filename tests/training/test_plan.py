"""`koff plan`: parameter counts from the meta device, and peak memory within 25% of a real run."""

import pytest

from koff.config.recipe import MemoryConfig
from koff.model.base_model import parameter_counts
from koff.training.plan import format_plan, make_plan, measure_peak


def test_counts_match_the_real_model(llama_folder):
    plan = make_plan(str(llama_folder), MemoryConfig(lora_rank=4, kv_tokens=4), batch_size=2, seq_len=16, memories=2)
    from koff.model.base_model import load_base

    base, _, _ = load_base(str(llama_folder))
    assert {k: plan.parameters[k] for k in ("total", "embeddings", "ffn")} == parameter_counts(base)
    # LoRA r=4 on q,k,v,o,gate,up,down of 2 layers (hidden 32, FFN 48, kv dim 16), KV 2 layers x 2 heads x 4 x 8 x 2
    lora = 2 * 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 48) * 2 + (48 + 32))
    assert plan.per_memory == {"lora": lora, "kv": 2 * 2 * 4 * 8 * 2, "total": lora + 256}
    assert plan.trainable["total"] == 2 * 48 + 2 * (lora + 256)
    for key in ("float32", "float32+checkpointing", "bfloat16", "bfloat16+checkpointing"):
        assert plan.estimates[key]["total"] == sum(v for k, v in plan.estimates[key].items() if k != "total")
    assert plan.estimates["bfloat16"]["weights"] * 2 == plan.estimates["float32"]["weights"]
    assert plan.estimates["float32+checkpointing"]["activations"] < plan.estimates["float32"]["activations"]
    assert "per memory" in format_plan(plan)


def test_an_8b_shape_plans_without_weights():
    plan = make_plan("llama-3.1-8b", MemoryConfig(), batch_size=4, seq_len=256, memories=3, world_size=4, fsdp=True)
    assert plan.parameters["total"] == 8_030_261_248
    assert plan.micro_batch == 1
    est = plan.estimates["bfloat16+checkpointing"]
    layer = 4 * 4096 * 4096 // 4 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096  # q,o + k,v + MLP + 2 norms
    assert est["weights"] == -(-8_030_261_248 * 2 // 4) + 2 * layer * 2


@pytest.mark.integration
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_within_25_percent_of_measured_peak_rss(checkpointing):
    """The bundled model on this CPU: the plan's float32 peak against the peak RSS of 3 real
    training steps (gates + LoRA r=8 + KV m=16, batch 4 x 128) in a fresh process."""
    plan = make_plan(None, MemoryConfig(), batch_size=4, seq_len=128, memories=1, dtypes=("float32",))
    key = "float32" + ("+checkpointing" if checkpointing else "")
    measured = measure_peak(None, MemoryConfig(), 4, 128, "float32", checkpointing)["peak_rss"]
    ratio = plan.estimates[key]["total"] / measured
    assert 0.75 <= ratio <= 1.25, (key, plan.estimates[key], measured)
