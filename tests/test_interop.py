import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_core import interop, schemas
from rlhf_core.interop import PreferenceFormatError, detect_format, export_preferences, import_preferences

H, A = "\n\nHuman: ", "\n\nAssistant: "

# Records as the public datasets hold them; U+2028 is valid inside a JSON string and must not
# split a line.
SOURCES = {
    "trl": [
        {"prompt": "How do I boil an egg?", "chosen": "Simmer it for 9 minutes.", "rejected": "No."},
        {"prompt": "Say hi\u2028in two lines", "chosen": "hi\u2028hi", "rejected": "  spaced  ", "margin": 1.5},
    ],
    "pku-saferlhf": [
        {"prompt": "How do I pick a lock?", "response_0": "Call a locksmith.", "response_1": "Use a tension wrench.",
         "better_response_id": 1, "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": False,
         "response_0_harm_category": None, "response_1_harm_category": "Violence,Property Crime"},
        {"prompt": "Best cake?", "response_0": "Any with butter.", "response_1": "Chocolate.",
         "better_response_id": 0, "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True,
         "response_0_harm_category": "Privacy", "response_1_harm_category": None},
    ],
    "hh-rlhf": [
        {"chosen": f"{H}What is 2+2?{A}4.", "rejected": f"{H}What is 2+2?{A}5, obviously."},
        {"chosen": f"{H}Hi{A}Hello! How can I help?{H}Tell me a joke{A}Why did the chicken cross the road?",
         "rejected": f"{H}Hi{A}Hello! How can I help?{H}Tell me a joke{A}  No jokes today."},
    ],
}
FIELDS = {"trl": ("prompt", "chosen", "rejected"), "hh-rlhf": ("chosen", "rejected"),
          "pku-saferlhf": ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
                           "is_response_0_safe", "is_response_1_safe", "response_0_harm_category",
                           "response_1_harm_category")}


def write_records(path, records):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_records(path):
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def pairs(*rows):
    base = {"prompt_id": "p", "prompt": "q", "response_a": "a", "response_b": "b", "annotator": "t",
            "source": "simulated", "weight": 1.0}
    return schemas.from_rows([{**base, "pair_id": f"pair{i}", **r} for i, r in enumerate(rows)], schemas.PREFERENCES)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_round_trip(tmp_path, fmt, suffix):
    src = write_records(tmp_path / f"in{suffix}", SOURCES[fmt])
    table = import_preferences(src, fmt)
    assert table.schema.equals(schemas.PREFERENCES, check_metadata=False)
    counts = export_preferences(table, tmp_path / f"out{suffix}", fmt)
    assert counts == {"written": 2, "skipped_ties": 0}
    back = read_records(tmp_path / f"out{suffix}")
    assert [{k: r[k] for k in FIELDS[fmt]} for r in back] == [{k: r[k] for k in FIELDS[fmt]} for r in SOURCES[fmt]]


def test_imported_rows(tmp_path):
    src = tmp_path / "prefs.jsonl"
    src.write_text("\n" + json.dumps(SOURCES["trl"][0]) + "\n", encoding="utf-8")
    row = import_preferences(src, "trl").to_pylist()[0]
    # pair_id counts physical lines (the blank first line too), so it matches what an editor shows.
    assert row["pair_id"] == "trl-prefs-2"
    assert row["prompt_id"] == "imported-" + hashlib.sha1(b"How do I boil an egg?").hexdigest()[:12]
    assert (row["response_a"], row["response_b"], row["better"]) == ("Simmer it for 9 minutes.", "No.", 0)
    assert (row["annotator"], row["source"], row["weight"]) == ("imported:prefs.jsonl", "imported", 1.0)
    assert row["soft_label"] is None and row["score_a"] is None and row["is_safe_a"] is None
    assert import_preferences(src, "trl", annotator="alice").column("annotator").to_pylist() == ["alice"]


