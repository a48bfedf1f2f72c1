"""Reward models: any Hugging Face model with a 1-output sequence-classification head.

`AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)` works both for encoders
(BERT / MiniLM: the head reads the [CLS] token) and for causal LMs (Llama: the head reads the last
non-pad token, which is why `config.pad_token_id` must be set). The model is trained with the
Bradley–Terry pairwise loss from `rlhf_core.algorithms` (Ouyang et al. 2022, eq. 1; Llama 2 margin).

Shapes: N pairs in total, batches of B.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from rlhf_core.algorithms import bradley_terry_loss, cost_model_loss
from rlhf_core.io import atomic_dir, temp_dir_beside
from rlhf_core.optim import GradSync, GuardedStep

__all__ = [
    "load_reward_model",
    "encode_pairs",
    "score",
    "train_reward_model",
    "train_cost_model",
    "pair_accuracy",
    "holdout_split",
    "save_reward_model",
    "save_ensemble",
    "ensemble_member_path",
]

# separator when a tokenizer has no notion of a text pair (decoder-only LMs)
JOIN = "\n\n"


def _prepare(model, tokenizer):
    """Give decoder tokenizers a pad token and tell the model which id it is.

    Causal-LM classification heads pool the last non-pad token, found via config.pad_token_id;
    without it they refuse batches larger than one.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "right"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_reward_model(path: str | os.PathLike):
    """Load (model, tokenizer) from a folder: AutoModelForSequenceClassification with num_labels=1."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    return _prepare(model, tokenizer)


def set_dropout(model, p: float) -> None:
    """Every dropout layer of any architecture to probability p (0: training is deterministic)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def _has_pairs(tokenizer) -> bool:
    """Encoders (BERT, RoBERTa, MiniLM) have a [SEP] token and a text-pair template; decoder-only
    tokenizers (Llama, GPT-2, SmolLM) do not, and would glue a pair together with no separator."""
    return getattr(tokenizer, "sep_token", None) is not None


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int):
    """Tokenize N (prompt, response) pairs into right-padded tensors (input_ids (N, L), attention_mask, ...).

    The response is what is being judged, so truncation eats the prompt first:
      * pair tokenizers: text pair with truncation="only_first"; when the response alone does not
        fit, that pair falls back to "longest_first";
      * other tokenizers: prompt + "\\n\\n" + response as one text, truncated from the left.
    """
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if _has_pairs(tokenizer):
        try:
            enc = tokenizer(prompts, responses, truncation="only_first", max_length=max_length)
            features = [dict(zip(enc.keys(), values)) for values in zip(*enc.values())]
        except Exception:  # fast tokenizers raise when the response alone is too long: go pair by pair
            features = []
            for p, r in zip(prompts, responses):
                try:
                    features.append(dict(tokenizer(p, r, truncation="only_first", max_length=max_length)))
                except Exception:
                    features.append(dict(tokenizer(p, r, truncation="longest_first", max_length=max_length)))
        # slow tokenizers only log an error and return an over-long sequence: redo those
        for i, f in enumerate(features):
            if len(f["input_ids"]) > max_length:
                features[i] = dict(
                    tokenizer(prompts[i], responses[i], truncation="longest_first", max_length=max_length)
                )
        return tokenizer.pad(features, padding=True, return_tensors="pt")
    texts = [p + JOIN + r for p, r in zip(prompts, responses)]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # keep the end of the text, where the response is
    try:
        return tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    finally:
        tokenizer.truncation_side = side


