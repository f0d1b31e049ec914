"""``neftune data clean``: each filter on hand-made records, the candidate search against exhaustive ROUGE-L,
formats written back unchanged apart from the removed records and in order, the recipe form, and the errors."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import write_jsonl
from rouge_score import rouge_scorer

from neftune_cli.data.rouge import exhaustive_near_duplicates, near_duplicates, rouge_l
from neftune_cli.io import console

KEEP = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
    {"instruction": "Translate the sentence into French.", "input": "I like tea.", "output": "J'aime le thé."},
    {"instruction": "Name the largest planet of the solar system.", "input": "", "output": "Jupiter", "id": 7},
]
# one record per filter, in the order the filters are reported
REMOVED = {
    "empty": {"instruction": "Explain why the sky is blue.", "input": "", "output": "  "},
    "length": {"instruction": "Add numbers.", "input": "2 3", "output": "5"},
    "blocklist": {"instruction": "Draw a picture of a cat sitting down.", "input": "", "output": "..."},
    "punctuation": {"instruction": '"Quote" this famous line from the play.', "input": "", "output": "To be."},
    "exact_dup": {"instruction": "give three tips for  staying healthy.", "input": "",
                  "output": "Eat well, sleep, move."},
    "near_dup": {"instruction": "Give three tips for staying happy.", "input": "", "output": "Smile."},
}
PLACEHOLDER = {"instruction": "Compose a short song about the sea.", "input": "", "output": "<nooutput> (audio)"}


def records() -> list[dict]:
    return [KEEP[0], REMOVED["empty"], KEEP[1], REMOVED["length"], REMOVED["blocklist"], PLACEHOLDER,
            REMOVED["punctuation"], REMOVED["exact_dup"], KEEP[2], REMOVED["near_dup"]]


def run_clean(cli, *args):
    code, out, err = cli("data", "clean", *args)
    assert code == 0, err
    return out


def test_each_filter_on_hand_made_records(cli, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", records())
    out = run_clean(cli, src, "--out", tmp_path / "out.jsonl", "--report", tmp_path / "report.json")
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert kept == KEEP  # values unchanged (the extra id column too), input order
    report = json.loads((tmp_path / "report.json").read_text())
    removed = {name: f["removed"] for name, f in report["filters"].items() if f["removed"]}
    assert removed == {"empty": 2, "length": 1, "blocklist": 1, "punctuation": 1, "exact_dup": 1, "near_dup": 1}
    assert (report["records"], report["kept"], report["removed"]) == (10, 3, 7)
    examples = {name: f["examples"] for name, f in report["filters"].items()}
    assert [e["where"] for e in examples["empty"]] == [f"{src}: line 2", f"{src}: line 6"]
    assert examples["blocklist"][0]["reason"] == "instruction mentions 'Draw'"
    near = examples["near_dup"][0]
    assert near["duplicate_of"] == {"where": f"{src}: line 1", "instruction": KEEP[0]["instruction"]}
    assert near["rouge_l"] == round(rouge_l(REMOVED["near_dup"]["instruction"], KEEP[0]["instruction"]), 4)
    assert examples["exact_dup"][0]["duplicate_of"]["where"] == f"{src}: line 1"
    assert not report["filters"]["non_english"]["enabled"]
    assert "near_dup: 1 removed" in out and "kept 3 of 10 records, removed 7" in out  # plain lines off a terminal


def test_filters_switch_and_thresholds(cli, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", records() + [{"instruction": "Résumez ce texte, s'il vous plaît ça."
                                                                          " 这是中文的句子", "output": "ok"}])
    run_clean(cli, src, "--out", tmp_path / "a.jsonl", "--without", "near_dup,punctuation", "--without", "length",
              "--with", "non_english", "--max-non-ascii", "0.2", "--blocklist", "cat,planet",
              "--placeholders", "<none>")
    kept = [json.loads(line)["instruction"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert kept == [KEEP[0]["instruction"], KEEP[1]["instruction"], REMOVED["length"]["instruction"],
                    PLACEHOLDER["instruction"], REMOVED["punctuation"]["instruction"],
                    REMOVED["near_dup"]["instruction"]]
    run_clean(cli, src, "--out", tmp_path / "b.jsonl", "--rouge-l", "0.95", "--min-words", "2",
              "--max-output-words", "3")
    kept = [json.loads(line)["instruction"] for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    # near_dup at 0.95 keeps "staying happy"; --max-output-words 3 drops the 4-word outputs (and so the duplicate)
    assert REMOVED["near_dup"]["instruction"] in kept and REMOVED["length"]["instruction"] in kept
    assert KEEP[0]["instruction"] not in kept and REMOVED["exact_dup"]["instruction"] not in kept


def test_conversation_rules(cli, tmp_path):
    def conv(*turns, **extra):
        return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}

    data = [
        conv(("human", "How do I boil an egg quickly?"), ("gpt", "Put it in boiling water."), id=1),
        conv(("human", "Tell me a story about dragons."), ("gpt", "   ")),  # empty turn
        conv(("human", "Is anyone there to answer this?")),  # one-sided: no assistant turn
        conv(("system", "You are terse."), ("gpt", "Hello there, how can I help?")),  # one-sided: no user turn
        conv(("human", "How do I boil an egg fast?"), ("gpt", "Boil water first.")),  # near-dup of the first turn
        conv(("human", "Show me the image below, please."), ("gpt", "I cannot see images.")),  # blocklist
        conv(("human", "Summarise the plot of Hamlet briefly."), ("gpt", "<nooutput>")),  # placeholder
        conv(("human", "Summarise the story of Macbeth briefly."), ("gpt", "Ambition ruins a man."), ("human", "x"),
             ("gpt", "y"), id=9),
    ]
    src = tmp_path / "chat.json"
    src.write_text(json.dumps(data), encoding="utf-8")
    run_clean(cli, src, "--out", tmp_path / "out.json", "--report", tmp_path / "r.json")
    assert json.loads((tmp_path / "out.json").read_text()) == [data[0], data[7]]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["inputs"][0]["format"] == "sharegpt"
    removed = {name: f["removed"] for name, f in report["filters"].items() if f["removed"]}
    assert removed == {"empty": 2, "one_sided": 2, "blocklist": 1, "near_dup": 1}


def test_formats_round_trip_unchanged_apart_from_removed(cli, tmp_path):
    base = records()
    want = KEEP
    # parquet: the rows themselves are taken, so types stay (ints, nulls, nested lists)
    rows = [dict(r, id=i, tags=[i, i + 1], score=None if i % 2 else 0.5) for i, r in enumerate(base)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    run_clean(cli, tmp_path / "in.parquet", "--out", tmp_path / "out.parquet")
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema == pq.read_table(tmp_path / "in.parquet").schema
    assert table.to_pylist() == [rows[0], rows[2], rows[8]]
    # json -> json, renamed fields
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in base]
    (tmp_path / "q.json").write_text(json.dumps(renamed, ensure_ascii=False), encoding="utf-8")
    run_clean(cli, tmp_path / "q.json", "--out", tmp_path / "q-out.json", "--format", "alpaca",
              "--field", "instruction=question", "--field", "input=context", "--field", "output=answer")
    assert json.loads((tmp_path / "q-out.json").read_text()) == [renamed[0], renamed[2], renamed[8]]
    # messages jsonl, unicode kept as it is
    msgs = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            for r in want]
    write_jsonl(tmp_path / "m.jsonl", msgs)
    run_clean(cli, tmp_path / "m.jsonl", "--out", tmp_path / "m-out.jsonl")
    assert [json.loads(line) for line in (tmp_path / "m-out.jsonl").read_text().splitlines()] == msgs
    assert "J'aime le thé." in (tmp_path / "m-out.jsonl").read_text(encoding="utf-8")


def test_folder_in_folder_out_and_dry_run(cli, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", records()[:5])
    write_jsonl(folder / "b.jsonl", records()[5:])  # b's exact/near duplicates refer to a's records
    run_clean(cli, folder, "--out", tmp_path / "clean")
    assert [json.loads(x) for x in (tmp_path / "clean" / "a.jsonl").read_text().splitlines()] == KEEP[:2]
    assert [json.loads(x) for x in (tmp_path / "clean" / "b.jsonl").read_text().splitlines()] == KEEP[2:]
    out = run_clean(cli, folder, "--dry-run", "--report", tmp_path / "dry.json")
    assert not (tmp_path / "dry").exists() and json.loads((tmp_path / "dry.json").read_text())["kept"] == 3
    assert "dry run: nothing written" in out


def test_recipe_form_cleans_each_source_and_prints_set_lines(cli, tmp_path):
    from neftune_cli.recipe.load import load_recipe

    write_jsonl(tmp_path / "one.jsonl", records())
    write_jsonl(tmp_path / "two.jsonl", [KEEP[0], KEEP[1]])  # duplicates of source 0's records
    (tmp_path / "r.yaml").write_text("model: {name_or_path: builtin:tiny-llama}\ndata:\n  sources:\n"
                                     "    - {path: one.jsonl, max_samples: 2}\n    - {path: two.jsonl}\n"
                                     "output: {dir: run}\n", encoding="utf-8")
    out = run_clean(cli, tmp_path / "r.yaml", "--out", tmp_path / "clean")
    sets = [line.split()[1] for line in out.splitlines() if line.startswith("  --set ")]
    assert sets == [f"data.sources.0.path={tmp_path / 'clean' / 'one.jsonl'}",
                    f"data.sources.1.path={tmp_path / 'clean' / 'two.jsonl'}"]
    assert (tmp_path / "clean" / "two.jsonl").read_text() == ""  # both were duplicates of source 0
    loaded = load_recipe(tmp_path / "r.yaml", sets)
    assert [s.path for s in loaded.recipe.data.sources] == [str(tmp_path / "clean" / n) for n in ("one.jsonl",
                                                                                                   "two.jsonl")]


def test_summary_table_on_a_terminal(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(console, "stdout_is_tty", lambda: True)
    out = run_clean(cli, write_jsonl(tmp_path / "in.jsonl", records()), "--dry-run")
    assert "kept 3 of 10 records" in out and "┃ filter" in out and "near_dup" in out


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda p: write_jsonl(p / "in.jsonl", KEEP), ["{p}/in.jsonl", "--out", "{p}/in.jsonl"],
         "is an input of this command"),
        (lambda p: write_jsonl(p / "in.jsonl", KEEP), ["{p}/in.jsonl", "--out", "{p}/./in.jsonl", "--overwrite"],
         "is an input of this command"),
        (lambda p: [write_jsonl(p / "in.jsonl", KEEP), (p / "o.jsonl").write_text("")],
         ["{p}/in.jsonl", "--out", "{p}/o.jsonl"], "o.jsonl exists; pass --overwrite to replace it"),
        (lambda p: write_jsonl(p / "in.jsonl", KEEP), ["{p}/in.jsonl", "--out", "{p}/o.txt"], "unsupported file type"),
        (lambda p: write_jsonl(p / "in.jsonl", KEEP), ["{p}/in.jsonl"], "--out is required"),
        (lambda p: write_jsonl(p / "in.jsonl", KEEP), ["{p}/in.jsonl", "--dry-run", "--without", "typo"],
         "--without typo: unknown filter"),
        (lambda p: write_jsonl(p / "in.jsonl", KEEP), ["{p}/in.jsonl", "--dry-run", "--field", "answer=output"],
         "--field answer=...: unknown field"),
        (lambda p: write_jsonl(p / "in.jsonl", KEEP), ["{p}/in.jsonl", "--dry-run", "--report", "{p}/in.jsonl"],
         "--report {p}/in.jsonl is an input of this command"),
        (lambda p: (p / "in.json").write_text("[{\"instruction\": 1"), ["{p}/in.json", "--dry-run"],
         "in.json: malformed JSON"),
        (lambda p: write_jsonl(p / "in.jsonl", [KEEP[0], ["not", "an", "object"]]), ["{p}/in.jsonl", "--dry-run"],
         "in.jsonl: line 2: a record must be a JSON object, got list (--on-bad-record skip removes"),
        (lambda p: write_jsonl(p / "in.jsonl", [KEEP[0], {"instruction": 3, "output": "x"}]),
         ["{p}/in.jsonl", "--dry-run"], "in.jsonl: line 2: field instruction: expected a string, got int"),
    ],
)
def test_errors_exit_2_with_one_line(cli, tmp_path, make, args, message):
    make(tmp_path)
    code, _, err = cli("data", "clean", *[a.format(p=tmp_path) for a in args])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(p=tmp_path) in lines[0], err
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


def test_bad_records_skipped_when_asked(cli, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(KEEP[0]) + "\n{oops\n" + json.dumps(KEEP[1]) + "\n", encoding="utf-8")
    run_clean(cli, src, "--out", tmp_path / "out.jsonl", "--on-bad-record", "skip", "--report", tmp_path / "r.json")
    assert [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()] == KEEP[:2]
    bad = json.loads((tmp_path / "r.json").read_text())["filters"]["bad"]
    assert bad["removed"] == 1 and bad["examples"][0]["where"] == f"{src}: line 2"


def test_rouge_l_equals_rouge_score_including_ties():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    words = "the a cat dog sat on mat red blue big small it is was".split()
    pairs = [("a b c d e f g h i j", "a b c d e f g x y z"),  # F exactly 0.7
             ("Hello, World! ÉTÉ 2024", "hello world ete 2024"), ("", "x"), ("!!!", "?")]
    pairs += [(" ".join(rng.choices(words, k=rng.randint(1, 15))), " ".join(rng.choices(words, k=rng.randint(1, 15))))
              for _ in range(500)]
    for a, b in pairs:
        assert rouge_l(a, b) == scorer.score(a, b)["rougeL"].fmeasure, (a, b)


@pytest.mark.parametrize(("threshold", "shortest", "longest", "count"),
                         [(0.5, 2, 14, 400), (0.7, 2, 14, 400), (0.9, 2, 14, 400), (0.7, 20, 70, 120)])
def test_candidate_search_equals_exhaustive_rouge_l(threshold, shortest, longest, count):
    # variants of a few templates: many near-duplicates at every threshold, of every length (over 20 tokens,
    # partner lengths share index buckets)
    rng = random.Random(threshold)
    words = "write describe list explain the a of story poem about cat dog sea city five three short long".split()
    bases = [rng.choices(words, k=rng.randint(shortest, longest)) for _ in range(count // 10)]
    texts = []
    for _ in range(count):
        seq = list(rng.choice(bases))
        for _ in range(rng.randint(0, 4 * longest // 14)):
            op = rng.random()
            if op < 0.4 and seq:
                seq[rng.randrange(len(seq))] = rng.choice(words)
            elif op < 0.7:
                seq.insert(rng.randint(0, len(seq)), rng.choice(words))
            elif seq:
                seq.pop(rng.randrange(len(seq)))
        texts.append(" ".join(seq) if rng.random() > 0.05 else None)  # None: removed by another filter
    fast = near_duplicates(texts, threshold)
    assert fast == exhaustive_near_duplicates(texts, threshold)
    assert len(fast) > count // 8


def test_candidate_search_equals_exhaustive_on_alpaca(shared_data):
    data = json.loads((shared_data / "alpaca" / "alpaca_data_first2k.json").read_text())
    texts = [r["instruction"] for r in data[:400]]
    fast = near_duplicates(texts, 0.5)  # a low threshold, so the 400 records have near-duplicates to find
    assert fast == exhaustive_near_duplicates(texts, 0.5) and len(fast) > 5


def test_alpaca_2k_sample(cli, shared_data, tmp_path):
    run_clean(cli, shared_data / "alpaca" / "alpaca_data_first2k.json", "--out", tmp_path / "out.json",
              "--report", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    removed = {name: f["removed"] for name, f in report["filters"].items() if f["removed"]}
    assert removed == {"empty": 7, "near_dup": 6} and report["kept"] == 1987
    source = json.loads((shared_data / "alpaca" / "alpaca_data_first2k.json").read_text())
    kept = json.loads((tmp_path / "out.json").read_text())
    it = iter(source)
    assert all(any(k == s for s in it) for k in kept)  # a subsequence: same values, same order
