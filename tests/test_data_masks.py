"""Loss masks and train/inference parity: hand-written expected tokens, TRL's masks, property tests.

Expected examples are written with ``marked``: the tokens of a word-level tokenizer separated by spaces,
trained runs in brackets. ``[elppa </s>]`` means: those two tokens have labels equal to their ids, every
other token has -100.
"""

from __future__ import annotations

import pytest
from data_helpers import (
    STANFORD_INPUT,
    STANFORD_NO_INPUT,
    chat_ids,
    marked,
    prepared,
    recipe,
    trained_text,
    word_tokenizer,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neftune_cli.data.pipeline import prompt_ids, stop_token_ids
from neftune_cli.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, AlpacaTemplate
from neftune_cli.io.errors import DataError

# A word-friendly chat template: every token is a word, "<eot>" closes each turn, the generation prompt is the
# assistant header alone (the assistant turn renders as that header + " " + content).
CHAT = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} <eot>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
REVERSE = {"instruction": "Reverse the word", "input": "apple", "output": "elppa"}
SAY_HI = {"instruction": "Say hi", "input": "", "output": "hi there"}
THREE_TURNS = {
    "conversations": [
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "add 2 and 3"},
        {"from": "gpt", "value": "5"},
        {"from": "human", "value": "thanks"},
        {"from": "gpt", "value": "you are welcome"},
    ]
}
WITH_SYSTEM = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
}
TOOLS = {
    "conversations": [
        {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": "get_weather"},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "it is sunny"},
    ]
}
WORDS = (
    "user: assistant: system: tool: hi hello add 2 and 3 5 thanks you are welcome be brief weather? get_weather sunny"
)
WORDS += " it is"


@pytest.fixture(scope="module")
def words():
    return word_tokenizer(WORDS, "Reverse the word apple elppa Say hi there", chat_template=CHAT)


def one(tmp_path, records, tokenizer, **data) -> list[str]:
    result = prepared(tmp_path, records, tokenizer, **data)
    return [marked(tokenizer, ex) for ex in result.train]


PREAMBLE_INPUT = (
    "<s> Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
PREAMBLE = (
    "<s> Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def test_alpaca_with_and_without_input(tmp_path, words):
    assert one(tmp_path, [REVERSE, SAY_HI], words, template="alpaca") == [
        f"{PREAMBLE_INPUT} ### Instruction: Reverse the word ### Input: apple ### Response: [elppa </s>]",
        f"{PREAMBLE} ### Instruction: Say hi ### Response: [hi there </s>]",
    ]


def test_alpaca_prompt_is_stanfords_verbatim():
    assert ALPACA_PROMPT_INPUT == STANFORD_INPUT and ALPACA_PROMPT_NO_INPUT == STANFORD_NO_INPUT
    rendered = AlpacaTemplate("", "</s>").render({**REVERSE, "system": None})
    assert rendered.text == STANFORD_INPUT.format(**REVERSE) + "elppa</s>"
    assert rendered.text[rendered.spans[0][0] :] == "elppa</s>"


def test_alpaca_system_replaces_the_task_description(tmp_path, words):
    record = {**SAY_HI, "system": "be brief"}
    assert one(tmp_path, [record], words, template="alpaca") == [
        "<s> be brief ### Instruction: Say hi ### Response: [hi there </s>]"
    ]
    assert (
        AlpacaTemplate("", "</s>").prompt({**record, "output": None})
        == "be brief\n\n### Instruction:\nSay hi\n\n### Response:\n"
    )


def test_sharegpt_three_turns_all_and_last(tmp_path, words):
    head = "<s> user: hi <eot> assistant:"
    assert one(tmp_path, [THREE_TURNS], words, template="chat") == [
        f"{head} [hello <eot>] user: add 2 and 3 <eot> assistant: [5 <eot>] user: thanks <eot> assistant: "
        "[you are welcome <eot>]"
    ]
    assert one(tmp_path, [THREE_TURNS], words, template="chat", train_on="last_turn") == [
        f"{head} hello <eot> user: add 2 and 3 <eot> assistant: 5 <eot> user: thanks <eot> assistant: "
        "[you are welcome <eot>]"
    ]


def test_messages_with_system_prompt(tmp_path, words):
    assert one(tmp_path, [WITH_SYSTEM], words, template="custom", chat_template=CHAT) == [
        "<s> system: be brief <eot> user: hi <eot> assistant: [hello <eot>]"
    ]


def test_train_on_inputs_trains_every_token(tmp_path, words):
    assert one(tmp_path, [WITH_SYSTEM], words, template="chat", train_on_inputs=True) == [
        "[<s> system: be brief <eot> user: hi <eot> assistant: hello <eot>]"
    ]
    assert one(tmp_path, [REVERSE], words, template="alpaca", train_on_inputs=True)[0].startswith("[<s> Below")


def test_function_calls_and_observations_are_context(tmp_path, words):
    assert one(tmp_path, [TOOLS], words, template="chat") == [
        "<s> user: weather? <eot> assistant: get_weather <eot> tool: sunny <eot> assistant: [it is sunny <eot>]"
    ]


def test_alpaca_record_under_chat_template(tmp_path, words):
    record = {**REVERSE, "system": "be brief"}
    assert one(tmp_path, [record], words, template="chat") == [
        "<s> system: be brief <eot> user: Reverse the word apple <eot> assistant: [elppa <eot>]"
    ]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Reverse the word\n\napple"}]
    assert prompt_ids(record, _data("chat"), words) == chat_ids(words, messages, add_generation_prompt=True)


def test_conversation_under_alpaca_template(tmp_path, words):
    exchange = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]}
    assert one(tmp_path, [exchange], words, template="alpaca") == [
        f"{PREAMBLE} ### Instruction: Say hi ### Response: [hi there </s>]"
    ]
    with pytest.raises(
        DataError, match=r"line 1: field conversations: template alpaca takes a single user \+ assistant"
    ):
        one(tmp_path, [THREE_TURNS], words, template="alpaca")


@pytest.mark.parametrize("template_bos", [True, False])
@pytest.mark.parametrize("tokenizer_bos", [True, False])
def test_bos_is_what_the_template_writes(tmp_path, template_bos, tokenizer_bos):
    """As at serving: the rendered text decides, the tokenizer adds nothing; a missing BOS is warned about."""
    template = CHAT if template_bos else CHAT.removeprefix("{{ bos_token }}")
    tokenizer = word_tokenizer(WORDS, chat_template=template, add_bos=tokenizer_bos)
    logged = []
    result = prepared(tmp_path, [WITH_SYSTEM, WITH_SYSTEM], tokenizer, template="chat", log=logged.append)
    for example in result.train:
        assert marked(tokenizer, example).startswith("<s> system:" if template_bos else "system:")
    warnings = [line for line in logged if "writes no BOS" in line]
    assert len(warnings) == (not template_bos and tokenizer_bos)


def test_end_of_turn_is_trained_and_the_newline_after_it_is_not(tmp_path, tiny_tokenizer):
    result = prepared(tmp_path, [THREE_TURNS], tiny_tokenizer, template="chat")
    ids, labels = result.train[0]["input_ids"], result.train[0]["labels"]
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, t in enumerate(ids) if t == im_end]
    assert [labels[i] == im_end for i in ends] == [False, True, False, True, False, True]  # user turns: no
    assert tiny_tokenizer.decode(ids[ends[1] + 1]) == "\n" and labels[ends[1] + 1] == -100
    assert ids[-1] == im_end  # the example ends at the last end-of-turn: the template's final "\n" is cut
    assert trained_text(tiny_tokenizer, result.train[0]) == "hello<|im_end|>5<|im_end|>you are welcome<|im_end|>"


