import pytest
import torch
from conftest import ARCHS, tiny_model

from koff.model.gates import NeuronGates
from koff.model.koff_model import KoffModel, lm_loss
from koff.model.memory import KVMemory, lora_config


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_memory_from_tokens_equals_real_prefix(arch):
    """A KV memory initialised from tokens t gives the same next-token logits as feeding t."""
    km = KoffModel(tiny_model(arch))
    t = torch.randint(3, 150, (7,))
    x = torch.randint(3, 150, (2, 20))  # 7 + 20 tokens: longer than gemma3's 16-token sliding window
    k, v = km.capture_kv(t)
    km.add_memory("d", kv=KVMemory(k, v))
    with torch.no_grad():
        with_memory = km(x, memory="d")
        full = km.model(input_ids=torch.cat([t[None].expand(2, -1), x], dim=1)).logits[:, t.numel():]
        bare = km(x)
    torch.testing.assert_close(with_memory, full, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(with_memory, bare, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kv_memory_with_left_padding(arch):
    """Left-padded rows score like unpadded ones (positions continue after the memory)."""
    km = KoffModel(tiny_model(arch))
    t = torch.randint(3, 150, (5,))
    k, v = km.capture_kv(t)
    km.add_memory("d", kv=KVMemory(k, v))
    x = torch.randint(3, 150, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = km(x, memory="d")
        b = km(padded, memory="d", attention_mask=mask)[:, 3:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_memories_in_one_batch_match_single_rows(arch):
    """Each row of a mixed batch gets its own LoRA delta and KV prefix (different lengths too)."""
    km = KoffModel(tiny_model(arch))
    torch.manual_seed(1)
    for name, m in (("m1", 4), ("m2", 7)):
        k, v = km.capture_kv(torch.randint(3, 150, (m,)))
        km.add_memory(name, lora=lora_config(4), kv=KVMemory(k + 0.1 * torch.randn_like(k), v))
    with torch.no_grad():  # make the LoRA deltas non-zero and different
        for n, p in km.parts.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    x = torch.randint(3, 150, (3, 8))
    names = ["m1", "m2", None]
    with torch.no_grad():
        mixed = km(x, memory=names)
        for i, n in enumerate(names):
            single = km(x[i: i + 1], memory=n)
            torch.testing.assert_close(mixed[i: i + 1], single, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)


def test_sink_tokens_never_train():
    km = KoffModel(tiny_model("llama"))
    k, v = km.capture_kv(torch.randint(3, 150, (6,)))
    mem = KVMemory(k, v, num_frozen=2)
    km.add_memory("d", kv=mem)
    x = torch.randint(3, 150, (2, 10))
    lm_loss(km(x, memory="d"), x).backward()
    assert mem.keys.grad[:, :, :2].abs().sum() == 0
    assert mem.keys.grad[:, :, 2:].abs().sum() > 0
    assert mem.values.grad[:, :, :2].abs().sum() == 0


def test_gradients_reach_only_gates_and_the_active_memory():
    km = KoffModel(tiny_model("qwen2"), NeuronGates.for_model(tiny_model("qwen2")))
    for name in ("m1", "m2"):
        k, v = km.capture_kv(torch.randint(3, 150, (4,)))
        km.add_memory(name, lora=lora_config(4), kv=KVMemory(k, v, num_frozen=0))
    x = torch.randint(3, 150, (2, 10))
    km.gates.resample()
    lm_loss(km(x, memory="m2"), x).backward()
    with_grad = {n for n, p in km.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("gates.") for n in with_grad)
    assert any(n.startswith("parts.lora.adapters.m2.lora_B.") for n in with_grad)
    assert {"parts.kv.memories.m2.keys", "parts.kv.memories.m2.values"} <= with_grad
    assert not any(".m1." in n for n in with_grad)
    frozen = [n for n, _ in km.model.named_parameters()]
    assert frozen and not any(f"model.{n}" in with_grad for n in frozen)
    assert all(not p.requires_grad for p in km.model.parameters())


def test_memory_validation():
    km = KoffModel(tiny_model("llama"))
    k, v = km.capture_kv(torch.randint(3, 150, (4,)))
    with pytest.raises(ValueError, match="expected"):
        km.add_memory("x", kv=KVMemory(k[:, :1], v[:, :1]))
    km.add_memory("x", kv=KVMemory(k, v))
    with pytest.raises(ValueError, match="already exists"):
        km.add_memory("x", kv=KVMemory(k, v))
    with pytest.raises(KeyError, match="no memory named"):
        km(torch.randint(3, 150, (1, 4)), memory="nope")
    with pytest.raises(ValueError, match="must both be"):
        KVMemory(k, v[0])
    for bad in ("", "x/y", "../x", ".hidden", "__base__", "my memory", "café", "none", "auto", "v1.2", "x" * 65):
        with pytest.raises(ValueError, match="invalid memory name"):
            km.add_memory(bad, kv=KVMemory(k, v))
    for good in ("a", "l", "lo", "lora", "ora", "lora_", "fr-CA", "v1_2"):  # peft's reserved 'lora_' is no concern
        km.add_memory(good, kv=KVMemory(k, v))


def test_lora_init_and_delta_equal_peft():
    """A fresh koff LoRA draws the same A as peft's get_peft_model from the same seed, and with the
    same weights both give the same logits (koff's own per-call routing computes peft's delta)."""
    from peft import get_peft_model, set_peft_model_state_dict

    torch.manual_seed(5)
    km = KoffModel(tiny_model("llama"))
    km.add_memory("m1", lora=lora_config(4))
    km.add_memory("m2", lora=lora_config(2, alpha=3.0, targets=("q_proj", "down_proj")))
    torch.manual_seed(5)
    pm = get_peft_model(tiny_model("llama"), lora_config(4).peft_config_object(), adapter_name="m1")
    state = km.snapshot_memory("m1")["lora"].tensors
    theirs = {k.replace(".m1.", "."): v for k, v in pm.state_dict().items() if ".lora_A.m1." in k}
    assert set(theirs) == {k for k in state if ".lora_A." in k} and len(theirs) == 14
    for k, v in theirs.items():
        assert torch.equal(state[k], v), k
    with torch.no_grad():  # different, non-zero deltas
        for n, p in km.parts.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    x = torch.randint(3, 150, (2, 8))
    for name in ("m2", "m1"):
        pm.add_adapter(name, km.snapshot_memory(name)["lora"].peft_config_object()) if name == "m2" else None
        set_peft_model_state_dict(pm, km.snapshot_memory(name)["lora"].tensors, adapter_name=name)
    with torch.no_grad():
        for name in ("m1", "m2", "m1"):
            pm.set_adapter(name)
            torch.testing.assert_close(km(x, memory=name), pm(input_ids=x).logits, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(km(x, memory="m1"), km(x, memory="m2"))
    assert all(p.requires_grad for n in ("m1", "m2") for p in km.memory_parameters(n))


def test_concurrent_calls_do_not_race():
    """Routing is per call: threads running different memories at once get what each alone gets."""
    from concurrent.futures import ThreadPoolExecutor

    km = KoffModel(tiny_model("llama"))
    for name in ("m1", "m2", "m3"):
        k, v = km.capture_kv(torch.randint(3, 150, (3,)))
        km.add_memory(name, lora=lora_config(4), kv=KVMemory(k + 0.1 * torch.randn_like(k), v))
    with torch.no_grad():
        for n, p in km.parts.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    x = torch.randint(3, 150, (2, 12))
    jobs = [("m1", None), ("m2", None), ("m3", None), (None, None), (["m1", "m3"], None)] * 8
    with torch.no_grad():
        alone = {str(m): km(x, memory=m) for m, _ in jobs[:5]}
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda job: (str(job[0]), km(x, memory=job[0])), jobs))
    for name, logits in got:
        torch.testing.assert_close(logits, alone[name], atol=0, rtol=0)
