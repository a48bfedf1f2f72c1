"""The policy: a causal LM with a LoRA adapter and a value head on its trunk.

One copy of the base weights serves three roles:
- policy  π_θ      = base + LoRA adapter
- reference π_ref  = the same model with the adapter disabled (no second copy)
- critic  V_φ      = a linear value head on the policy's last hidden state

Token layout of a batch (B rows): [query, left-padded to Q | response, right-padded to A].
Position ids are computed from the attention mask so that left padding does not shift positions
(generation does the same), which keeps log-probs identical between rollout and training.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from rlhf_core.algorithms import entropy_from_logits, logprobs_from_logits


@dataclass
class RolloutBatch:
    """Generated answers as token ids. Shapes: query (B, Q), response (B, A)."""
    query_ids: torch.Tensor        # (B, Q) left-padded chat-formatted prompts
    query_mask: torch.Tensor       # (B, Q) 1 = real token
    response_ids: torch.Tensor     # (B, A) right-padded answers
    response_mask: torch.Tensor    # (B, A) 1 = answer token (up to and including the first EOS)
    texts: list[str]               # decoded answers

    def to_cpu_dict(self) -> dict:
        return {"query_ids": self.query_ids.cpu(), "query_mask": self.query_mask.cpu(),
                "response_ids": self.response_ids.cpu(), "response_mask": self.response_mask.cpu(),
                "texts": list(self.texts)}

    @classmethod
    def from_dict(cls, d: dict) -> "RolloutBatch":
        return cls(d["query_ids"], d["query_mask"], d["response_ids"], d["response_mask"], d["texts"])


def response_mask_from_ids(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each row. (B, A) -> (B, A).

    EOS and PAD are the same token for SmolLM2, so the mask cannot be `ids != pad`.
    """
    is_eos = (response_ids == eos_id).int()
    eos_seen_before = torch.cumsum(is_eos, dim=1) - is_eos  # (B, A) count of EOS strictly before t
    return (eos_seen_before == 0).long()