def test_template_that_rewrites_earlier_turns_is_reported(tmp_path, words):
    rewriting = CHAT.replace("{{ m['role'] }}:", "{{ m['role'] }}{% if loop.last %}-last{% endif %}:")
    with pytest.raises(DataError, match=r"line 1: field conversations\[1\]: .*not prefix-stable"):
        one(tmp_path, [THREE_TURNS], words, template="custom", chat_template=rewriting)


GLUED = CHAT.replace("{{ m['role'] }}: {{ m['content'] }}", "{{ m['role'] }}:{{ m['content'] }}")


def test_token_merging_across_the_boundary_keeps_the_prompts_own_tokens(tmp_path, words):
    # "assistant:hello" is one (unknown) word of the whole text; served, the prompt ends in "assistant:" and
    # the model generates "hello <eot>" after it: that is what is trained.
    assert one(tmp_path, [WITH_SYSTEM], words, template="custom", chat_template=GLUED) == [
        "<s> <unk> brief <eot> <unk> <eot> assistant: [hello <eot>]"
    ]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected = chat_ids(words, messages, add_generation_prompt=True, chat_template=GLUED)
    assert prepared(tmp_path, [WITH_SYSTEM], words, template="custom", chat_template=GLUED).train[0]["input_ids"][
        : len(expected)
    ] == expected


