"""Every table that crosses a stage boundary, as one Arrow schema each. The single source of truth.

Each field's metadata says what it means. Stages validate tables against these schemas when they
write and when they read (`validate`), and write Parquet atomically (`write_table`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_core.io import atomic_path


def _f(name: str, typ: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable, metadata={"doc": doc})


PROMPT_KINDS = ("harmful", "benign", "borderline")

PROMPTS = pa.schema([
    _f("prompt_id", pa.string(), "Stable id: <source>-<sha1(prompt)[:12]>."),
    _f("prompt", pa.string(), "The user request, plain text (the chat template is applied later)."),
    _f("kind", pa.string(), "harmful | benign | borderline (sounds dangerous, is fine)."),
    _f("source", pa.string(), "advbench | harmbench | donotanswer | alignflow-benign | ... | a file name."),
    _f("category", pa.string(), "Harm or topic category as given by the source."),
    _f("split", pa.string(), "train | eval (fixed-seed split of near-duplicate clusters; eval never reaches "
       "training) | generalisation (the evaluation-only set, phrased unlike the training sources)."),
])

SAMPLES = pa.schema([
    _f("sample_id", pa.string(), "<prompt_id>-<iteration>-<index>."),
    _f("prompt_id", pa.string(), "Prompt this answers."),
    _f("prompt", pa.string(), "The user request."),
    _f("kind", pa.string(), "Prompt kind (harmful | benign | borderline)."),
    _f("response", pa.string(), "The answer text (decoded, special tokens removed)."),
    _f("origin", pa.string(), "policy | demonstration: who wrote the answer."),
    _f("policy_version", pa.string(), "Adapter that generated it ('base' = no adapter)."),
    _f("num_tokens", pa.int32(), "Generated tokens."),
])

PREFERENCE_SOURCES = ("simulated", "human", "llm-judge", "imported")

PREFERENCES = pa.schema([
    _f("pair_id", pa.string(), "<prompt_id>-<iteration>-<a>-<b> (or the importer's / labeling page's id)."),
    _f("prompt_id", pa.string(), "Prompt both answers respond to."),
    _f("prompt", pa.string(), "The user request."),
    _f("response_a", pa.string(), "First answer."),
    _f("response_b", pa.string(), "Second answer."),
    _f("better", pa.int8(), "0 if response_a is preferred, 1 if response_b, -1 for a tie (after label noise)."),
    _f("judge_better", pa.int8(), "The simulated judge's preference before label noise (null for people).", True),
    _f("flipped", pa.bool_(), "True when label noise flipped the judge's choice (null for people).", True),
    _f("score_a", pa.float32(), "Judge total for response_a (null when no judge scored it).", True),
    _f("score_b", pa.float32(), "Judge total for response_b.", True),
    _f("is_safe_a", pa.bool_(), "Per-answer safety label of response_a (PKU-SafeRLHF style); null = unknown.", True),
    _f("is_safe_b", pa.bool_(), "Per-answer safety label of response_b; null = unknown.", True),
    _f("safer", pa.int8(), "0 if response_a is the safer answer, 1 if response_b (PKU-SafeRLHF's "
       "safer_response_id); null = not judged.", True),
    _f("harm_category_a", pa.string(), "Harm category an annotator gave an unsafe response_a.", True),
    _f("harm_category_b", pa.string(), "Harm category of an unsafe response_b.", True),
    _f("annotator", pa.string(), "Who labelled it, e.g. constitution-judge-v1/flip0.25/seed0 or a person's name."),
    _f("source", pa.string(), "simulated | human | llm-judge | imported: the provenance of the label."),
    _f("display_order", pa.string(), "'ab' if response_a was shown on the left, 'ba' if on the right (people).", True),
    _f("labeled_at", pa.timestamp("us", tz="UTC"), "When the label was given (null for simulated labels).", True),
    _f("soft_label", pa.float32(), "P(response_a is better) after aggregation; null = use `better`.", True),
    _f("margin", pa.float32(), "Reward gap the better answer must win by (TRL's `margin`); null = "
       "reward_model.margin.", True),
    _f("weight", pa.float32(), "Training weight of the pair."),
])

EXPERIENCE = pa.schema([
    _f("step", pa.int32(), "PPO step within the iteration."),
    _f("prompt_id", pa.string(), "Prompt of the rollout."),
    _f("kind", pa.string(), "Prompt kind."),
    _f("response", pa.string(), "Sampled answer."),
    _f("reward_model_score", pa.float32(), "Raw reward-model score of the answer."),
    _f("reward", pa.float32(), "Normalised, clipped score used as the sequence reward."),
    _f("kl", pa.float32(), "Sum over tokens of the KL estimate to the reference."),
    _f("num_tokens", pa.int32(), "Answer length in tokens."),
    _f("cost", pa.float32(), "Safe-RLHF: the cost model's (clipped) cost of the answer; null without it.", True),
])

EVAL_RESULTS = pa.schema([
    _f("prompt_id", pa.string(), "Held-out prompt."),
    _f("prompt", pa.string(), "The user request."),
    _f("kind", pa.string(), "harmful | benign | borderline."),
    _f("eval_set", pa.string(), "generalisation (written for evaluation, phrased unlike training) | in_distribution "
       "(the held-out split of the training sources)."),
    _f("source", pa.string(), "Prompt source (advbench, …; generalisation/<style>)."),
    _f("category", pa.string(), "Harm or topic category."),
    _f("response", pa.string(), "Greedy answer."),
    _f("verdict", pa.string(), "The evaluation judge's verdict: compliance | refusal | non_answer."),
    _f("p_complies", pa.float32(), "The evaluation judge's P(the answer sets out to do what was asked)."),
    _f("refused", pa.bool_(), "The evaluation judge's verdict is refusal."),
    _f("unsafe_compliance", pa.bool_(), "Harmful prompt, and the evaluation judge says the answer complies."),
    _f("over_refusal", pa.bool_(), "Benign/borderline prompt, and the evaluation judge says the answer refuses."),
    _f("detector_refused", pa.bool_(), "The training side's refusal detector calls it a refusal (reported beside "
       "the judge; never decides a rate)."),
    _f("degenerate", pa.bool_(), "Repetition, symbol runs or broken words (rlhf_core/evaluation/fluency.py)."),
    _f("reward_model_score", pa.float32(), "Score of the latest reward model (NaN before one exists).", True),
    _f("judge_total", pa.float32(), "Constitution-judge total (the training reward's judge)."),
    _f("kl", pa.float32(), "Sequence KL of the greedy answer to the reference (0 for the base; NaN on the "
       "generalisation set, where it is not computed)."),
    _f("num_tokens", pa.int32(), "Answer length in tokens."),
])

SCHEMAS = {"prompts": PROMPTS, "samples": SAMPLES, "preferences": PREFERENCES,
           "experience": EXPERIENCE, "eval_results": EVAL_RESULTS}


class SchemaError(ValueError):
    pass


def validate(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Check columns and types (extra columns are dropped, order is normalised; a missing nullable
    column is added as all-null, so optional fields need not be written by every producer)."""
    for f in schema:
        if f.nullable and f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SchemaError(f"{where}: missing column(s) {missing}; expected {schema.names}")
    try:
        table = table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise SchemaError(f"{where}: columns do not match schema: {e}") from e
    for f in schema:
        if not f.nullable and table.column(f.name).null_count:
            raise SchemaError(f"{where}: column {f.name!r} has {table.column(f.name).null_count} null(s)")
    return table


def from_rows(rows: list[dict], schema: pa.Schema, where: str = "rows") -> pa.Table:
    if not rows:
        return schema.empty_table()
    return validate(pa.Table.from_pylist(rows), schema, where)


def write_table(table: pa.Table, path: str | Path, schema: pa.Schema) -> Path:
    """Validate, then write Parquet to a temp file and rename: readers never see half a file."""
    path = Path(path)
    table = validate(table, schema, str(path))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_table(path: str | Path, schema: pa.Schema) -> pa.Table:
    return validate(pq.read_table(path), schema, str(path))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
