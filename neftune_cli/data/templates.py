"""Templates turn a canonical record into text and find the character span of every assistant response.

- ``AlpacaTemplate``: the Stanford Alpaca prompt, exactly; then the response, then the EOS token. BOS is written
  in front when the tokenizer adds one by default (as the Stanford code's tokenizer call does), so the text alone
  decides every token, as it does under a chat template; ``jinja`` is the same prompt as a chat template.
- ``ChatTemplate``: the tokenizer's own chat template (or the recipe's), rendered by ``apply_chat_template``.
  Spans are found without knowing the template: render ``messages[:k]`` with the generation prompt, then
  ``messages[:k+1]``; the assistant span is the text the second rendering adds. That needs each rendering to
  be a prefix of the next; a template that rewrites earlier turns fails that check, and the record is reported
  rather than masked wrongly.

A span covers the response and what the template closes it with (EOS / end-of-turn token), minus trailing
whitespace: the model must learn to emit the end-of-turn token, but the newline a template writes after it is
never generated (inference stops at the token, and the next prompt starts with that newline).

``Template.jinja`` is the chat template that renders prompts exactly as the template does: what a run hands on
with its tokenizer, so serving (``apply_chat_template``, vLLM, llama.cpp) feeds the model the trained prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from neftune_cli.data.formats import (
    AlpacaRecord,
    BadRecord,
    Conversation,
    Message,
    Record,
    is_conversation,
    turn_name,
)
from neftune_cli.io.errors import DataError, first_line
from neftune_cli.recipe.schema import DataSection, jinja_syntax_error

# Stanford Alpaca (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), verbatim.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Rendered:
    text: str  # the example's text; it ends where its last assistant span ends
    spans: list[tuple[int, int]]  # [start, end) of each assistant response + end-of-turn, in order
    names: list[str]  # the field each span comes from, for error messages


class Template(Protocol):
    jinja: str  # the chat template for serving: renders the same prompts

    def render(self, record: Record) -> Rendered: ...

    def prompt(self, record: Record) -> str:
        """The text inference feeds the model for a prompt record (no response)."""
        ...


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's post-processor puts BOS in front (Llama, Mistral: yes; GPT-2, Qwen: no)."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos is not None and with_special[:1] == [bos] and without[:1] != [bos]


def make_template(data: DataSection, tokenizer) -> Template:
    if data.template == "alpaca":
        if not tokenizer.eos_token:
            raise DataError("data.template alpaca ends every response with the EOS token, but the tokenizer has none")
        return AlpacaTemplate(tokenizer.bos_token if adds_bos(tokenizer) else "", tokenizer.eos_token)
    if data.template == "chat" and not tokenizer.chat_template:
        raise DataError(
            "data.template is chat but the tokenizer has no chat template; use data.template: custom with "
            "data.chat_template (a jinja template), or data.template: alpaca"
        )
    if data.template == "chat" and isinstance(tokenizer.chat_template, str) and (
        problem := jinja_syntax_error(tokenizer.chat_template)
    ):
        raise DataError(f"the tokenizer's chat template (data.template: chat): {problem}")
    return ChatTemplate(tokenizer, data.chat_template if data.template == "custom" else None)


def alpaca_prompt(record: AlpacaRecord) -> str:
    """The Stanford prompt; a record's system text replaces its first paragraph (the task description)."""
    template = ALPACA_PROMPT_INPUT if record["input"] != "" else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=record["instruction"], input=record["input"])
    if record["system"] is None:
        return prompt
    return record["system"] + prompt[prompt.index("\n\n### Instruction:") :]


class AlpacaTemplate:
    def __init__(self, bos_token: str, eos_token: str):
        self.bos_token = bos_token  # "" when the tokenizer adds no BOS by default
        self.eos_token = eos_token

    def render(self, record: Record) -> Rendered:
        alpaca = _as_alpaca(record, response=True)
        prompt = self.bos_token + alpaca_prompt(alpaca)
        text = prompt + alpaca["output"] + self.eos_token
        return Rendered(text, [(len(prompt), len(text))], [_response_name(record)])

    def prompt(self, record: Record) -> str:
        return self.bos_token + alpaca_prompt(_as_alpaca(record, response=False))

    @property
    def jinja(self) -> str:
        return alpaca_jinja(with_bos=bool(self.bos_token))


