"""Sources, formats, bad records, counts, eval split, weights, the cache, and the ``neftune data`` commands."""

from __future__ import annotations

import json

import pytest
from data_helpers import prepared, recipe, write_json, write_jsonl

from neftune_cli.data.cache import entry
from neftune_cli.data.pipeline import prepare
from neftune_cli.io.errors import DataError

ALPACA = [{"instruction": f"Reverse {w}", "input": "", "output": w[::-1]} for w in ("apple", "river", "stone", "tiger")]
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
MESSAGES = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def run(tmp_path, records, tokenizer, **data):
    return prepared(tmp_path, records, tokenizer, **data)


# --- bad records -------------------------------------------------------------------------------------------------

BAD_RECORDS = [
    ({"instruction": "x", "input": ""}, "field output: missing"),
    ({"instruction": "x", "output": ""}, "field output: empty"),
    ({"instruction": "x", "output": "  \n"}, "field output: empty"),
    ({"instruction": 5, "output": "y"}, "field instruction: expected a string, got int"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "field input: expected a string, got list"),
    (
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
        r"field conversations\[1\].from: unknown role 'bot' \(expected one of human, user, gpt",
    ),
    ({"conversations": []}, "field conversations: empty conversation"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "field conversations: no assistant turn"),
    ({"conversations": [{"from": "gpt", "value": "hi"}]}, r"field conversations\[0\]: the conversation starts with"),
    ({"conversations": [{"from": "human", "value": "hi"}, "hello"]}, r"field conversations\[1\]: a turn must be"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}, r"field conversations\[0\].value: missing"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"field messages\[0\].role: unknown role 'robot'"),
    ({"messages": [{"content": "hi"}]}, r"field messages\[0\].role: missing"),
    (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "x"}]},
        r"field messages\[0\].content: expected a string, got list",
    ),
    ({"messages": "hi"}, "field messages: expected a list of turns, got str"),
    ([1, 2], "a record must be a JSON object, got list"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_RECORDS)
def test_bad_record_is_an_error_naming_file_line_and_field(tmp_path, tiny_tokenizer, bad, message):
    fmt = "alpaca" if isinstance(bad, dict) and "instruction" in bad else "auto"
    fmt = "sharegpt" if isinstance(bad, dict) and "conversations" in bad else fmt
    fmt = "messages" if isinstance(bad, dict) and "messages" in bad else fmt
    good = SHAREGPT if fmt == "sharegpt" else MESSAGES if fmt == "messages" else ALPACA[0]
    with pytest.raises(DataError, match=rf"data\.jsonl: line 2: {message}") as error:
        run(tmp_path, [good, bad], tiny_tokenizer, source={"format": fmt if fmt != "auto" else "alpaca"})
    assert "\n" not in str(error.value) and "on_bad_record: skip" in str(error.value)


def test_undecodable_and_malformed_lines(tmp_path, tiny_tokenizer):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps(ALPACA[0]).encode(),
        b'{"instruction": "caf\xe9"}',
        b'{"instruction": ',
        json.dumps(ALPACA[1]).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    with pytest.raises(DataError, match=r"data\.jsonl: line 2: not valid UTF-8"):
        prepare(recipe([path]), tiny_tokenizer, log=lambda m: None)
    result = prepare(recipe([path], on_bad_record="skip"), tiny_tokenizer, log=lambda m: None)
    assert result.report.bad == 2 and len(result.train) == 2
    assert [r.split(": ", 2)[1:] for r in result.report.bad_reasons] == [
        ["line 2", "not valid UTF-8 (byte 20 of the line)"],
        ["line 3", "malformed JSON: Expecting value at column 17"],
    ]


def test_skip_counts_every_bad_record_and_keeps_the_first_reasons(tmp_path, tiny_tokenizer):
    bad = [{"instruction": f"x{i}", "output": ""} for i in range(7)]
    result = run(tmp_path, [ALPACA[0], *bad, ALPACA[1]], tiny_tokenizer, on_bad_record="skip")
    report = result.report
    assert (report.bad, report.sources[0].bad, report.sources[0].records, len(result.train)) == (7, 7, 9, 2)
    assert len(report.bad_reasons) == 5 and report.bad_reasons[0].endswith("data.jsonl: line 2: field output: empty")
    assert "7 bad skipped" in report.summary()