def _forward(model, enc) -> torch.Tensor:
    """(B,) rewards: the single classification logit of each sequence."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in enc.items()}
    return model(**inputs).logits[:, 0].float()


def score(
    model, tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32, max_length: int = 256
) -> np.ndarray:
    """Reward of each (prompt, response) pair -> np.ndarray (N,) float32, in eval mode, no grad."""
    prompts, responses = list(prompts), list(responses)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                enc = encode_pairs(tokenizer, prompts[i : i + batch_size], responses[i : i + batch_size], max_length)
                out.append(_forward(model, enc).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def preference_arrays(rows: Sequence[dict]) -> tuple[list[str], list[str], list[str], list[float]]:
    """(prompts, chosen, rejected, P(chosen ≻ rejected)) from schemas.PREFERENCES rows.

    Chosen is response_a unless `better` is 1. The probability is 1 for a hard label, 0.5 for a
    tie (better = -1), and the aggregated `soft_label` (P(a ≻ b)) when a row has one.
    """
    prompts, chosen, rejected, targets = [], [], [], []
    for r in rows:
        b_wins = r["better"] == 1
        prompts.append(r["prompt"])
        chosen.append(r["response_b"] if b_wins else r["response_a"])
        rejected.append(r["response_a"] if b_wins else r["response_b"])
        if r.get("soft_label") is not None:
            p_a = float(r["soft_label"])
            targets.append(1.0 - p_a if b_wins else p_a)
        else:
            targets.append(0.5 if r["better"] == -1 else 1.0)
    return prompts, chosen, rejected, targets


def holdout_split(rows: Sequence[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(held out, train) preference rows, split by prompt: every pair of a prompt is on one side.

    A random split over pairs lets the two answers of one prompt, and the same answer in two pairs,
    sit on both sides, which measures memory rather than judgement. The side is a pure function of
    the prompt's text (a hash), so a prompt held out in one iteration is held out in every later one,
    and a reward model warm-started from the last iteration has never trained on it either. At least
    one prompt stays on each side when there are two or more.
    """
    from rlhf_core.prompts import hash_fraction
    if fraction <= 0:
        return [], list(rows)
    prompts = sorted({r["prompt"] for r in rows}, key=hash_fraction)
    held = {p for p in prompts if hash_fraction(p) < fraction}
    if len(prompts) >= 2:
        if not held:
            held = {prompts[0]}
        elif len(held) == len(prompts):
            held.discard(prompts[-1])
    return [r for r in rows if r["prompt"] in held], [r for r in rows if r["prompt"] not in held]


