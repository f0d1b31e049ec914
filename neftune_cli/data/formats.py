"""Record formats: check a raw record and turn it into one of two canonical shapes.

- ``AlpacaRecord``: instruction, input ("" when absent), output, system (None when absent).
- ``Conversation``: messages ``[{role, content}]`` with roles system / user / assistant / tool, and per message
  whether it is an assistant response that may be trained. ShareGPT ``function_call`` turns become assistant
  messages that are never trained and ``observation`` turns become tool messages: both are context only.

Every problem raises ``BadRecord`` naming the field as it is called in the file (``conversations[2].from``).
"""

from __future__ import annotations

from typing import Any, TypedDict

FORMATS = ("alpaca", "sharegpt", "messages")

# ShareGPT "from" -> (role, trained)
SHAREGPT_ROLES = {
    "human": ("user", False),
    "user": ("user", False),
    "gpt": ("assistant", True),
    "assistant": ("assistant", True),
    "system": ("system", False),
    "function_call": ("assistant", False),
    "observation": ("tool", False),
    "tool": ("tool", False),
}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


class AlpacaRecord(TypedDict):
    instruction: str
    input: str
    output: str | None
    system: str | None


class Message(TypedDict):
    role: str
    content: str


class Conversation(TypedDict):
    messages: list[Message]
    trained: list[bool]  # per message: an assistant response that may be trained
    field: str  # the conversation's column name in the file, for error messages
    offset: int  # messages[i] is the file's turn i - offset (a system column adds a message in front)


def turn_name(conversation: Conversation, index: int) -> str:
    """How the file calls message ``index``: ``conversations[3]`` (or the system column)."""
    turn = index - conversation["offset"]
    return f"{conversation['field']}[{turn}]" if turn >= 0 else "system"


Record = AlpacaRecord | Conversation


class BadRecord(Exception):
    """A record that cannot be used; the message names the field."""

    def __init__(self, field: str | None, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"field {field}: {reason}" if field else reason)


class EmptyText(BadRecord):
    """A required text, turn or conversation is empty: well-formed, but nothing to learn from.
    Training treats it as any bad record; ``neftune data clean`` removes it as a filter instead of failing."""


class OneSided(BadRecord):
    """A conversation with no assistant turn to train on (``neftune data clean`` filters it, like EmptyText)."""


def is_conversation(record: Record) -> bool:
    return "messages" in record


class Fields:
    """Our field names -> the names in the file (``data.sources[].fields``)."""

    def __init__(self, renames: dict[str, str] | None):
        self.renames = dict(renames or {})

    def __getitem__(self, ours: str) -> str:
        return self.renames.get(ours, ours)

    def label(self, ours: str) -> str:
        theirs = self[ours]
        return theirs if theirs == ours else f"{theirs} ({ours})"


def detect(value: Any, fields: Fields) -> tuple[str, dict[str, str], str]:
    """Guess the format of a source from one record: (format, extra renames, why).

    A ``conversations`` or ``messages`` column whose turns are {from, value} is ShareGPT and {role, content} is
    OpenAI messages, whichever column name they use.
    """
    if not isinstance(value, dict):
        raise BadRecord(None, f"a record must be a JSON object, got {type(value).__name__}")
    for column in (fields["conversations"], fields["messages"]):
        turns = value.get(column)
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
            continue
        if fields["from"] in turns[0]:
            return (
                "sharegpt",
                {"conversations": column},
                f"column {column} with {fields['from']}/{fields['value']} turns",
            )
        if fields["role"] in turns[0]:
            return "messages", {"messages": column}, f"column {column} with {fields['role']}/{fields['content']} turns"
    if fields["instruction"] in value and fields["output"] in value:
        return "alpaca", {}, f"columns {fields['instruction']} and {fields['output']}"
    keys = ", ".join(sorted(map(str, value))) or "none"
    if missing := [(ours, theirs) for ours, theirs in fields.renames.items() if theirs not in value]:
        ours, theirs = missing[0]
        raise BadRecord(None, f"no column {theirs!r} (mapped by fields {ours}={theirs}); the columns are {keys}")
    raise BadRecord(
        None,
        f"cannot detect the format from the columns ({keys}); set format: alpaca|sharegpt|messages "
        "and fields: to map the columns",
    )