def test_conversation_is_split_where_a_later_prompt_retokenizes_a_reply(tmp_path, words):
    one_turn = {"conversations": THREE_TURNS["conversations"][:2]}
    result = prepared(tmp_path, [THREE_TURNS, one_turn], words, template="custom", chat_template=GLUED)
    head = "<s> <unk> <eot> "
    assert [marked(words, ex) for ex in result.train] == [
        f"{head}assistant: [hello <eot>]",
        f"{head}<unk> <eot> <unk> 2 and 3 <eot> assistant: [5 <eot>]",
        f"{head}<unk> <eot> <unk> 2 and 3 <eot> <unk> <eot> <unk> <eot> assistant: [you are welcome <eot>]",
        f"{head}assistant: [hello <eot>]",
    ]
    assert result.report.sources[0].splits == result.report.splits == 2
    assert "2 conversation splits" in result.report.summary()
    # the last turn alone needs no split
    last = prepared(tmp_path, [THREE_TURNS], words, template="custom", chat_template=GLUED, train_on="last_turn")
    assert [marked(words, ex) for ex in last.train] == [marked(words, result.train[2])]
    assert last.report.splits == 0


def test_double_bos_is_reported(tmp_path, words):
    with pytest.raises(DataError, match="two BOS tokens"):
        one(tmp_path, [WITH_SYSTEM], words, template="custom", chat_template="{{ bos_token }}" + CHAT)


def test_missing_chat_template_names_the_fix(tmp_path):
    tokenizer = word_tokenizer(WORDS)
    with pytest.raises(DataError, match="no chat template; use data.template: custom with data.chat_template.*alpaca"):
        one(tmp_path, [WITH_SYSTEM], tokenizer, template="chat")


def test_prompt_ids_and_stop_tokens(words, tiny_tokenizer):
    assert (
        prompt_ids({"instruction": "Say hi"}, _data("alpaca"), tiny_tokenizer)
        == tiny_tokenizer(STANFORD_NO_INPUT.format(instruction="Say hi"))["input_ids"]
    )
    messages = [{"role": "user", "content": "hi"}]
    expected = chat_ids(tiny_tokenizer, messages, add_generation_prompt=True)
    assert prompt_ids(messages, _data("chat"), tiny_tokenizer) == expected
    assert expected[:2] != [tiny_tokenizer.bos_token_id] * 2
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(_data("chat"), tiny_tokenizer) == [tiny_tokenizer.eos_token_id, im_end]
    assert stop_token_ids(_data("alpaca"), tiny_tokenizer) == [tiny_tokenizer.eos_token_id]
    with pytest.raises(DataError, match="prompt: field messages.*must end with a user or tool turn"):
        prompt_ids([*messages, {"role": "assistant", "content": "hello"}], _data("chat"), tiny_tokenizer)