def train_reward_model(
    model,
    tokenizer,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    weights: Sequence[float] | None = None,
    margins: Sequence[float] | None = None,
    targets: Sequence[float] | None = None,
    epochs: int = 1,
    lr: float = 5e-5,
    batch_size: int = 16,
    max_length: int = 256,
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
    sync: GradSync | None = None,
) -> dict:
    """Fit the reward model on N preference pairs with the Bradley–Terry loss.

    AdamW, gradient-norm clipping at 1.0, pairs reshuffled each epoch by a generator seeded with
    `seed` (global RNG untouched). Chosen and rejected of a batch go through one forward pass of 2B
    sequences. `targets` (optional, per pair): P(chosen ≻ rejected) for soft labels (aggregated
    annotators, 0.5 for ties). `on_step(step, total_steps, loss)` is called after every optimizer step.
    `sync`: data-parallel over a torch.distributed group; every rank passes all pairs (see `_fit`).

    Returns {"loss": mean loss of the last epoch, "train_accuracy": fraction of last-epoch pairs
    with r_chosen > r_rejected (measured before each step), "steps": optimizer steps taken}.
    """
    prompts, chosen, rejected = list(prompts), list(chosen), list(rejected)
    n = len(prompts)
    if not (len(chosen) == len(rejected) == n):
        raise ValueError(f"lengths differ: {n} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
    w_all = None if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    m_all = None if margins is None else torch.as_tensor(list(margins), dtype=torch.float32)
    t_all = None if targets is None else torch.as_tensor(list(targets), dtype=torch.float32)
    device = next(model.parameters()).device

    weight_of = len if w_all is None else (lambda idx: float(w_all[idx].sum()))

    def batch_loss(idx: list[int], batch: list[int]) -> tuple[torch.Tensor, int]:
        b, p = len(idx), [prompts[i] for i in idx]
        enc = encode_pairs(tokenizer, p + p, [chosen[i] for i in idx] + [rejected[i] for i in idx], max_length)
        rewards = _forward(model, enc)                      # chosen and rejected in one pass of 2B
        r_chosen, r_rejected = rewards[:b], rewards[b:]
        pick = lambda x: None if x is None else x[idx].to(device)  # noqa: E731
        loss = bradley_terry_loss(r_chosen, r_rejected, margin=pick(m_all), weights=pick(w_all), targets=pick(t_all))
        share = weight_of(idx) / weight_of(batch) if len(idx) < len(batch) else 1.0   # a weighted mean
        return loss * share, int((r_chosen > r_rejected).sum())

    return _fit(model, n, batch_loss, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, on_step=on_step,
                what="preference pairs", sync=sync, weight_of=weight_of)


def _fit(model, n: int, batch_loss: Callable[[list[int], list[int]], tuple[torch.Tensor, int]], *, epochs: int,
         lr: float,
         batch_size: int, seed: int, on_step: Callable[[int, int, float], None] | None, what: str,
         sync: GradSync | None = None, weight_of: Callable[[list[int]], float] | None = None) -> dict:
    """The training loop shared by reward and cost models: AdamW, grad-norm clip 1.0, items
    reshuffled each epoch by a generator seeded with `seed` (global RNG untouched).

    `batch_loss(indices, batch)` returns (loss, number of items it got right) for the items
    `indices` of the batch `batch` (the same list unless data parallel). Returns the last epoch's
    mean loss (batches weighted by `weight_of`, default the count) and accuracy, and the steps.

    Data parallel (`sync`): every rank draws the same permutation and takes every world-th item of
    each batch; `batch_loss` returns its part of the whole batch's loss (its mean scaled by its
    share), so that the summed gradients are those of the whole batch's loss.
    """
    if n == 0:
        raise ValueError(f"no {what} to train on")
    rank, world = (sync.rank, sync.world) if sync else (0, 1)
    weight_of = weight_of or len
    params = [p for p in model.parameters() if p.requires_grad]
    if sync is not None:
        sync.broadcast_parameters(params)
    optimizer = torch.optim.AdamW(params, lr=lr)
    guarded_step = GuardedStep(limit=3)
    generator = torch.Generator().manual_seed(seed)
    total = -(-n // batch_size) * epochs
    step = 0
    epoch_loss, epoch_correct = 0.0, 0
    model.train()
    for _ in range(epochs):
        epoch_loss, epoch_correct = 0.0, 0
        perm = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, batch_size):
            batch = perm[start : start + batch_size]
            idx = batch[rank::world]
            if idx:
                loss, correct = batch_loss(idx, batch)
            else:                               # a short last batch: this rank adds a zero gradient
                loss, correct = sum(p.sum() for p in params) * 0.0, 0
            guarded_step(optimizer, loss, params, 1.0, f"{what} loss at step {step}", sync=sync)
            step += 1
            epoch_loss += loss.item() * weight_of(batch)      # the ranks' parts add up to the batch's
            epoch_correct += correct
            if on_step is not None:
                on_step(step, total, loss.item())
        if sync is not None:
            epoch_loss, epoch_correct = sync.sum([epoch_loss, epoch_correct])
    model.eval()
    return {"loss": epoch_loss / weight_of(list(range(n))), "train_accuracy": epoch_correct / n, "steps": step}


def train_cost_model(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    safe_a: Sequence[bool],
    safe_b: Sequence[bool],
    *,
    weights: Sequence[float] | None = None,
    epochs: int = 1,
    lr: float = 5e-5,
    batch_size: int = 16,
    max_length: int = 256,
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
    sync: GradSync | None = None,
) -> dict:
    """Fit a cost model (Safe-RLHF) on N answer pairs with per-answer safety labels.

    The loss is `cost_model_loss`: unsafe answers above zero cost and safe ones below (sign term),
    and where one answer is safe and the other not, the unsafe one costs more (pairwise term).
    "train_accuracy" is the share of answers on the right side of zero (2 per pair, so ≤ 2 per item:
    divided by 2 here).
    """
    prompts, ra, rb = list(prompts), list(responses_a), list(responses_b)
    n = len(prompts)
    if not (len(ra) == len(rb) == len(safe_a) == len(safe_b) == n):
        raise ValueError("prompts, responses and safety labels must have the same length")
    sa = torch.as_tensor([bool(x) for x in safe_a])
    sb = torch.as_tensor([bool(x) for x in safe_b])
    safer = torch.where(sa == sb, -1, sb.long())            # 0: a is the safer one, 1: b, −1: neither
    w_all = None if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    device = next(model.parameters()).device

    w_items = torch.ones(n) if w_all is None else w_all

    def batch_loss(idx: list[int], batch: list[int]) -> tuple[torch.Tensor, int]:
        b, p = len(idx), [prompts[i] for i in idx]
        costs = _forward(model, encode_pairs(tokenizer, p + p, [ra[i] for i in idx] + [rb[i] for i in idx],
                                             max_length))
        ca, cb = costs[:b], costs[b:]
        w = None if w_all is None else w_all[idx].to(device)
        # the whole batch's normalisers: a rank's part of each mean (data parallel)
        totals = (float(w_items[batch][safer[batch] >= 0].sum()), float(w_items[batch].sum()))
        loss, _ = cost_model_loss(ca, cb, sa[idx].to(device), sb[idx].to(device), safer[idx].to(device), w,
                                  totals=totals)
        right = ((ca > 0) != sa[idx].to(device)).sum() + ((cb > 0) != sb[idx].to(device)).sum()
        return loss, int(right) / 2

    return _fit(model, n, batch_loss, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, on_step=on_step,
                what="labelled answer pairs", sync=sync)


def pair_accuracy(
    model,
    tokenizer,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    batch_size: int = 32,
    max_length: int = 256,
) -> float:
    """Fraction of pairs with score(prompt, chosen) > score(prompt, rejected) (ties count as wrong)."""
    sc = score(model, tokenizer, prompts, chosen, batch_size=batch_size, max_length=max_length)
    sr = score(model, tokenizer, prompts, rejected, batch_size=batch_size, max_length=max_length)
    return float(np.mean(sc > sr)) if len(sc) else 0.0


def save_reward_model(model, tokenizer, dest: str | os.PathLike) -> Path:
    """Save model + tokenizer to `dest` atomically.

    Written into a temp folder beside `dest` (same filesystem, so rename is atomic); only once it
    is complete is an existing `dest` moved aside, the new folder renamed into place, and the old
    one deleted. A crash mid-save leaves the previous model intact.
    """
    dest = Path(dest)
    tmp = temp_dir_beside(dest, f".{dest.name}.tmp")
    old = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if dest.exists():
            # os.replace cannot overwrite a non-empty directory: move the old one aside first
            old = temp_dir_beside(dest, f".{dest.name}.old")
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
    except BaseException:
        if old is not None and (old / dest.name).exists() and not dest.exists():
            os.replace(old / dest.name, dest)  # put the previous model back
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def ensemble_member_path(folder: str | os.PathLike, i: int) -> Path:
    """Member i of a saved ensemble (a folder of HF folders member_00, member_01, …)."""
    return Path(folder) / f"member_{i:02d}"


def save_ensemble(models, tokenizer, dest: str | os.PathLike) -> Path:
    """Save k reward models as dest/member_XX, all or nothing (built beside dest, then renamed in)."""
    dest = Path(dest)
    with atomic_dir(dest, f".{dest.name}.tmp") as tmp:
        for i, model in enumerate(models):
            save_reward_model(model, tokenizer, ensemble_member_path(tmp, i))
    return dest
