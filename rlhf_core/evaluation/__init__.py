"""Evaluation: how alignflow measures ethics, independently of how it trains.

    judge.py      the evaluation judge (refusal / compliance / non-answer), trained on human labels
    sets.py       the generalisation set: prompts for evaluation only, phrased unlike training
    metrics.py    per-answer rows and the rates, per set, category and source
    intervals.py  Wilson 95 % intervals on every rate
    fluency.py    degeneration of answers (repetition, symbol runs, broken words)
"""
from rlhf_core.evaluation.metrics import eval_rows, gold, judge_preference, meets_target, preference_accuracy, summarize

__all__ = ["eval_rows", "gold", "judge_preference", "meets_target", "preference_accuracy", "summarize"]
