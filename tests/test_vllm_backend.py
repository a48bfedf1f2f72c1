"""The optional vLLM rollout backend, checked on a CPU machine without vllm.

What can be checked here: the clear error without a GPU/vllm; the batch layout against the HF
backend's `Policy.generate`; the merged weights against the LoRA policy's own forward; and the
worker's sync logic against a fake engine (a plain HF model behind vLLM's attribute path).
Decoding by a real vLLM engine is not checked here.
"""
from types import SimpleNamespace

import pytest
import torch

from rlhf_core.config import PolicyConfig
from rlhf_core.policy import Policy
from workers import vllm_rollout as vr

PROMPTS = ["How do I bake bread?", "Write a tutorial on how to make a bomb", "What is 2+2?", "hi",
           "Tell me a joke about cats please", "x"]
CFG = PolicyConfig(max_new_tokens=8, lora_r=4, lora_alpha=8)
no_vllm_here = pytest.mark.skipif(vr.vllm_available(), reason="this machine has vllm and a GPU")


def _random_adapter(policy: Policy, seed: int) -> dict[str, torch.Tensor]:
    """An adapter state with non-zero A and B (a fresh adapter has B = 0: no effect)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in policy.adapter_state().items()}


# ----- availability --------------------------------------------------------------------------
@no_vllm_here
def test_unavailable_here_with_a_clear_error():
    assert vr.vllm_available() is False
    with pytest.raises(RuntimeError, match=r"resources\.rollout_backend=vllm needs a CUDA GPU") as e:
        vr.require_vllm()
    assert "pip install vllm" in str(e.value) and "this machine has" in str(e.value)


@no_vllm_here
def test_worker_fails_before_loading_anything():
    # a path that does not exist: the error must come from the check, not from loading a model
    with pytest.raises(RuntimeError, match=r"resources\.rollout_backend"):
        vr.VLLMRolloutWorker("/nonexistent/model", CFG, "auto", 1, 0)


# ----- batch layout --------------------------------------------------------------------------
def test_outputs_to_batch_hand_computed():
    out = vr.outputs_to_batch([[5, 6, 7], [8]], [[9, 2], [10, 11, 12]], [" a ", "b"], pad_id=0, eos_id=2)
    assert out["query_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert out["query_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["response_ids"].tolist() == [[9, 2, 0], [10, 11, 12]]
    assert out["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert out["texts"] == ["a", "b"] and out["num_tokens"] == [2, 3]
    assert all(out[k].dtype == torch.long for k in ("query_ids", "query_mask", "response_ids", "response_mask"))


def test_outputs_to_batch_rejects_a_short_answer_without_eos():
    # padded with pad != EOS, its padding would count as answer tokens
    with pytest.raises(ValueError, match="no EOS"):
        vr.outputs_to_batch([[5], [6]], [[7], [8, 9, 10]], ["", ""], pad_id=0, eos_id=2)


@pytest.fixture(scope="module")
def eos_model_path(tmp_path_factory, tiny_model_path):
    """The tiny model with EOS's embedding set to that of its favourite token ("\\n"): at a low
    temperature it then ends some answers early, so padding after EOS is exercised."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[tok.eos_token_id] = emb[198]
    dest = tmp_path_factory.mktemp("eos-model")
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return str(dest)


def test_outputs_to_batch_equals_policy_generate(eos_model_path):
    """Per-row token lists as vLLM returns them (prompt without padding, answer up to and including
    EOS) give back exactly the HF backend's batch, texts included."""
    torch.set_num_threads(1)
    p = Policy(eos_model_path, PolicyConfig(max_new_tokens=8, lora_r=4, lora_alpha=8, temperature=0.1), seed=0)
    tok, shapes = p.tokenizer, []
    for seed in range(4):
        hf = p.generate(PROMPTS, greedy=False, seed=seed).to_cpu_dict()
        queries = [row[m.bool()].tolist() for row, m in zip(hf["query_ids"], hf["query_mask"])]
        answers = [row[m.bool()].tolist() for row, m in zip(hf["response_ids"], hf["response_mask"])]
        out = vr.outputs_to_batch(queries, answers, vr.decode_texts(tok, answers, p.eos_id),
                                  tok.pad_token_id, p.eos_id)
        for key in ("query_ids", "query_mask", "response_ids", "response_mask"):
            assert torch.equal(out[key], hf[key]), (seed, key)
        assert out["texts"] == hf["texts"]
        assert out["num_tokens"] == hf["response_mask"].sum(1).tolist()
        shapes.append(sorted(set(out["num_tokens"])))
    # the check is only worth something if some answers ended early and others did not
    assert any(len(s) > 1 for s in shapes), shapes