def alpaca_jinja(with_bos: bool) -> str:
    """The Alpaca prompt as a chat template: [system,] user[, assistant]; a system message replaces the task
    description. A chat message has no separate input, so the "### Input:" variant cannot be asked for."""
    head, after = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
    cut = head.index("\n\n### Instruction:")
    description, header = head[:cut], head[cut:]
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {_jinja_str(description)} -%}}{{%- set turns = messages -%}}{{%- endif -%}}"
        "{%- if not turns or turns[0]['role'] != 'user' or turns | length > 2 "
        "or (turns | length == 2 and turns[1]['role'] != 'assistant') -%}"
        "{{- raise_exception('the Alpaca prompt takes [system,] user[, assistant]: one exchange') -}}"
        "{%- endif -%}"
        + ("{{- bos_token -}}" if with_bos else "")
        + f"{{{{- system + {_jinja_str(header)} + turns[0]['content'] + {_jinja_str(after)} -}}}}"
        "{%- if turns | length == 2 -%}{{- turns[1]['content'] + eos_token -}}{%- endif -%}"
    )


def _jinja_str(text: str) -> str:
    """A jinja string literal (JSON escapes are valid jinja escapes)."""
    return json.dumps(text)


def _as_alpaca(record: Record, response: bool) -> AlpacaRecord:
    """A conversation fits the Alpaca prompt only as one exchange: [system,] user[, assistant]."""
    if not is_conversation(record):
        return record
    messages = record["messages"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    expected = ["user", "assistant"] if response else ["user"]
    if [m["role"] for m in rest] != expected:
        roles = ", ".join(m["role"] for m in messages)
        raise BadRecord(
            record["field"],
            f"template alpaca takes a single {' + '.join(expected)} exchange, this conversation is [{roles}]; "
            "use data.template: chat or custom for conversations",
        )
    return AlpacaRecord(
        instruction=rest[0]["content"], input="", output=rest[1]["content"] if response else None, system=system
    )


def _response_name(record: Record) -> str:
    return turn_name(record, len(record["messages"]) - 1) if is_conversation(record) else "output"


class ChatTemplate:
    def __init__(self, tokenizer, source: str | None):
        self.tokenizer = tokenizer
        self.source = source  # None: the tokenizer's own template

    @property
    def jinja(self) -> str:
        return self.source if self.source is not None else self.tokenizer.chat_template

    def render(self, record: Record) -> Rendered:
        conversation = _as_conversation(record, response=True)
        messages = conversation["messages"]
        full = self._render(conversation, messages, generation_prompt=False)
        spans, names = [], []
        for k, trained in enumerate(conversation["trained"]):
            if not trained:
                continue
            name = turn_name(conversation, k) if is_conversation(record) else "output"
            before = self._render(conversation, messages[:k], generation_prompt=True)
            upto = self._render(conversation, messages[: k + 1], generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise BadRecord(
                    name,
                    "the chat template renders earlier turns differently once later turns follow (it is not "
                    "prefix-stable), so the response tokens cannot be located; use a template that is",
                )
            end = len(upto.rstrip())
            if end <= len(before):
                raise BadRecord(name, "the chat template renders nothing for this assistant turn")
            spans.append((len(before), end))
            names.append(name)
        return Rendered(full[: spans[-1][1]], spans, names)

    def prompt(self, record: Record) -> str:
        conversation = _as_conversation(record, response=False)
        return self._render(conversation, conversation["messages"], generation_prompt=True)

    def _render(self, conversation: Conversation, messages: list[Message], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=self.source
            )
        except Exception as e:  # noqa: BLE001 - templates raise anything (raise_exception, TypeError, ...)
            raise BadRecord(conversation["field"] or None, f"chat template error: {first_line(e)}") from None


def _as_conversation(record: Record, response: bool) -> Conversation:
    """An alpaca record as a chat: [system,] user: instruction (+ blank line + input), assistant: output."""
    if is_conversation(record):
        return record
    messages = [Message(role="system", content=record["system"])] if record["system"] is not None else []
    offset = len(messages)
    user = record["instruction"] + ("\n\n" + record["input"] if record["input"] != "" else "")
    messages.append(Message(role="user", content=user))
    if response:
        messages.append(Message(role="assistant", content=record["output"]))
    # no field: template errors concern the whole record, which has no conversation column
    return Conversation(
        messages=messages, trained=[m["role"] == "assistant" for m in messages], field="", offset=offset
    )


PROBE_REPLY = "Hello"


def probe(response: bool) -> Conversation:
    """A one-exchange conversation for asking a template how it renders."""
    messages = [Message(role="user", content="Hi")]
    if response:
        messages.append(Message(role="assistant", content=PROBE_REPLY))
    return Conversation(messages=messages, trained=[False, True][: len(messages)], field="probe", offset=0)


def end_of_turn(template: Template) -> str:
    """The text a template closes a response with (what generation must stop on), from a probe exchange.

    "" when the template rejects the probe (say it needs a system turn) or rewrites the reply.
    """
    try:
        rendered = template.render(probe(response=True))
    except BadRecord:
        return ""
    start, end = rendered.spans[0]
    span = rendered.text[start:end]
    at = span.rfind(PROBE_REPLY)
    return span[at + len(PROBE_REPLY) :].strip() if at >= 0 else ""