class Policy(nn.Module):
    def __init__(self, model_path: str, cfg, device: str = "cpu", seed: int = 0):
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        self.cfg = cfg
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        base.config.use_cache = True
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=lora_target_names(base, cfg.lora_target_modules), task_type="CAUSAL_LM")
        self.lora_config = lora
        self.model = get_peft_model(base, lora)
        # Adapters already folded into the base weights (the warm-up), oldest first. With them
        # merged, "adapter disabled" is the warm-up policy: PPO's reference is the policy RL
        # starts from, as in InstructGPT, not the raw pretrained model.
        self.merged: list[dict[str, torch.Tensor]] = []
        self._unfolded: dict[str, torch.Tensor] = {}   # W of the adapted layers while folded (fold_adapter)
        hidden = base.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        # Safe-RLHF's second critic: the expected cost to go, trained only when the cost is used
        self.cost_value_head = nn.Linear(hidden, 1)
        for head in (self.value_head, self.cost_value_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.to(self.device)
        self.eos_id = self.tokenizer.eos_token_id

    # ----- text <-> tokens -------------------------------------------------------------------
    def format_prompts(self, prompts: list[str]) -> list[str]:
        if self.tokenizer.chat_template:
            return [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                       add_generation_prompt=True) for p in prompts]
        return [f"User: {p}\nAssistant:" for p in prompts]

    def encode_queries(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(self.format_prompts(prompts), return_tensors="pt", padding=True, truncation=True,
                             max_length=self.cfg.max_prompt_tokens, add_special_tokens=False)
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def encode_responses(self, responses: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise demonstration answers (+EOS) into a right-padded (B, A) batch."""
        ids = [self.tokenizer(r, add_special_tokens=False).input_ids[: max_tokens - 1] + [self.eos_id]
               for r in responses]
        width = max(len(x) for x in ids)
        out = torch.full((len(ids), width), self.eos_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            out[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return out.to(self.device), mask.to(self.device)

    # ----- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str], *, greedy: bool, max_new_tokens: int | None = None,
                 use_adapter: bool = True, seed: int | None = None) -> RolloutBatch:
        self.model.eval()
        if seed is not None:
            torch.manual_seed(seed)
        q_ids, q_mask = self.encode_queries(prompts)
        kwargs = dict(do_sample=not greedy, max_new_tokens=max_new_tokens or self.cfg.max_new_tokens,
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_id)
        if not greedy:
            kwargs.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=0)
        ctx = self.model.disable_adapter() if not use_adapter else contextlib.nullcontext()
        with ctx:
            out = self.model.generate(input_ids=q_ids, attention_mask=q_mask, **kwargs)
        r_ids = out[:, q_ids.shape[1]:]                              # (B, A)
        if r_ids.shape[1] == 0:  # every row stopped at once: keep one EOS column
            r_ids = torch.full((len(prompts), 1), self.eos_id, dtype=torch.long, device=self.device)
        r_mask = response_mask_from_ids(r_ids, self.eos_id)
        texts = self.tokenizer.batch_decode(r_ids * r_mask + self.eos_id * (1 - r_mask), skip_special_tokens=True)
        return RolloutBatch(q_ids, q_mask, r_ids, r_mask, [t.strip() for t in texts])

    # ----- scoring ---------------------------------------------------------------------------
    def forward(self, batch: RolloutBatch, *, use_adapter: bool = True, with_values: bool = False,
                with_cost_values: bool = False, with_entropy: bool = False, temperature: float = 1.0) -> dict:
        """Per-token log π(a_t|s_t) of the response (B, A), optionally values V(s_t), cost values
        V_C(s_t) (B, A) and entropy."""
        with_hidden = with_values or with_cost_values
        input_ids = torch.cat([batch.query_ids, batch.response_ids], dim=1)       # (B, Q+A)
        attn = torch.cat([batch.query_mask, batch.response_mask], dim=1)          # (B, Q+A)
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        Q, A = batch.query_ids.shape[1], batch.response_ids.shape[1]
        ctx = self.model.disable_adapter() if not use_adapter else contextlib.nullcontext()
        with ctx:
            # logits_to_keep: run the LM head (49k × hidden) only over the positions that predict
            # answer tokens, not over the prompt: a large share of the compute of a small model.
            out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos,
                             output_hidden_states=with_hidden, use_cache=False, logits_to_keep=A + 1)
        # logits at position t predict token t+1: response token j is predicted at Q-1+j,
        # and the kept window is positions Q-1 … Q+A-1
        logits = out.logits[:, :-1, :]                                            # (B, A, V)
        if temperature != 1.0:
            logits = logits / temperature
        res = {"logp": logprobs_from_logits(logits, batch.response_ids)}          # (B, A)
        if with_entropy:
            res["entropy"] = entropy_from_logits(logits)
        if with_hidden:
            h = out.hidden_states[-1][:, Q - 1: -1, :]                            # (B, A, H)
            if with_values:
                res["values"] = self.value_head(h).squeeze(-1)                    # (B, A)
            if with_cost_values:
                res["cost_values"] = self.cost_value_head(h).squeeze(-1)          # (B, A)
        return res

    def forward_shared_prompts(self, query_ids: torch.Tensor, query_mask: torch.Tensor,
                               continuations: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                               ) -> list[torch.Tensor]:
        """Per-token log-probs of several answer sets to ONE batch of prompts, prompts run once.

        `continuations`: (rows (n,), response_ids (n, A), response_mask (n, A)) — row i of a set
        answers prompt rows[i]. The prompts go through the model once with a KV cache; each set
        then runs only its own answer tokens against the cached prompt rows, and gradients flow
        back through the cache. The supervised stage scores targets and negatives of the same
        prompts this way: a negative's 3-token opening costs 3 tokens, not a whole prompt.
        Equal to `forward` on the concatenated rows (tests/test_policy.py). Returns [(n, A)].
        """
        from transformers.cache_utils import DynamicCache
        pos = (query_mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=query_ids, attention_mask=query_mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1)
        first = out.logits[:, -1, :]                                              # (B, V): answer token 0
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        result = []
        for rows, r_ids, r_mask in continuations:
            cache = DynamicCache([(k[rows], v[rows]) for k, v in kv])
            attn = torch.cat([query_mask[rows], r_mask], dim=1)                   # (n, Q+A)
            r_pos = (attn.cumsum(1) - 1).clamp(min=0)[:, query_ids.shape[1]:]
            o = self.model(input_ids=r_ids, attention_mask=attn, position_ids=r_pos, past_key_values=cache,
                           use_cache=True)
            logits = torch.cat([first[rows, None, :], o.logits[:, :-1, :]], dim=1)   # (n, A, V)
            result.append(logprobs_from_logits(logits, r_ids))
        return result

    # ----- weights ---------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """LoRA weights only (a few MB): what moves from trainer to rollout workers."""
        from peft import get_peft_model_state_dict
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict
        result = set_peft_model_state_dict(self.model, {k: v.to(self.device) for k, v in state.items()})
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"adapter state has unexpected keys, e.g. {unexpected[:3]}")

    def merge_adapter(self) -> None:
        """Fold the current LoRA adapter into the base weights and start a fresh (zero) adapter."""
        from peft import get_peft_model
        self.merged.append(self.adapter_state())
        base = self.model.merge_and_unload()
        self.model = get_peft_model(base, self.lora_config).to(self.device)

    def fold_adapter(self, on: bool) -> None:
        """Rollout copies: hold W + ΔW_LoRA in each adapted layer's weight (on), or the exact W (off).

        Folded, an adapted layer costs one matmul per decoding step instead of three plus an add;
        decoding a small model on CPU is dominated by such per-layer work. W is copied aside when
        folding and copied back when unfolding (never subtracted), so nothing drifts by rounding.
        Unfold before loading, merging or disabling the adapter; training copies never fold.
        """
        if on == bool(self._unfolded):
            return
        from peft.tuners.lora import LoraLayer
        layers = {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLayer)}
        if on:
            self._unfolded = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
            self.model.merge_adapter()
        else:
            self.model.unmerge_adapter()
            with torch.no_grad():
                for n, m in layers.items():
                    m.base_layer.weight.copy_(self._unfolded[n])
            self._unfolded = {}

    def apply_stack(self, merged: list[dict], current: dict) -> None:
        """Reach the state (merged adapters…, current adapter) from this policy's own state.

        `self.merged` must be a prefix of `merged`: adapters are only ever merged, never un-merged.
        """
        if len(merged) < len(self.merged):
            raise RuntimeError(f"policy already merged {len(self.merged)} adapters, asked for {len(merged)}")
        for state in merged[len(self.merged):]:
            self.load_adapter_state(state)
            self.merge_adapter()
        self.load_adapter_state(current)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return ([p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())
                + list(self.cost_value_head.parameters()))


# LoRA targets per `config.model_type` for policy.lora_target_modules = "auto": every attention and
# MLP projection (QLoRA's finding: adapting all of them is what matches full fine-tuning).
_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS = {
    "llama": _PROJECTIONS, "mistral": _PROJECTIONS, "qwen2": _PROJECTIONS, "qwen3": _PROJECTIONS,
    "gemma": _PROJECTIONS, "gemma2": _PROJECTIONS,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}


def lora_target_names(model: nn.Module, wanted: list[str] | str) -> list[str]:
    """The LoRA target module names for `model`: `wanted`'s that exist in it, or with "auto" those
    of its architecture (LORA_TARGETS), else every linear layer but the output head. Fails clearly
    when none exist."""
    from transformers.pytorch_utils import Conv1D
    if wanted == "auto":
        kind = getattr(getattr(model, "config", None), "model_type", None)
        if kind in LORA_TARGETS:
            wanted = LORA_TARGETS[kind]
        else:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            wanted = sorted({n.split(".")[-1] for n, m in model.named_modules()
                             if isinstance(m, (nn.Linear, Conv1D)) and m is not head})
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    present = [w for w in wanted if w in names]
    if not present:
        raise ValueError(f"policy.lora_target_modules {wanted} match no module of this model; "
                         f"linear layers include e.g. {sorted(names)[:12]}")
    return present
