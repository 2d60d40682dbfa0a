"""`llama-mlx chat` in a real pseudo-terminal on the real SmolLM2 model (greedy, short answers), and on a
tiny random model where what the answers say does not matter."""

import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

import pexpect

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x01\x02]")
SPINNER = re.compile(r"[\u2800-\u28ff]")
STATS = re.compile(
    r"([\d.]+)s to first token · prompt (\d+) tok at [\d.]+ tok/s \((\d+) cached\) · (\d+) tok at [\d.]+ tok/s"
    r" · context (\d+)/(\d+) · peak [\d.]+ GB(?: · ([a-z -]+))?")
PROMPT = ">>> "


def command() -> list[str]:
    exe = Path(sys.executable).with_name("llama-mlx")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("llama-mlx")
    return [found] if found else [sys.executable, "-m", "llama_mlx_cli.main"]


def clean(text: str) -> str:
    return SPINNER.sub("", ANSI.sub("", text)).replace("\r", "")


class Chat:
    """A chat process in a pty, with helpers that wait for the prompt."""

    def __init__(self, *args: str, timeout: float = 240, **env_vars: str):
        env = {**os.environ, "TERM": "xterm", "LLAMA_MLX_HISTORY": "", "COLUMNS": "200", **env_vars}
        env.pop("NO_COLOR", None)
        env.pop("FORCE_COLOR", None)
        cmd = command()
        # A job started in the background of a shell ignores SIGINT, and a child inherits that:
        # give the chat the disposition of a terminal session, where Ctrl-C interrupts.
        self.p = pexpect.spawn(cmd[0], [*cmd[1:], "chat", *args], env=env, encoding="utf-8",
                               timeout=timeout, dimensions=(50, 200),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.log: list[str] = []
        self.wait_prompt()

    def wait_prompt(self) -> str:
        self.p.expect_exact(PROMPT)
        out = clean(self.p.before)
        self.log.append(out)
        return out

    def command(self, line: str) -> str:
        """Send a line that produces no answer; returns what it printed."""
        self.p.sendline(line)
        out = self.wait_prompt()
        return out.split("\n", 1)[1] if "\n" in out else ""  # drop the echoed input

    def ctrl_c_at_prompt(self) -> None:
        """Ctrl-C at the prompt just seen, once readline waits for keys. It prints the prompt just before
        it waits, and Python's readline looks at signals only when that wait is interrupted: a Ctrl-C
        landing in between is seen at the next key (no person is that quick; a test is)."""
        time.sleep(0.2)
        self.p.sendintr()

    def ask(self, line: str) -> tuple[str, re.Match]:
        """Send a question; returns (everything printed before the stats line, the stats match)."""
        self.p.sendline(line)
        self.p.expect(r"peak [\d.]+ GB[^\r\n]*")
        text = clean(self.p.before + self.p.after)
        self.wait_prompt()
        match = STATS.search(text)
        assert match, text
        return text[: match.start()], match


@pytest.fixture(scope="module")
def smol(default_model):
    # SmolLM2's converted folder, not its GGUF: the same weights, loaded in 0.4 s instead of 2 s a process
    return str(default_model)


def test_chat_conversation_commands_interrupt_and_resume(smol, tmp_path):
    session_file = tmp_path / "talk.safetensors"
    chat = Chat("--model", smol, "--temp", "0", "--max-tokens", "12")

    # Multi-line input: a trailing backslash continues the message, and so does a paste. (Before the first
    # question: a new system prompt is a new start of the conversation, to prefill again.)
    chat.p.sendline("/system You are terse.\\")
    chat.p.expect_exact("... ")
    chat.command("Answer in one word.")
    assert "You are terse.\\nAnswer in one word." in chat.command("/system")
    chat.command("/system -")
    chat.p.send("/system pasted one\rpasted two\r")  # arrives at once, as a paste does
    chat.wait_prompt()
    assert "pasted one\\npasted two" in chat.command("/system")
    chat.p.sendline('"""/system block one')
    chat.p.expect_exact("... ")
    chat.command('block two"""')
    assert "block one\\nblock two" in chat.command("/system")
    chat.command("/system -")

    # 1. A question gets a streamed answer: its words arrive before the answer ends.
    chat.p.sendline("What is the capital of France?")
    chat.p.expect(r"\?25h")  # the spinner stops at the first token
    chat.p.expect(r"[A-Za-z]+")
    first_word_at = time.monotonic()
    chat.p.expect("Paris")
    paris_at = time.monotonic()
    chat.p.expect(r"peak [\d.]+ GB[^\r\n]*")
    stats1 = STATS.search(clean(chat.p.before + chat.p.after))
    chat.wait_prompt()
    assert stats1 and int(stats1.group(3)) == 0  # nothing cached on the first turn
    assert paris_at - first_word_at > 0.05, "the answer came in one piece, not streamed"
    context1 = int(stats1.group(5))
    assert int(stats1.group(6)) == 8192

    # 2. A second turn uses the history: the elliptical question is understood, and only
    #    the new turn is prefilled (the first exchange comes from the cache).
    answer, stats2 = chat.ask("And of Germany?")
    assert "Berlin" in answer
    assert int(stats2.group(3)) >= context1 - 1
    assert int(stats2.group(2)) < 25
    context2 = int(stats2.group(5))

    # /retry answers the same question again (greedy: the same answer), reusing the cache.
    out = chat.command("/set temp 0")  # also exercises /set
    assert "temp = 0.0" in out
    answer, stats3 = chat.ask("/retry")
    assert "Berlin" in answer
    assert int(stats3.group(2)) <= 2 and int(stats3.group(5)) == context2

    # /undo drops the exchange and trims the cache back.
    out = chat.command("/undo")
    assert "dropped the last exchange" in out
    out = chat.command("/history")
    assert "France" in out and "Germany" not in out
    out = chat.command("/stats")
    used = int(re.search(r"context: (\d+)/8192", out).group(1))
    assert context1 <= used < context2

    # 3. Ctrl-C mid-answer: back at the prompt, the process alive, the partial answer kept.
    chat.command("/set max-tokens 300")
    chat.p.sendline("Tell me a long story about a dragon who loves books.")
    chat.p.expect(r"\?25h")
    chat.p.expect(r"[A-Za-z]+\W+[A-Za-z]+\W+[A-Za-z]+")  # a few words have streamed
    chat.p.sendintr()
    chat.p.expect(r"peak [\d.]+ GB[^\r\n]*")
    stopped = STATS.search(clean(chat.p.before + chat.p.after))
    chat.wait_prompt()
    assert stopped and stopped.group(7) == "stopped"
    assert int(stopped.group(4)) < 300
    assert chat.p.isalive()
    history = chat.command("/history")
    assert "dragon" in history and history.rstrip().split("assistant:")[-1].strip()

    # The cache is consistent with the kept partial answer: the next turn reuses it.
    chat.command("/set max-tokens 1")  # what counts is the cache, not the answer
    answer, stats4 = chat.ask("What is 2 + 2?")
    assert int(stats4.group(3)) >= int(stopped.group(5)) - 4

    # /save, then Ctrl-D exits with code 0.
    out = chat.command(f"/save {session_file}")
    assert "saved" in out and session_file.exists()
    saved_tokens = int(re.search(r"and (\d+) cached tokens", out).group(1))
    chat.p.sendeof()
    chat.p.expect(pexpect.EOF)
    chat.p.close()
    assert chat.p.exitstatus == 0

    # /load in a new process continues the same conversation without prefilling it again.
    again = Chat("--model", smol, "--temp", "0", "--max-tokens", "1")
    out = again.command(f"/load {session_file}")
    assert f"{saved_tokens} tokens already in the KV cache" in out
    assert "dragon" in again.command("/history")
    answer, stats5 = again.ask("And what is 3 + 3?")
    assert int(stats5.group(3)) >= saved_tokens - 2
    assert int(stats5.group(2)) < 25

    # /reset forgets everything; Ctrl-C at the prompt exits cleanly with code 0.
    # (issue 13: the first Ctrl-C clears the line, a second one on the empty line leaves)
    assert "conversation cleared" in again.command("/reset")
    assert "context: 0/8192" in again.command("/stats")
    again.ctrl_c_at_prompt()
    again.p.expect_exact("Ctrl-C again")
    again.wait_prompt()
    again.ctrl_c_at_prompt()
    again.p.expect(pexpect.EOF)
    again.p.close()
    assert again.p.exitstatus == 0


def test_chat_drops_oldest_turns_when_the_context_is_full(tiny_meta_checkpoint):
    # An 80-token window: the third exchange no longer fits with the first one.
    chat = Chat("--model", str(tiny_meta_checkpoint), "--temp", "0", "--max-tokens", "8", "--max-kv-size", "80",
                "--system", "Answer briefly.")
    seen = ""
    for question in ("What is the capital of France?", "What is the capital of Spain?",
                     "What is the capital of Italy?", "What is the capital of Japan?"):
        answer, stats = chat.ask(question)
        seen += answer
        assert int(stats.group(5)) <= 80
        if "outgrew the context" in answer:
            break
    assert "outgrew the context: dropped the oldest exchange" in seen
    history = chat.command("/history")
    assert "Answer briefly." in history  # the system prompt stays
    assert "France" not in history  # the oldest exchange went
    chat.p.sendeof()
    chat.p.expect(pexpect.EOF)
    chat.p.close()
    assert chat.p.exitstatus == 0


def test_chat_with_piped_input_and_output_is_plain_text(tiny_meta_checkpoint):
    import subprocess

    env = dict(os.environ, TERM="xterm-256color", LLAMA_MLX_HISTORY="")
    env.pop("FORCE_COLOR", None)
    r = subprocess.run([*command(), "chat", "--model", str(tiny_meta_checkpoint), "--temp", "0", "--max-tokens", "4"],
                       input="Hello!\n/undo\n/stats\n/nonsense\n/exit\n", capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\x1b[" not in r.stdout and "\x1b[" not in r.stderr
    assert STATS.search(r.stdout)
    assert "dropped the last exchange" in r.stdout and re.search(r"context: 0/\d+", r.stdout)
    assert "error: unknown command /nonsense" in r.stderr  # the session went on after it


def test_chat_history_file_keeps_bounded_inputs_outside_loaded_sessions(smol, tmp_path):
    history = tmp_path / "history"
    session_file = tmp_path / "talk.json"
    chat = Chat("--model", smol, "--temp", "0", "--max-tokens", "2", LLAMA_MLX_HISTORY=str(history),
                HOME=str(tmp_path / "home"))
    chat.command("/system kept marker")
    # A paste over 4096 characters (a pasted document): recalled in the session, never written.
    lines = [f"zebra document line {i} " + "x" * 80 for i in range(60)]
    chat.p.send("/system " + "\r".join(lines) + "\r")
    chat.wait_prompt()
    assert "zebra document line 59" in chat.command("/system")
    chat.command(f"/save {session_file}")
    chat.command(f"/load {session_file}")
    chat.command("/system typed in a loaded session")  # inputs of a resumed session stay out of the file
    chat.p.sendeof()
    chat.p.expect(pexpect.EOF)
    chat.p.close()
    assert chat.p.exitstatus == 0
    kept = history.read_text()
    assert "/system kept marker" in kept and f"/load {session_file}" in kept
    assert "zebra" not in kept and "loaded session" not in kept
    assert not (tmp_path / "home").exists()

    # --load: nothing typed in the resumed session is kept either; older entries stay.
    again = Chat("--model", smol, "--load", str(session_file), LLAMA_MLX_HISTORY=str(history))
    again.command("/system typed after --load")
    again.p.sendline("/exit")
    again.p.expect(pexpect.EOF)
    again.p.close()
    assert "after --load" not in history.read_text() and "/system kept marker" in history.read_text()


@pytest.mark.parametrize("how", ["off", "--no-history"])
def test_chat_history_off_leaves_no_file(smol, tmp_path, how):
    home = tmp_path / "home"
    home.mkdir()
    if how == "off":
        chat = Chat("--model", smol, LLAMA_MLX_HISTORY="off", HOME=str(home))
    else:
        chat = Chat("--model", smol, how, LLAMA_MLX_HISTORY=str(tmp_path / "history"), HOME=str(home))
    chat.command("/system remember nothing")
    chat.p.sendline("/exit")
    chat.p.expect(pexpect.EOF)
    chat.p.close()
    assert chat.p.exitstatus == 0
    assert list(tmp_path.rglob("*")) == [home]  # no history file, and no ~/.cache made
    assert not Path("off").exists()  # "off" is no file name
