"""Thin Ray actors. Each method validates its input, calls `rlhf_core`, returns small values.

No decorators with hard-coded resources: `workers.controller` applies `num_cpus`/`num_gpus` from
config when it creates the actors (`ray.remote(**opts)(Class)`).
"""
from __future__ import annotations

import os

import torch


def _setup_threads(n: int) -> None:
    # Ray sets OMP_NUM_THREADS=num_cpus (often fractional → 1) inside actors; stages here run one
    # after another, so each actor may use every core while it is the busy one (STACK.md).
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


class RolloutWorker:
    """Holds one policy copy for generation; receives LoRA adapter weights from the trainer."""

    def __init__(self, model_path: str, policy_cfg, device: str, threads: int, seed: int):
        _setup_threads(threads)
        from rlhf_core.policy import Policy
        self.policy = Policy(model_path, policy_cfg, device=_device(device), seed=seed)
        self.version = "base"

    def generate(self, prompts: list[str], greedy: bool, seed: int | None = None,
                 use_adapter: bool = True) -> dict:
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("generate: prompts must be a non-empty list of strings")
        batch = self.policy.generate(prompts, greedy=greedy, seed=seed, use_adapter=use_adapter)
        out = batch.to_cpu_dict()
        out["num_tokens"] = batch.response_mask.sum(1).cpu().tolist()
        out["policy_version"] = self.version if use_adapter else "base"
        return out

    def load_adapter(self, stack: dict, version: str) -> str:
        """stack = {"merged": [adapter states folded into the base], "current": adapter state}."""
        self.policy.apply_stack(stack["merged"], stack["current"])
        self.version = version
        return version


class FeedbackWorker:
    """The constitution judge: scores (prompt, answer) pairs."""

    def __init__(self, constitution_path: str | None, encoder_path: str, harm_classifier_path: str | None,
                 threads: int):
        _setup_threads(threads)
        from rlhf_core import judge
        self.encoder = judge.TextEncoder(encoder_path)
        self.constitution = judge.load_constitution(constitution_path)
        self.harm = judge.HarmClassifier.load(harm_classifier_path, self.encoder) if harm_classifier_path else None
        self.judge = None
        if self.harm is not None:
            self.judge = judge.ConstitutionJudge(self.constitution, self.encoder, self.harm, judge.RefusalDetector())

    def fit_harm_classifier(self, texts: list[str], labels: list[int], seed: int, dest: str,
                            heldout: tuple[list[str], list[int]] | None = None) -> dict:
        """Train the harmful-request classifier on training prompts only; save it atomically.

        Returns its accuracy and false-positive rate on `heldout` (texts, labels) when given.
        """
        import numpy as np

        from rlhf_core import judge
        if len(set(labels)) < 2:
            raise ValueError("harm classifier needs both harmful and non-harmful training prompts")
        clf = judge.HarmClassifier(self.encoder).fit(texts, labels, seed=seed)
        clf.save(dest)
        if not heldout or not heldout[0]:
            return {}
        pred = clf.predict_proba(heldout[0]) >= 0.5
        y = np.asarray(heldout[1], dtype=bool)
        return {"heldout_accuracy": float((pred == y).mean()),
                "heldout_false_positive_rate": float(pred[~y].mean()) if (~y).any() else float("nan"),
                "heldout_recall": float(pred[y].mean()) if y.any() else float("nan"), "heldout_n": int(len(y))}

    def load_harm_classifier(self, path: str) -> None:
        from rlhf_core import judge
        self.harm = judge.HarmClassifier.load(path, self.encoder)
        self.judge = judge.ConstitutionJudge(self.constitution, self.encoder, self.harm, judge.RefusalDetector())

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

    def score(self, prompts: list[str], responses: list[str]):
        if self.judge is None:
            raise RuntimeError("FeedbackWorker.score before a harm classifier was trained or loaded")
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        return self.judge.score(prompts, responses)