def parse(value: Any, fmt: str, fields: Fields, *, response: bool = True) -> Record:
    """Check a raw record and return its canonical form.

    response=False reads a prompt for inference: no output needed, and a conversation ends with a user turn.
    """
    if not isinstance(value, dict):
        raise BadRecord(None, f"a record must be a JSON object, got {type(value).__name__}")
    if fmt == "alpaca":
        return _alpaca(value, fields, response)
    conversation = _sharegpt(value, fields) if fmt == "sharegpt" else _messages(value, fields)
    _check_conversation(conversation, response)
    return conversation


def _alpaca(value: dict, fields: Fields, response: bool) -> AlpacaRecord:
    return AlpacaRecord(
        instruction=_text(value, "instruction", fields, required=True),
        input=_text(value, "input", fields, required=False),
        output=_text(value, "output", fields, required=True) if response else None,
        system=_text(value, "system", fields, required=False) or None,
    )


def _text(value: dict, ours: str, fields: Fields, *, required: bool) -> str:
    text = value.get(fields[ours])
    if text is None:
        if required:
            raise BadRecord(fields.label(ours), "missing")
        return ""
    if not isinstance(text, str):
        raise BadRecord(fields.label(ours), f"expected a string, got {type(text).__name__}")
    if required and not text.strip():
        raise EmptyText(fields.label(ours), "empty")
    return text


def _turns(value: dict, ours: str, fields: Fields) -> tuple[str, list]:
    column = fields[ours]
    turns = value.get(column)
    if turns is None:
        raise BadRecord(fields.label(ours), "missing")
    if not isinstance(turns, list):
        raise BadRecord(fields.label(ours), f"expected a list of turns, got {type(turns).__name__}")
    if not turns:
        raise EmptyText(fields.label(ours), "empty conversation")
    return column, turns


def _sharegpt(value: dict, fields: Fields) -> Conversation:
    return _conversation(value, fields, "conversations", "from", "value", SHAREGPT_ROLES, "a turn")


def _messages(value: dict, fields: Fields) -> Conversation:
    roles = {role: (role, role == "assistant") for role in MESSAGE_ROLES}
    return _conversation(value, fields, "messages", "role", "content", roles, "a message")


def _conversation(value: dict, fields: Fields, column_key: str, role_key: str, content_key: str,
                  roles: dict[str, tuple[str, bool]], noun: str) -> Conversation:
    """A list of {role, content}-like turns; `roles` maps each allowed role to (our role, trained)."""
    column, turns = _turns(value, column_key, fields)
    messages, trained = _system_column(value, fields)
    for i, turn in enumerate(turns):
        where = f"{column}[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord(where, f"{noun} must be an object, got {type(turn).__name__}")
        speaker = turn.get(fields[role_key])
        if speaker not in roles:
            shown = "missing" if speaker is None else f"unknown role {speaker!r}"
            raise BadRecord(f"{where}.{fields[role_key]}", f"{shown} (expected one of {', '.join(roles)})")
        role, train = roles[speaker]
        content = _content(turn, f"{where}.{fields[content_key]}", fields[content_key])
        messages.append(Message(role=role, content=content))
        trained.append(train)
    return Conversation(messages=messages, trained=trained, field=column, offset=len(messages) - len(turns))


def _system_column(value: dict, fields: Fields) -> tuple[list[Message], list[bool]]:
    """A record-level system prompt (a ``system`` column beside the conversation) becomes the first message."""
    system = _text(value, "system", fields, required=False)
    return ([Message(role="system", content=system)], [False]) if system.strip() else ([], [])


def _content(turn: dict, where: str, key: str) -> str:
    text = turn.get(key)
    if text is None:
        raise BadRecord(where, "missing")
    if not isinstance(text, str):
        raise BadRecord(where, f"expected a string, got {type(text).__name__}")
    if not text.strip():
        raise EmptyText(where, "empty")
    return text


def _check_conversation(conversation: Conversation, response: bool) -> None:
    messages = conversation["messages"]
    if response:
        if not any(conversation["trained"]):
            raise OneSided(conversation["field"], "no assistant turn to train on")
        if messages[0]["role"] == "assistant":
            raise BadRecord(turn_name(conversation, 0), "the conversation starts with an assistant turn: no prompt")
    elif messages[-1]["role"] == "assistant":
        raise BadRecord(turn_name(conversation, len(messages) - 1), "a prompt must end with a user or tool turn")
