"""The single controller that owns the long-lived Ray actors of a run.

Prefect tasks call one `RLHFWorkers` object; it fans work out to the rollout and feedback pools,
drives the PPO inner loop (generate → score → update → sync adapter), and applies a timeout to
every remote call so that a hung actor fails loudly instead of stalling the run.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import ray
import torch

from rlhf_core.config import GROUPED_ESTIMATORS
from rlhf_core.prompts import sample_prompts
from workers.actors import (
    FeedbackWorker,
    PolicyTrainerActor,
    RolloutWorker,
    StaleAdapterError,
)
from workers.cluster import (
    ActorCallError,
    check_resources,
    start_reward_trainers,
    start_trainer_ranks,
    timed_get,
    wait_ready,
)

Progress = Callable[[int], None]   # advance(n): called as work items finish
GEN_CHUNK = 32                      # prompts per generate call: batches well on CPU, small for progress


def _rollout_class(r):
    """The rollout actor class of resources.rollout_backend; a vLLM request that cannot work fails
    here, before any actor loads a model."""
    if r.rollout_backend == "hf":
        return RolloutWorker
    from workers.vllm_rollout import VLLMRolloutWorker, require_vllm
    if r.gpus_per_rollout <= 0:
        raise ActorCallError("resources.rollout_backend=vllm needs resources.gpus_per_rollout > 0 "
                             "(each vLLM engine runs on a GPU Ray assigns to its actor)")
    if not ray.cluster_resources().get("GPU"):
        require_vllm()      # no GPU anywhere in the cluster: say what is missing
    return VLLMRolloutWorker


def merge_rollouts(parts: list[dict], pad_id: int) -> dict:
    """Concatenate generate() outputs of several workers: queries re-left-padded, answers right-padded."""
    Q = max(p["query_ids"].shape[1] for p in parts)
    A = max(p["response_ids"].shape[1] for p in parts)

    def pad(t, width, left, value):
        extra = width - t.shape[1]
        if extra == 0:
            return t
        fill = torch.full((t.shape[0], extra), value, dtype=t.dtype)
        return torch.cat([fill, t] if left else [t, fill], dim=1)

    return {
        "query_ids": torch.cat([pad(p["query_ids"], Q, True, pad_id) for p in parts]),
        "query_mask": torch.cat([pad(p["query_mask"], Q, True, 0) for p in parts]),
        "response_ids": torch.cat([pad(p["response_ids"], A, False, pad_id) for p in parts]),
        "response_mask": torch.cat([pad(p["response_mask"], A, False, 0) for p in parts]),
        "texts": [t for p in parts for t in p["texts"]],
        "num_tokens": [n for p in parts for n in p["num_tokens"]],
        "policy_version": parts[0]["policy_version"],
    }


def merge_scores(parts: list):
    """Concatenate JudgeScores (or EvalVerdicts) dataclasses field by field (arrays, lists, dicts of arrays)."""
    first = parts[0]
    out = {}
    for f in dataclasses.fields(first):
        vals = [getattr(p, f.name) for p in parts]
        if isinstance(vals[0], dict):
            out[f.name] = {k: np.concatenate([v[k] for v in vals]) for k in vals[0]}
        elif isinstance(vals[0], list):
            out[f.name] = [x for v in vals for x in v]
        else:
            out[f.name] = np.concatenate([np.asarray(v) for v in vals])
    return type(first)(**out)


class RLHFWorkers:
    """Creates every actor once per flow run and reuses them across iterations."""

    def __init__(self, cfg, policy_path: str, encoder_path: str, rm_backbone_path: str):
        self.cfg = cfg
        r, seed, dev = cfg.resources, cfg.run.seed, cfg.run.device
        self.timeout = r.actor_timeout_s
        k = r.reward_model_trainers
        # policy ranks, reward-model ranks, cost-model ranks
        check_resources(cfg, n_trainers=r.policy_trainers + k * (1 + int(cfg.safe_rlhf.enabled)))
        # The pools restart a lost actor and the controller redoes its shard (re-sending the adapter);
        # Ray must not retry a method on the fresh instance by itself: its state would be missing.
        # Trainers hold state no restart can restore: losing one fails the run (`alignflow resume`).
        pool = dict(max_restarts=r.max_restarts, max_task_retries=0)
        roll = ray.remote(num_cpus=r.cpus_per_rollout, num_gpus=r.gpus_per_rollout, **pool)(_rollout_class(r))
        feed = ray.remote(num_cpus=r.cpus_per_feedback, **pool)(FeedbackWorker)
        self.rollout = [roll.remote(policy_path, cfg.policy, dev, r.torch_threads, seed + i)
                        for i in range(r.rollout_workers)]
        self.feedback = [feed.remote(cfg.feedback.constitution, encoder_path, None, r.torch_threads)
                         for _ in range(r.feedback_workers)]
        self.placements = []
        self.reward_trainers = self._ranks(start_reward_trainers(cfg, rm_backbone_path, self.timeout))
        self.reward_model = self.reward_trainers[0]     # rank 0: evaluates, saves and scores
        # Safe-RLHF: a second model of the same kind, trained as a cost model on the safety labels
        self.cost_trainers = (self._ranks(start_reward_trainers(cfg, rm_backbone_path, self.timeout, seed_offset=1))
                              if cfg.safe_rlhf.enabled else [])
        self.cost_model = self.cost_trainers[0] if self.cost_trainers else None
        # the policy: rank 0 serves the adapter, saves and scores; every rank takes every update
        self.policy_trainers = self._ranks(start_trainer_ranks(
            PolicyTrainerActor, r.policy_trainers,
            (policy_path, cfg.policy, cfg.ppo, dev, r.torch_threads, seed, cfg.safe_rlhf), r, self.timeout, "policy"))
        self.policy_trainer = self.policy_trainers[0]
        # Block until every actor has loaded its model, so a bad path fails here, not mid-stage.
        timed_get([a.__ray_ready__.remote() for a in self._actors()], self.timeout, "starting actors")
        from transformers import AutoTokenizer
        self.pad_id = AutoTokenizer.from_pretrained(policy_path).pad_token_id or 0
        self.adapter_version = "base"
        self.harm_classifier: str | None = None
        self.sft_rounds = 0
        self.redone_shards = 0      # shards of a lost pool actor that were run again

    def _ranks(self, started: tuple[list, object]) -> list:
        actors, placement = started
        if placement is not None:
            self.placements.append(placement)
        return actors

    def _update(self, method: str, *args, what: str):
        """Call `method` on every policy rank (arguments put in the object store once); rank 0's result."""
        refs = [ray.put(a) if isinstance(a, (dict, list)) else a for a in args]
        return timed_get([getattr(t, method).remote(*refs) for t in self.policy_trainers], self.timeout, what)[0]

    # ----- rollout pool ----------------------------------------------------------------------
    def generate(self, prompts: list[str], *, greedy: bool, seed: int | None = None,
                 use_adapter: bool = True, progress: Progress | None = None) -> dict:
        """Answers for `prompts` (in order), spread over the rollout workers in length-sorted chunks."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
        chunks = [order[i: i + GEN_CHUNK] for i in range(0, len(order), GEN_CHUNK)]
        expect = self.adapter_version if use_adapter else None

        def submit(k: int):
            return self.rollout[k % len(self.rollout)].generate.remote(
                [prompts[i] for i in chunks[k]], greedy, None if seed is None else seed + k, use_adapter, expect)

        def restore(k: int) -> None:
            w = self.rollout[k % len(self.rollout)]
            wait_ready(w, self.timeout, "restarting a rollout worker")
            timed_get(w.load_adapter.remote(self.policy_trainer.adapter_stack.remote(), self.adapter_version),
                      self.timeout, "re-sending the adapter to a restarted rollout worker")

        advance = (lambda k: progress(len(chunks[k]))) if progress else None
        results = self._gather(len(chunks), submit, restore, "rollout", advance)
        merged = merge_rollouts(results, self.pad_id)
        inverse = np.argsort([i for idx in chunks for i in idx])  # position of prompt i in merged
        return _select(merged, inverse.tolist())

    def _gather(self, n: int, submit: Callable, restore: Callable[[int], None], what: str,
                done: Callable[[int], None] | None = None) -> list:
        """Run shards 0..n-1 (`submit(k)` → ref) on a pool and return their results in order.

        A shard whose actor was lost (killed, crashed, restarted with a fresh state) is redone once
        the actor is back and restored (`restore(k)`): every shard's result is kept exactly once,
        none dropped, none doubled. Each shard is tried at most resources.max_restarts + 1 times.
        """
        pending = {submit(k): k for k in range(n)}
        tries = [1] * n
        results: dict[int, object] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout)
            if not ready:
                raise ActorCallError(f"{what}: no shard finished within {self.timeout:.0f}s "
                                     "(resources.actor_timeout_s)")
            k = pending.pop(ready[0])
            try:
                results[k] = ray.get(ready[0])
            except (ray.exceptions.RayActorError, StaleAdapterError) as e:
                if tries[k] > self.cfg.resources.max_restarts:
                    raise ActorCallError(f"{what}: shard {k} failed {tries[k]} times; last: {e}") from e
                print(f"ALERT: {what} actor lost ({type(e).__name__}); redoing shard {k} "
                      f"(try {tries[k] + 1} of {self.cfg.resources.max_restarts + 1})")
                restore(k)
                tries[k] += 1
                self.redone_shards += 1
                pending[submit(k)] = k
                continue
            if done:
                done(k)
        return [results[k] for k in range(n)]

    def sync_adapter(self, version: str) -> None:
        """Trainer → rollout weight sync: the LoRA adapter only, put in the object store once."""
        state_ref = self.policy_trainer.adapter_stack.remote()
        timed_get([w.load_adapter.remote(state_ref, version) for w in self.rollout], self.timeout,
                  "weight sync to rollout workers")
        self.adapter_version = version

    # ----- feedback pool ---------------------------------------------------------------------
    def fit_harm_classifier(self, texts: list[str], labels: list[int], dest: str,
                            heldout: tuple[list[str], list[int]] | None = None) -> dict:
        metrics = timed_get(
            self.feedback[0].fit_harm_classifier.remote(texts, labels, self.cfg.run.seed, dest, heldout),
            self.timeout, "harm classifier training")
        self.load_harm_classifier(dest)
        return metrics

    def load_harm_classifier(self, path: str) -> None:
        """Judge calls name this file from now on (a restarted feedback worker loads it itself)."""
        timed_get([w.load_harm_classifier.remote(path) for w in self.feedback], self.timeout, "loading harm classifier")
        self.harm_classifier = path

    def constitution_info(self) -> dict:
        return timed_get(self.feedback[0].constitution_info.remote(), self.timeout, "constitution")

    def match_demonstrations(self, prompts: list[str]) -> list[str]:
        return timed_get(self.feedback[0].match_demonstrations.remote(prompts), self.timeout, "matching demonstrations")

    def _on_feedback_pool(self, prompts: list[str], responses: list[str], call: Callable, what: str):
        """`call(worker, prompts, responses)` → ref on shards of the pairs over the feedback pool,
        lost workers' shards redone; the shards' dataclasses merged in order."""
        shard = max(1, -(-len(prompts) // len(self.feedback)))
        starts = list(range(0, len(prompts), shard))

        def submit(k: int):
            s = starts[k]
            return call(self.feedback[k % len(self.feedback)], prompts[s: s + shard], responses[s: s + shard])
        return merge_scores(self._gather(len(starts), submit, self._wait_feedback_worker, what))

    def _wait_feedback_worker(self, k: int) -> None:
        wait_ready(self.feedback[k % len(self.feedback)], self.timeout, "restarting a feedback worker")

    def judge(self, prompts: list[str], responses: list[str], progress: Progress | None = None):
        """The constitution judge's scores (the training side's feedback)."""
        # workers are told the harm-classifier file, so a restarted one loads it itself
        scores = self._on_feedback_pool(prompts, responses,
                                        lambda w, p, r: w.score.remote(p, r, self.harm_classifier), "feedback (judge)")
        if progress:
            progress(len(prompts))
        return scores

    def evaluate_answers(self, prompts: list[str], responses: list[str]):
        """The evaluation judge's verdicts (EvalVerdicts): independent of every training signal."""
        return self._on_feedback_pool(prompts, responses, lambda w, p, r: w.evaluate.remote(p, r), "evaluation judge")

    def score_answers(self, prompts: list[str], rollout: dict, *, with_reward_model: bool,
                      kl_rows: list[int] | None) -> tuple:
        """Training-judge scores, evaluation-judge verdicts, reward-model scores and KL to the
        reference of the same answers (KL of the rows `kl_rows` only: it is the costly one).

        They live on different actors: the reward model and KL are submitted first and run while
        the feedback pool judges. Returns (JudgeScores, EvalVerdicts, raw reward-model scores or
        None, per-answer KL (NaN outside kl_rows) or None).
        """
        responses = rollout["texts"]
        rm_ref = self.reward_model.score.remote(prompts, responses) if with_reward_model else None
        kl_refs = self._sequence_kl_refs(_select(rollout, kl_rows)) if kl_rows else None
        scores = self.judge(prompts, responses)
        verdicts = self.evaluate_answers(prompts, responses)
        rm = timed_get(rm_ref, self.timeout, "reward model scoring")["raw"] if rm_ref is not None else None
        kls = None
        if kl_refs is not None:
            kls = [float("nan")] * len(responses)
            for i, v in zip(kl_rows, self._collect_kl(kl_refs)):
                kls[i] = v
        return scores, verdicts, rm, kls

    # ----- reward model ----------------------------------------------------------------------
    def train_reward_model(self, pairs: list[dict], dest: str, init_from: str | None = None,
                           round_seed: int = 0) -> dict:
        """All ranks train together (each on its share of every batch); rank 0's metrics."""
        return timed_get([t.train.remote(pairs, dest, init_from, round_seed) for t in self.reward_trainers],
                         self.timeout, "reward model training")[0]

    def configure_policy_update(self, ppo_cfg, safe_cfg) -> None:
        """Switch the RL algorithm between runs of `ppo` (benchmarks): a fresh trainer state."""
        # the config validates each assignment (Safe-RLHF needs gae): switch in an order that stays valid
        if safe_cfg.enabled:
            self.cfg.ppo, self.cfg.safe_rlhf = ppo_cfg, safe_cfg
        else:
            self.cfg.safe_rlhf, self.cfg.ppo = safe_cfg, ppo_cfg
        self._update("configure", ppo_cfg, safe_cfg, self.cfg.run.seed, what="configuring the policy update")

    def reward_members(self, prompts: list[str], responses: list[str]) -> list[list[float]]:
        """Every ensemble member's raw scores, (E, N) (E = 1 without an ensemble)."""
        return timed_get(self.reward_model.member_scores.remote(prompts, responses), self.timeout,
                         "reward model scoring")

    def train_cost_model(self, pairs: list[dict], dest: str, init_from: str | None = None,
                         round_seed: int = 0) -> dict:
        """All cost-model ranks train together; rank 0's metrics."""
        return timed_get([t.train_cost.remote(pairs, dest, init_from, round_seed) for t in self.cost_trainers],
                         self.timeout, "cost model training")[0]

    def reward(self, prompts: list[str], responses: list[str]) -> dict:
        return timed_get(self.reward_model.score.remote(prompts, responses), self.timeout, "reward model scoring")

    # ----- policy ----------------------------------------------------------------------------
    def warmup(self, prompts: list[str], responses: list[str], *, epochs: int, version: str = "warmup",
               negatives: dict[str, list[str]] | None = None, progress: Progress | None = None) -> dict:
        """Supervised stage on judge-picked targets, merged into the base (the new PPO reference),
        then synced to the rollout pool.

        `negatives` maps a prompt to answers to make unlikely (refusals of a safe prompt); they join
        the batches their prompt is in.
        """
        w = self.cfg.warmup
        negatives = negatives or {}
        self.sft_rounds += 1
        rng = np.random.default_rng(self.cfg.run.seed * 1000 + self.sft_rounds)
        self._update("begin_sft", w.lr, what="warm-up setup")
        history = []
        for _ in range(epochs):
            order = rng.permutation(len(prompts))
            for s in range(0, len(order), w.batch_size):
                idx = order[s: s + w.batch_size]
                batch_prompts = [prompts[i] for i in idx]
                negs = [(p, n) for p in dict.fromkeys(batch_prompts) for n in negatives.get(p, [])]
                history.append(self._update("sft_step", batch_prompts, [responses[i] for i in idx], negs,
                                            w.unlikelihood_coef, w.unlikelihood_tokens, what="warm-up step"))
                if progress:
                    progress(1)
        self._update("end_sft", what="merging the warm-up adapter")
        self.sync_adapter(version)
        per_epoch = max(1, len(history) // epochs)

        def mean(key, part):
            return float(np.mean([h[key] for h in part]))
        return {"warmup_loss_first_epoch": mean("sft_loss", history[:per_epoch]),
                "warmup_loss_last_epoch": mean("sft_loss", history[-per_epoch:]),
                "warmup_unlikelihood_first_epoch": mean("unlikelihood_loss", history[:per_epoch]),
                "warmup_unlikelihood_last_epoch": mean("unlikelihood_loss", history[-per_epoch:]),
                "warmup_negatives": sum(len(v) for v in negatives.values()), "warmup_steps": len(history)}

    def ppo(self, prompt_rows: list[dict], iteration: int, progress: Progress | None = None,
            start: dict | None = None, on_step: Callable[[dict], None] | None = None) -> tuple[list, list]:
        """The RL inner loop: per step generate → reward → PPO update → adapter sync.

        `on_step(state)` is called after every step with what continuing needs besides the policy
        checkpoint: {"step": steps done, "rng": the batch sampler's state, "history", "experience"}.
        `start` is such a state (the policy restored to its checkpoint): the loop continues after
        its step and takes the steps an uninterrupted loop would have taken.
        Returns (per-step metrics, experience rows for schemas.EXPERIENCE).
        """
        p = self.cfg.ppo
        rng = np.random.default_rng(self.cfg.run.seed * 1000 + iteration)
        harmful = [r for r in prompt_rows if r["kind"] == "harmful"]
        other = [r for r in prompt_rows if r["kind"] != "harmful"]
        history, experience, first = [], [], 0
        if start is not None:
            rng.bit_generator.state = start["rng"]
            history, experience, first = list(start["history"]), list(start["experience"]), int(start["step"])
        # Group estimators (GRPO, RLOO, …) compare k answers to the same prompt: k consecutive rows.
        k = p.group_size if p.advantage_estimator in GROUPED_ESTIMATORS else 1
        n_prompts = p.rollout_batch_size // k
        for step in range(first, p.steps):
            # Balanced batches: equal harmful and benign/borderline prompts, so that refusing
            # everything cannot raise the mean reward (the sparse-reward trap).
            half, by_source = n_prompts // 2, self.cfg.data.balance_sources
            batch_rows = (sample_prompts(harmful, half, rng, by_source)
                          + sample_prompts(other, n_prompts - half, rng, by_source))
            batch_rows = [r for r in batch_rows for _ in range(k)]
            prompts = [r["prompt"] for r in batch_rows]
            roll = self.generate(prompts, greedy=False, seed=int(rng.integers(1 << 30)))
            reward_ref = self.reward_model.score.remote(prompts, roll["texts"])
            use_cost = self.cost_model is not None and self.cfg.safe_rlhf.enabled
            cost_ref = self.cost_model.score.remote(prompts, roll["texts"]) if use_cost else None
            rewards = timed_get(reward_ref, self.timeout, "reward model scoring")
            scores = [float(np.clip(x, -p.reward_clip, p.reward_clip)) for x in rewards["normalized"]]
            costs = None
            if cost_ref is not None:
                # raw costs: their sign means unsafe (> 0) or safe (< 0), which the threshold relies on
                clip = self.cfg.safe_rlhf.cost_clip
                raw = timed_get(cost_ref, self.timeout, "cost scoring")["raw"]
                costs = [float(np.clip(x, -clip, clip)) for x in raw]
            batch = {k: roll[k] for k in ("query_ids", "query_mask", "response_ids", "response_mask", "texts")}
            m = self._update("ppo_step", batch, scores, costs, what=f"PPO step {step}")
            self.sync_adapter(f"iter{iteration}-step{step + 1}")
            seq_kl = m.pop("seq_kl")
            m["reward_model_score"] = float(np.mean(rewards["raw"]))
            m["reward_std"] = float(np.std(scores))
            history.append(m)
            for j, (r, text, raw, sc, kl, n) in enumerate(zip(batch_rows, roll["texts"], rewards["raw"], scores,
                                                              seq_kl, roll["num_tokens"])):
                experience.append({"step": step, "prompt_id": r["prompt_id"], "kind": r["kind"], "response": text,
                                   "reward_model_score": raw, "reward": sc, "kl": kl, "num_tokens": n,
                                   "cost": None if costs is None else costs[j]})
            if progress:
                progress(1)
            if on_step:
                on_step({"step": step + 1, "rng": rng.bit_generator.state, "history": history,
                         "experience": experience})
        return history, experience

    def dpo(self, prompts: list[str], chosen: list[str], rejected: list[str], *, cache: str | None, model_id: str,
            progress_ref: Progress | None = None, progress: Progress | None = None) -> dict:
        """Offline DPO/IPO on the pairs: reference log-probs once (cached), then epochs of steps,
        then the adapter is synced to the rollout pool. Returns metrics (first/last epoch)."""
        d = self.cfg.dpo
        self._update("dpo_begin", d, what="DPO setup")
        ref = self.policy_trainer.dpo_reference.remote(prompts, chosen, rejected, cache, model_id)
        ref_c, ref_r, computed = timed_get(ref, self.timeout, "DPO reference log-probs")
        if progress_ref:
            progress_ref(len(prompts))
        history = []
        order_rng = np.random.default_rng(self.cfg.run.seed)
        for _ in range(d.epochs):
            order = order_rng.permutation(len(prompts))
            for s in range(0, len(order), d.batch_size):
                idx = order[s: s + d.batch_size]
                history.append(self._update(
                    "dpo_step", [prompts[i] for i in idx], [chosen[i] for i in idx], [rejected[i] for i in idx],
                    ref_c[idx].tolist(), ref_r[idx].tolist(), what="DPO step"))
                if progress:
                    progress(1)
        self.sync_adapter("dpo")
        per_epoch = max(1, len(history) // d.epochs)

        def mean(key: str, part: list[dict]) -> float:
            return float(np.mean([h[key] for h in part]))
        return {"steps": len(history), "pairs": len(prompts), "reference_logps_computed": int(computed),
                **{f"{k}_first_epoch": mean(k, history[:per_epoch]) for k in ("loss", "reward_accuracy")},
                **{f"{k}_last_epoch": mean(k, history[-per_epoch:])
                   for k in ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")}}

    def restore(self, policy: str | None, reward_model: dict | None, cost_model: dict | None,
                sft_rounds: int) -> None:
        """Put the actors where a crashed run left them: the policy checkpoint (weights, optimizer,
        controllers, RNG) synced to the rollout pool, and the reward/cost models as trained."""
        if policy:
            self.load_policy(policy)
        for actor, rec in ((self.reward_model, reward_model), (self.cost_model, cost_model)):
            if actor is not None and rec:
                timed_get(actor.load.remote(rec["path"], (rec.get("score_mean", 0.0), rec.get("score_std", 1.0))),
                          self.timeout, f"loading {rec['path']}")
        self.sft_rounds = sft_rounds

    def sequence_kl(self, rollout: dict) -> list[float]:
        return self._collect_kl(self._sequence_kl_refs(rollout))

    def _sequence_kl_refs(self, rollout: dict) -> list:
        """KL to the reference of every answer, the rows split over the policy ranks (no collective:
        each rank holds the same weights and scores its part alone)."""
        k = len(self.policy_trainers)
        parts = [list(range(r, len(rollout["texts"]), k)) for r in range(k)]
        return [(rows, t.sequence_kl.remote(_select(rollout, rows)))
                for rows, t in zip(parts, self.policy_trainers) if rows]

    def _collect_kl(self, refs: list) -> list[float]:
        out = [0.0] * sum(len(rows) for rows, _ in refs)
        for rows, ref in refs:
            for i, v in zip(rows, timed_get(ref, self.timeout, "KL to reference")):
                out[i] = v
        return out

    def save_policy(self, dest: str) -> str:
        return timed_get(self.policy_trainer.save.remote(dest), self.timeout, "saving the policy adapter")

    def load_policy(self, adapter_dir: str) -> None:
        """Load a saved adapter (+ value head) into the trainer and sync it to the rollout pool."""
        self._update("load", adapter_dir, what=f"loading adapter {adapter_dir}")
        self.sync_adapter(adapter_dir)

    def busy_intervals(self) -> dict[str, list[tuple[float, float]]]:
        """Per role, when its actors computed since the last call (the run's timeline). An actor
        that does not answer within a few seconds (lost, or stuck in a call) is left out."""
        roles = {"rollout": self.rollout, "feedback": self.feedback, "reward_model": self.reward_trainers,
                 "cost_model": self.cost_trainers, "policy": self.policy_trainers}
        # asked all at once, so the actors answer in parallel at each stage's end, not one after another
        refs = [(role, a.busy_intervals.remote()) for role, actors in roles.items() for a in actors]
        out: dict[str, list] = {}
        for role, ref in refs:
            try:
                out.setdefault(role, []).extend(ray.get(ref, timeout=10))
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                pass
        return out

    def _actors(self) -> list:
        return self.rollout + self.feedback + self.reward_trainers + self.cost_trainers + self.policy_trainers

    def shutdown(self) -> None:
        for a in self._actors():
            ray.kill(a)
        from ray.util.placement_group import remove_placement_group
        for placement in self.placements:
            remove_placement_group(placement)


def _select(d: dict, idx: list[int]) -> dict:
    out = {}
    for k, v in d.items():
        if torch.is_tensor(v):
            out[k] = v[idx]
        elif isinstance(v, list):
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v
    return out