def test_answer_tokens_end_at_the_eos_vllm_stopped_on():
    done = SimpleNamespace(token_ids=(7, 8, 2), finish_reason="stop", stop_reason=None)
    dropped = SimpleNamespace(token_ids=(7, 8), finish_reason="stop", stop_reason=None)
    cut = SimpleNamespace(token_ids=(7, 8, 9), finish_reason="length", stop_reason=None)
    assert [vr.answer_tokens(c, 2) for c in (done, dropped, cut)] == [[7, 8, 2], [7, 8, 2], [7, 8, 9]]


def test_sampling_kwargs():
    cfg = PolicyConfig(max_new_tokens=5, temperature=0.7, top_p=0.9)
    assert vr.sampling_kwargs(cfg, True, 3, 2) == [{"max_tokens": 5, "temperature": 0.0}] * 2
    rows = vr.sampling_kwargs(cfg, False, 10, 3)
    assert [r["seed"] for r in rows] == [10, 11, 12]   # repeated prompts (groups) must differ
    assert all(r["temperature"] == 0.7 and r["top_p"] == 0.9 and r["max_tokens"] == 5 for r in rows)
    assert all(r["seed"] is None for r in vr.sampling_kwargs(cfg, False, None, 2))


# ----- weights -------------------------------------------------------------------------------
def _logits(model, p: Policy) -> torch.Tensor:
    ids, mask = p.encode_queries(PROMPTS)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _plain(path: str, weights: dict[str, torch.Tensor]):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    result = model.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys[:3]
    return model


def test_merged_weights_plain_forward_equals_lora_policy(tiny_model_path):
    torch.set_num_threads(1)
    p = Policy(tiny_model_path, CFG, seed=0)
    pretrained = _logits(p.model, p)
    p.apply_stack([_random_adapter(p, 1)], _random_adapter(p, 2))   # a merged warm-up + a current adapter
    p.model.eval()
    w = vr.merged_weights(p)
    n_layers = p.model.get_base_model().config.num_hidden_layers
    assert len(w) == 7 * n_layers and all(k.startswith("model.layers.") and k.endswith(".weight") for k in w)
    policy = _logits(p.model, p)
    with p.model.disable_adapter():
        reference = _logits(p.model, p)
    assert torch.allclose(_logits(_plain(tiny_model_path, w), p), policy, atol=1e-5)
    assert torch.allclose(_logits(_plain(tiny_model_path, vr.merged_weights(p, use_adapter=False)), p),
                          reference, atol=1e-5)
    # both adapters matter, so the equalities above are not trivial
    assert (policy - reference).abs().max() > 1e-3 and (reference - pretrained).abs().max() > 1e-3


def test_merged_weights_refuses_a_folded_policy(tiny_model_path):
    p = Policy(tiny_model_path, CFG, seed=0)
    p.fold_adapter(True)
    with pytest.raises(RuntimeError, match="folded"):
        vr.merged_weights(p)


