"""Train/serve parity from the files a run hands on.

The reference is not our code: a tokenizer loaded fresh from the folder a run writes (``tokenizer_files``) and its
``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``, which is what transformers and vLLM feed
the model. Every trained reply must follow exactly those prompt tokens; ``prompt_ids`` (our inference path) must
give them too. With ``NEFTUNE_OTHER_PYTHON`` set to a Python with another major transformers version (``make
test-tf4`` sets it), the same folders are loaded there as well and must give the same tokens and logits.
Real-data tests skip without ../shared/data.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from data_helpers import STANFORD_NO_INPUT, chat_ids, prepared, recipe, word_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from neftune_cli.data.pipeline import prepare, prompt_ids, stop_token_ids
from neftune_cli.data.templates import AlpacaTemplate, alpaca_jinja
from neftune_cli.models.serving_files import tokenizer_files

TEMPLATES = ["chatml", "llama-2-chat", "zephyr", "mistral-instruct", "alpaca"]
CHECKED = 25  # conversations / records checked turn by turn per combination


def quiet(message: str) -> None:
    pass


def write_serving_files(folder: Path, base: str | Path, data, tokenizer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_files(str(base), data, tokenizer).write(folder)
    return folder


def served(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _data(template: str, **data):
    return recipe([{"path": "org/unused"}], template=template, **data).data


def assert_trained_after(example: dict, prompts: list[list[int]]) -> None:
    """Each trained run of the example starts right after one of these prompts' exact tokens."""
    ids, labels = example["input_ids"], example["labels"]
    starts = [t for t in range(len(ids)) if labels[t] != -100 and (t == 0 or labels[t - 1] == -100)]
    assert starts and all(ids[:t] in prompts for t in starts)


# --- the Alpaca prompt as a chat template -----------------------------------------------------------------------

text = st.text(alphabet="abc xyz,.!?\n#:0123", min_size=1, max_size=25).filter(lambda s: s.strip())


@settings(max_examples=30, deadline=None)
@given(instruction=text, output=text, system=st.one_of(st.none(), text))
def test_alpaca_jinja_renders_the_training_prompt(tiny_tokenizer, instruction, output, system):
    bos = tiny_tokenizer.bos_token
    template = AlpacaTemplate(bos, tiny_tokenizer.eos_token)
    record = {"instruction": instruction, "input": "", "output": output, "system": system}
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": instruction}
    ]
    render = tiny_tokenizer.apply_chat_template
    prompt = render(messages, tokenize=False, add_generation_prompt=True, chat_template=template.jinja)
    assert prompt == template.prompt({**record, "output": None}) == bos + alpaca_prompt_of(record)
    full = render(
        [*messages, {"role": "assistant", "content": output}], tokenize=False, chat_template=template.jinja
    )
    assert full == template.render(record).text


def alpaca_prompt_of(record: dict) -> str:
    prompt = STANFORD_NO_INPUT.format(**record)
    return prompt if record["system"] is None else record["system"] + prompt[prompt.index("\n\n### Instruction:") :]


def test_alpaca_jinja_without_bos_and_its_limits(tiny_tokenizer):
    jinja = alpaca_jinja(with_bos=False)
    user = {"role": "user", "content": "Say hi"}
    prompt = tiny_tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True, chat_template=jinja)
    assert prompt == STANFORD_NO_INPUT.format(instruction="Say hi")
    for messages in ([user, {"role": "assistant", "content": "hi"}, user], [{"role": "assistant", "content": "x"}]):
        with pytest.raises(Exception, match="one exchange"):
            tiny_tokenizer.apply_chat_template(messages, tokenize=False, chat_template=jinja)


def test_alpaca_bos_follows_the_tokenizer(tmp_path):
    for add_bos in (True, False):
        words = word_tokenizer("Say hi there", add_bos=add_bos)
        (example,) = prepared(tmp_path, [{"instruction": "Say hi", "output": "hi there"}], words).train
        assert (example["input_ids"][0] == words.bos_token_id) == add_bos
        base = tmp_path / "no-files"  # a base that ships no tokenizer files: the template is still written
        base.mkdir(exist_ok=True)
        folder = write_serving_files(tmp_path / f"bos-{add_bos}", base, _data("alpaca"), words)
        assert ("bos_token" in (folder / "chat_template.jinja").read_text()) == add_bos


