"""The interactive chat: history trimming, one turn (and Ctrl-C during it), and the script driven
through a pipe, a pseudo-terminal and torchrun."""
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

import helpers
from llama import ChatFormat, Llama, Tokenizer
from llama.chat import PIPED_SEPARATOR, ChatSession, trim_history

SCRIPT = "scripts/chat.py"
MAX_SEQ_LEN, MAX_GEN_LEN = 128, 32
# Long lines in a short window: the history must be trimmed along the way.
LINES = ["Hello there", "a" * 40, "/reset", "b" * 40, "c" * 40, "d" * 40]


@pytest.fixture(scope="module")
def llama(tiny_ckpt, byte_tokenizer) -> Llama:
    return Llama.build(str(tiny_ckpt), str(byte_tokenizer), MAX_SEQ_LEN, 1, device="cpu", dtype="float32")


def session(llama: Llama, **kwargs) -> ChatSession:
    return ChatSession(llama, **{"max_gen_len": MAX_GEN_LEN, "temperature": 0, **kwargs})


def script_args(ckpt, tokenizer, max_seq_len=MAX_SEQ_LEN, max_gen_len=MAX_GEN_LEN) -> list:
    return [
        "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer, "--temperature", 0,
        "--max_seq_len", max_seq_len, "--max_gen_len", max_gen_len, "--device", "cpu", "--dtype", "float32",
    ]


def expected_stdout(llama: Llama, lines: list) -> str:
    """What the script prints for piped `lines`: the answers of the same session, one per turn."""
    s = session(llama)
    answers = []
    for line in lines:
        if line == "/reset":
            s.reset()
        else:
            answers.append(s.turn(line))
    return PIPED_SEPARATOR.join(a + "\n" for a in answers)


def run_script(args: list, input: str) -> subprocess.CompletedProcess:
    env = helpers.child_env()
    cmd = [sys.executable, SCRIPT, *map(str, args)]
    return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120, cwd=helpers.REPO, env=env)


def test_trimming_drops_the_oldest_turns_and_keeps_the_system_prompt(byte_tokenizer):
    fmt = ChatFormat(Tokenizer(str(byte_tokenizer)))
    system = [{"role": "system", "content": "Be brief."}]
    u1, a1, u2, a2, u3 = (
        {"role": role, "content": f"message {i}"} for i, role in enumerate(["user", "assistant"] * 2 + ["user"])
    )
    history = [u1, a1, u2, a2, u3]
    full = len(fmt.encode_dialog_prompt(system + history))
    assert trim_history(fmt, system, history, full) == (history, 0)
    assert trim_history(fmt, system, history, full - 1) == ([u2, a2, u3], 1)
    last_only = len(fmt.encode_dialog_prompt(system + [u3]))
    assert trim_history(fmt, system, history, last_only) == ([u3], 2)
    no_system = len(fmt.encode_dialog_prompt([u2, a2, u3]))
    assert trim_history(fmt, [], history, no_system) == ([u2, a2, u3], 1)
    assert trim_history(fmt, system, history, no_system) == ([u3], 2)  # the system prompt counts too
    with pytest.raises(ValueError, match="exceed"):
        trim_history(fmt, system, history, last_only - 1)


def test_a_turn_streams_and_remembers_the_answer(llama, capsys):
    s = session(llama, system="Be brief.")
    answer = s.turn("Hi")
    out = capsys.readouterr().out
    assert out == answer + "\n" and answer
    assert s.history == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]
    prompt = llama.formatter.encode_dialog_prompt([{"role": "system", "content": "Be brief."}, s.history[0]])
    tokens, _ = llama.generate([prompt], MAX_GEN_LEN, temperature=0)
    assert answer == llama.tokenizer.decode(tokens[0])
    s.reset()
    assert s.history == [] and s.system == [{"role": "system", "content": "Be brief."}]


