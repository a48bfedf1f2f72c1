"""Annotator agreement and noise-aware aggregation of preference labels, in plain numpy.

Several people (or judges) labelling the same pair only help if we know how far to trust them:
chance-corrected agreement says whether the labels carry signal at all, per-annotator biases say
whose labels to doubt, and Dawid–Skene turns disagreeing labels into one soft label per pair that
weighs each annotator by their estimated reliability instead of counting votes.

Undefined agreement: when every rating falls in one category, the agreement expected by chance is
total and every kappa/alpha is 0/0. Following Krippendorff (2011) ("alpha is undefined when there
is no variation") all three coefficients return NaN there rather than guessing 1.0.

References
    Cohen 1960, "A Coefficient of Agreement for Nominal Scales"
    Fleiss 1971, "Measuring nominal scale agreement among many raters"
    Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability" (repository.upenn.edu/asc_papers/43)
    Dawid & Skene 1979, "Maximum Likelihood Estimation of Observer Error-Rates Using the EM Algorithm"
"""
from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PREFERENCE_LABELS = (0, 1, -1)       # response_a better, response_b better, tie
_PREF_CLASS = {0: 0, 1: 1, -1: 2}    # `better` -> Dawid–Skene class index
ALPHA_LEVELS = ("nominal", "ordinal", "interval")


def _missing(v) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


# --------------------------------------------------------------------------------------------
# Agreement coefficients
# --------------------------------------------------------------------------------------------
def cohens_kappa(a: Sequence, b: Sequence, labels: Sequence | None = None) -> float:
    """Cohen's kappa of two raters over the same items: (p_o - p_e) / (1 - p_e).

    Items where either rating is missing (None/NaN) are dropped; with `labels`, so are items rated
    outside them (as sklearn's cohen_kappa_score does). NaN when p_e = 1 or no item is left.
    """
    if len(a) != len(b):
        raise ValueError(f"cohens_kappa: {len(a)} vs {len(b)} ratings")
    pairs = [(x, y) for x, y in zip(a, b) if not (_missing(x) or _missing(y))]
    cats = list(labels) if labels is not None else sorted({v for p in pairs for v in p})
    index = {c: k for k, c in enumerate(cats)}
    pairs = [(index[x], index[y]) for x, y in pairs if x in index and y in index]
    if not pairs:
        return math.nan
    confusion = np.zeros((len(cats), len(cats)))   # (C, C) rater a x rater b
    np.add.at(confusion, tuple(np.array(pairs).T), 1.0)
    confusion /= confusion.sum()
    p_o = np.trace(confusion)
    p_e = float(confusion.sum(1) @ confusion.sum(0))
    return math.nan if np.isclose(p_e, 1.0) else float((p_o - p_e) / (1.0 - p_e))