# --- the builtin model: prompts served from a run folder -------------------------------------------------------


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_builtin_run_folder_serves_the_trained_prompts(tmp_path, tiny_model_dir, tiny_tokenizer, template):
    data = _data(template)
    folder = write_serving_files(tmp_path / "final", tiny_model_dir, data, tiny_tokenizer)
    serving = served(folder)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Reverse the word 'moon'."}]
    expected = chat_ids(serving, messages, add_generation_prompt=True)
    assert prompt_ids(messages, data, tiny_tokenizer) == expected
    assert expected[0] == tiny_tokenizer.bos_token_id and expected[1] != tiny_tokenizer.bos_token_id
    record = {"messages": [*messages, {"role": "assistant", "content": "noom"}]}
    (example,) = prepared(tmp_path, [record], tiny_tokenizer, template=template).train
    assert_trained_after(example, [expected])

    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (folder / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    generation = json.loads((folder / "generation_config.json").read_text())
    stops = stop_token_ids(data, tiny_tokenizer)
    assert generation["eos_token_id"] == (stops if len(stops) > 1 else stops[0])
    assert stops == ([2, 5] if template == "chat" else [2])  # </s>, and <|im_end|> under ChatML


# --- real tokenizers and templates ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_tokenizers():
    cache = {}

    def load(path: Path):
        from transformers import AutoTokenizer

        if path not in cache:
            cache[path] = AutoTokenizer.from_pretrained(path)
        return cache[path]

    return load


@pytest.mark.parametrize("name", ["llama2", "mistral_v1"])
@pytest.mark.parametrize("template", TEMPLATES)
def test_real_templates_served_from_the_run_folder(tmp_path, shared_data, real_tokenizers, name, template):
    base = shared_data / "tokenizers" / name
    tokenizer = real_tokenizers(base)
    if template == "alpaca":
        path = shared_data / "alpaca" / "alpaca_data_first2k.json"
        records = [r for r in json.loads(path.read_text()) if not r["input"]][:CHECKED]
        conversations = [
            [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
            for r in records
        ]
        options = {"template": "alpaca"}
    else:
        path = shared_data / "sharegpt" / "oasst_en100_paths_sharegpt.json"
        roles = {"human": "user", "gpt": "assistant"}
        conversations = [
            [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]
            for r in json.loads(path.read_text())[:CHECKED]
        ]
        chat_template = (shared_data / "chat_templates" / f"{template}.jinja").read_text()
        options = {"template": "custom", "chat_template": chat_template, "max_seq_len": 8192}
    (tmp_path / "data.json").write_text(json.dumps([{"messages": m} for m in conversations]))
    run = recipe([tmp_path / "data.json"], **options)
    data = run.data
    result = prepare(run, tokenizer, log=quiet)
    assert result.report.splits == 0 and result.report.bad == 0 and len(result.train) == len(conversations)

    serving = served(write_serving_files(tmp_path / "final", base, data, tokenizer))
    assert (tmp_path / "final" / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    shipped = json.loads((base / "tokenizer_config.json").read_text())
    written = json.loads((tmp_path / "final" / "tokenizer_config.json").read_text())
    assert written == {**shipped, "chat_template": written["chat_template"]}  # the base's own, plus the template
    for messages, example in zip(conversations, result.train, strict=True):
        prompts = []
        for k in range(1, len(messages), 2):
            prompt = chat_ids(serving, messages[:k], add_generation_prompt=True)
            assert prompt_ids(messages[:k], data, tokenizer) == prompt
            prompts.append(prompt)
        assert_trained_after(example, prompts)


@pytest.mark.parametrize("space", ["prepend", "metaspace"])
def test_a_boundary_merge_is_trained_as_served_and_splits_later_turns(tmp_path, shared_data, real_tokenizers, space):
    """The generation prompt ends in a space: alone it is its own "▁" token, followed by a reply it merges into
    "▁Hello". Served, the prompt keeps its "▁" and the model generates "Hello": that is what is trained. The next
    prompt re-tokenizes the reply as "▁Hello", so the second turn is its own example. Both ways SentencePiece
    conversions put a space in front of the text (the Llama-2 file's Prepend normalizer; a Metaspace
    pre-tokenizer, as newer conversions have) are taken off the reply."""
    base = shared_data / "tokenizers" / "llama2"
    if space == "metaspace":
        base = _metaspace_copy(base, tmp_path / "metaspace")
    tokenizer = real_tokenizers(base)
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    messages = [
        {"role": "user", "content": "Greet me."},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "Hello again."},
    ]
    result = prepared(tmp_path, [{"messages": messages}], tokenizer, template="custom", chat_template=template)
    assert result.report.splits == 1 and len(result.train) == 2
    data = _data("custom", chat_template=template)
    serving = served(write_serving_files(tmp_path / "final", base, data, tokenizer))
    for k, example in zip((1, 3), result.train, strict=True):
        prompt = chat_ids(serving, messages[:k], add_generation_prompt=True)
        assert tokenizer.convert_ids_to_tokens(prompt[-1]) == "▁"
        ids, labels = example["input_ids"], example["labels"]
        assert ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) == {-100}
        reply = tokenizer.convert_ids_to_tokens(ids[len(prompt) :])
        assert labels[len(prompt) :] == ids[len(prompt) :]
        assert "".join(reply).replace("▁", " ") == messages[k]["content"] + "</s>"  # no doubled space


def _metaspace_copy(base: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        (folder / name).write_bytes((base / name).read_bytes())
    spec = json.loads((base / "tokenizer.json").read_text())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


# --- another transformers version reads the same folders -------------------------------------------------------

OTHER = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
job = json.load(sys.stdin)
out = {"version": transformers.__version__, "folders": {}}
for folder, conversations in job["folders"].items():
    tok = AutoTokenizer.from_pretrained(folder)
    out["folders"][folder] = [
        list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
        for m in conversations
    ]
model = AutoModelForCausalLM.from_pretrained(job["model"])
with torch.no_grad():
    out["logits"] = model(torch.tensor([job["ids"]])).logits[0, :, :8].tolist()
json.dump(out, sys.stdout)
"""


def test_another_transformers_version_reads_the_same_folders(tmp_path, tiny_model_dir, tiny_tokenizer):
    other = os.environ.get("NEFTUNE_OTHER_PYTHON")
    if not other:
        pytest.skip("NEFTUNE_OTHER_PYTHON (a Python with the other transformers major version) is not set")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    messages = [
        [{"role": "user", "content": "Sort 3 1 2."}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Add 2 and 3."}],
    ]
    folders = {}
    for template in ("chat", "alpaca"):
        data = _data(template)
        folder = write_serving_files(tmp_path / template, tiny_model_dir, data, tiny_tokenizer)
        folders[str(folder)] = ([prompt_ids(m, data, tiny_tokenizer) for m in messages], messages)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "llama2"
    if shared.is_dir():
        from transformers import AutoTokenizer

        llama = AutoTokenizer.from_pretrained(shared)
        chat_template = (shared.parents[1] / "chat_templates" / "llama-2-chat.jinja").read_text()
        for template, options in (("alpaca", {}), ("custom", {"chat_template": chat_template})):
            data = _data(template, **options)
            folder = write_serving_files(tmp_path / f"llama-{template}", shared, data, llama)
            folders[str(folder)] = ([prompt_ids(m, data, llama) for m in messages], messages)
    ids = tiny_tokenizer("Reverse the word 'moon'.")["input_ids"]
    job = {"folders": {f: m for f, (_, m) in folders.items()}, "model": str(tiny_model_dir), "ids": ids}
    done = subprocess.run([other, "-c", OTHER], input=json.dumps(job), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout)
    assert theirs["version"].split(".")[0] != transformers.__version__.split(".")[0]
    for folder, (expected, _) in folders.items():
        assert theirs["folders"][folder] == expected, folder
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(torch.tensor([ids])).logits[0, :, :8]
    torch.testing.assert_close(torch.tensor(theirs["logits"]), ours, rtol=1e-5, atol=1e-5)


# --- a run and its merge hand the files on ---------------------------------------------------------------------


def test_a_run_and_its_merge_hand_on_the_training_template(cli, tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import GenerationConfig

    from neftune_cli.demo import tasks as demo_tasks

    (tmp_path / "train.jsonl").write_text(demo_tasks.to_jsonl(demo_tasks.generate(16, seed=7)))
    (tmp_path / "r.yaml").write_text(f"""\
model: {{name_or_path: builtin:tiny-llama}}
data: {{sources: [{{path: train.jsonl}}], template: chat, max_seq_len: 128}}
lora: {{r: 4, alpha: 8}}
train: {{max_steps: 2, micro_batch_size: 8, save_every: 1}}
output: {{dir: {tmp_path / 'run'}}}
""")
    code, _, err = cli("train", str(tmp_path / "r.yaml"))
    assert code == 0, err
    code, _, err = cli("merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    assert code == 0, err
    data = _data("chat")
    messages = [{"role": "user", "content": "Reverse the word 'moon'."}]
    expected = prompt_ids(messages, data, tiny_tokenizer)
    for folder in (tmp_path / "run" / "final", tmp_path / "run" / "checkpoints" / "step-1", tmp_path / "merged"):
        assert chat_ids(served(folder), messages, add_generation_prompt=True) == expected, folder
        assert GenerationConfig.from_pretrained(folder).eos_token_id == stop_token_ids(data, tiny_tokenizer)
        assert (folder / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