class RewardModelTrainer:
    """Trains the Bradley–Terry reward model on preference pairs and scores answers with it."""

    def __init__(self, backbone_path: str, rm_cfg, device: str, threads: int, seed: int):
        _setup_threads(threads)
        self.backbone_path = backbone_path
        self.cfg = rm_cfg
        self.device = _device(device)
        self.seed = seed
        self.model = self.tokenizer = None
        self.norm = (0.0, 1.0)  # (mean, std) of scores on the training answers: rewards are z-scored

    def train(self, pairs: list[dict], dest: str, init_from: str | None = None) -> dict:
        """Train (warm-starting from `init_from` if given) and save to `dest`. Pairs: PREFERENCES rows."""
        import numpy as np
        from rlhf_core import reward_model as rmlib
        if len(pairs) < 2:
            raise ValueError(f"reward model needs at least 2 preference pairs, got {len(pairs)}")
        self.model, self.tokenizer = rmlib.load_reward_model(init_from or self.backbone_path)
        self.model.to(self.device)
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(pairs))
        n_hold = int(len(pairs) * self.cfg.holdout_fraction)
        hold, train = [pairs[i] for i in order[:n_hold]], [pairs[i] for i in order[n_hold:]]

        p, c, r, targets = rmlib.preference_arrays(train)
        soft = any(t != 1.0 for t in targets)  # hard labels only: the plain (optionally margin) loss
        metrics = rmlib.train_reward_model(
            self.model, self.tokenizer, p, c, r, weights=[x["weight"] for x in train],
            margins=[self.cfg.margin] * len(train) if self.cfg.margin and not soft else None,
            targets=targets if soft else None, epochs=self.cfg.epochs,
            lr=self.cfg.lr, batch_size=self.cfg.batch_size, max_length=self.cfg.max_length, seed=self.seed)
        hold = [x for x in hold if x["better"] in (0, 1)]   # accuracy needs a decided pair
        if hold:
            hp, hc, hr, _ = rmlib.preference_arrays(hold)
            metrics["heldout_accuracy"] = rmlib.pair_accuracy(self.model, self.tokenizer, hp, hc, hr)
            # Accuracy against the judge's own (noise-free) choice: what the RM can learn at best.
            judged = [x for x in hold if x.get("judge_better") in (0, 1)]
            if judged:
                jc = [x["response_a"] if x["judge_better"] == 0 else x["response_b"] for x in judged]
                jr = [x["response_b"] if x["judge_better"] == 0 else x["response_a"] for x in judged]
                metrics["heldout_accuracy_vs_judge"] = rmlib.pair_accuracy(
                    self.model, self.tokenizer, [x["prompt"] for x in judged], jc, jr)
        all_scores = rmlib.score(self.model, self.tokenizer, p + p, c + r, max_length=self.cfg.max_length)
        self.norm = (float(np.mean(all_scores)), float(np.std(all_scores) + 1e-6))
        rmlib.save_reward_model(self.model, self.tokenizer, dest)
        metrics.update(train_pairs=len(train), heldout_pairs=len(hold), score_mean=self.norm[0],
                       score_std=self.norm[1])
        return metrics

    def score(self, prompts: list[str], responses: list[str]) -> dict:
        """Raw scores and the normalised reward (z-score against the training answers)."""
        from rlhf_core import reward_model as rmlib
        if self.model is None:
            raise RuntimeError("RewardModelTrainer.score before train()")
        raw = rmlib.score(self.model, self.tokenizer, prompts, responses, max_length=self.cfg.max_length)
        return {"raw": [float(x) for x in raw],
                "normalized": [float((x - self.norm[0]) / self.norm[1]) for x in raw]}


class PolicyTrainerActor:
    """Owns the trainable policy (LoRA + value head) and its reference (adapter disabled)."""

    def __init__(self, model_path: str, policy_cfg, ppo_cfg, device: str, threads: int, seed: int):
        _setup_threads(threads)
        from rlhf_core.policy import Policy
        from rlhf_core.policy_trainer import PolicyTrainer
        self.policy = Policy(model_path, policy_cfg, device=_device(device), seed=seed)
        self.trainer = PolicyTrainer(self.policy, ppo_cfg, seed=seed)

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

    def ppo_step(self, batch: dict, scores: list[float]) -> dict:
        from rlhf_core.policy import RolloutBatch
        if len(scores) != len(batch["texts"]):
            raise ValueError(f"ppo_step: {len(scores)} scores for {len(batch['texts'])} answers")
        return self.trainer.ppo_step(RolloutBatch.from_dict(batch), torch.tensor(scores, dtype=torch.float32))

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
        self.trainer.load(src)
