"""`neftune chat`: talk to a run, a checkpoint or any model, in the prompt format it was trained with.

Each turn's prompt is ``data.prompt_ids`` of the conversation so far (the code path `generate` and the training
parity gate use: under a chat template, ``apply_chat_template(history, add_generation_prompt=True)``), answered by
`generate`'s own decoding, one prompt at a time, with a streamer that prints the answer as it is generated.
A run trained with the Alpaca prompt knows one exchange only: each message is then a new instruction.

On a terminal: streamed answers, readline editing and history, ``/reset``, ``/system``, ``/help``; Ctrl-C stops
the answer being generated, Ctrl-D ends the session. Otherwise (a pipe, a script): one answer per input line on
stdout and nothing else there; every other line goes to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from neftune_cli.data.pipeline import prompt_ids
from neftune_cli.infer.generate import Answer, Settings, Stops, decoding, finish, generate, stops_for
from neftune_cli.infer.target import Target
from neftune_cli.io.console import log
from neftune_cli.io.errors import DataError

PROMPT = "> "
COMMANDS = {
    "/reset": "forget the conversation (the system message stays)",
    "/system TEXT": "set the system message (/system alone removes it); the conversation so far stays",
    "/help": "these commands and the settings",
}
INCOMPLETE = "\ufffd"  # what decoding shows for a character whose bytes have not all been generated yet


class TextStream:
    """A transformers streamer: collects the generated ids and writes the answer text as it grows.

    The text shown is always a prefix of the final answer (`generate.finish`'s): it holds back what could still
    change, namely trailing whitespace (stripped at the end, or merged by the tokenizer's clean-up), a partly
    generated character, and a tail that may be the start of a stop string.
    """

    def __init__(self, tokenizer, stops: Stops, write: Callable[[str], None] | None):
        self.tokenizer, self.stops, self.write = tokenizer, stops, write
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self.show(self.visible())

    def end(self) -> None:
        pass

    def visible(self) -> str:
        cut = next((k for k, t in enumerate(self.ids) if t in self.stops.token_ids), len(self.ids))
        text = self.tokenizer.decode(self.ids[:cut], skip_special_tokens=True).lstrip()
        for stop in self.stops.strings:
            if stop in text:
                text = text[:text.index(stop)]
            else:  # the longest tail that begins the stop string
                text = text[:len(text) - next((n for n in range(min(len(stop), len(text)), 0, -1)
                                               if stop.startswith(text[-n:])), 0)]
        return text.rstrip().rstrip(INCOMPLETE).rstrip()

    def show(self, text: str) -> None:
        if self.write is not None and text.startswith(self.shown) and len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


@dataclass
class Session:
    target: Target
    tokenizer: object
    model: object
    settings: Settings
    stops: Stops
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    @property
    def single_turn(self) -> bool:
        # The Alpaca prompt holds one exchange (its chat-template twin raises on more)
        return self.target.data.template == "alpaca"

    def messages(self, user: str, system: str | None = None) -> list[dict]:
        system = self.system if system is None else system
        turns = [] if self.single_turn else self.history
        return ([{"role": "system", "content": system}] if system else []) + turns + [
            {"role": "user", "content": user}]

    def prompt(self, user: str, system: str | None = None) -> list[int]:
        """The prompt tokens of the next turn (DataError when the template cannot render it)."""
        try:
            return prompt_ids(self.messages(user, system), self.target.data, self.tokenizer)
        except DataError as e:
            raise DataError(str(e).removeprefix("prompt: ")) from None

    def set_system(self, text: str) -> None:
        if text:
            self.prompt("hi", system=text)  # a template without a system role refuses it here, not next turn
        self.system = text or None

    def answer(self, user: str, write: Callable[[str], None] | None = None) -> tuple[Answer, bool]:
        """Answer a message (streamed through write), record the exchange; (answer, True) when Ctrl-C stopped it."""
        ids = self.prompt(user)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions and len(ids) + self.settings.max_new_tokens > positions:
            log(f"warning: this prompt ({len(ids)} tokens) plus max_new_tokens is over the model's {positions} "
                "positions" + ("" if self.single_turn else "; /reset starts a new conversation"))
        stream = TextStream(self.tokenizer, self.stops, write)
        try:
            answer = next(generate(self.model, self.tokenizer, [ids], self.settings, self.stops, streamer=stream))[0]
            stopped = False
        except KeyboardInterrupt:
            answer, stopped = finish(stream.ids, self.tokenizer, self.stops, self.settings.max_new_tokens), True
        stream.show(answer.text)
        if not self.single_turn:  # a stopped answer stays as far as it was shown
            self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer.text}]
        return answer, stopped

    def command(self, line: str) -> bool:
        """Run a /command (its feedback on stderr); False when the line is a message."""
        word, _, rest = line.strip().partition(" ")
        if word == "/reset":
            self.history.clear()
            log("(conversation cleared)")
        elif word == "/system":
            try:
                self.set_system(rest.strip())
            except DataError as e:
                log(f"error: /system: {e}")
                return True
            log(f"(system message: {self.system!r})" if self.system else "(no system message)")
        elif word == "/help":
            for name, what in COMMANDS.items():
                log(f"  {name:<14} {what}")
            log("  Ctrl-C         stop the answer being generated; Ctrl-D: quit")
            for line_ in self.describe():
                log(line_)
        else:
            return False
        return True

    def describe(self) -> list[str]:
        turns = ("single-turn: the Alpaca prompt holds one exchange, so each message is a new instruction "
                 "(no history)" if self.single_turn else "multi-turn")
        device = next(self.model.parameters()).device
        return [f"chat: {self.target.name}, template {self.target.data.template} ({turns})",
                f"chat: {decoding(self.settings)}, max_new_tokens {self.settings.max_new_tokens}, stops "
                f"{self.stops.token_ids + self.stops.strings}, {device}; system message: {self.system!r}"]


def open_session(target: Target, settings: Settings, *, system: str | None, device: torch.device) -> Session:
    tokenizer = target.tokenizer()
    session = Session(target, tokenizer, None, settings, stops_for(target, tokenizer))
    session.set_system(system or "")  # a bad --system exits 2 before the model loads
    session.model = target.load(device, merge=True)
    return session


def run_chat(session: Session) -> None:
    for line in session.describe():
        log(line)
    if sys.stdin.isatty() and sys.stdout.isatty():
        _interactive(session)
    else:
        _piped(session)


def _interactive(session: Session) -> None:
    try:
        import readline  # noqa: F401 - input() gets line editing and history
    except ImportError:  # no readline on this platform: plain input()
        pass
    log("type a message; /help for commands, Ctrl-D to quit")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        try:
            line = input(PROMPT)
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            write("\n")
            continue
        except EOFError:
            write("\n")
            return
        if not line.strip() or session.command(line):
            continue
        try:
            _, stopped = session.answer(line, write)
        except DataError as e:  # the conversation no longer renders (say, the template's turn limit)
            log(f"error: {e}")
            continue
        write("\n")
        if stopped:
            log("(stopped)")


def _piped(session: Session) -> None:
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        if not line.strip() or session.command(line):
            continue
        answer, stopped = session.answer(line)
        if stopped:  # no one to keep a session for: Ctrl-C ends the script's run (exit 130), no partial line
            raise KeyboardInterrupt
        sys.stdout.write(one_line(answer.text) + "\n")
        sys.stdout.flush()


def one_line(text: str) -> str:
    """An answer on one line, reversibly: a backslash as \\\\, a newline as \\n (a line per answer in a pipe)."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
