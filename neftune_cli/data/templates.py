"""Templates turn a canonical record into text and find the character span of every assistant response.

- ``AlpacaTemplate``: the Stanford Alpaca prompt, exactly; then the response, then the EOS token.
- ``ChatTemplate``: the tokenizer's own chat template (or the recipe's), rendered by ``apply_chat_template``.
  Spans are found without knowing the template: render ``messages[:k]`` with the generation prompt, then
  ``messages[:k+1]``; the assistant span is the text the second rendering adds. That needs each rendering to
  be a prefix of the next; a template that rewrites earlier turns fails that check, and the record is reported
  rather than masked wrongly.

A span covers the response and what the template closes it with (EOS / end-of-turn token), minus trailing
whitespace: the model must learn to emit the end-of-turn token, but the newline a template writes after it is
never generated (inference stops at the token, and the next prompt starts with that newline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from neftune_cli.data.formats import (
    AlpacaRecord,
    BadRecord,
    Conversation,
    Message,
    Record,
    first_line,
    is_conversation,
    turn_name,
)
from neftune_cli.errors import DataError
from neftune_cli.recipe import DataSection

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
    def render(self, record: Record) -> Rendered: ...

    def prompt(self, record: Record) -> str:
        """The text inference feeds the model for a prompt record (no response)."""
        ...


def make_template(data: DataSection, tokenizer) -> Template:
    if data.template == "alpaca":
        if not tokenizer.eos_token:
            raise DataError("data.template alpaca ends every response with the EOS token, but the tokenizer has none")
        return AlpacaTemplate(tokenizer.eos_token)
    if data.template == "chat" and not tokenizer.chat_template:
        raise DataError(
            "data.template is chat but the tokenizer has no chat template; use data.template: custom with "
            "data.chat_template (a jinja template), or data.template: alpaca"
        )
    return ChatTemplate(tokenizer, data.chat_template if data.template == "custom" else None)


def alpaca_prompt(record: AlpacaRecord) -> str:
    """The Stanford prompt; a record's system text replaces its first paragraph (the task description)."""
    template = ALPACA_PROMPT_INPUT if record["input"] != "" else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=record["instruction"], input=record["input"])
    if record["system"] is None:
        return prompt
    return record["system"] + prompt[prompt.index("\n\n### Instruction:") :]


class AlpacaTemplate:
    def __init__(self, eos_token: str):
        self.eos_token = eos_token

    def render(self, record: Record) -> Rendered:
        alpaca = _as_alpaca(record, response=True)
        prompt = alpaca_prompt(alpaca)
        text = prompt + alpaca["output"] + self.eos_token
        return Rendered(text, [(len(prompt), len(text))], [_response_name(record)])

    def prompt(self, record: Record) -> str:
        return alpaca_prompt(_as_alpaca(record, response=False))


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


def end_of_turn(template: Template) -> str:
    """The text a template closes a response with (what generation must stop on), from a probe exchange.

    "" when the template rejects the probe (say it needs a system turn) or rewrites the reply.
    """
    probe = Conversation(
        messages=[Message(role="user", content="Hi"), Message(role="assistant", content=PROBE_REPLY)],
        trained=[False, True],
        field="probe",
        offset=0,
    )
    try:
        rendered = template.render(probe)
    except BadRecord:
        return ""
    start, end = rendered.spans[0]
    span = rendered.text[start:end]
    at = span.rfind(PROBE_REPLY)
    return span[at + len(PROBE_REPLY) :].strip() if at >= 0 else ""
