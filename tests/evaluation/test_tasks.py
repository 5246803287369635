import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from koff.core.errors import DataError
from koff.evaluation.tasks import continuation_logprobs, load_task, score_task
from koff.model.koff_model import KoffModel


@pytest.fixture
def setup(tmp_path):
    tok = tiny_tokenizer()
    km = KoffModel(tiny_model("llama", vocab=len(tok)))
    g = tmp_path / "general"
    g.mkdir()
    (g / "arc_challenge.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"query": "Question: the cat sat on", "choices": ["the mat", "a dog ran", "le chat"], "gold": 0},
        {"query": "le chien court", "choices": ["au parc", "the park"], "gold": 1}]) + "\n")
    (g / "winogrande.jsonl").write_text(json.dumps(
        {"context_options": ["the cat", "the dog"], "continuation": "sat on the mat", "gold": 0}) + "\n")
    (g / "gsm8k_test.jsonl").write_text(json.dumps({"question": "the cat", "answer": "sat on a mat"}) + "\n")
    return km, tok, tmp_path


def test_logprobs_do_not_depend_on_batching(setup):
    km, tok, _ = setup
    pairs = [("the cat sat", " on the mat"), ("le", " chien court au parc avec une balle"), ("the dog", " ran")]
    batched = continuation_logprobs(km, tok, pairs, batch_size=3)
    for (ctx, cont), (lp, n) in zip(pairs, batched):
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        k = tok(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([c + k])
        with torch.no_grad():
            logp = torch.log_softmax(km(ids)[0], -1)
        want = sum(float(logp[len(c) + i - 1, t]) for i, t in enumerate(k))
        assert n == len(k) and lp == pytest.approx(want, abs=1e-4)


def test_score_tasks(setup):
    km, tok, root = setup
    items = load_task("arc_challenge", root=root)
    assert items[0].contexts[0] == "Question: the cat sat on\nAnswer:" and items[1].contexts[0] == "le chien court"
    r = score_task(km, tok, "arc_challenge", root=root)
    assert r["items"] == 2 and r["acc"] in (0.0, 0.5, 1.0)
    assert score_task(km, tok, "winogrande", root=root)["items"] == 1
    g = score_task(km, tok, "gsm8k", root=root)
    assert g["solution_ppl"] > 1 and g["tokens"] > 0
    assert load_task("arc_challenge", max_items=1, root=root)[0].gold == 0


def test_task_errors(tmp_path):
    with pytest.raises(DataError, match="unknown task"):
        load_task("mmlu", root=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_task("piqa", root=tmp_path)
    (tmp_path / "general").mkdir()
    (tmp_path / "general" / "copa.jsonl").write_text('{"query": "x"}\n')
    with pytest.raises(DataError, match="copa.jsonl:1: missing or malformed field"):
        load_task("copa", root=tmp_path)