def test_template_errors_are_bad_records(tmp_path, tiny_tokenizer):
    template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    template += "{{ m['content'] }}</s>{% endfor %}"
    system = {"messages": [{"role": "system", "content": "s"}, *MESSAGES["messages"]]}
    result = run(
        tmp_path, [MESSAGES, system], tiny_tokenizer, template="custom", chat_template=template, on_bad_record="skip"
    )
    assert result.report.bad == 1 and result.report.bad_reasons[0].endswith(
        "line 2: field messages: chat template error: no system"
    )


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "data.json",
            b'[{"instruction": "x", "output": "y"},',
            r"data\.json: malformed JSON: Expecting value at line 1",
        ),
        (
            "data.json",
            b'{"instruction": "x", "output": "y"}',
            r"data\.json: expected a JSON array of records, got a dict",
        ),
        (
            "data.json",
            b'[{"instruction": "caf\xe9"}]',
            r"data\.json: not a UTF-8 text file \(invalid byte at offset 21\)",
        ),
        ("data.csv", b"instruction,output\ncaf\xe9,x\n", r"data\.csv: not a UTF-8 text file"),
        ("data.txt", b"hello", r"data\.txt: unsupported file type '\.txt'"),
        ("data.parquet", b"not parquet", r"data\.parquet: cannot read parquet"),
    ],
)
def test_unreadable_files(tmp_path, tiny_tokenizer, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare(recipe([path], on_bad_record="skip"), tiny_tokenizer, log=lambda m: None)


def test_empty_folder_and_hub_offline(tmp_path, tiny_tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: the folder holds no \.json, \.jsonl, \.parquet, \.csv files"):
        prepare(recipe([tmp_path / "empty"]), tiny_tokenizer, log=lambda m: None)
    with pytest.raises(DataError, match=r"nobody/no-such-dataset: cannot load hub dataset \(split train\); offline"):
        prepare(recipe(["nobody/no-such-dataset"]), tiny_tokenizer, log=lambda m: None)


# --- sources and formats ------------------------------------------------------------------------------------------


def test_file_types_and_folders_give_the_same_examples(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "folder"
    folder.mkdir()
    write_json(folder / "a.json", ALPACA[:1])
    write_jsonl(folder / "b.jsonl", ALPACA[1:2])
    pq.write_table(pa.Table.from_pylist(ALPACA[2:3]), folder / "c.parquet")
    (folder / "d.csv").write_text("instruction,input,output\nReverse tiger,,regit\n", encoding="utf-8")
    (folder / "notes.md").write_text("ignored")
    reference = [ex["input_ids"] for ex in run(tmp_path, ALPACA, tiny_tokenizer).train]
    result = prepare(recipe([folder]), tiny_tokenizer, log=lambda m: None)
    assert [ex["input_ids"] for ex in result.train] == reference
    jsonl_named_json = write_jsonl(tmp_path / "lines.json", ALPACA)  # many published .json files are JSON lines
    assert [ex["input_ids"] for ex in prepare(recipe([jsonl_named_json]), tiny_tokenizer).train] == reference


@pytest.mark.parametrize(
    ("record", "picked"),
    [
        (ALPACA[0], "alpaca (columns instruction and output)"),
        (SHAREGPT, "sharegpt (column conversations with from/value turns)"),
        (MESSAGES, "messages (column messages with role/content turns)"),
        ({"conversations": MESSAGES["messages"]}, "messages (column conversations with role/content turns)"),
    ],
)
def test_auto_detection_logs_what_it_picked(tmp_path, tiny_tokenizer, record, picked):
    logs = []
    result = run(tmp_path, [record], tiny_tokenizer, template="chat", log=logs.append)
    assert any(line.endswith(f"data.jsonl: format auto -> {picked}") for line in logs)
    assert result.report.sources[0].format == picked.split()[0] and len(result.train) == 1


def test_auto_detection_failure_names_the_columns(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"line 1: cannot detect the format from the columns \(answer, question\)"):
        run(tmp_path, [{"question": "q", "answer": "a"}], tiny_tokenizer)


def test_field_renames(tmp_path, tiny_tokenizer):
    renamed = [{"question": r["instruction"], "answer": r["output"]} for r in ALPACA]
    reference = [ex["input_ids"] for ex in run(tmp_path, ALPACA, tiny_tokenizer).train]
    fields = {"instruction": "question", "output": "answer"}
    result = run(tmp_path, renamed, tiny_tokenizer, name="renamed.jsonl", source={"fields": fields})
    assert [ex["input_ids"] for ex in result.train] == reference
    with pytest.raises(DataError, match=r"line 1: field answer \(output\): missing"):
        run(tmp_path, [{"question": "q"}], tiny_tokenizer, source={"fields": fields, "format": "alpaca"})
    speaker = {"talk": [{"who": "human", "text": "hi"}, {"who": "gpt", "text": "hello"}]}
    fields = {"conversations": "talk", "from": "who", "value": "text"}
    assert len(run(tmp_path, [speaker], tiny_tokenizer, template="chat", source={"fields": fields}).train) == 1


def test_unknown_field_name_is_a_recipe_error():
    from neftune_cli.io.errors import RecipeError

    with pytest.raises(RecipeError, match="unknown field name answer; our names are instruction"):
        recipe([{"path": "org/x", "fields": {"answer": "output"}}])


def test_max_samples_takes_the_first_records(tmp_path, tiny_tokenizer):
    result = run(tmp_path, ALPACA, tiny_tokenizer, source={"max_samples": 2})
    assert result.report.sources[0].records == 2 and len(result.train) == 2
    assert (
        result.train[1]["input_ids"]
        == run(tmp_path, ALPACA[:2], tiny_tokenizer, name="two.jsonl").train[1]["input_ids"]
    )


# --- lengths -----------------------------------------------------------------------------------------------------


def test_truncation_and_drops_are_counted(tmp_path, tiny_tokenizer):
    long_answer = {"instruction": "Say it", "input": "", "output": " ".join(["apple"] * 200)}
    long_prompt = {"instruction": "Say " + " ".join(["apple"] * 200), "input": "", "output": "ok"}
    records = [ALPACA[0], long_answer, long_prompt]
    full = run(tmp_path, records, tiny_tokenizer, max_seq_len=4096).train
    limit = len(full[0]["input_ids"]) + 5
    cut = run(tmp_path, records, tiny_tokenizer, max_seq_len=limit)
    source = cut.report.sources[0]
    assert (source.truncated, source.dropped_untrained, source.dropped_overlength, len(cut.train)) == (1, 1, 0, 2)
    assert cut.train[1]["input_ids"] == full[1]["input_ids"][:limit]  # keeps the start
    assert cut.train[1]["labels"] == full[1]["labels"][:limit] and cut.train[1]["length"] == limit
    assert "1 truncated, 1 dropped" in cut.report.summary()
    dropped = run(tmp_path, records, tiny_tokenizer, max_seq_len=limit, overlength="drop")
    source = dropped.report.sources[0]
    assert (source.truncated, source.dropped_overlength, len(dropped.train)) == (0, 2, 1)


def test_no_usable_examples_is_an_error(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="no usable training examples: 4 records, 0 bad, 4 over max_seq_len"):
        run(tmp_path, ALPACA, tiny_tokenizer, max_seq_len=8, overlength="drop")


# --- eval split and weights --------------------------------------------------------------------------------------

MANY = [{"instruction": f"Add {i} and 1", "input": "", "output": str(i + 1)} for i in range(40)]


def test_eval_fraction_and_size_are_seeded_and_disjoint(tmp_path, tiny_tokenizer):
    def split(seed=0, **data):
        result = prepare(recipe([path], **data), tiny_tokenizer, seed=seed, log=lambda m: None)
        return [tuple(x["input_ids"]) for x in result.train], [tuple(x["input_ids"]) for x in result.eval], result

    path = write_jsonl(tmp_path / "many.jsonl", MANY)
    train, held, result = split(eval_fraction=0.1)
    assert (len(train), len(held), result.report.sources[0].held_out) == (36, 4, 4)
    assert not set(train) & set(held) and result.report.eval.examples == 4
    assert split(eval_fraction=0.1)[1] == held and split(seed=1, eval_fraction=0.1)[1] != held
    assert [len(x) for x in split(eval_size=7)[:2]] == [33, 7]
    with pytest.raises(DataError, match="data.eval_size 40 leaves no training examples: there are 40 usable"):
        split(eval_size=40)


def test_eval_sources(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", MANY[:30])
    held = write_jsonl(tmp_path / "eval.jsonl", MANY[30:])
    data = recipe([train], eval_sources=[{"path": str(held)}])
    result = prepare(data, tiny_tokenizer, log=lambda m: None)
    assert (len(result.train), len(result.eval), result.report.eval_sources[0].used) == (30, 10, 10)


def test_weights_resample_each_source(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", MANY[:10])
    b = write_jsonl(tmp_path / "b.jsonl", MANY[10:30])
    data = recipe([{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.25}])
    result = prepare(data, tiny_tokenizer, log=lambda m: None)
    assert [s.used for s in result.report.sources] == [20, 5] and len(result.train) == 25
    ids = [tuple(x["input_ids"]) for x in result.train]
    assert ids[:10] == ids[10:20]  # every example of a twice
    assert len(set(ids[20:])) == 5 and set(ids[20:]) <= {
        tuple(x["input_ids"]) for x in run(tmp_path, MANY[10:30], tiny_tokenizer).train
    }
    again = prepare(data, tiny_tokenizer, log=lambda m: None)
    assert [tuple(x["input_ids"]) for x in again.train] == ids  # seeded
    other = prepare(data, tiny_tokenizer, seed=5, log=lambda m: None)
    assert [tuple(x["input_ids"]) for x in other.train][20:] != ids[20:]
    one_and_half = prepare(recipe([{"path": str(a), "weight": 1.5}]), tiny_tokenizer, log=lambda m: None)
    assert one_and_half.report.sources[0].used == 15 and len(set(map(tuple, one_and_half.train["input_ids"]))) == 10


# --- parallelism and the cache -----------------------------------------------------------------------------------


def test_num_proc_gives_the_same_data(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "many.jsonl", MANY * 3)
    one = prepare(recipe([path], template="chat"), tiny_tokenizer, log=lambda m: None)
    two = prepare(recipe([path], template="chat", num_proc=2), tiny_tokenizer, log=lambda m: None)
    assert one.train.to_dict() == two.train.to_dict() and one.fingerprint == two.fingerprint


def test_cache_hit_on_second_run_and_fingerprint(tmp_path, tiny_tokenizer, neftune_cache):
    path = write_jsonl(tmp_path / "many.jsonl", MANY)
    logs: list[str] = []
    first = prepare(recipe([path], cache=True, eval_size=3), tiny_tokenizer, log=logs.append)
    assert any(line.startswith("data: tokenized") for line in logs)
    assert (entry(first.fingerprint) / "report.json").is_file() and entry(
        first.fingerprint
    ).parent == neftune_cache / "data"
    logs.clear()
    second = prepare(recipe([path], cache=True, eval_size=3, num_proc=2), tiny_tokenizer, log=logs.append)
    assert logs == [f"data: cache hit ({entry(first.fingerprint)})"]  # nothing read or tokenized
    assert second.fingerprint == first.fingerprint
    assert second.train.to_dict() == first.train.to_dict() and second.eval.to_dict() == first.eval.to_dict()
    assert second.report.to_dict() == first.report.to_dict()
    assert not list((neftune_cache / "data").glob(".tmp-*"))

    moved = tmp_path / "elsewhere.jsonl"
    moved.write_bytes(path.read_bytes())
    assert prepare(recipe([moved], cache=True, eval_size=3), tiny_tokenizer).report.sources[0].path == str(moved)
    changes = {
        "content": lambda: (write_jsonl(path, MANY[:-1]), recipe([path], eval_size=3))[1],
        "max_seq_len": lambda: recipe([moved], eval_size=3, max_seq_len=100),
        "train_on_inputs": lambda: recipe([moved], eval_size=3, train_on_inputs=True),
    }
    for name, changed in changes.items():
        assert prepare(changed(), tiny_tokenizer).fingerprint != first.fingerprint, name
    assert prepare(recipe([moved], eval_size=3), tiny_tokenizer, seed=1).fingerprint != first.fingerprint
    # the seed only matters to the eval split and weights
    assert (
        prepare(recipe([moved]), tiny_tokenizer, seed=1).fingerprint
        == prepare(recipe([moved]), tiny_tokenizer).fingerprint
    )


def test_cached_bad_records_still_stop_a_run_in_error_mode(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", [ALPACA[0], {"instruction": "x", "output": ""}])
    assert prepare(recipe([path], cache=True, on_bad_record="skip"), tiny_tokenizer).report.bad == 1
    logs: list[str] = []
    with pytest.raises(DataError, match=r"data\.jsonl: line 2: field output: empty"):
        prepare(recipe([path], cache=True), tiny_tokenizer, log=logs.append)
    assert logs[0].startswith("data: cache hit")


def test_fingerprint_covers_the_tokenizer(tmp_path, tiny_tokenizer):
    import copy

    path = write_jsonl(tmp_path / "many.jsonl", MANY[:3])
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    fingerprints = {prepare(recipe([path]), t).fingerprint for t in (tiny_tokenizer, other)}
    assert len(fingerprints) == 2


def test_report_is_json_able(tmp_path, tiny_tokenizer):
    result = run(tmp_path, ALPACA, tiny_tokenizer, eval_size=1)
    data = json.loads(json.dumps(result.report.to_dict()))
    assert data["train"]["examples"] == 3 and data["eval"]["examples"] == 1
    assert data["sources"][0]["records"] == 4 and data["end_of_turn"] == "</s>"