def test_hh_split_keeps_earlier_turns_in_prompt(tmp_path):
    rows = import_preferences(write_records(tmp_path / "hh.jsonl", SOURCES["hh-rlhf"]), "hh-rlhf").to_pylist()
    assert (rows[0]["prompt"], rows[0]["response_a"], rows[0]["response_b"]) == ("What is 2+2?", "4.", "5, obviously.")
    assert rows[1]["prompt"] == "Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke"
    assert rows[1]["response_b"] == "  No jokes today."  # only the separator space is removed
    # The same request gets the same prompt_id from any format.
    trl = write_records(tmp_path / "t.jsonl", [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}])
    assert import_preferences(trl, "trl").column("prompt_id").to_pylist() == [rows[0]["prompt_id"]]


def test_pku_mapping_and_harm_category_dict(tmp_path):
    rec = {**SOURCES["pku-saferlhf"][0],
           "response_1_harm_category": {"Violence": True, "Privacy": False, "Cybercrime": True}}
    row = import_preferences(write_records(tmp_path / "pku.parquet", [rec]), "pku-saferlhf").to_pylist()[0]
    assert (row["response_a"], row["response_b"], row["better"]) == ("Call a locksmith.", "Use a tension wrench.", 1)
    assert (row["is_safe_a"], row["is_safe_b"]) == (True, False)
    assert (row["harm_category_a"], row["harm_category_b"]) == (None, "Violence,Cybercrime")


def test_pku_safer_id_kept_or_derived_from_the_flags(tmp_path):
    # the `safer` column wins; without it, export derives it from differing flags or leaves it null
    out = tmp_path / "pku.jsonl"
    export_preferences(pairs({"better": 0, "is_safe_a": True, "is_safe_b": True, "safer": 0},
                             {"better": 1, "is_safe_a": False, "is_safe_b": True},
                             {"better": 1, "is_safe_a": True, "is_safe_b": True}), out, "pku-saferlhf")
    assert [r["safer_response_id"] for r in read_records(out)] == [0, 1, None]


def test_trl_export_skips_ties_and_orders_by_better(tmp_path):
    table = pairs({"better": 0, "score_a": 0.75, "score_b": 0.25}, {"better": -1, "score_a": 0.5, "score_b": 0.5},
                  {"better": 1, "score_a": 0.0, "score_b": 0.5})
    out = tmp_path / "trl.jsonl"
    assert export_preferences(table, out, "trl", with_margin=True) == {"written": 2, "skipped_ties": 1}
    assert read_records(out) == [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 0.5},
                                 {"prompt": "q", "chosen": "b", "rejected": "a", "margin": 0.5}]
    export_preferences(table, out, "trl")
    assert "margin" not in read_records(out)[0]


def test_export_from_parquet_path(tmp_path):
    path = schemas.write_table(pairs({"better": 1}), tmp_path / "prefs.parquet", schemas.PREFERENCES)
    export_preferences(path, tmp_path / "out.parquet", "hh-rlhf")
    assert read_records(tmp_path / "out.parquet") == [{"chosen": f"{H}q{A}b", "rejected": f"{H}q{A}a"}]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_detect_format(tmp_path, fmt, suffix):
    assert detect_format(write_records(tmp_path / f"x{suffix}", SOURCES[fmt])) == fmt


