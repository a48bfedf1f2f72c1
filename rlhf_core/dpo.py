"""Offline preference optimisation (DPO, IPO, conservative DPO) of the policy's LoRA adapter.

No sampling, no reward model: the policy learns straight from preference pairs. The reference
log-probs log π_ref(y|x) of every chosen and rejected answer are computed once, before training,
with the adapter disabled (the reference is the policy training starts from), and kept in a
cache file next to the run, so a second run on the same pairs and model skips that pass.

Plain torch on one device; the Ray actor only forwards calls (workers/actors.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rlhf_core import schemas
from rlhf_core.algorithms import get_preference_loss
from rlhf_core.optim import GradSync, GuardedStep, shard_rows
from rlhf_core.policy import Policy

REFERENCE_CACHE = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("ref_chosen", pa.float64(), nullable=False),
    pa.field("ref_rejected", pa.float64(), nullable=False),
])


def preference_pairs(rows: Sequence[dict]) -> tuple[list[str], list[str], list[str], int]:
    """(prompts, chosen, rejected, ties dropped) from PREFERENCES rows; a soft label picks its side
    by P(a ≻ b) ≥ ½, a tie (better = −1) teaches DPO nothing and is dropped."""
    prompts, chosen, rejected, ties = [], [], [], 0
    for r in rows:
        better = r["better"]
        if r.get("soft_label") is not None:
            better = -1 if r["soft_label"] == 0.5 else int(r["soft_label"] < 0.5)
        if better not in (0, 1):
            ties += 1
            continue
        prompts.append(r["prompt"])
        chosen.append(r["response_b"] if better == 1 else r["response_a"])
        rejected.append(r["response_a"] if better == 1 else r["response_b"])
    return prompts, chosen, rejected, ties


def pair_keys(model_id: str, max_tokens: int, prompts, chosen, rejected) -> list[str]:
    """A cache key per pair: the reference log-probs depend on the model, the truncation and the texts."""
    head = f"{model_id}\0{max_tokens}\0"
    return [hashlib.sha256(json.dumps([head, p, c, r]).encode()).hexdigest()[:32]
            for p, c, r in zip(prompts, chosen, rejected)]


class DPOTrainer:
    """DPO-family training of `policy`'s LoRA adapter; `cfg` is config.DPOConfig."""

    def __init__(self, policy: Policy, cfg, sync: GradSync | None = None):
        self.policy, self.cfg = policy, cfg
        self.loss = get_preference_loss(cfg.loss)
        self.optimizer = torch.optim.AdamW([q for q in policy.model.parameters() if q.requires_grad], lr=cfg.lr)
        self.step_guard = GuardedStep(cfg.max_nonfinite_updates)
        self.sync = sync    # data parallel: each rank steps on its pairs, scaled by its share (optim.py)

    def _answer_logps(self, prompts, chosen, rejected, use_adapter: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """log π(y|x) of chosen and rejected answers (B,), summed over tokens, or their mean when the
        loss is length-normalised (IPO). One prompt pass serves both answers."""
        p = self.policy
        q_ids, q_mask = p.encode_queries(list(prompts))
        c_ids, c_mask = p.encode_responses(list(chosen), p.cfg.max_new_tokens)
        r_ids, r_mask = p.encode_responses(list(rejected), p.cfg.max_new_tokens)
        rows = torch.arange(len(prompts), device=p.device)
        ctx = contextlib.nullcontext() if use_adapter else p.model.disable_adapter()
        with ctx:
            lc, lr = p.forward_shared_prompts(q_ids, q_mask, [(rows, c_ids, c_mask), (rows, r_ids, r_mask)])
        sums = [(logp * m).sum(1) for logp, m in ((lc, c_mask), (lr, r_mask))]
        if self.loss.length_normalised:
            sums = [s / m.sum(1) for s, m in zip(sums, (c_mask, r_mask))]
        return sums[0], sums[1]

    @torch.no_grad()
    def reference_logps(self, prompts, chosen, rejected, cache: str | Path | None = None,
                        model_id: str = "") -> tuple[np.ndarray, np.ndarray, int]:
        """Reference log-probs of every pair, from `cache` where present; returns (chosen, rejected,
        pairs computed now). New values are added to the cache file atomically."""
        keys = pair_keys(f"{model_id}\0{self.cfg.loss}", self.policy.cfg.max_new_tokens, prompts, chosen, rejected)
        known: dict[str, tuple[float, float]] = {}
        if cache is not None and Path(cache).exists():
            t = schemas.read_table(cache, REFERENCE_CACHE).to_pydict()
            known = dict(zip(t["key"], zip(t["ref_chosen"], t["ref_rejected"])))
        todo = [i for i, k in enumerate(keys) if k not in known]
        self.policy.model.eval()
        bs = self.cfg.batch_size
        for s in range(0, len(todo), bs):
            idx = todo[s: s + bs]
            c, r = self._answer_logps([prompts[i] for i in idx], [chosen[i] for i in idx],
                                      [rejected[i] for i in idx], use_adapter=False)
            for i, vc, vr in zip(idx, c.tolist(), r.tolist()):
                known[keys[i]] = (vc, vr)
        if cache is not None and todo:
            schemas.write_table(pa.table({"key": list(known), "ref_chosen": [v[0] for v in known.values()],
                                          "ref_rejected": [v[1] for v in known.values()]}, schema=REFERENCE_CACHE),
                                cache, REFERENCE_CACHE)
        ref = np.array([known[k] for k in keys], dtype=np.float64).reshape(-1, 2)
        return ref[:, 0], ref[:, 1], len(todo)

    def step(self, prompts, chosen, rejected, ref_chosen, ref_rejected) -> dict:
        """One optimizer step on a batch of pairs. Returns the loss and the implicit-reward metrics."""
        p = self.policy
        params = [q for q in p.model.parameters() if q.requires_grad]
        n = len(prompts)
        mine = shard_rows(n, self.sync.rank, self.sync.world) if self.sync else list(range(n))
        share = len(mine) / n      # the losses and metrics are means over pairs
        p.model.train()
        if mine:
            pick = lambda xs: [xs[i] for i in mine]  # noqa: E731
            pc, pr = self._answer_logps(pick(prompts), pick(chosen), pick(rejected), use_adapter=True)
            rc = torch.as_tensor(pick(list(ref_chosen)), dtype=pc.dtype, device=pc.device)
            rr = torch.as_tensor(pick(list(ref_rejected)), dtype=pc.dtype, device=pc.device)
            loss, metrics = self.loss.fn(pc, pr, rc, rr, self.cfg.beta, self.cfg.label_smoothing)
            loss = loss * share
        else:                   # fewer pairs than ranks: a zero gradient, zero metrics
            loss = sum(q.sum() for q in params) * 0.0
            metrics = dict.fromkeys(("chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin"), 0.0)
        applied = self.step_guard(self.optimizer, loss, params, self.cfg.max_grad_norm, f"{self.cfg.loss} loss",
                                  sync=self.sync)
        p.model.eval()
        stats = {"loss": float(loss.item()), **{k: share * v for k, v in metrics.items()}}
        if self.sync is not None:
            keys = sorted(stats)
            stats = dict(zip(keys, self.sync.sum([stats[k] for k in keys])))
        return {**stats, "skipped_updates": int(not applied)}