def test_ctrl_c_stops_the_answer_and_the_conversation_goes_on(llama, capsys, monkeypatch):
    full = session(llama).turn("Hi")
    real_stream = llama.stream

    def interrupted(*args, **kwargs):
        for i, step in enumerate(real_stream(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield step

    s = session(llama)
    monkeypatch.setattr(llama, "stream", interrupted)
    partial = s.turn("Hi")
    monkeypatch.undo()
    assert full.startswith(partial) and len(partial) < len(full)
    assert s.history[-1] == {"role": "assistant", "content": partial}  # the partial answer is kept
    assert "[answer stopped]" in capsys.readouterr().err
    assert s.turn("Go on")  # the session still answers
    assert len(s.history) == 4


def test_a_message_too_long_for_the_window_is_refused(llama, capsys):
    s = session(llama)
    s.turn("Hi")
    before = list(s.history)
    assert s.turn("z" * MAX_SEQ_LEN) is None
    assert s.history == before
    assert "message not sent" in capsys.readouterr().err


def test_max_gen_len_must_leave_room_for_a_prompt(llama):
    with pytest.raises(ValueError, match="no room for a prompt"):
        session(llama, max_gen_len=MAX_SEQ_LEN)


def test_piped_chat_prints_the_answers_and_trims_the_history(llama, tiny_ckpt, byte_tokenizer):
    r = run_script(script_args(tiny_ckpt, byte_tokenizer), "\n".join(LINES) + "\n")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == expected_stdout(llama, LINES)
    assert "You:" not in r.stdout  # no prompts off a terminal
    assert "[history cleared]" in r.stderr
    assert "[history trimmed: the oldest" in r.stderr


def test_two_processes_follow_rank0_input_and_print_once(llama, tiny_ckpt_2shards, byte_tokenizer):
    r = helpers.run_torchrun(SCRIPT, script_args(tiny_ckpt_2shards, byte_tokenizer), 2, input="\n".join(LINES) + "\n")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == expected_stdout(llama, LINES)  # rank 0 alone prints, the same answers
    assert r.stderr.count("[history cleared]") == 1 and r.stderr.count("Loaded") == 1


def test_help():
    r = run_script(["--help"], "")
    assert r.returncode == 0 and "--system" in r.stdout + r.stderr  # fire writes help to stderr off a terminal


class Terminal:
    """The chat script on a pseudo-terminal, read as the user would see it."""

    def __init__(self, args: list):
        master, slave = pty.openpty()
        env = helpers.child_env(TERM="dumb")
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, *map(str, args)], stdin=slave, stdout=slave, stderr=slave, cwd=helpers.REPO, env=env,
            # as in a terminal's foreground: a suite started in the background inherits SIGINT
            # ignored, and Python then never raises KeyboardInterrupt
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        os.close(slave)
        self.master, self.seen = master, b""

    def expect(self, text: str, timeout: float = 60) -> None:
        """Read until `text` has appeared since the last expect."""
        deadline = time.monotonic() + timeout
        while text.encode() not in self.seen:
            assert time.monotonic() < deadline, f"no {text!r} in {self.seen[-2000:]!r}"
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # EIO: the process closed the terminal
                    assert text.encode() in self.seen, f"no {text!r} in {self.seen[-2000:]!r}"
        self.seen = self.seen[self.seen.index(text.encode()) + len(text) :]

    def read_some(self, timeout: float = 60) -> None:
        """Wait for more output (e.g. the first bytes of an answer)."""
        assert select.select([self.master], [], [], timeout)[0], "no output"
        self.seen += os.read(self.master, 65536)

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def close(self) -> int:
        try:
            rc = self.proc.wait(timeout=60)
        finally:
            self.proc.kill()
            os.close(self.master)
        return rc


def test_chat_on_a_terminal_shows_prompts(tiny_ckpt, byte_tokenizer):
    term = Terminal(script_args(tiny_ckpt, byte_tokenizer))
    term.expect("/exit or Ctrl-D quits")
    term.expect("You: ")
    term.type("Hello there")
    term.expect("Assistant: ")
    term.expect("You: ")
    term.type("/exit")
    assert term.close() == 0


def test_sigint_on_a_terminal_stops_only_the_answer(tiny_ckpt, byte_tokenizer):
    # A long answer (greedy, so the same every run, and without a stop token) to interrupt.
    term = Terminal(script_args(tiny_ckpt, byte_tokenizer, max_seq_len=1024, max_gen_len=960))
    term.expect("You: ")
    term.type("Hello there")
    term.expect("Assistant: ")
    term.read_some()  # the answer has begun
    term.proc.send_signal(signal.SIGINT)
    term.expect("[answer stopped]", timeout=20)
    term.expect("You: ")
    term.type("/exit")
    assert term.close() == 0


def test_piped_answers_have_a_separator_line_between_them(llama, capsys):
    s = session(llama)
    answers = [s.turn("Hello there"), s.turn("x" * 10)]
    out = capsys.readouterr().out
    assert out == answers[0] + "\n" + PIPED_SEPARATOR + answers[1] + "\n"
    assert not out.startswith(PIPED_SEPARATOR) and not out.endswith(PIPED_SEPARATOR)