def _data(template: str):
    return recipe([{"path": "org/unused"}], template=template).data


# --- TRL: the same masks on the same prompt/completion pairs --------------------------------------------------


def test_masks_equal_trl_completion_only_masks(tmp_path, tiny_model_dir, tiny_tokenizer):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    records = [REVERSE, SAY_HI, {"instruction": "Count the items", "input": "a, b, c", "output": "3"}]
    ours = prepared(tmp_path, records, tiny_tokenizer, template="alpaca").train
    chats = prepared(tmp_path, records, tiny_tokenizer, name="chat.jsonl", template="chat").train

    def prompt(r):
        return (STANFORD_INPUT if r["input"] else STANFORD_NO_INPUT).format(**r)

    def user(r):
        return [{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")}]

    plain = Dataset.from_dict({"prompt": [prompt(r) for r in records], "completion": [r["output"] for r in records]})
    conversational = Dataset.from_dict(
        {
            "prompt": [user(r) for r in records],
            "completion": [[{"role": "assistant", "content": r["output"]}] for r in records],
        }
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        completion_only_loss=True,
        max_length=None,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    for dataset, mine in ((plain, ours), (conversational, chats)):
        trl = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tiny_tokenizer).train_dataset
        for theirs, example in zip(trl, mine, strict=True):
            n = len(example["input_ids"])
            assert theirs["input_ids"][:n] == example["input_ids"]
            assert theirs["labels"][:n] == example["labels"]
            # TRL also trains what the template writes after the end-of-turn token ("\n"); we end the example there
            assert tiny_tokenizer.decode(theirs["input_ids"][n:]).strip() == ""


# --- properties -------------------------------------------------------------------------------------------------

text = st.text(alphabet="abcdefgh xyz,.!?\n0123", min_size=1, max_size=30).filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    turns = draw(st.integers(1, 3))
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(text)})
    for _ in range(turns):
        messages += [{"role": "user", "content": draw(text)}, {"role": "assistant", "content": draw(text)}]
    return {"messages": messages}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(conversations(), min_size=1, max_size=4))
def test_property_chat_trained_tokens_and_prompts(tmp_path, tiny_tokenizer, batch):
    """Every trained reply follows exactly the tokens apply_chat_template gives its prompt, and all the replies,
    in order, are what is trained (split conversations included)."""
    result = prepared(tmp_path, batch, tiny_tokenizer, template="chat", max_seq_len=4096)
    assert len(result.train) == len(batch) + result.report.splits
    prompts = set()
    replies = []
    for record in batch:
        messages = record["messages"]
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                prompts.add(tuple(chat_ids(tiny_tokenizer, messages[:k], add_generation_prompt=True)))
                replies.append(m["content"] + "<|im_end|>")
    trained = []
    for example in result.train:
        ids, labels = example["input_ids"], example["labels"]
        starts = [t for t in range(len(ids)) if labels[t] != -100 and (t == 0 or labels[t - 1] == -100)]
        assert all(tuple(ids[:t]) in prompts for t in starts)
        trained.append(trained_text(tiny_tokenizer, example))
    assert "".join(trained) == "".join(replies)


alpaca_records = st.fixed_dictionaries({"instruction": text, "input": st.one_of(st.just(""), text), "output": text})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(alpaca_records, min_size=1, max_size=4))
def test_property_alpaca_trained_tokens_and_prompts(tmp_path, tiny_tokenizer, batch):
    result = prepared(tmp_path, batch, tiny_tokenizer, template="alpaca", max_seq_len=4096)
    for record, example in zip(batch, result.train, strict=True):
        assert trained_text(tiny_tokenizer, example) == record["output"] + "</s>"
        prompt = (STANFORD_INPUT if record["input"] else STANFORD_NO_INPUT).format(**record)
        expected = tiny_tokenizer(prompt)["input_ids"]  # the prompt tokenized alone, as inference does
        assert example["input_ids"][: len(expected)] == expected
        assert all(label == -100 for label in example["labels"][: len(expected)])
