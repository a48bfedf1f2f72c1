import json

import pytest

from rlhf_core.config import DataConfig
from rlhf_core.prompts import (BENIGN_FILE, BORDERLINE_FILE, PromptFileError, assign_split, build_prompt_table,
                               far_from, read_prompt_file)


def test_packaged_sets_are_large_enough():
    benign = read_prompt_file(BENIGN_FILE, "benign")
    borderline = read_prompt_file(BORDERLINE_FILE, "borderline")
    assert len(benign) + len(borderline) >= 300
    assert len({r["category"] for r in benign}) >= 8 and len({r["category"] for r in borderline}) >= 6


def test_prompt_table_split_is_fixed_and_disjoint():
    t1 = build_prompt_table(DataConfig()).to_pylist()
    t2 = build_prompt_table(DataConfig()).to_pylist()
    assert [r["split"] for r in t1] == [r["split"] for r in t2]
    train = {r["prompt"].lower() for r in t1 if r["split"] == "train"}
    held = {r["prompt"].lower() for r in t1 if r["split"] == "eval"}
    assert train and held and not (train & held)
    kinds = {r["kind"] for r in t1}
    assert kinds == {"harmful", "benign", "borderline"}
    assert len({r["prompt_id"] for r in t1}) == len(t1)


def test_near_copies_of_an_evaluation_only_set_are_dropped():
    import numpy as np
    rng = np.random.default_rng(0)
    held = rng.normal(size=(5, 16))
    held /= np.linalg.norm(held, axis=1, keepdims=True)
    # cosine 0.9 to held[0] / 0.6 to held[1] / unrelated
    emb = np.stack([0.9 * held[0] + np.sqrt(1 - 0.81) * _orth(held[0], rng),
                    0.6 * held[1] + 0.8 * _orth(held[1], rng), _orth(held[2], rng)])
    assert far_from(emb, held, 0.75).tolist()[:2] == [False, True]
    assert far_from(emb, held[:0], 0.75).all()


def _orth(v, rng):
    """A unit vector orthogonal to unit vector v (and, with 16 dims, nearly so to the other rows)."""
    import numpy as np
    u = rng.normal(size=v.shape)
    u -= (u @ v) * v
    return u / np.linalg.norm(u)


def test_split_does_not_depend_on_order():
    rows = [{"prompt": f"p{i}"} for i in range(200)]
    a = {r["prompt"]: r["split"] for r in assign_split([dict(r) for r in rows], 0.25, 7)}
    b = {r["prompt"]: r["split"] for r in assign_split([dict(r) for r in reversed(rows)], 0.25, 7)}
    assert a == b
    assert 20 < sum(v == "eval" for v in a.values()) < 80


@pytest.mark.parametrize("name,content,message", [
    ("missing.csv", "text\nhello\n", "missing column 'prompt'"),
    ("empty.jsonl", "", "no prompts"),
    ("blank.jsonl", '{"prompt": "ok"}\n{"prompt": "  "}\n', ":2: empty"),
    ("badjson.jsonl", '{"prompt": "ok"}\n{"prompt": \n', ":2: invalid JSON"),
    ("nofield.jsonl", '{"text": "ok"}\n', ":1: missing field 'prompt'"),
    ("notes.txt", "hello\n", "unsupported prompt file type"),
    # a quote left open used to swallow the rest of the file into one prompt, silently
    ("open_quote.csv", 'prompt\nhello\n"what is this\nsecond line\n', ":3: a quoted field is never closed"),
    ("bad_quote.csv", 'prompt\n"ab"c\n', ":2: not valid CSV"),
    ("big_field.csv", "prompt\nok\n" + "a" * 140_000 + "\n", ":3: a field longer than 131,072 characters"),
    ("huge.jsonl", '{"prompt": "ok"}\n{"prompt": "' + "b" * 70_000 + '"}\n', ":2: prompt of 70,000 characters"),
])
def test_malformed_files_name_file_and_problem(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(PromptFileError) as e:
        read_prompt_file(p, "benign")
    assert str(p) in str(e.value) and message in str(e.value)


def test_bad_encoding(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(json.dumps({"prompt": "caf\u00e9"}).encode("latin-1").replace(b"\\u00e9", b"\xe9"))
    with pytest.raises(PromptFileError, match="not valid UTF-8"):
        read_prompt_file(p, "benign")
    c = tmp_path / "latin.csv"
    c.write_bytes(b"prompt\nhello\ncaf\xe9\n")
    with pytest.raises(PromptFileError, match=rf"^{c}:3: not valid UTF-8 \(invalid continuation byte\)$"):
        read_prompt_file(c, "benign")          # the line a person can find, not a byte offset


def test_csv_lines_count_multiline_fields_and_blank_lines(tmp_path):
    c = tmp_path / "multi.csv"
    c.write_text('prompt,category\n\n"two\nlines",x\n""\n', encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"multi\.csv:5: empty"):
        read_prompt_file(c, "benign")


def test_good_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    c = tmp_path / "ok.csv"
    c.write_text('prompt,category\n"Hello, there",greeting\n', encoding="utf-8")
    assert read_prompt_file(c, "benign")[0]["prompt"] == "Hello, there"
    q = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"prompt": ["a b c"]}), q)
    assert read_prompt_file(q, "harmful")[0]["kind"] == "harmful"


def test_sample_prompts_gives_every_source_an_equal_share():
    import numpy as np

    from rlhf_core.prompts import sample_prompts
    rows = ([{"prompt": f"a{i}", "source": "big"} for i in range(300)]
            + [{"prompt": f"b{i}", "source": "mid"} for i in range(40)]
            + [{"prompt": f"c{i}", "source": "small"} for i in range(5)])
    got = sample_prompts(rows, 31, np.random.default_rng(0))
    counts = {s: sum(r["source"] == s for r in got) for s in ("big", "mid", "small")}
    assert sum(counts.values()) == 31 and max(counts.values()) - min(counts.values()) <= 1
    mid = [r["prompt"] for r in got if r["source"] == "mid"]
    assert len(set(mid)) == len(mid)                     # no repeat while a source lasts
    assert {r["prompt"] for r in got if r["source"] == "small"} == {f"c{i}" for i in range(5)}   # repeats once exhausted
    assert got == sample_prompts(rows, 31, np.random.default_rng(0))        # seeded
    plain = sample_prompts(rows, 31, np.random.default_rng(0), by_source=False)
    assert sum(r["source"] == "big" for r in plain) > 20                     # by prompt: the big source dominates
    # coverage draws each prompt once: a small source gives what it has
    once = sample_prompts(rows, 31, np.random.default_rng(0), repeat=False)
    assert len(once) == len({r["prompt"] for r in once}) == 10 + 10 + 5