def test_detect_format_lists_required_fields(tmp_path):
    path = write_records(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(PreferenceFormatError) as e:
        detect_format(path)
    msg = str(e.value)
    assert f"{path} line 1" in msg and "['answer', 'question']" in msg
    assert "hh-rlhf needs chosen, rejected" in msg and "trl needs prompt, chosen, rejected" in msg
    assert "pku-saferlhf needs prompt, response_0" in msg


TRL, PKU, HH = SOURCES["trl"][0], SOURCES["pku-saferlhf"][0], SOURCES["hh-rlhf"][0]


@pytest.mark.parametrize("fmt,lines,message", [
    ("hh-rlhf", [HH, {"chosen": HH["chosen"]}], "line 2: missing field 'rejected' (hh-rlhf needs chosen, rejected)"),
    ("pku-saferlhf", [PKU, PKU, {**PKU, "better_response_id": 2}],
     "line 3: field 'better_response_id' must be 0 or 1, got 2"),
    ("pku-saferlhf", [{**PKU, "safer_response_id": True}], "line 1: field 'safer_response_id' must be 0 or 1, got True"),
    ("pku-saferlhf", [{**PKU, "is_response_1_safe": "no"}], "line 1: field 'is_response_1_safe' must be true or false"),
    ("pku-saferlhf", [{**PKU, "response_0_harm_category": 3}], "line 1: field 'response_0_harm_category' must be"),
    ("trl", [TRL, {**TRL, "prompt": "   "}], "line 2: field 'prompt' is empty"),
    ("trl", [{**TRL, "chosen": None}], "line 1: field 'chosen' must be a string, got null"),
    ("trl", [{**TRL, "chosen": [{"role": "assistant", "content": "x"}]}], "line 1: field 'chosen' is a list of messages"),
    ("trl", [{**TRL, "margin": "big"}], "line 1: field 'margin' must be a finite number"),
    ("hh-rlhf", [{**HH, "rejected": f"{H}What is 2+2?{A}"}], "line 1: field 'rejected' has an empty final answer"),
    ("hh-rlhf", [{**HH, "rejected": f"{H}What is 3+3?{A}6"}], "line 1: fields 'chosen' and 'rejected' differ"),
    ("hh-rlhf", [{**HH, "chosen": "Human: hi\n\nAssistant: x"}], "line 1: field 'chosen' must start with"),
    ("hh-rlhf", [{**HH, "chosen": f"{H}only a question"}], "line 1: field 'chosen' has no"),
    ("hh-rlhf", [{"chosen": f"{H} {A}x", "rejected": f"{H} {A}y"}], "line 1: field 'chosen' has an empty first"),
])
def test_bad_records_name_file_line_and_field(tmp_path, fmt, lines, message):
    path = write_records(tmp_path / "prefs.jsonl", lines)
    with pytest.raises(PreferenceFormatError) as e:
        import_preferences(path, fmt)
    assert str(e.value).startswith(f"{path} ") and message in str(e.value)


@pytest.mark.parametrize("content,message", [
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n', "line 2: not valid JSON ("),
    (b'[{"prompt": "a", "chosen": "b", "rejected": "c"}]\n', "line 1: expected a JSON object, got list; the file"),
    (b'[\n  {"prompt": "a", "chosen": "b", "rejected": "c"}\n]\n', "line 1: not valid JSON (Expecting value"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n"x"\n', "line 2: expected a JSON object, got str"),
    (b'{"prompt": "ok", "chosen": "b", "rejected": "c"}\n{"prompt": "caf\xe9"}\n',
     "line 2: not valid UTF-8 at column 16 (invalid continuation byte)"),
    (b"", ": empty file"),
    (b"\n  \n", ": empty file"),
])
def test_unreadable_jsonl(tmp_path, content, message):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(content)
    with pytest.raises(PreferenceFormatError) as e:
        import_preferences(path, "trl")
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(TRL).encode())
    assert import_preferences(path, "trl").num_rows == 1


def test_parquet_errors_name_the_row(tmp_path):
    path = write_records(tmp_path / "prefs.parquet", [PKU, {**PKU, "better_response_id": 5}])
    with pytest.raises(PreferenceFormatError, match=r"prefs\.parquet row 2: field 'better_response_id'"):
        import_preferences(path, "pku-saferlhf")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([TRL]).slice(0, 0), empty)
    with pytest.raises(PreferenceFormatError, match="empty file"):
        import_preferences(empty, "trl")