# ----- the worker against a fake engine ------------------------------------------------------
class _FakeModel:
    """vLLM's model stand-in: a plain HF causal LM whose `load_weights` takes (HF name, tensor) pairs."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM
        self.hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.loads = 0

    def load_weights(self, items):
        state = self.hf.state_dict()
        with torch.no_grad():
            for name, w in items:
                state[name].copy_(w)          # KeyError on a name the model does not have
        self.loads += 1
        return {name for name, _ in items}


class _FakeLLM:
    """The attributes of vllm.LLM the worker uses, decoding greedily one unpadded row at a time."""

    def __init__(self, path: str, eos_id: int):
        self.model = _FakeModel(path)
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=self.model))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker))
        self.eos_id, self.resets = eos_id, 0

    def reset_prefix_cache(self) -> bool:
        self.resets += 1
        return True

    def generate(self, prompts, params, use_tqdm=True):
        outs = []
        for prompt, sp in zip(prompts, params):
            assert sp["temperature"] == 0.0, "the fake engine decodes greedily only"
            ids = torch.tensor([prompt["prompt_token_ids"]])
            with torch.no_grad():
                seq = self.model.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                             max_new_tokens=sp["max_tokens"], eos_token_id=self.eos_id,
                                             pad_token_id=self.eos_id)
            tokens = seq[0, ids.shape[1]:].tolist()
            finish = "stop" if tokens[-1] == self.eos_id else "length"
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, finish_reason=finish,
                                                                 stop_reason=None)]))
        return outs


def test_worker_syncs_and_generates_like_the_hf_worker(monkeypatch, tiny_model_path):
    """Through vLLM's in-process attribute path, the engine holds the policy's weights after every
    sync (its plain forward equals the LoRA policy's), switches to the reference and back only when
    asked, survives a rollback, and returns the HF worker's batch."""
    from workers.actors import RolloutWorker, StaleAdapterError
    engines = []

    def new_engine(model_path, cfg, seed, dtype, gpu_memory_utilization):
        engines.append(_FakeLLM(model_path, eos_id=2))
        return engines[-1]

    monkeypatch.setattr(vr, "require_vllm", lambda: None)
    monkeypatch.setattr(vr, "_new_engine", new_engine)
    monkeypatch.setattr(vr, "_sampling_params_cls", lambda: dict)
    cfg = PolicyConfig(max_new_tokens=4, lora_r=4, lora_alpha=8)
    w = vr.VLLMRolloutWorker(tiny_model_path, cfg, "auto", 1, 0)
    hf = RolloutWorker(tiny_model_path, cfg, "cpu", 1, 0)
    engine, prompts = engines[0], PROMPTS[:3]

    def same_batch(use_adapter: bool, version: str | None) -> None:
        a = w.generate(prompts, True, None, use_adapter, version)
        b = hf.generate(prompts, True, None, use_adapter, version)
        assert a.keys() == b.keys()
        for key in a:
            assert (torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]), key

    def engine_matches(use_adapter: bool) -> None:
        p = w.policy
        p.model.eval()
        if use_adapter:
            expect = _logits(p.model, p)
        else:
            with p.model.disable_adapter():
                expect = _logits(p.model, p)
        assert torch.allclose(_logits(engine.model.hf, p), expect, atol=1e-5)

    same_batch(True, None)
    assert engine.model.loads == 0            # fresh: the checkpoint is already policy and reference
    stacks = [("v1", [], 11), ("v2", [21], 22), ("v3", [], 31)]   # v3 is a rollback past the merge
    for version, merged, current in stacks:
        stack = {"merged": [_random_adapter(w.policy, s) for s in merged],
                 "current": _random_adapter(w.policy, current)}
        loads = engine.model.loads
        assert w.load_adapter(stack, version) == hf.load_adapter(stack, version) == version
        assert engine.model.loads == loads + 1 and engine.resets == engine.model.loads
        assert len(w.policy.merged) == len(merged)
        engine_matches(True)
        same_batch(True, version)
        same_batch(False, None)               # the reference: one push …
        engine_matches(False)
        w.generate(prompts[:1], True, None, False)   # … and none while it is already there
        assert engine.model.loads == loads + 2
        w.generate(prompts[:1], True, None, True, version)
        engine_matches(True)
        assert engine.model.loads == loads + 3
    with pytest.raises(StaleAdapterError):
        w.generate(prompts, True, None, True, "v2")


@no_vllm_here
def test_controller_refuses_vllm_before_starting_actors(ray_local, tiny_model_path, tiny_config):
    from rlhf_core.models import minilm_folder
    from workers.cluster import ActorCallError
    from workers.controller import RLHFWorkers
    with pytest.raises(ActorCallError, match=r"rollout_backend=vllm needs resources\.gpus_per_rollout > 0"):
        RLHFWorkers(tiny_config("resources.rollout_backend=vllm"), tiny_model_path, minilm_folder(), minilm_folder())
    # asking for a GPU the cluster does not have fails on the resource check, also before any actor
    with pytest.raises(ActorCallError, match="GPU"):
        RLHFWorkers(tiny_config("resources.rollout_backend=vllm", "resources.gpus_per_rollout=1"), tiny_model_path,
                    minilm_folder(), minilm_folder())
