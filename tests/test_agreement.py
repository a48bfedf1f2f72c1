"""Tests for annotator agreement and Dawid–Skene aggregation: textbook values, sklearn, synthetic
annotators with known noise and biases, and pyrit's real three-annotator harm labels."""
import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from rlhf_core.agreement import (
    aggregate_preferences,
    agreement_report,
    cohens_kappa,
    dawid_skene,
    fleiss_kappa,
    krippendorff_alpha,
    load_pyrit_harm_annotations,
)
from rlhf_core.schemas import PREFERENCES, from_rows

NAN = math.nan

# Wikipedia, "Fleiss' kappa", worked example: 10 items, 5 categories, 14 raters each.
FLEISS_WIKIPEDIA = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 observers x 12 units.
KRIPPENDORFF_2011 = [[1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
                     [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
                     [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
                     [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN]]


def reference_alpha(data, level: str) -> float:
    """Krippendorff's alpha straight from its definition over pairs of values, no matrices:
    D_o averages d2 over ordered pairs within a unit (weight 1 / (m_u - 1)), D_e over all ordered
    pairs of pairable values."""
    d2 = (lambda x, y: float(x != y)) if level == "nominal" else (lambda x, y: (x - y) ** 2)
    units = [[v for v in col if not math.isnan(v)] for col in zip(*data)]
    units = [u for u in units if len(u) >= 2]
    values = [v for u in units for v in u]
    n = len(values)
    d_o = sum(d2(x, y) / (len(u) - 1) for u in units for x, y in itertools.permutations(u, 2)) / n
    d_e = sum(d2(values[i], values[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    return 1.0 - d_o / d_e


def reference_fleiss(counts) -> float:
    n = sum(counts[0])
    total = n * len(counts)
    p_bar = sum(sum(c * (c - 1) for c in row) / (n * (n - 1)) for row in counts) / len(counts)
    p_e = sum((sum(row[j] for row in counts) / total) ** 2 for j in range(len(counts[0])))
    return (p_bar - p_e) / (1 - p_e)


# ---------------------------------------------------------------------------------------------
def test_fleiss_kappa_wikipedia_example():
    assert fleiss_kappa(FLEISS_WIKIPEDIA) == pytest.approx(0.2099, abs=1e-4)
    assert fleiss_kappa(FLEISS_WIKIPEDIA) == pytest.approx(reference_fleiss(FLEISS_WIKIPEDIA))


def test_krippendorff_alpha_2011_example():
    # The paper's values: nominal 0.743, ordinal 0.815, interval 0.849.
    assert krippendorff_alpha(KRIPPENDORFF_2011, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(KRIPPENDORFF_2011, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(KRIPPENDORFF_2011, "interval") == pytest.approx(0.849, abs=5e-4)
    none_for_missing = [[None if math.isnan(v) else v for v in row] for row in KRIPPENDORFF_2011]
    assert krippendorff_alpha(none_for_missing) == krippendorff_alpha(KRIPPENDORFF_2011)
    with pytest.raises(ValueError, match="level"):
        krippendorff_alpha(KRIPPENDORFF_2011, "ratio")


@pytest.mark.parametrize("seed", range(5))
def test_cohens_kappa_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-1, 2, 80)
    b = np.where(rng.random(80) < 0.6, a, rng.integers(-1, 2, 80))
    assert cohens_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    assert cohens_kappa(a, b, labels=[0, 1]) == pytest.approx(cohen_kappa_score(a, b, labels=[0, 1]))


def test_degenerate_agreement():
    # One category only: chance explains everything, every coefficient is undefined (NaN).
    assert math.isnan(cohens_kappa([1, 1, 1], [1, 1, 1]))
    assert math.isnan(fleiss_kappa([[3, 0], [3, 0]]))
    assert math.isnan(krippendorff_alpha([[1, 1], [1, 1]]))
    assert math.isnan(krippendorff_alpha([[1, NAN], [NAN, 2]]))      # no unit with two values
    # Perfect agreement with variation is 1; missing ratings are skipped.
    assert cohens_kappa([0, 1, None, 1], [0, 1, 1, NAN]) == 1.0
    assert fleiss_kappa([[3, 0], [0, 3], [1, 0]]) == 1.0
    assert krippendorff_alpha([[0, 1, 2], [0, 1, 2]], "interval") == 1.0


# ---------------------------------------------------------------------------------------------
def _simulate(confusions: list[np.ndarray], n_items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(truth (N,), triples (N * J, 3)): every annotator labels every item via its confusion."""
    rng = np.random.default_rng(seed)
    n_classes = confusions[0].shape[0]
    truth = rng.integers(0, n_classes, n_items)
    triples = [(i, j, rng.choice(n_classes, p=c[t]))
               for i, t in enumerate(truth) for j, c in enumerate(confusions)]
    return truth, np.array(triples)


def _accurate(acc: float, k: int) -> np.ndarray:
    c = np.full((k, k), (1 - acc) / (k - 1))
    np.fill_diagonal(c, acc)
    return c


def test_dawid_skene_beats_majority_vote_and_recovers_confusions():
    k = 3
    adversarial = 0.8 * np.roll(np.eye(k), 1, axis=1) + 0.2 / k     # mostly reports class (z + 1) % 3
    confusions = [_accurate(0.75, k)] * 3 + [adversarial, np.full((k, k), 1 / k)]
    truth, triples = _simulate(confusions, n_items=200, seed=0)
    votes = np.zeros((200, k))
    np.add.at(votes, (triples[:, 0], triples[:, 2]), 1)
    post, conf, priors = dawid_skene(triples, k)
    assert post.shape == (200, k) and conf.shape == (5, k, k) and priors.shape == (k,)
    np.testing.assert_allclose(post.sum(1), 1.0)
    np.testing.assert_allclose(conf.sum(2), 1.0)
    assert priors.sum() == pytest.approx(1.0)
    mv_acc, ds_acc = np.mean(votes.argmax(1) == truth), np.mean(post.argmax(1) == truth)
    # Measured (seed 0): majority vote 0.675, Dawid–Skene 0.935.
    assert ds_acc >= 0.88 and ds_acc >= mv_acc + 0.15
    err = np.abs(conf - np.array(confusions))
    assert err.mean() < 0.06 and err.max() < 0.2
    assert (conf[3].argmax(1) == (np.arange(k) + 1) % k).all()       # the adversary is found out


def _pref_row(pair_id: str, annotator: str, better: int, **extra) -> dict:
    return {"pair_id": pair_id, "prompt_id": pair_id.split("-")[0], "prompt": "q", "response_a": "a",
            "response_b": "bb", "better": better, "annotator": annotator, "source": "human", "weight": 1.0, **extra}


def test_aggregate_preferences():
    k = 2
    flipper = np.array([[0.1, 0.9], [0.9, 0.1]])
    confusions = [_accurate(0.8, k)] * 3 + [flipper, np.full((k, k), 0.5)]
    truth, triples = _simulate(confusions, n_items=150, seed=1)
    rows = [_pref_row(f"p{i}-0-0-1", f"ann{j}", int(c)) for i, j, c in triples]
    rows += [_pref_row("tie-0-0-1", f"ann{j}", -1, display_order="ba") for j in range(3)]
    out = aggregate_preferences(rows)
    assert len(out) == 151
    from_rows(out, PREFERENCES)                                      # still valid PREFERENCES rows
    better = np.array([r["better"] for r in out[:150]])
    soft = np.array([r["soft_label"] for r in out[:150]])
    votes = np.zeros((150, k))
    np.add.at(votes, (triples[:, 0], triples[:, 2]), 1)
    assert np.mean(better == truth) >= np.mean(votes.argmax(1) == truth) + 0.1   # measured 0.92 vs 0.76
    assert np.mean((soft > 0.5) == (truth == 0)) == np.mean(better == truth)
    assert out[0]["annotator"] == "dawid-skene(5 annotators)" and out[0]["prompt_id"] == "p0"
    tie = out[150]
    assert tie["better"] == -1 and tie["soft_label"] == pytest.approx(0.5, abs=0.02)
    # one annotator's act of labelling does not survive aggregation; the pair's content does
    assert tie["annotator"] == "dawid-skene(3 annotators)" and tie["display_order"] is None
    majority = aggregate_preferences(rows, method="majority")
    assert np.mean(np.array([r["better"] for r in majority[:150]]) == truth) < np.mean(better == truth)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_preferences(rows, method="mean")


# ---------------------------------------------------------------------------------------------
def test_agreement_report_counts_and_leave_one_out():
    rows = [_pref_row("x", "A", 0), _pref_row("x", "B", 0), _pref_row("x", "C", 1),
            _pref_row("y", "A", 1), _pref_row("y", "B", 1), _pref_row("y", "C", 1),
            _pref_row("z", "A", -1), _pref_row("z", "B", 0), _pref_row("w", "A", 0)]
    rep = agreement_report(rows)
    assert (rep["n_pairs"], rep["n_pairs_multi"], rep["n_annotators"]) == (4, 3, 3)
    # A: x -> others split 0/1 (skipped); y -> others say 1 (agree); z -> B says 0 (disagree).
    a = rep["annotators"]["A"]
    assert (a["n_labels"], a["agreement_with_others"], a["n_compared"]) == (4, 0.5, 2)
    assert a["tie_rate"] == 0.25 and a["position_bias"] is None
    matrix = [[0, 1, -1], [0, 1, 0], [1, 1, NAN]]                    # annotators x multi-label pairs
    counts = [[2, 1, 0], [0, 3, 0], [1, 0, 1]]                       # labels 0, 1, -1
    assert rep["krippendorff_alpha"] == pytest.approx(reference_alpha(matrix, "nominal"))
    assert rep["fleiss_kappa"] == pytest.approx(fleiss_kappa(counts))
    pairwise = [cohens_kappa([0, 1, -1], [0, 1, 0], [0, 1, -1]), cohens_kappa([0, 1], [1, 1], [0, 1, -1]),
                cohens_kappa([0, 1], [1, 1], [0, 1, -1])]
    assert rep["mean_pairwise_cohens_kappa"] == pytest.approx(np.nanmean(pairwise))


def test_agreement_report_detects_position_and_length_bias():
    rng = np.random.default_rng(2)
    rows = []
    for i in range(100):
        order = "ab" if rng.random() < 0.5 else "ba"
        len_a, len_b = rng.choice(np.arange(10, 200), 2, replace=False)
        common = {"response_a": "x" * len_a, "response_b": "y" * len_b, "display_order": order}
        rows += [
            _pref_row(f"p{i}", "left-clicker", 0 if order == "ab" else 1, **common),
            _pref_row(f"p{i}", "length-lover", 0 if len_a > len_b else 1, **common),
            _pref_row(f"p{i}", "fair", int(rng.integers(0, 2)), **common),
        ]
    ann = agreement_report(rows)["annotators"]
    assert ann["left-clicker"]["position_bias"] == 1.0
    assert ann["length-lover"]["length_bias"] == 1.0
    assert 0.3 < ann["left-clicker"]["length_bias"] < 0.7 and 0.3 < ann["length-lover"]["position_bias"] < 0.7
    assert 0.3 < ann["fair"]["position_bias"] < 0.7 and 0.3 < ann["fair"]["length_bias"] < 0.7
    assert ann["fair"]["tie_rate"] == 0.0


# ---------------------------------------------------------------------------------------------
def test_pyrit_harm_annotations_agreement():
    """pyrit's hate_speech_multi_score.csv (199 items) and violence_multi_score.csv (187), three
    human_score_* columns each on a 1-5 harm scale (mini_hate_speech.csv repeats 15 of them)."""
    items, annotators, labels = load_pyrit_harm_annotations()
    assert labels.shape == (6, 386) and len(items) == len(set(items)) == 386
    assert ((~np.isnan(labels)).sum(0) == 3).all()
    assert set(np.unique(labels[~np.isnan(labels)])) == {0.0, 0.25, 0.5, 0.75, 1.0}
    measured = {  # pyrit 1.1.0: (Fleiss kappa, alpha nominal, alpha interval)
        "hate_speech": (0.483, 0.484, 0.862),
        "violence": (0.366, 0.367, 0.766),
    }
    for category, (kappa, nominal, interval) in measured.items():
        rows = [j for j, a in enumerate(annotators) if a.startswith(category + "/")]
        sub = labels[rows][:, ~np.isnan(labels[rows]).all(0)]          # (3, items) complete
        counts = [[int((col == v).sum()) for v in (0, 0.25, 0.5, 0.75, 1)] for col in sub.T]
        assert fleiss_kappa(counts) == pytest.approx(reference_fleiss(counts))
        assert fleiss_kappa(counts) == pytest.approx(kappa, abs=1e-3)
        assert krippendorff_alpha(sub, "nominal") == pytest.approx(reference_alpha(sub.tolist(), "nominal"))
        assert krippendorff_alpha(sub, "interval") == pytest.approx(reference_alpha(sub.tolist(), "interval"))
        assert krippendorff_alpha(sub, "nominal") == pytest.approx(nominal, abs=1e-3)
        assert krippendorff_alpha(sub, "interval") == pytest.approx(interval, abs=1e-3)
        for j, k in itertools.combinations(range(3), 2):
            reference = cohen_kappa_score(sub[j].astype(str), sub[k].astype(str))
            assert cohens_kappa(sub[j], sub[k]) == pytest.approx(reference)
    # Pooled, with NaN where an annotator of the other category did not rate.
    assert krippendorff_alpha(labels, "nominal") == pytest.approx(reference_alpha(labels.tolist(), "nominal"))
