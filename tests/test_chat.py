"""`neftune chat`: each turn's prompt tokens equal `apply_chat_template` of the conversation (the Stanford prompt of
the message alone under the Alpaca template), answers equal transformers' own greedy generate on those tokens, and
in a real pseudo-terminal the answer streams before it ends, Ctrl-C stops it and keeps the session, Ctrl-D exits 0;
from a pipe, stdout holds one answer per line and nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from data_helpers import STANFORD_NO_INPUT, chat_ids

from neftune_cli.infer import chat as chat_module
from neftune_cli.infer.chat import Session, one_line, open_session
from neftune_cli.infer.generate import Settings
from neftune_cli.infer.target import resolve
from neftune_cli.io.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 16


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> Session:
    return open_session(resolve(str(tiny_model_dir)), Settings(max_new_tokens=MAX_NEW), system=None,
                        device=torch.device("cpu"))


def reference(session: Session, ids: list[int], max_new: int = MAX_NEW) -> tuple[list[int], str]:
    """transformers' stock greedy generate with repetition penalty 1.2 (one unpadded row), cut at EOS/<|im_end|>."""
    stops = [session.tokenizer.eos_token_id, session.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.inference_mode():
        out = session.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=max_new, do_sample=False, repetition_penalty=1.2,
                                     eos_token_id=stops, pad_token_id=session.tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    new = new[:next((k for k, t in enumerate(new) if t in stops), len(new))]
    return new, session.tokenizer.decode(new, skip_special_tokens=True).strip()


def conversation_reference(session: Session, users: list[str], system: str | None = None) -> list[str]:
    """The answers of a conversation, each generated from apply_chat_template of the history before it."""
    history = [{"role": "system", "content": system}] if system else []
    answers = []
    for user in users:
        history.append({"role": "user", "content": user})
        _, text = reference(session, chat_ids(session.tokenizer, history, add_generation_prompt=True))
        history.append({"role": "assistant", "content": text})
        answers.append(text)
    return answers


def test_multi_turn_prompts_equal_apply_chat_template_and_answers_equal_transformers(tiny, monkeypatch):
    seen = []
    real = chat_module.generate

    def recording(model, tokenizer, prompts, *args, **kwargs):
        seen.append(prompts[0])
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(chat_module, "generate", recording)
    tiny.history.clear()
    tiny.set_system("You are terse.")
    users = ["Add 2 and 3.", "Now count the letters in cat.", "Say hi."]
    shown = []
    answers = [tiny.answer(u, shown.append)[0].text for u in users]
    history = [{"role": "system", "content": "You are terse."}]
    for user, ids, answer in zip(users, seen, answers, strict=True):
        history.append({"role": "user", "content": user})
        assert ids == chat_ids(tiny.tokenizer, history, add_generation_prompt=True)
        history.append({"role": "assistant", "content": answer})
    assert tiny.history == history[1:]
    assert answers == conversation_reference(tiny, users, system="You are terse.")
    assert "".join(shown) == "".join(answers)  # what streamed is the answers, in full
    tiny.command("/reset")
    assert tiny.history == [] and tiny.system == "You are terse."
    tiny.command("/system")
    assert tiny.system is None


def test_alpaca_template_is_single_turn_with_the_stanford_prompt(tiny_model_dir, capsys):
    session = open_session(resolve(str(tiny_model_dir), "alpaca"), Settings(max_new_tokens=4), system=None,
                           device=torch.device("cpu"))
    assert session.single_turn
    for message in ["Add 2 and 3.", "Say hi."]:
        expected = session.tokenizer(STANFORD_NO_INPUT.format(instruction=message))["input_ids"]
        assert session.prompt(message) == expected  # the earlier exchange is not in it
        session.answer(message)
    assert session.history == []
    assert any("single-turn" in line for line in session.describe())


def test_a_system_message_the_template_cannot_render_is_refused(tiny_model_dir, tmp_path):
    target = resolve(str(tiny_model_dir))
    target.data = target.data.model_copy(update={"template": "custom", "chat_template": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}\n{% endfor %}")})
    with pytest.raises(DataError, match="no system role"):
        open_session(target, Settings(), system="Be brief.", device=torch.device("cpu"))


def test_stream_holds_back_a_partial_stop_string_and_whitespace(tiny):
    from neftune_cli.infer.chat import TextStream
    from neftune_cli.infer.generate import Stops

    tokenizer = tiny.tokenizer
    ids = tokenizer("Hello world ###END tail", add_special_tokens=False)["input_ids"]
    shown = []
    stream = TextStream(tokenizer, Stops([tokenizer.eos_token_id], ["###END"]), shown.append)
    stream.put(torch.tensor([[1]]))  # the prompt: not shown
    texts = []
    for t in ids:
        stream.put(torch.tensor([t]))
        texts.append(stream.shown)
    assert stream.shown == "Hello world"
    assert all("#" not in t and not t.endswith(" ") for t in texts)
    assert "".join(shown) == "Hello world"


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
            "TERM": "dumb", "OMP_NUM_THREADS": "1"}


def wait_for(path: Path, limit_s: float = 120.0) -> None:
    for _ in range(int(limit_s / 0.01)):
        if path.exists():
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} did not appear")