def fleiss_kappa(counts) -> float:
    """Fleiss' kappa from counts (items, categories): how many raters put item i in category j.

    Fleiss assumes the same number of raters n per item; rows with different n_i use each row's
    own n_i in P_i = sum_j n_ij (n_ij - 1) / (n_i (n_i - 1)), which is identical for constant n.
    Rows with fewer than two ratings carry no agreement information and are dropped.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or (counts < 0).any():
        raise ValueError("fleiss_kappa: counts must be a non-negative (items, categories) matrix")
    n_i = counts.sum(1)                                         # (items,)
    counts, n_i = counts[n_i >= 2], n_i[n_i >= 2]
    if not len(n_i):
        return math.nan
    p_bar = float(np.mean(((counts * (counts - 1)).sum(1)) / (n_i * (n_i - 1))))
    p_j = counts.sum(0) / n_i.sum()                             # (categories,)
    p_e = float(p_j @ p_j)
    return math.nan if np.isclose(p_e, 1.0) else (p_bar - p_e) / (1.0 - p_e)


def krippendorff_alpha(data, level: str = "nominal") -> float:
    """Krippendorff's alpha = 1 - D_o / D_e from data (raters, items), None/NaN = missing.

    Built from the coincidence matrix o_ck = sum_u (#c-k pairs of values in unit u) / (m_u - 1)
    over pairable units (m_u >= 2 values); n_c = sum_k o_ck, n = sum_c n_c, and
        alpha = 1 - (n - 1) * sum_ck o_ck d2_ck / sum_ck n_c n_k d2_ck
    with the squared distance d2 of `level`: nominal 1[c != k]; interval (c - k)^2; ordinal
    (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2, n_g counted over the ranked categories (Krippendorff 2011).
    """
    if level not in ALPHA_LEVELS:
        raise ValueError(f"krippendorff_alpha: level {level!r} not in {ALPHA_LEVELS}")
    values = np.asarray(data, dtype=object)
    if values.ndim != 2:
        raise ValueError("krippendorff_alpha: data must be (raters, items)")
    present = [v for v in values.ravel() if not _missing(v)]
    cats = list(dict.fromkeys(present)) if level == "nominal" else sorted(set(present))
    index = {c: k for k, c in enumerate(cats)}
    counts = np.zeros((values.shape[1], len(cats)))            # (items, C) values per unit
    for (_, item), v in np.ndenumerate(values):
        if not _missing(v):
            counts[item, index[v]] += 1
    m_u = counts.sum(1)
    counts, m_u = counts[m_u >= 2], m_u[m_u >= 2]
    if not len(m_u):
        return math.nan
    weighted = counts / (m_u - 1)[:, None]
    o = weighted.T @ counts - np.diag(weighted.sum(0))          # (C, C) coincidences
    n_c = o.sum(1)
    n = n_c.sum()
    if level == "nominal":
        d2 = 1.0 - np.eye(len(cats))
    elif level == "interval":
        v = np.asarray(cats, dtype=np.float64)
        d2 = (v[:, None] - v[None, :]) ** 2
    else:
        cum, rank = np.cumsum(n_c), np.arange(len(cats))
        lo, hi = np.minimum.outer(rank, rank), np.maximum.outer(rank, rank)
        between = cum[hi] - cum[lo] + n_c[lo]                   # sum_{g=lo..hi} n_g
        d2 = (between - (n_c[:, None] + n_c[None, :]) / 2) ** 2
    expected = float(n_c @ d2 @ n_c)
    return math.nan if expected == 0 else float(1.0 - (n - 1) * float((o * d2).sum()) / expected)


# --------------------------------------------------------------------------------------------
# Preference rows: agreement report
# --------------------------------------------------------------------------------------------
def _label_matrix(rows: list[dict]) -> tuple[list[str], list[str], np.ndarray]:
    """(pair_ids, annotators, labels (annotators, pairs) float, NaN = not labelled).
    An annotator who labelled a pair twice counts with their last row."""
    pair_ids = list(dict.fromkeys(r["pair_id"] for r in rows))
    annotators = list(dict.fromkeys(r["annotator"] for r in rows))
    p_idx = {p: i for i, p in enumerate(pair_ids)}
    a_idx = {a: j for j, a in enumerate(annotators)}
    labels = np.full((len(annotators), len(pair_ids)), np.nan)
    for r in rows:
        labels[a_idx[r["annotator"]], p_idx[r["pair_id"]]] = r["better"]
    return pair_ids, annotators, labels


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def _annotator_biases(rows: list[dict]) -> dict:
    """Tie rate, position bias (share of non-tie choices that went to the answer shown on the
    left; None without display_order) and length bias (share of non-tie choices that went to the
    longer answer, in characters; pairs of equal length are skipped)."""
    left, longer, ties = [], [], []
    for r in rows:
        ties.append(r["better"] == -1)
        if r["better"] == -1:
            continue
        if r.get("display_order") in ("ab", "ba"):
            left.append(r["better"] == (0 if r["display_order"] == "ab" else 1))
        len_a, len_b = len(r.get("response_a") or ""), len(r.get("response_b") or "")
        if len_a != len_b:
            longer.append(r["better"] == (0 if len_a > len_b else 1))
    return {"position_bias": _share(left), "length_bias": _share(longer), "tie_rate": _share(ties)}


def _agreement_with_others(labels: np.ndarray, j: int) -> tuple[float | None, int]:
    """Leave-one-out: share of items where annotator j matches the plurality label of the other
    annotators; items whose other labels have no unique plurality are skipped."""
    hits = []
    for item in np.flatnonzero(~np.isnan(labels[j])):
        others = Counter(labels[k, item] for k in range(len(labels)) if k != j and not np.isnan(labels[k, item]))
        top = others.most_common(2)
        if top and (len(top) == 1 or top[0][1] > top[1][1]):
            hits.append(bool(labels[j, item] == top[0][0]))
    return _share(hits), len(hits)


def agreement_report(rows: list[dict]) -> dict:
    """Agreement over preference rows (schemas.PREFERENCES fields; pair_id, annotator and better
    required) on the labels {0, 1, -1} treated as nominal categories.

    Fleiss' kappa and Krippendorff's alpha use the pairs with >= 2 labels; the mean pairwise
    Cohen's kappa averages over annotator pairs whose kappa is defined on their shared pairs.
    """
    pair_ids, annotators, labels = _label_matrix(rows)          # labels: (annotators, pairs)
    multi = (~np.isnan(labels)).sum(0) >= 2
    counts = np.stack([(labels[:, multi] == c).sum(0) for c in PREFERENCE_LABELS], axis=1)
    kappas = [cohens_kappa(labels[j], labels[k], PREFERENCE_LABELS)
              for j, k in itertools.combinations(range(len(annotators)), 2)]
    kappas = [k for k in kappas if not math.isnan(k)]
    by_annotator = defaultdict(list)
    for r in rows:
        by_annotator[r["annotator"]].append(r)
    per_annotator = {}
    for j, name in enumerate(annotators):
        agree, n_compared = _agreement_with_others(labels, j)
        per_annotator[name] = {"n_labels": len(by_annotator[name]), "agreement_with_others": agree,
                               "n_compared": n_compared, **_annotator_biases(by_annotator[name])}
    return {
        "n_pairs": len(pair_ids),
        "n_pairs_multi": int(multi.sum()),
        "n_annotators": len(annotators),
        "fleiss_kappa": fleiss_kappa(counts),
        "krippendorff_alpha": krippendorff_alpha(labels[:, multi], "nominal"),
        "mean_pairwise_cohens_kappa": float(np.mean(kappas)) if kappas else math.nan,
        "annotators": per_annotator,
    }


# --------------------------------------------------------------------------------------------
# Dawid–Skene
# --------------------------------------------------------------------------------------------
def dawid_skene(labels: Sequence[tuple[int, int, int]], n_classes: int, max_iter: int = 100,
                tol: float = 1e-6, smoothing: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EM for the Dawid & Skene (1979) model: each item i has a hidden true class z_i ~ rho, and
    annotator j, independently given z_i, reports class l with probability pi_j[z_i, l].

    `labels` are (item, annotator, class) triples, indices from 0; an annotator may label an
    item more than once. With T_ik = P(z_i = k | labels):
        E-step  T_ik ∝ rho_k * prod_{(i, j, l)} pi_j[k, l]                   (in log space)
        M-step  rho_k     = (sum_i T_ik + s) / (N + K s)
                pi_j[k, l] = (sum_{(i, j, l)} T_ik + s) / (sum_{(i, j, .)} T_ik + K s)
    `smoothing` s is a pseudo-count: a class an annotator never saw gets a uniform row instead of
    0/0, and no log(0) can lock a posterior. T starts as each item's vote shares (majority vote;
    items without labels start uniform): EM only finds a local optimum, and this start picks the
    one where most annotators beat chance, not its class-permuted mirror image. Stops when no
    posterior moves by more than `tol`.

    Returns posteriors T (items, K), confusions pi (annotators, K, K) rows = true class, priors (K,).
    """
    triples = np.asarray(labels, dtype=np.int64).reshape(-1, 3)
    item, annot, cls = triples.T
    if len(triples) and (cls.min() < 0 or cls.max() >= n_classes):
        raise ValueError(f"dawid_skene: classes must lie in [0, {n_classes})")
    n_items = int(item.max()) + 1 if len(triples) else 0
    n_annot = int(annot.max()) + 1 if len(triples) else 0
    votes = np.zeros((n_items, n_classes))
    np.add.at(votes, (item, cls), 1.0)
    n_votes = votes.sum(1, keepdims=True)
    post = np.where(n_votes > 0, votes / np.maximum(n_votes, 1), 1.0 / n_classes)   # (N, K)
    for _ in range(max_iter):
        priors, conf = _ds_m_step(post, item, annot, cls, n_annot, smoothing)
        log_post = np.tile(np.log(priors), (n_items, 1))                            # (N, K)
        np.add.at(log_post, item, np.log(conf[annot, :, cls]))
        new = np.exp(log_post - log_post.max(1, keepdims=True))
        new /= new.sum(1, keepdims=True)
        converged = np.abs(new - post).max(initial=0.0) < tol
        post = new
        if converged:
            break
    priors, conf = _ds_m_step(post, item, annot, cls, n_annot, smoothing)
    return post, conf, priors


def _ds_m_step(post: np.ndarray, item: np.ndarray, annot: np.ndarray, cls: np.ndarray, n_annot: int,
               smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed priors (K,) and confusions (J, K, K) given posteriors (N, K)."""
    n_items, n_classes = post.shape
    priors = (post.sum(0) + smoothing) / (n_items + n_classes * smoothing)
    conf = np.full((n_annot, n_classes, n_classes), smoothing)
    np.add.at(conf, (annot, slice(None), cls), post[item])    # true class k (soft) x reported l
    return priors, conf / conf.sum(2, keepdims=True)


def aggregate_preferences(rows: list[dict], method: str = "dawid-skene", **ds_kwargs) -> list[dict]:
    """One row per pair_id, the labels of all its annotators combined over the classes
    {a better, b better, tie}: by Dawid–Skene (`method="dawid-skene"`) or by vote shares
    (`method="majority"`, which is Dawid–Skene's starting point, i.e. zero EM iterations).

    soft_label = P(a) + P(tie) / 2: a tie says neither answer is better, so its mass is split
    evenly, which keeps soft_label a probability the Bradley–Terry loss can use directly.
    better = -1 if the tie class has the highest posterior, else 0/1 for the likelier of a and b.
    is_safe_a/b = the annotators' majority (a split vote counts as unsafe: the cautious reading).
    Fields that belong to one annotator's act of labelling (flipped, display order, time, harm
    categories) are null; annotator = "<method>(<n> annotators)"; the rest is the pair's first row's
    (judge_better is the judge's, the same for every annotator). `ds_kwargs` go to dawid_skene.
    """
    if method not in ("dawid-skene", "majority"):
        raise ValueError(f"unknown aggregation {method!r}; valid: 'dawid-skene', 'majority'")
    if method == "majority":
        ds_kwargs["max_iter"] = 0
    pair_ids = list(dict.fromkeys(r["pair_id"] for r in rows))
    annotators = list(dict.fromkeys(r["annotator"] for r in rows))
    p_idx = {p: i for i, p in enumerate(pair_ids)}
    a_idx = {a: j for j, a in enumerate(annotators)}
    triples = [(p_idx[r["pair_id"]], a_idx[r["annotator"]], _PREF_CLASS[r["better"]]) for r in rows]
    post, _, _ = dawid_skene(triples, n_classes=3, **ds_kwargs)   # (pairs, 3): a, b, tie
    by_pair: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_pair[r["pair_id"]].append(r)

    def safe_vote(group: list[dict], key: str) -> bool | None:
        votes = [r[key] for r in group if r.get(key) is not None]
        return None if not votes else sum(votes) > len(votes) / 2

    out = []
    for pid, (p_a, p_b, p_tie) in zip(pair_ids, post):
        group = by_pair[pid]
        better = -1 if p_tie > max(p_a, p_b) else (0 if p_a >= p_b else 1)
        out.append({**group[0], "better": better, "soft_label": float(p_a + p_tie / 2),
                    "is_safe_a": safe_vote(group, "is_safe_a"), "is_safe_b": safe_vote(group, "is_safe_b"),
                    "flipped": None, "display_order": None, "labeled_at": None,
                    "harm_category_a": None, "harm_category_b": None,
                    "annotator": f"{method}({len({r['annotator'] for r in group})} annotators)"})
    return out


# --------------------------------------------------------------------------------------------
# Real multi-annotator data: pyrit's harm scorer evals
# --------------------------------------------------------------------------------------------
def pyrit_harm_annotation_files() -> list[Path]:
    """pyrit's harm-scorer eval CSVs that carry more than one human_score_* column."""
    folder = Path(importlib.metadata.distribution("pyrit").locate_file("pyrit/datasets/scorer_evals/harm"))
    return [p for p in sorted(folder.glob("*.csv")) if len(_score_columns(_read_csv(p)[0])) >= 2]


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as fh:
        # Only leading `# dataset_version=...` lines are comments (a quoted multi-line answer may
        # also have a line starting with '#'), so stop skipping at the header.
        lines = iter(fh)
        header = next(line for line in lines if not line.startswith("#"))
        reader = csv.DictReader([header, *lines])
        rows = list(reader)
    return list(reader.fieldnames or []), rows


def _score_columns(fieldnames: list[str]) -> list[str]:
    return [f for f in fieldnames if f.startswith("human_score_")]


def load_pyrit_harm_annotations() -> tuple[list[str], list[str], np.ndarray]:
    """(items, annotators, labels (annotators, items) float, NaN = not rated) from pyrit's
    multi-annotator harm CSVs. Scores are a 1-5 harm scale mapped to 0, 0.25, ..., 1.

    Each human_score_k column is an annotator, named "<harm_category>/human_score_k": files do
    not say whether column k is the same person across harm categories, so we do not assume it.
    An item is (harm_category, objective, assistant_response), id "<category>-<sha1[:12]>"; the
    `mini_` files repeat rows of the full ones, and a repeated item keeps its first labels.
    """
    ratings: dict[tuple[str, str], float] = {}                  # (item, annotator) -> score
    items, annotators = {}, {}
    for path in pyrit_harm_annotation_files():
        fieldnames, rows = _read_csv(path)
        for r in rows:
            digest = hashlib.sha1(f"{r['objective']}\0{r['assistant_response']}".encode()).hexdigest()[:12]
            item = f"{r['harm_category']}-{digest}"
            if item in items:
                continue
            items[item] = None
            for col in _score_columns(fieldnames):
                if r[col].strip():
                    annotators.setdefault(f"{r['harm_category']}/{col}", None)
                    ratings[item, f"{r['harm_category']}/{col}"] = float(r[col])
    item_ids, names = list(items), list(annotators)
    i_idx = {p: i for i, p in enumerate(item_ids)}
    a_idx = {a: j for j, a in enumerate(names)}
    labels = np.full((len(names), len(item_ids)), np.nan)
    for (item, name), score in ratings.items():
        labels[a_idx[name], i_idx[item]] = score
    return item_ids, names, labels
