"""Optional vLLM rollout backend: `VLLMRolloutWorker`, a drop-in for `workers.actors.RolloutWorker`.

What it is. The same actor interface as the HF rollout worker (`generate`, `load_adapter`,
`version`), with decoding done by a vLLM engine on a CUDA GPU. Weight sync stays LoRA-sized on the
wire ("Weight sync"): the trainer sends the adapter stack
{"merged": [...], "current": {...}}; this actor folds it into full weights on a CPU copy of the HF
policy (W + ΔW for every adapted layer, merged adapters first, in order) and writes those layers
into the engine in place. Only the adapted layers move; embeddings and norms never change.

Why full weights and not vLLM's LoRARequest: adapters already merged (the warm-up) change W
itself, which a LoRARequest cannot express, and a LoRARequest is read from a folder on disk per
version. One path (write W into the engine) covers the policy, the reference (adapter off) and a
rollback.

Token layout. Prompts are chat-formatted and tokenised by the HF policy's own `encode_queries`
(truncated left to policy.max_prompt_tokens) and handed to vLLM as token ids, and the answers are
laid out by `outputs_to_batch` exactly as `Policy.generate` lays them out: queries left-padded to
Q, answers right-padded to A, mask 1 up to and including the first EOS. The trainer recomputes
every log-prob from these ids, so the two backends feed it the same kind of batch.

Status. The HF backend (`RolloutWorker`) stays the default and the reference for correctness.
This module was written against vLLM's public API (LLM.generate with token prompts,
SamplingParams, LLM.collective_rpc, the in-process driver worker, LLM.reset_prefix_cache) but has
NOT been run on a GPU or with vllm installed in this project yet. What runs without vllm
(`outputs_to_batch`, `decode_texts`, `answer_tokens`, `sampling_kwargs`, `merged_weights`, the worker
against a fake engine) is tested in tests/test_vllm_backend.py.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch

from workers.actors import _setup_threads, busy_clock, check_generate_request

BACKEND_KEY = "resources.rollout_backend"


# ----- availability --------------------------------------------------------------------------
def vllm_available() -> bool:
    """True when the vllm package is installed and torch sees a CUDA GPU.

    `find_spec` instead of `import vllm`: importing vllm takes seconds and sets up CUDA state, and
    the driver only needs to know whether the actors can start; they import it for real.
    """
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def require_vllm() -> None:
    """Raise a RuntimeError that says what is missing, before any model is loaded."""
    if vllm_available():
        return
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("no vllm package")
    else:
        missing.append(f"vllm {_vllm_version()} installed")
    if not torch.cuda.is_available():
        why = f"no CUDA GPU visible to torch {torch.__version__}"
        if torch.version.cuda is None:
            why += " (a CPU-only build of torch)"
        elif os.environ.get("CUDA_VISIBLE_DEVICES") == "":
            # Ray hides every GPU from an actor that reserved none
            why += " (CUDA_VISIBLE_DEVICES is empty: in a Ray actor, resources.gpus_per_rollout is 0)"
        missing.append(why)
    raise RuntimeError(f"{BACKEND_KEY}=vllm needs a CUDA GPU and the vllm package (pip install vllm); "
                       f"this machine has {' and '.join(missing)}. Use {BACKEND_KEY}=hf (the default) here.")


def _vllm_version() -> str:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


# ----- pure helpers (no vllm needed) -----------------------------------------------------------
def outputs_to_batch(query_token_lists: list[list[int]], response_token_lists: list[list[int]],
                     texts: list[str], pad_id: int, eos_id: int) -> dict:
    """Per-row token lists → the dict `RolloutWorker.generate` returns (without policy_version).

    query_ids (B, Q) left-padded with pad_id, query_mask (B, Q), response_ids (B, A) right-padded
    with pad_id, response_mask (B, A) = 1 up to and including the first EOS (`response_mask_from_ids`,
    as in `Policy.generate`), texts, num_tokens (B,). A is the longest answer (at least 1), which is
    the width HF `generate` stops at.
    """
    from rlhf_core.policy import response_mask_from_ids
    B = len(query_token_lists)
    if not (B == len(response_token_lists) == len(texts)) or B == 0:
        raise ValueError(f"outputs_to_batch: {B} queries, {len(response_token_lists)} responses, "
                         f"{len(texts)} texts (need the same, non-zero number)")
    Q = max(len(q) for q in query_token_lists)
    A = max(1, max(len(r) for r in response_token_lists))
    query_ids = torch.full((B, Q), pad_id, dtype=torch.long)
    query_mask = torch.zeros((B, Q), dtype=torch.long)
    response_ids = torch.full((B, A), pad_id, dtype=torch.long)
    for i, (q, r) in enumerate(zip(query_token_lists, response_token_lists)):
        if not q:
            raise ValueError(f"outputs_to_batch: query {i} has no tokens")
        # A short answer is one that stopped at EOS; anything else (a stop string, an abort, a
        # context-length cut) would be padded with tokens the mask counts as answer when pad != EOS.
        if len(r) < A and (not r or eos_id not in r):
            raise ValueError(f"outputs_to_batch: response {i} has {len(r)} < {A} tokens and no EOS "
                             f"(id {eos_id}): generation stopped for another reason than EOS or max tokens")
        query_ids[i, Q - len(q):] = torch.tensor(q, dtype=torch.long)
        query_mask[i, Q - len(q):] = 1
        if r:
            response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    response_mask = response_mask_from_ids(response_ids, eos_id)
    return {"query_ids": query_ids, "query_mask": query_mask, "response_ids": response_ids,
            "response_mask": response_mask, "texts": [t.strip() for t in texts],
            "num_tokens": response_mask.sum(1).tolist()}


def decode_texts(tokenizer, response_token_lists: list[list[int]], eos_id: int) -> list[str]:
    """Answer texts decoded as `Policy.generate` decodes them: tokens up to the first EOS, special
    tokens skipped, stripped. Decoding here (not vLLM's incremental detokeniser) keeps the texts the
    reward model and judge see identical between the backends."""
    cut = [r[: r.index(eos_id) + 1] if eos_id in r else r for r in response_token_lists]
    return [t.strip() for t in tokenizer.batch_decode(cut, skip_special_tokens=True)]


def answer_tokens(completion, eos_id: int) -> list[int]:
    """Token ids of one vLLM CompletionOutput, ending in the EOS it stopped at.

    vLLM reports an EOS stop as finish_reason "stop" with stop_reason None. Its token_ids carry
    that EOS; should a version leave it out, it is put back, since the answer layout (and the
    trainer's log-probs) count the EOS as the answer's last token, as the HF backend does.
    """
    tokens = list(completion.token_ids)
    stopped_at_eos = completion.finish_reason == "stop" and getattr(completion, "stop_reason", None) is None
    if stopped_at_eos and (not tokens or tokens[-1] != eos_id):
        tokens.append(eos_id)
    return tokens


def sampling_kwargs(policy_cfg, greedy: bool, seed: int | None, n: int) -> list[dict]:
    """Keyword arguments of one vllm.SamplingParams per prompt row.

    Greedy is temperature 0 (vLLM's greedy path). Sampling uses policy.temperature / top_p and no
    top-k, as `Policy.generate` does (top_k=0 there). Seeds are per row (seed + i): group
    estimators send the same prompt k times in a row, and one shared per-request seed would give
    those k rows the same answer.
    """
    base = {"max_tokens": policy_cfg.max_new_tokens}
    if greedy:
        return [dict(base, temperature=0.0) for _ in range(n)]
    return [dict(base, temperature=policy_cfg.temperature, top_p=policy_cfg.top_p,
                 seed=None if seed is None else seed + i) for i in range(n)]


def merged_weights(policy, use_adapter: bool = True) -> dict[str, torch.Tensor]:
    """Full weights of every LoRA-adapted linear layer of `policy`, named as in the plain HF
    checkpoint ("model.layers.0.self_attn.q_proj.weight"), which is what vLLM's `load_weights` reads.

    W is the layer's base weight, which already holds the merged adapters (`Policy.merge_adapter`
    folds them in, oldest first); with `use_adapter`, ΔW = scale · B A of the current adapter is
    added. So a plain HF model with these weights loaded computes the LoRA policy (use_adapter) or
    its reference (not). Tensors without the adapter share storage with the policy: copy before
    changing them. Only these layers are returned: LoRA changes nothing else.
    """
    from peft.tuners.lora import LoraLayer
    adapter = policy.model.active_adapter
    out = {}
    for name, m in policy.model.get_base_model().named_modules():
        if not isinstance(m, LoraLayer):
            continue
        if m.merged:   # folded (fold_adapter): W + ΔW is already in the weight; adding ΔW again doubles it
            raise RuntimeError(f"merged_weights: layer {name} has its adapter folded in; unfold it first")
        w = m.base_layer.weight.detach()
        out[f"{name}.weight"] = w + m.get_delta_weight(adapter).detach() if use_adapter else w
    if not out:
        raise RuntimeError("merged_weights: the policy has no LoRA layers")
    return out


# ----- the vLLM engine (everything that imports vllm is below) ---------------------------------
def _new_engine(model_path: str, policy_cfg, seed: int, dtype: str, gpu_memory_utilization: float):
    # In-process engine core (V1) or the V0 engine: the model is then reachable as
    # llm.llm_engine.model_executor.driver_worker.model_runner.model, and weights are written into
    # it with no serialisation. setdefault: a user who set it keeps theirs (then collective_rpc).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # With a separate engine process, collective_rpc pickles our worker function (cloudpickle),
    # which vLLM refuses unless this is set; the function and the process are both ours.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM
    return LLM(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed,
               gpu_memory_utilization=gpu_memory_utilization,
               # prompts are truncated to max_prompt_tokens: a longer context only reserves KV cache
               max_model_len=policy_cfg.max_prompt_tokens + policy_cfg.max_new_tokens,
               # group estimators repeat each prompt k times, which prefix caching serves once; it
               # is only safe where the cache can be reset after each weight push
               enable_prefix_caching=hasattr(LLM, "reset_prefix_cache"))


def _sampling_params_cls():
    from vllm import SamplingParams
    return SamplingParams


def _driver_model(llm):
    """The engine's model when it lives in this process (V0, or V1 without multiprocessing), else None.

    driver_worker is vLLM's WorkerWrapperBase, which forwards attribute reads to the real worker.
    """
    executor = getattr(llm.llm_engine, "model_executor", None)
    runner = getattr(getattr(executor, "driver_worker", None), "model_runner", None)
    model = _runner_model(runner) if runner is not None else None
    return model if callable(getattr(model, "load_weights", None)) else None


def _runner_model(runner):
    # get_model() where it exists: newer runners may wrap `.model` (CUDA-graph wrappers) and
    # return the bare model from get_model()
    return runner.get_model() if callable(getattr(runner, "get_model", None)) else runner.model


def _load_weights_on_worker(worker, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside each vLLM worker (collective_rpc passes the worker first). Module level, so that
    cloudpickle sends it by reference."""
    loaded = _runner_model(worker.model_runner).load_weights(weights)
    return len(loaded) if loaded is not None else len(weights)


def push_weights(llm, weights: dict[str, torch.Tensor], timeout_s: float) -> str:
    """Write `weights` (HF names) into the engine in place; returns the path used.

    vLLM's `load_weights` maps HF names onto its fused layers (q/k/v → qkv_proj, gate/up →
    gate_up_proj) and copies into the existing GPU tensors, so captured CUDA graphs stay valid.
    The prefix cache holds KV computed with the old weights: it is reset after every push (vLLM
    issue #9744), or prompts shared across a sync would decode against stale keys and values.
    """
    items = [(name, w.contiguous()) for name, w in weights.items()]
    model = _driver_model(llm)
    if model is not None:
        loaded = model.load_weights(items)
        counts, path = [len(loaded) if loaded is not None else len(items)], "driver_worker"
    elif callable(getattr(llm, "collective_rpc", None)):
        counts, path = llm.collective_rpc(_load_weights_on_worker, timeout=timeout_s, args=(items,)), "collective_rpc"
    else:
        raise RuntimeError(
            f"vllm {_vllm_version()}: the engine exposes neither an in-process model "
            "(llm.llm_engine.model_executor.driver_worker.model_runner.model) nor LLM.collective_rpc, "
            f"so rollout weights cannot be updated; use a vllm version with either, or {BACKEND_KEY}=hf")
    if not counts or min(counts) == 0:
        raise RuntimeError(f"vllm {_vllm_version()} loaded none of {len(items)} weights "
                           f"(e.g. {items[0][0]!r}) on some worker: names do not match the engine's model")
    reset = getattr(llm, "reset_prefix_cache", None)
    if reset is not None and reset() is False:
        raise RuntimeError("vLLM refused to reset its prefix cache after a weight update "
                           "(requests still running?): answers would reuse KV of the old weights")
    return path


@busy_clock
class VLLMRolloutWorker:
    """`RolloutWorker`'s interface, decoding with vLLM on a GPU; the HF policy copy stays on CPU and
    only turns adapter stacks into full layer weights."""

    def __init__(self, model_path: str, policy_cfg, device: str, threads: int, seed: int, *,
                 dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3, sync_timeout_s: float = 300.0):
        require_vllm()   # first: a machine without GPU or vllm fails here, before any model loads
        if device not in ("auto", "cuda", "cuda:0"):
            raise ValueError(f"VLLMRolloutWorker generates on the GPU Ray assigns it (CUDA_VISIBLE_DEVICES); "
                             f"device must be 'auto', 'cuda' or 'cuda:0', got {device!r} (run.device)")
        _setup_threads(threads)
        from rlhf_core.policy import Policy
        self._build = lambda: Policy(model_path, policy_cfg, device="cpu", seed=seed)
        self.policy = self._build()
        self.cfg = policy_cfg
        self.sync_timeout_s = sync_timeout_s
        # bfloat16 by default: every vLLM attention backend runs it, while float32 support has come
        # and gone between versions (vllm PRs #19319, #19404). The trainer rescores every answer in
        # float32 either way; bfloat16 only samples from a slightly different distribution than
        # the HF reference. dtype="float32" where the attention backend has it, to compare exactly.
        self.llm = _new_engine(model_path, policy_cfg, seed, dtype, gpu_memory_utilization)
        self.version = "base"
        # Roles the engine's weights currently serve. Fresh from the checkpoint, with a zero adapter
        # and nothing merged, the pretrained weights are both the policy and the reference.
        self._serves = {"policy", "reference"}

    def _serve(self, role: str) -> None:
        if role not in self._serves:
            self._serves = set()   # a push that fails half way leaves weights that serve no role
            push_weights(self.llm, merged_weights(self.policy, use_adapter=role == "policy"), self.sync_timeout_s)
            self._serves = {role}

    def generate(self, prompts: list[str], greedy: bool, seed: int | None = None,
                 use_adapter: bool = True, expect_version: str | None = None) -> dict:
        check_generate_request(prompts, use_adapter, expect_version, self.version)
        self._serve("policy" if use_adapter else "reference")
        q_ids, q_mask = self.policy.encode_queries(prompts)                  # (B, Q) as the HF backend
        queries = [row[m.bool()].tolist() for row, m in zip(q_ids, q_mask)]
        params_cls = _sampling_params_cls()
        params = [params_cls(**kw) for kw in sampling_kwargs(self.cfg, greedy, seed, len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": q} for q in queries], params, use_tqdm=False)
        responses = [answer_tokens(o.outputs[0], self.policy.eos_id) for o in outs]
        tok = self.policy.tokenizer
        out = outputs_to_batch(queries, responses, decode_texts(tok, responses, self.policy.eos_id),
                               tok.pad_token_id, self.policy.eos_id)
        out["policy_version"] = self.version if use_adapter else "base"
        return out

    def load_adapter(self, stack: dict, version: str) -> str:
        """stack = {"merged": [adapter states folded into the base], "current": adapter state}."""
        if len(stack["merged"]) < len(self.policy.merged):
            self.policy = self._build()   # a rollback: merged adapters cannot be unmerged, start from the base
        # Until the push succeeds this worker holds no named version: a failed sync then makes the
        # controller's next versioned generate raise StaleAdapterError, and it re-sends the adapter.
        self.version = "unsynced"
        self.policy.apply_stack(stack["merged"], stack["current"])
        self._serves = set()      # the engine holds neither role of the new stack yet
        # Pushed now, not at the next generate: a failing sync then fails the sync call, which the
        # controller times and names, and the policy (not the reference) is what is asked for next.
        self._serve("policy")
        self.version = version
        return version
