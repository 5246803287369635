"""The auto router's losses are each memory's loss on the prompt alone (padding changes nothing)."""

import torch
from conftest import tiny_model

from koff.model.koff_model import KoffModel, lm_loss
from koff.model.memory import KVMemory, lora_config
from koff.serve.routing import choose, token_losses


def test_token_losses_equal_each_prompt_scored_alone():
    km = KoffModel(tiny_model("llama"))
    for name in ("a", "b", "c"):
        k, v = km.capture_kv(torch.randint(3, 150, (3,)))
        km.add_memory(name, lora=lora_config(2), kv=KVMemory(k, v))
    with torch.no_grad():
        for n, p in km.parts.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    prompts = [torch.randint(3, 150, (n,)).tolist() for n in (5, 12, 1, 8)]
    names = ["a", "b", "c"]
    got = token_losses(km, prompts, names, max_tokens=10, rows_per_call=5)
    for p, losses in zip(prompts, got):
        x = torch.tensor([p[:10]])
        assert losses.shape == (3, len(x[0]) - 1)
        for j, n in enumerate(names):
            if x.shape[1] > 1:
                with torch.no_grad():
                    want = lm_loss(km(x, memory=n), x, reduction="none")[0]
                torch.testing.assert_close(losses[j], want, atol=1e-4, rtol=1e-4)
    assert choose(got[2], names) == "a"  # one token: nothing to compare, the first name
    mean = got[1].mean(dim=1)
    assert choose(got[1], names) == names[int(mean.argmin())]
    assert choose(torch.tensor([[3.0, 1.0], [2.0, 9.0]]), ["x", "y"], length=2) == "y"
    assert choose(torch.tensor([[3.0, 1.0], [2.0, 9.0]]), ["x", "y"]) == "x"


def test_classifier_picks_the_memory_whose_training_text_fits(tmp_path):
    from conftest import corpus, tiny_tokenizer

    from koff.serve.routing import TokenClassifier, token_counts

    tok = tiny_tokenizer()
    counts = {}
    for lang in ("en", "fr", "es"):
        f = tmp_path / f"{lang}.txt"
        f.write_text("\n".join(corpus(lang, 40, 1)) + "\n")
        counts[lang] = token_counts([f], tok, len(tok))
        assert counts[lang].shape == (len(tok),) and counts[lang].sum() > 100
    clf = TokenClassifier.fit(counts)
    for lang in ("en", "fr", "es"):
        for doc in corpus(lang, 10, 9):
            assert clf.choose(tok(doc, add_special_tokens=False)["input_ids"]) == lang
    ids = tok("le chat", add_special_tokens=False)["input_ids"] + tok("the dog ran to the park", add_special_tokens=False)["input_ids"]
    assert clf.choose(ids, length=2) == "fr" and clf.choose(ids) == "en"
