"""Thin Ray actors. Each method validates its input, calls `rlhf_core`, returns small values.

No decorators with hard-coded resources: `workers.controller` applies `num_cpus`/`num_gpus` from
config when it creates the actors (`ray.remote(**opts)(Class)`).
"""
from __future__ import annotations

import functools
import os
import time

import torch


def _setup_threads(n: int) -> None:
    # Ray sets OMP_NUM_THREADS=num_cpus (often fractional → 1) inside actors; stages here run one
    # after another, so each actor may use every core while it is the busy one.
    torch.set_num_threads(n)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers
    # Load reports and weight-loading bars from 4 actors drown the run's own progress output.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def busy_clock(cls):
    """Record when each of the actor's methods (its constructor included) ran.

    The run's timeline sets these intervals against each stage's wall time, so compute is told
    apart from what Ray, Prefect and the driver add (`alignflow run` report, bench/orchestration).
    An actor runs one call at a time, so the list needs no lock.
    """
    def clocked(fn):
        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            t0 = time.time()
            try:
                return fn(self, *args, **kwargs)
            finally:
                self.__dict__.setdefault("_busy", []).append((t0, time.time()))
        return method

    for name, fn in list(vars(cls).items()):
        if callable(fn) and (name == "__init__" or not name.startswith("_")):
            setattr(cls, name, clocked(fn))

    def busy_intervals(self) -> list[tuple[float, float]]:
        """(start, end) wall-clock times of the calls since the last time this was asked; then forget them."""
        out, self._busy = self.__dict__.get("_busy", []), []
        return out

    cls.busy_intervals = busy_intervals
    return cls