def test_in_a_terminal_answers_stream_ctrl_c_stops_one_and_ctrl_d_exits_0(tiny, tiny_model_dir, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    pause_at = 3
    first, second = "Add 2 and 3.", "Say hi."
    ids = chat_ids(tiny.tokenizer, [{"role": "user", "content": first}], add_generation_prompt=True)
    new, _ = reference(tiny, ids, max_new=40)
    assert len(new) > pause_at  # the pause comes before the answer's end
    partial = tiny.tokenizer.decode(new[:pause_at], skip_special_tokens=True).strip()
    assert partial
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": partial},
               {"role": "user", "content": second}]
    _, answer = reference(tiny, chat_ids(tiny.tokenizer, history, add_generation_prompt=True), max_new=40)

    child = pexpect.spawn(sys.executable, [str(REPO_ROOT / "tests/chat_child.py"), str(tmp_path / "gate"),
                                           str(pause_at), str(tiny_model_dir), "--max-new-tokens", "40"],
                          env=child_env(), encoding="utf-8", timeout=120, dimensions=(50, 400))
    try:
        child.expect_exact("/help for commands")
        child.expect_exact("> ")
        child.sendline(first)
        child.expect_exact(first)  # the terminal's echo
        wait_for(tmp_path / "gate.waiting")  # the child now waits before token pause_at + 1 (its output stays queued)
        # the first tokens are on the screen while the model waits before the next one: streamed, not at the end
        # (less a partly generated character at its end, which is held back until it is complete)
        child.expect_exact(partial.rstrip("\ufffd").rstrip().replace("\n", "\r\n"))
        child.sendintr()
        child.expect_exact("(stopped)")
        child.expect_exact("> ")
        child.sendline(second)
        child.expect_exact(second)
        child.expect_exact(answer.replace("\n", "\r\n"))  # the stopped answer, as shown, is in the history
        child.expect_exact("> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_from_a_pipe_stdout_holds_one_answer_per_line(tiny, tiny_model_dir):
    users = ["Add 2 and 3.", "Now count the letters in cat."]
    done = subprocess.run([sys.executable, "-m", "neftune_cli", "chat", str(tiny_model_dir), "--max-new-tokens",
                           str(MAX_NEW), "--device", "cpu"], input="\n".join([users[0], "", "/reset", users[1]]) + "\n",
                          capture_output=True, text=True, env=child_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    # /reset between them: two one-message conversations
    expected = [one_line(conversation_reference(tiny, [u])[0]) for u in users]
    assert done.stdout.split("\n") == [*expected, ""]
    assert "conversation cleared" in done.stderr


def test_one_line_is_reversible():
    text = "a\\nb\nc\r\\"
    encoded = one_line(text)
    assert "\n" not in encoded
    decoded = encoded.encode().decode("unicode_escape")
    assert decoded == text


def test_from_a_pipe_ctrl_c_mid_answer_exits_130_with_no_partial_line(tiny_model_dir, tmp_path):
    child = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests/chat_child.py"), str(tmp_path / "gate"), "2",
                              str(tiny_model_dir), "--max-new-tokens", "40"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        child.stdin.write("Add 2 and 3.\n")
        child.stdin.flush()
        wait_for(tmp_path / "gate.waiting")
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert out == ""