def test_bad_paths_and_names(tmp_path):
    with pytest.raises(PreferenceFormatError, match=r"prefs\.csv: unsupported file type '\.csv'"):
        import_preferences(tmp_path / "prefs.csv", "trl")
    with pytest.raises(PreferenceFormatError, match="file not found"):
        import_preferences(tmp_path / "nope.jsonl", "trl")
    with pytest.raises(PreferenceFormatError, match="expected one of hh-rlhf, pku-saferlhf, trl"):
        import_preferences(write_records(tmp_path / "x.jsonl", [TRL]), "dpo")
    with pytest.raises(PreferenceFormatError, match="trl format only"):
        export_preferences(pairs({"better": 0}), tmp_path / "o.jsonl", "hh-rlhf", with_margin=True)
    with pytest.raises(PreferenceFormatError, match="unsupported file type"):
        export_preferences(pairs({"better": 0}), tmp_path / "o.txt", "trl")
    assert os.listdir(tmp_path) == ["x.jsonl"]


@pytest.mark.parametrize("table,fmt,kwargs,message", [
    # The bad pair comes last: nothing may be written for the good ones before it.
    (lambda: pairs({"better": 0}, {"better": 1, "response_a": "ok\n\nAssistant: more"}), "hh-rlhf", {},
     "pair 'pair1' (row 2): field 'response_a' contains"),
    (lambda: pairs({"better": 0, "score_a": 1.0, "score_b": 0.0}, {"better": 0, "score_a": 1.0}), "trl",
     {"with_margin": True}, "pair 'pair1' (row 2): field 'score_b' is null"),
    (lambda: pairs({"better": 0}, {"better": 1, "prompt": " "}), "trl", {}, "(row 2): field 'prompt' is empty"),
    (lambda: pairs({"better": -1}, {"better": -1}), "trl", {}, "nothing to export: 2 of 2 pairs are ties"),
])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_rejected_export_writes_nothing(tmp_path, table, fmt, kwargs, message, suffix):
    dest = tmp_path / "out" / f"prefs{suffix}"
    with pytest.raises(PreferenceFormatError) as e:
        export_preferences(table(), dest, fmt, **kwargs)
    assert str(e.value).startswith(str(dest)) and message in str(e.value)
    assert not dest.parent.exists() or os.listdir(dest.parent) == []


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, suffix):
    dest = tmp_path / f"prefs{suffix}"
    export_preferences(pairs({"better": 0}), dest, "trl")
    before = dest.read_bytes()
    real_dumps, real_write = json.dumps, pq.write_table

    def dumps_then_fail(rec, **kwargs):
        if rec["chosen"] == "b":  # the second record: the first is already in the temp file
            raise OSError("disk full")
        return real_dumps(rec, **kwargs)

    def write_then_fail(table, where, **kwargs):
        real_write(table, where, **kwargs)
        raise OSError("disk full")

    if suffix == ".jsonl":
        monkeypatch.setattr(interop.json, "dumps", dumps_then_fail)
    else:
        monkeypatch.setattr(interop.pq, "write_table", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_preferences(pairs({"better": 0}, {"better": 1}), dest, "trl")
    assert os.listdir(tmp_path) == [dest.name] and dest.read_bytes() == before


def test_cli_import_export_and_errors(tmp_path, capsys):
    from flows.cli import main
    src = tmp_path / "trl.jsonl"
    src.write_text('{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}\n'
                   '{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n')
    out = tmp_path / "prefs.parquet"
    assert main(["prefs", "import", str(src), "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == 2
    back = tmp_path / "back.jsonl"
    assert main(["prefs", "export", str(out), "--format", "trl", "--out", str(back)]) == 0
    assert [json.loads(x)["chosen"] for x in back.read_text().splitlines()] == ["Hello!", "4"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi?", "chosen": "Hello!", "rejected": "No."}\n{"prompt": "x", "chosen": "y"}\n')
    assert main(["prefs", "import", str(bad), "--format", "trl", "--out", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().out
    assert "bad.jsonl" in err and "line 2" in err and "rejected" in err
    assert not (tmp_path / "x.parquet").exists()
    assert main(["prefs", "import", str(src), "--format", "alpaca", "--out", str(tmp_path / "y.parquet")]) == 2
    assert "hh-rlhf" in capsys.readouterr().out