class DataParallelRank:
    """A trainer actor that can be one rank of a data-parallel group (cluster.form_process_group)."""

    sync = None
    threads = 1

    def location(self) -> tuple[str, str]:
        """(node id, node IP) of this actor: where the process group's rank 0 listens."""
        import ray
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def free_port(self) -> int:
        import socket
        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def join_group(self, rank: int, world: int, address: str, loopback: bool) -> int:
        """Join the trainers' torch.distributed group (gloo on CPU, NCCL on GPU); blocks until all joined.

        The ranks share the cores while they train: each uses its share of the threads."""
        import torch.distributed as dist

        from rlhf_core.optim import GradSync
        if loopback:            # all ranks on this machine: keep the traffic off the network
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("nccl" if self.device.startswith("cuda") else "gloo", init_method=address,
                                rank=rank, world_size=world)
        self.sync = GradSync()
        self.train_threads = max(1, self.threads // world)
        self._joined()
        return rank

    def _joined(self) -> None:
        """Hook: what the trainer does once it is a rank."""


class StaleAdapterError(RuntimeError):
    """A rollout worker does not hold the adapter version it was asked to generate with: it was
    restarted (with the base weights) since the last sync. The controller re-sends the adapter."""


def check_generate_request(prompts, use_adapter: bool, expect_version: str | None, version: str) -> None:
    """What every rollout backend checks before generating (HF here, vLLM in workers/vllm_rollout.py)."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("generate: prompts must be a non-empty list of strings")
    if use_adapter and expect_version is not None and expect_version != version:
        raise StaleAdapterError(f"holds adapter {version!r}, asked for {expect_version!r}")


@busy_clock
class RolloutWorker:
    """Holds one policy copy for generation; receives LoRA adapter weights from the trainer."""

    def __init__(self, model_path: str, policy_cfg, device: str, threads: int, seed: int):
        _setup_threads(threads)
        from rlhf_core.policy import Policy
        self._build = lambda: Policy(model_path, policy_cfg, device=_device(device), seed=seed)  # noqa: E731
        self.policy = self._build()
        self.version = "base"

    def generate(self, prompts: list[str], greedy: bool, seed: int | None = None,
                 use_adapter: bool = True, expect_version: str | None = None) -> dict:
        check_generate_request(prompts, use_adapter, expect_version, self.version)
        self.policy.fold_adapter(use_adapter)      # generate through W + ΔW: one matmul per layer
        batch = self.policy.generate(prompts, greedy=greedy, seed=seed, use_adapter=use_adapter)
        out = batch.to_cpu_dict()
        out["num_tokens"] = batch.response_mask.sum(1).cpu().tolist()
        out["policy_version"] = self.version if use_adapter else "base"
        return out

    def load_adapter(self, stack: dict, version: str) -> str:
        """stack = {"merged": [adapter states folded into the base], "current": adapter state}."""
        self.policy.fold_adapter(False)
        if len(stack["merged"]) < len(self.policy.merged):
            self.policy = self._build()   # a rollback: merged adapters cannot be unmerged, start from the base
        self.policy.apply_stack(stack["merged"], stack["current"])
        self.version = version
        return version


@busy_clock
class FeedbackWorker:
    """The constitution judge: scores (prompt, answer) pairs."""

    def __init__(self, constitution_path: str | None, encoder_path: str, harm_classifier_path: str | None,
                 threads: int):
        _setup_threads(threads)
        from rlhf_core import judge
        self.encoder, self.encoder_path = judge.TextEncoder(encoder_path), encoder_path
        self.constitution = judge.load_constitution(constitution_path)
        self.harm_path = self.judge = None
        if harm_classifier_path:
            self.load_harm_classifier(harm_classifier_path)

    def fit_harm_classifier(self, texts: list[str], labels: list[int], seed: int, dest: str,
                            heldout: tuple[list[str], list[int]] | None = None) -> dict:
        """Train the harmful-request classifier on training prompts only; save it atomically.

        Returns its accuracy and false-positive rate on `heldout` (texts, labels) when given.
        """
        import numpy as np

        from rlhf_core import judge
        if len(set(labels)) < 2:
            raise ValueError("harm classifier needs both harmful and non-harmful training prompts")
        from rlhf_core.prompts import prompt_embeddings
        # the run's training prompts are the same in every run of a config: their embeddings are cached
        emb = prompt_embeddings(texts, self.encoder_path, encoder=self.encoder)
        clf = judge.HarmClassifier(self.encoder).fit(texts, labels, seed=seed, embeddings=emb)
        clf.save(dest)
        if not heldout or not heldout[0]:
            return {}
        pred = clf.predict_proba_embeddings(prompt_embeddings(heldout[0], self.encoder_path, encoder=self.encoder)) >= 0.5
        y = np.asarray(heldout[1], dtype=bool)
        return {"heldout_accuracy": float((pred == y).mean()),
                "heldout_false_positive_rate": float(pred[~y].mean()) if (~y).any() else float("nan"),
                "heldout_recall": float(pred[y].mean()) if y.any() else float("nan"), "heldout_n": int(len(y))}

    def load_harm_classifier(self, path: str) -> None:
        from rlhf_core import judge
        harm = judge.HarmClassifier.load(path, self.encoder)
        self.judge = judge.ConstitutionJudge(self.constitution, self.encoder, harm, judge.RefusalDetector())
        self.harm_path = path

    def constitution_info(self) -> dict:
        return {"version": self.constitution.version}

    def match_demonstrations(self, prompts: list[str]) -> list[str]:
        """The constitution's refusal demonstration closest in meaning to each prompt.

        A refusal that names the right reason ("malware damages computers" for a malware request)
        is a better warm-up target than a random one.
        """
        import numpy as np
        demos = list(self.constitution.refusal_demonstrations)
        sims = self.encoder.encode(prompts) @ self.encoder.encode(demos).T   # (N, D) cosine
        return [demos[i] for i in np.argmax(sims, axis=1)]

    def score(self, prompts: list[str], responses: list[str], harm_classifier: str | None = None):
        """Judge scores. Callers name the harm classifier file, so a restarted worker (fresh state)
        loads it again by itself instead of failing."""
        if harm_classifier is not None and harm_classifier != self.harm_path:
            self.load_harm_classifier(harm_classifier)
        if self.judge is None:
            raise RuntimeError("FeedbackWorker.score before a harm classifier was trained or loaded")
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        return self.judge.score(prompts, responses)

    def evaluate(self, prompts: list[str], responses: list[str]):
        """The evaluation judge's verdicts (rlhf_core/evaluation/judge.py): independent of the
        constitution judge above, and never used for training."""
        from rlhf_core.evaluation.judge import EvalJudge
        if len(prompts) != len(responses):
            raise ValueError(f"evaluate: {len(prompts)} prompts but {len(responses)} responses")
        if getattr(self, "eval_judge", None) is None:
            self.eval_judge = EvalJudge.load(self.encoder)
        return self.eval_judge.judge(prompts, responses)


@busy_clock
class RewardModelTrainer(DataParallelRank):
    """Trains the Bradley–Terry reward model (or an ensemble of them) and scores answers with it.

    With `reward_model.ensemble` = k > 1, k models are trained on bootstrap resamples of the pairs
    with different seeds; the reward is their mean and their standard deviation is the uncertainty
    (for active selection and the reward-hacking guard).
    """

    def __init__(self, backbone_path: str, rm_cfg, device: str, threads: int, seed: int):
        _setup_threads(threads)
        self.backbone_path = backbone_path
        self.cfg = rm_cfg
        self.device = _device(device)
        self.seed = seed
        self.model = self.tokenizer = None
        self.members: list = []
        self.norm = (0.0, 1.0)  # (mean, std) of scores on the training answers: rewards are z-scored
        self.threads = self.train_threads = threads

    def _member_scores(self, prompts: list[str], responses: list[str]):
        """(E, N) raw scores of every ensemble member."""
        import numpy as np

        from rlhf_core import reward_model as rmlib
        return np.stack([rmlib.score(m, self.tokenizer, prompts, responses, max_length=self.cfg.max_length)
                         for m in self.members])

    def _seed(self, round_seed: int, member: int) -> None:
        # The new scalar head's initialisation and dropout draw from torch's global RNG: seed it per
        # training round, so a run is the same whichever process (fresh, reused, resumed) trains it.
        torch.manual_seed(self.seed + 7919 * round_seed + member)

    def train(self, pairs: list[dict], dest: str, init_from: str | None = None, round_seed: int = 0) -> dict:
        """Train (warm-starting from `init_from` if given) and save to `dest`. Pairs: PREFERENCES rows."""
        import numpy as np

        from rlhf_core import reward_model as rmlib
        if len(pairs) < 2:
            raise ValueError(f"reward model needs at least 2 preference pairs, got {len(pairs)}")
        k = self.cfg.ensemble
        hold, train = self._split(pairs)
        self.members, metrics = [], {}
        torch.set_num_threads(self.train_threads)
        for i in range(k):
            src = init_from if k == 1 or init_from is None else str(rmlib.ensemble_member_path(init_from, i))
            self._seed(round_seed, i)
            model, self.tokenizer = rmlib.load_reward_model(src or self.backbone_path)
            model.to(self.device)
            if self.cfg.dropout is not None:
                rmlib.set_dropout(model, self.cfg.dropout)
            # members see bootstrap resamples of the pairs: their disagreement measures uncertainty
            part = train if k == 1 else [train[j] for j in
                                         np.random.default_rng(self.seed + i).integers(0, len(train), len(train))]
            p, c, r, targets = rmlib.preference_arrays(part)
            soft = any(t != 1.0 for t in targets)  # hard labels only: the plain (optionally margin) loss
            # a pair's own margin (an imported TRL file's); else reward_model.margin on a hard label
            margins = [x["margin"] if x.get("margin") is not None else self.cfg.margin if t == 1.0 else 0.0
                       for x, t in zip(part, targets)]
            m = rmlib.train_reward_model(
                model, self.tokenizer, p, c, r, weights=[x["weight"] for x in part],
                margins=margins if any(margins) else None,
                targets=targets if soft else None, epochs=self.cfg.epochs,
                lr=self.cfg.lr, batch_size=self.cfg.batch_size, max_length=self.cfg.max_length, seed=self.seed + i,
                sync=self.sync)
            metrics = metrics or m                      # training curve of the first member
            self.members.append(model)
        self.model = self.members[0]
        if self.sync is not None and self.sync.rank > 0:
            return {}                                   # a replica: rank 0 evaluates and saves
        torch.set_num_threads(self.threads)
        hold = [x for x in hold if x["better"] in (0, 1)]   # accuracy needs a decided pair
        if hold:
            metrics["heldout_accuracy"] = self._pair_accuracy(hold, "better")
            # Accuracy against the judge's own (noise-free) choice: what the RM can learn at best.
            judged = [x for x in hold if x.get("judge_better") in (0, 1)]
            if judged:
                metrics["heldout_accuracy_vs_judge"] = self._pair_accuracy(judged, "judge_better")
        p, c, r, _ = rmlib.preference_arrays(train)
        all_scores = self._member_scores(p + p, c + r)
        self.norm = (float(all_scores.mean()), float(all_scores.mean(0).std() + 1e-6))
        if k == 1:
            rmlib.save_reward_model(self.model, self.tokenizer, dest)
        else:
            rmlib.save_ensemble(self.members, self.tokenizer, dest)
            metrics["heldout_ensemble_std"] = float(self._member_scores(
                [x["prompt"] for x in hold] * 2, [x["response_a"] for x in hold] + [x["response_b"] for x in hold]
            ).std(0).mean()) if hold else None
        metrics.update(train_pairs=len(train), heldout_pairs=len(hold), score_mean=self.norm[0],
                       score_std=self.norm[1], ensemble=k)
        return metrics

    def _pair_accuracy(self, rows: list[dict], key: str) -> float:
        """Share of pairs whose preferred answer (by `key`) gets the higher mean score."""
        from rlhf_core.evaluation import preference_accuracy
        prompts = [x["prompt"] for x in rows]
        s = self._member_scores(prompts * 2, [x["response_a"] for x in rows] + [x["response_b"] for x in rows]).mean(0)
        return preference_accuracy([x[key] for x in rows], s[: len(rows)], s[len(rows):])[0]

    def _split(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        """(held out, train) by prompt (reward_model.holdout_split): no answer on both sides."""
        from rlhf_core import reward_model as rmlib
        return rmlib.holdout_split(rows, self.cfg.holdout_fraction)

    def train_cost(self, pairs: list[dict], dest: str, init_from: str | None = None, round_seed: int = 0) -> dict:
        """Safe-RLHF cost model on the pairs whose two answers both carry a safety label; saved to `dest`.

        Held-out metric: the share of answers on the right side of zero cost (unsafe > 0 > safe).
        """
        import numpy as np

        from rlhf_core import reward_model as rmlib
        labelled = [x for x in pairs if x.get("is_safe_a") is not None and x.get("is_safe_b") is not None]
        if len(labelled) < 2:
            raise ValueError(f"cost model needs at least 2 pairs with both safety labels, got {len(labelled)}")
        hold, train = self._split(labelled)
        self._seed(round_seed, 0)
        self.model, self.tokenizer = rmlib.load_reward_model(init_from or self.backbone_path)
        self.model.to(self.device)
        if self.cfg.dropout is not None:
            rmlib.set_dropout(self.model, self.cfg.dropout)
        col = lambda rows, k: [x[k] for x in rows]  # noqa: E731
        torch.set_num_threads(self.train_threads)
        metrics = rmlib.train_cost_model(
            self.model, self.tokenizer, col(train, "prompt"), col(train, "response_a"), col(train, "response_b"),
            col(train, "is_safe_a"), col(train, "is_safe_b"), weights=col(train, "weight"), epochs=self.cfg.epochs,
            lr=self.cfg.lr, batch_size=self.cfg.batch_size, max_length=self.cfg.max_length, seed=self.seed,
            sync=self.sync)
        self.members = [self.model]
        if self.sync is not None and self.sync.rank > 0:
            return {}                                   # a replica: rank 0 evaluates and saves
        torch.set_num_threads(self.threads)
        if hold:
            prompts = col(hold, "prompt") * 2
            costs = rmlib.score(self.model, self.tokenizer, prompts, col(hold, "response_a") + col(hold, "response_b"),
                                max_length=self.cfg.max_length)
            unsafe = ~np.array(col(hold, "is_safe_a") + col(hold, "is_safe_b"), dtype=bool)
            metrics["heldout_sign_accuracy"] = float(np.mean((costs > 0) == unsafe))
            metrics["heldout_unsafe_share"] = float(unsafe.mean())
        rmlib.save_reward_model(self.model, self.tokenizer, dest)
        metrics.update(train_pairs=len(train), heldout_pairs=len(hold), unlabelled_pairs=len(pairs) - len(labelled))
        return metrics

    def load(self, path: str, norm: tuple[float, float] = (0.0, 1.0)) -> None:
        """A model `train`/`train_cost` saved (one model, or an ensemble's member folders) with the
        normalisation it was trained with: a resumed run scores exactly as the crashed one did."""
        from pathlib import Path

        from rlhf_core import reward_model as rmlib
        members = sorted(Path(path).glob("member_*")) or [Path(path)]
        self.members = []
        for m in members:
            model, self.tokenizer = rmlib.load_reward_model(m)
            self.members.append(model.to(self.device))
        self.model, self.norm = self.members[0], (float(norm[0]), float(norm[1]))

    def member_scores(self, prompts: list[str], responses: list[str]) -> list[list[float]]:
        if not self.members:
            raise RuntimeError("RewardModelTrainer.member_scores before train()")
        return self._member_scores(prompts, responses).tolist()

    def score(self, prompts: list[str], responses: list[str]) -> dict:
        """Raw scores (the ensemble mean), the normalised reward (z-score against the training
        answers) and, for an ensemble, the members' standard deviation per answer."""
        if not self.members:
            raise RuntimeError("RewardModelTrainer.score before train()")
        s = self._member_scores(prompts, responses)
        raw = s.mean(0)
        out = {"raw": [float(x) for x in raw], "normalized": [float((x - self.norm[0]) / self.norm[1]) for x in raw]}
        if len(self.members) > 1:
            out["std"] = [float(x) for x in s.std(0)]
        return out


@busy_clock
class PolicyTrainerActor(DataParallelRank):
    """Owns the trainable policy (LoRA + value head) and its reference (adapter disabled).

    With resources.policy_trainers = k > 1 there are k of these, ranks of one data-parallel group:
    every update call goes to all of them, with the whole batch (rlhf_core PolicyTrainer.join)."""

    def __init__(self, model_path: str, policy_cfg, ppo_cfg, device: str, threads: int, seed: int, safe_cfg=None):
        _setup_threads(threads)
        from rlhf_core.policy import Policy
        self.device, self.threads = _device(device), threads
        # every rank builds the same seeded policy; join_group broadcasts rank 0's anyway
        self._build = lambda: Policy(model_path, policy_cfg, device=self.device, seed=seed)  # noqa: E731
        self.policy = self._build()
        self.configure(ppo_cfg, safe_cfg, seed)

    def _joined(self) -> None:
        torch.set_num_threads(self.train_threads)
        self.trainer.join(self.sync)

    def configure(self, ppo_cfg, safe_cfg=None, seed: int = 0) -> None:
        """A fresh update rule (algorithm, optimizer, KL and λ controllers) on the current policy."""
        from rlhf_core.policy_trainer import PolicyTrainer

        def make(policy):
            trainer = PolicyTrainer(policy, ppo_cfg, seed=seed, safe_cfg=safe_cfg)
            trainer.sync = self.sync        # the ranks' weights are equal already: no broadcast needed
            return trainer
        self._trainer = make
        self.trainer = make(self.policy)

    def begin_sft(self, lr: float) -> None:
        self.trainer.begin_sft(lr)

    def end_sft(self) -> None:
        self.trainer.end_sft()

    def sft_step(self, prompts: list[str], responses: list[str], negatives: list[tuple[str, str]] | None = None,
                 unlikelihood_coef: float = 0.0, unlikelihood_tokens: int = 3) -> dict:
        if len(prompts) != len(responses) or not prompts:
            raise ValueError("sft_step: prompts and responses must be equal-length, non-empty lists")
        return self.trainer.sft_step(prompts, responses, max_tokens=self.policy.cfg.max_new_tokens,
                                     negatives=negatives, unlikelihood_coef=unlikelihood_coef,
                                     unlikelihood_tokens=unlikelihood_tokens)

    def ppo_step(self, batch: dict, scores: list[float], costs: list[float] | None = None) -> dict:
        from rlhf_core.policy import RolloutBatch
        if len(scores) != len(batch["texts"]) or (costs is not None and len(costs) != len(scores)):
            raise ValueError(f"ppo_step: {len(scores)} scores, {None if costs is None else len(costs)} costs "
                             f"for {len(batch['texts'])} answers")
        return self.trainer.ppo_step(RolloutBatch.from_dict(batch), torch.tensor(scores, dtype=torch.float32),
                                     None if costs is None else torch.tensor(costs, dtype=torch.float32))

    def dpo_begin(self, dpo_cfg) -> None:
        from rlhf_core.dpo import DPOTrainer
        self.dpo = DPOTrainer(self.policy, dpo_cfg, sync=self.sync)

    def dpo_reference(self, prompts: list[str], chosen: list[str], rejected: list[str], cache: str | None,
                      model_id: str) -> tuple:
        return self.dpo.reference_logps(prompts, chosen, rejected, cache=cache, model_id=model_id)

    def dpo_step(self, prompts: list[str], chosen: list[str], rejected: list[str], ref_chosen, ref_rejected) -> dict:
        return self.dpo.step(prompts, chosen, rejected, ref_chosen, ref_rejected)

    def sequence_kl(self, batch: dict) -> list[float]:
        from rlhf_core.policy import RolloutBatch
        b = RolloutBatch.from_dict({k: (v.to(self.policy.device) if torch.is_tensor(v) else v)
                                    for k, v in batch.items() if k in ("query_ids", "query_mask", "response_ids",
                                                                         "response_mask", "texts")})
        return self.trainer.sequence_kl(b)

    def adapter_stack(self) -> dict:
        return {"merged": self.policy.merged, "current": self.policy.adapter_state()}

    def save(self, dest: str) -> str:
        return self.trainer.save(dest)

    def load(self, src: str) -> None:
        from pathlib import Path
        if len(list(Path(src).glob("merged_*.safetensors"))) < len(self.policy.merged):
            # a rollback past a merge: rebuild from the base (optimizer and KL/λ controllers start afresh)
            self.policy = self._build()
            self.trainer = self._trainer(self.policy)
        self.trainer.load(src)
