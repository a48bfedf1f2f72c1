"""Policy optimisation on one device: the supervised warm-up and the on-policy RL update.

Plain torch, no Ray: the Ray actor in `workers/` only holds a `PolicyTrainer` and forwards calls.
PPO follows Ziegler et al. 2019 / InstructGPT with CleanRL's implementation details: per-token
KL penalty to the reference folded into the reward, GAE, whitened advantages, clipped surrogate
and value losses, minibatches, gradient clipping, an adaptive KL coefficient. The same update runs
GRPO, Dr. GRPO, RLOO and REINFORCE++: only the advantage estimator (`ppo.advantage_estimator`),
where the KL penalty goes (`ppo.kl_penalty`) and how token losses are averaged (`ppo.loss_agg`)
change, and critic-free estimators skip the value head.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from rlhf_core.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    LagrangeMultiplier,
    aggregate_loss,
    compute_gae,
    get_advantage_estimator,
    get_policy_loss,
    kl_estimate,
    lagrangian_advantages,
    masked_mean,
    masked_whiten,
    ppo_value_loss,
    sequence_unlikelihood_loss,
    token_level_rewards,
)
from rlhf_core.export import ADAPTER_README
from rlhf_core.io import atomic_dir
from rlhf_core.optim import GradSync, GuardedStep, shard_rows
from rlhf_core.policy import Policy, RolloutBatch


KL_CHUNK = 16     # answers per forward pass in sequence_kl


def _index(batch: RolloutBatch, idx: list[int]) -> RolloutBatch:
    return RolloutBatch(batch.query_ids[idx], batch.query_mask[idx], batch.response_ids[idx],
                        batch.response_mask[idx], [batch.texts[i] for i in idx])


def _trim(batch: RolloutBatch) -> RolloutBatch:
    """Drop all-padding columns (left of the queries, right of the answers): less compute."""
    q_keep = batch.query_mask.any(0).nonzero()
    r_keep = batch.response_mask.any(0).nonzero()
    q0 = int(q_keep[0]) if len(q_keep) else 0
    a1 = int(r_keep[-1]) + 1 if len(r_keep) else 1
    return RolloutBatch(batch.query_ids[:, q0:], batch.query_mask[:, q0:], batch.response_ids[:, :a1],
                        batch.response_mask[:, :a1], batch.texts)


class PolicyTrainer:
    def __init__(self, policy: Policy, ppo_cfg, seed: int = 0, safe_cfg=None):
        self.policy = policy
        self.cfg = ppo_cfg
        # Safe-RLHF: λ of the PPO-Lagrangian, only when a cost signal is used
        self.safe = safe_cfg if safe_cfg is not None and safe_cfg.enabled else None
        self.lagrange = (LagrangeMultiplier(self.safe.lambda_init, self.safe.cost_threshold, self.safe.lambda_lr,
                                            self.safe.lambda_window, self.safe.lambda_max) if self.safe else None)
        self.rng = random.Random(seed)
        self.kl_ctl = (AdaptiveKLController(ppo_cfg.init_kl_coef, ppo_cfg.target_kl, ppo_cfg.kl_horizon)
                       if ppo_cfg.target_kl is not None else FixedKLController(ppo_cfg.init_kl_coef))
        self.estimator = get_advantage_estimator(ppo_cfg.advantage_estimator)
        self.policy_loss_fn = get_policy_loss(ppo_cfg.policy_loss)
        self.optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=ppo_cfg.lr)
        self.step_guard = GuardedStep(ppo_cfg.max_nonfinite_updates)
        self.global_step = 0
        self.sync: GradSync | None = None     # data parallel: `join` a torch.distributed group

    # ----- data parallel ---------------------------------------------------------------------
    def join(self, sync: GradSync) -> None:
        """Train as one rank of a data-parallel group. Every rank gets every call with the whole
        batch, works on its rows (`shard_rows`) with its loss scaled by its share, and the summed
        gradients are those of the whole batch: the replicas take identical steps and match one
        trainer's (tests/test_data_parallel.py)."""
        self.sync = sync
        sync.broadcast_parameters(self.policy.trainable_parameters())

    def _mine(self, n: int) -> list[int]:
        return shard_rows(n, self.sync.rank, self.sync.world) if self.sync else list(range(n))

    def _zero_loss(self, params) -> torch.Tensor:
        """A rank with no rows of a (short) batch still joins the gradient sum, with zeros."""
        return sum(q.sum() for q in params) * 0.0

    def _sum_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Add up the ranks' shares of each metric (already scaled): the whole batch's value."""
        if self.sync is None or not stats:
            return stats
        keys = sorted(stats)        # the same order on every rank
        return dict(zip(keys, self.sync.sum([stats[k] for k in keys])))

    # ----- supervised warm-up ----------------------------------------------------------------
    def begin_sft(self, lr: float) -> None:
        """A fresh optimizer over the LoRA weights for the warm-up (the value head is not trained)."""
        params = [q for q in self.policy.model.parameters() if q.requires_grad]
        self.sft_optimizer = torch.optim.AdamW(params, lr=lr)

    def end_sft(self) -> None:
        """Merge the warm-up adapter into the base: the warm-up policy becomes PPO's reference."""
        self.sft_optimizer = None
        self.policy.merge_adapter()
        # the LoRA parameters are new objects: the PPO optimizer must track them
        self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=self.cfg.lr)
        if self.sync is not None:     # the fresh adapter's random init: rank 0's on every rank
            self.sync.broadcast_parameters(self.policy.trainable_parameters())

    def sft_step(self, prompts: list[str], responses: list[str], max_tokens: int,
                 negatives: list[tuple[str, str]] | None = None, unlikelihood_coef: float = 0.0,
                 unlikelihood_tokens: int = 8) -> dict:
        """One step of cross-entropy on answer tokens only (the prompt is context).

        `negatives`: (prompt, unwanted answer) pairs, e.g. a refusal of a safe prompt; their opening
        is pushed down with a sequence-level unlikelihood term weighted by `unlikelihood_coef`.
        Each negative's prompt must be one of `prompts`: the prompts run through the model once and
        both the targets and the negatives' openings are scored against them.
        Returns {"loss", "sft_loss", "unlikelihood_loss"}.
        """
        p = self.policy
        negatives = negatives if negatives and unlikelihood_coef > 0 else []
        row_of = {q: i for i, q in reversed(list(enumerate(prompts)))}          # first row of each prompt
        missing = [n[0] for n in negatives if n[0] not in row_of]
        if missing:
            raise ValueError(f"negatives must answer prompts of this batch; not in it: {missing[0][:80]!r}")
        # data parallel: this rank's rows, and the negatives of the prompts whose first row it holds
        mine = self._mine(len(prompts))
        local = {i: j for j, i in enumerate(mine)}
        negs = [n for n in negatives if row_of[n[0]] in local]
        r_ids, r_mask = p.encode_responses(responses, max_tokens)
        # shares of the whole batch's two means (answer tokens, negatives): the ranks' losses add up to it
        tok_share = float(r_mask[mine].sum() / r_mask.sum())
        neg_share = len(negs) / len(negatives) if negatives else 0.0
        params = [q for q in p.model.parameters() if q.requires_grad]
        p.model.train()
        if mine:
            q_ids, q_mask = p.encode_queries([prompts[i] for i in mine])
            sets = [(torch.arange(len(mine), device=p.device), r_ids[mine], r_mask[mine])]
            if negs:
                nr_ids, nr_mask = p.encode_responses([n[1] for n in negs], unlikelihood_tokens + 1)
                nr_mask[:, unlikelihood_tokens:] = 0                              # the opening only, no EOS
                sets.append((torch.tensor([local[row_of[n[0]]] for n in negs], device=p.device), nr_ids, nr_mask))
            logps = p.forward_shared_prompts(q_ids, q_mask, sets)                # [(B, A), (n, k)]
            sft_loss = -masked_mean(logps[0], r_mask[mine].float()) * tok_share
        else:
            sft_loss = self._zero_loss(params)
        ul_loss = (sequence_unlikelihood_loss(logps[1], nr_mask, unlikelihood_tokens) * neg_share if negs
                   else torch.zeros((), device=p.device))
        loss = sft_loss + unlikelihood_coef * ul_loss
        applied = self.step_guard(self.sft_optimizer, loss, params, self.cfg.max_grad_norm, "warm-up loss",
                                  sync=self.sync)
        p.model.eval()
        stats = self._sum_stats({"loss": float(loss.item()), "sft_loss": float(sft_loss.item()),
                                 "unlikelihood_loss": float(ul_loss.item())})
        return {**stats, "skipped_updates": int(not applied)}

    # ----- PPO -------------------------------------------------------------------------------
    @torch.no_grad()
    def _experience(self, batch: RolloutBatch, scores: torch.Tensor, costs: torch.Tensor | None = None) -> dict:
        """Old log-probs, reference log-probs, values, per-token rewards, advantages, returns.

        With `costs` (Safe-RLHF) the cost gets its own critic and GAE, and the advantage is
        (A_r − λ·A_c) / (1 + λ) with the current λ.
        """
        p, cfg, est = self.policy, self.cfg, self.estimator
        mask = batch.response_mask.float()                                        # (B, A)
        old = self._forward_rows(batch, with_values=est.critic, with_cost_values=costs is not None,
                                 temperature=p.cfg.temperature)
        ref = self._forward_rows(batch, use_adapter=False, temperature=p.cfg.temperature)
        # KL in the reward (PPO, RLOO, REINFORCE++) or as a loss term (GRPO): never both
        beta = self.kl_ctl.value if cfg.kl_penalty == "reward" else 0.0
        rewards, kl = token_level_rewards(scores, old["logp"], ref["logp"], mask, beta, kl_kind=cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        values = old["values"] * mask if est.critic else torch.zeros_like(mask)
        advantages, returns = est.fn(rewards, mask, values, cfg.group_size, cfg.gamma, cfg.lam)
        if est.whiten:
            advantages = masked_whiten(advantages, mask)
        exp = {"logp": old["logp"], "ref_logp": ref["logp"], "values": values, "advantages": advantages,
               "returns": returns, "mask": mask, "kl": kl}
        if costs is not None:
            # the cost is paid once at the last token; the KL penalty belongs to the reward side only
            cost_rewards, _ = token_level_rewards(costs, old["logp"], ref["logp"], mask, 0.0)
            cost_values = old["cost_values"] * mask
            cost_adv, cost_returns = compute_gae(cost_rewards, cost_values, mask, cfg.gamma, cfg.lam)
            exp.update(cost_values=cost_values, cost_returns=cost_returns,
                       advantages=lagrangian_advantages(advantages, masked_whiten(cost_adv, mask),
                                                        self.lagrange.value))
        return exp

    def _forward_rows(self, batch: RolloutBatch, **kw) -> dict:
        """`Policy.forward` of the whole batch; data parallel, each rank runs its rows and they are
        gathered, so every rank then computes the same advantages (whitening needs the whole batch)."""
        if self.sync is None:
            return self.policy.forward(batch, **kw)
        out = self.policy.forward(_index(batch, self._mine(len(batch.texts))), **kw)
        return {k: self.sync.gather_rows(v, len(batch.texts)) for k, v in out.items()}

    def _minibatch_loss(self, batch: RolloutBatch, exp: dict, full: list[int], with_costs: bool
                        ) -> tuple[torch.Tensor, dict[str, float]]:
        """PPO loss of minibatch `full` (row indices) and its metrics. Data parallel: of this rank's
        rows of it, each term scaled by the rank's share of the term's mean (tokens, or answers for
        the per-answer aggregations), so that the ranks' losses add up to the whole minibatch's."""
        p, cfg, critic = self.policy, self.cfg, self.estimator.critic
        idx = full[self.sync.rank::self.sync.world] if self.sync else full
        if not idx:     # a short minibatch: zeros, with the same metric names (the ranks sum them)
            keys = ["pg_loss", "entropy", "clipfrac", "approx_kl"] + ["vf_loss", "vf_clipfrac"] * critic + \
                ["cost_vf_loss"] * with_costs + ["kl_loss"] * (cfg.kl_penalty == "loss")
            return self._zero_loss(p.trainable_parameters()), dict.fromkeys(keys, 0.0)
        m = exp["mask"][idx]
        tok = float(m.sum() / exp["mask"][full].sum()) if self.sync else 1.0       # share of the tokens
        agg = tok if cfg.loss_agg == "token-mean" else len(idx) / len(full)       # share of the pg/KL mean
        out = p.forward(_index(batch, idx), with_values=critic, with_cost_values=with_costs, with_entropy=True,
                        temperature=p.cfg.temperature)
        pg_loss, pg_stats = self.policy_loss_fn(out["logp"], exp["logp"][idx], exp["advantages"][idx],
                                                m, cfg.clip_eps, agg=cfg.loss_agg, max_tokens=p.cfg.max_new_tokens)
        entropy = masked_mean(out["entropy"], m)
        loss = agg * pg_loss - cfg.ent_coef * tok * entropy
        stats = {"pg_loss": agg * pg_loss.item(), "entropy": tok * entropy.item(),
                 "clipfrac": tok * float(pg_stats["clipfrac"]), "approx_kl": tok * float(pg_stats["approx_kl"])}
        if critic:
            vf_loss, vf_clipfrac = ppo_value_loss(out["values"], exp["values"][idx], exp["returns"][idx],
                                                  m, cfg.clip_value)
            loss = loss + cfg.vf_coef * tok * vf_loss
            stats.update(vf_loss=tok * vf_loss.item(), vf_clipfrac=tok * float(vf_clipfrac))
        if with_costs:
            cost_vf_loss, _ = ppo_value_loss(out["cost_values"], exp["cost_values"][idx],
                                             exp["cost_returns"][idx], m, cfg.clip_value)
            loss = loss + cfg.vf_coef * tok * cost_vf_loss
            stats["cost_vf_loss"] = tok * cost_vf_loss.item()
        if cfg.kl_penalty == "loss":
            # GRPO's k3 term, unbiased and ≥ 0, on the current policy's log-probs
            kl_loss = aggregate_loss(kl_estimate(out["logp"], exp["ref_logp"][idx], "k3"), m,
                                     cfg.loss_agg, p.cfg.max_new_tokens)
            loss = loss + self.kl_ctl.value * agg * kl_loss
            stats["kl_loss"] = agg * kl_loss.item()
        return loss, stats

    def ppo_step(self, batch: RolloutBatch, scores: torch.Tensor, costs: torch.Tensor | None = None) -> dict:
        """One update on a rollout batch with sequence-level scores (B,) and, for Safe-RLHF, costs (B,).
        Returns metrics."""
        p, cfg = self.policy, self.cfg
        if (costs is None) != (self.safe is None):
            raise ValueError("costs are required with safe_rlhf.enabled and only then")
        batch = _trim(RolloutBatch.from_dict({k: (v.to(p.device) if torch.is_tensor(v) else v)
                                              for k, v in batch.to_cpu_dict().items()}))
        scores = scores.to(p.device).float()
        costs = None if costs is None else costs.to(p.device).float()
        exp = self._experience(batch, scores, costs)
        B = batch.query_ids.shape[0]
        stats: dict[str, list[float]] = {}
        p.model.train()
        params = p.trainable_parameters()
        skipped = 0
        for _ in range(cfg.ppo_epochs):
            order = list(range(B))
            self.rng.shuffle(order)       # the same order on every rank: the ranks share the seed
            for s in range(0, B, cfg.minibatch_size):
                loss, mb_stats = self._minibatch_loss(batch, exp, order[s: s + cfg.minibatch_size],
                                                      costs is not None)
                skipped += not self.step_guard(self.optimizer, loss, params, cfg.max_grad_norm,
                                               f"PPO loss at step {self.global_step}", sync=self.sync)
                for k, v in self._sum_stats(mb_stats).items():
                    stats.setdefault(k, []).append(v)
        p.model.eval()
        seq_kl = (exp["kl"] * exp["mask"]).sum(1)                                 # (B,)
        mean_kl = float(seq_kl.mean())
        self.kl_ctl.update(mean_kl, B)
        self.global_step += 1
        metrics = {k: float(sum(v) / len(v)) for k, v in stats.items() if v}
        metrics.update(score_mean=float(scores.mean()), kl_to_reference=mean_kl, kl_coef=float(self.kl_ctl.value),
                       response_length=float(exp["mask"].sum(1).mean()), step=self.global_step,
                       skipped_updates=skipped)
        if costs is not None:
            # λ moves after the update, from this batch's episode costs (the moving average inside)
            lam_used = self.lagrange.value
            self.lagrange.update(costs.cpu().tolist())
            metrics.update(episode_cost=float(costs.mean()), cost_moving_average=self.lagrange.mean_cost,
                           cost_threshold=self.lagrange.threshold, lagrange_lambda=lam_used,
                           lagrange_lambda_next=self.lagrange.value)
        metrics["seq_kl"] = seq_kl.cpu().tolist()
        return metrics

    @torch.no_grad()
    def sequence_kl(self, batch: RolloutBatch) -> list[float]:
        """Σ_t KL estimate of each answer between policy and reference (greedy eval answers).

        Uses k3 = (r − 1) − log r, r = π_ref/π_θ, which is never negative, so a reported KL is
        never below zero even on greedy (not sampled) answers.
        """
        p, out = self.policy, []
        # In chunks: the (rows, answer tokens, vocabulary) logits of a whole evaluation set at once
        # take gigabytes (100 answers × 49 positions × 49k entries × 4 bytes ≈ 1 GB per copy).
        for s in range(0, len(batch.texts), KL_CHUNK):
            part = _trim(_index(batch, list(range(s, min(s + KL_CHUNK, len(batch.texts))))))
            pol = p.forward(part)["logp"]
            ref = p.forward(part, use_adapter=False)["logp"]
            out += (kl_estimate(pol, ref, "k3") * part.response_mask.float()).sum(1).cpu().tolist()
        return out

    # ----- checkpoints -----------------------------------------------------------------------
    def save(self, dest: str) -> str:
        """LoRA adapter (peft format), merged adapters and value heads (safetensors) and the trainer state
        (`state_dict`), written to a temp folder, then renamed: a checkpoint is whole or absent."""
        from safetensors.torch import save_file
        dest_p = Path(dest)
        with atomic_dir(dest_p) as tmp:
            self.policy.model.save_pretrained(tmp)
            # it looks like a PEFT adapter but is not one alone (the merged files): say so inside it
            (tmp / "README.md").write_text(ADAPTER_README, encoding="utf-8")
            # adapters merged into the base (the warm-up) are needed to rebuild this policy
            for i, state in enumerate(self.policy.merged):
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / f"merged_{i:02d}.safetensors"))
            for name in ("value_head", "cost_value_head"):
                head = getattr(self.policy, name)
                save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                          str(tmp / f"{name}.safetensors"))
            torch.save(self.state_dict(), tmp / TRAINER_STATE)
        return str(dest_p)

    def load(self, src: str) -> None:
        from safetensors.torch import load_file
        state = load_file(str(Path(src) / "adapter_model.safetensors"))
        merged = [load_file(str(f)) for f in sorted(Path(src).glob("merged_*.safetensors"))]
        # peft saves keys without the adapter name; set_peft_model_state_dict adds it back.
        self.policy.apply_stack(merged, state)
        self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=self.cfg.lr)
        for name in ("value_head", "cost_value_head"):
            f = Path(src) / f"{name}.safetensors"
            if f.exists():
                getattr(self.policy, name).load_state_dict(load_file(str(f)))
        if (Path(src) / TRAINER_STATE).exists():
            self.load_state_dict(torch.load(Path(src) / TRAINER_STATE, weights_only=True))

    def state_dict(self) -> dict:
        """Everything besides the weights that the next update depends on: optimizer moments, the KL
        and λ controllers, the minibatch shuffler and the torch RNG. Saved with every checkpoint, so
        a resumed run takes exactly the steps the uninterrupted run would have taken."""
        state = {"optimizer": self.optimizer.state_dict(), "kl_coef": self.kl_ctl.value,
                 "global_step": self.global_step, "rng": _encode_random_state(self.rng.getstate()),
                 "torch_rng": torch.get_rng_state()}
        if self.lagrange is not None:
            state["lagrange"] = {"log_value": self.lagrange.log_value, "costs": list(self.lagrange.costs)}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:   # the moments carry over; the learning rate is this config's
            group["lr"] = self.cfg.lr
        self.kl_ctl.value = float(state["kl_coef"])
        self.global_step = int(state["global_step"])
        self.rng.setstate(_decode_random_state(state["rng"]))
        torch.set_rng_state(state["torch_rng"])
        if self.lagrange is not None and "lagrange" in state:
            self.lagrange.log_value = float(state["lagrange"]["log_value"])
            self.lagrange.costs.clear()
            self.lagrange.costs.extend(state["lagrange"]["costs"])


TRAINER_STATE = "trainer_state.pt"


def _encode_random_state(state: tuple) -> list:
    # random.Random's state is (version, 625 ints, gauss): lists load under torch's weights_only
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_random_state(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])
