"""Issue 13, item 9: `chat --tools python`, Llama 3.1's code interpreter.

The sandbox runs real subprocesses (limits, no network, scratch folder). The loop runs the real
ChatSession, stream_generate and Meta's tokenizer; only the model's choices are scripted (a
logits processor forces each reply), since what is tested is the loop.
"""

import socket
import threading

import mlx.core as mx
import pytest
from oracles import TINY_META_PARAMS

from llama_mlx.chat import ChatSession
from llama_mlx.config import config_from_meta_params
from llama_mlx.model import Model, ModelArgs
from llama_mlx.tokenizer import Llama3Tokenizer
from llama_mlx.sandbox import PythonSandbox
from llama_mlx_cli.chat import ChatApp, Terminal
from llama_mlx_cli.common import GenerationOptions


@pytest.fixture(scope="module")
def sandbox():
    with PythonSandbox(timeout=5, memory_mb=256) as sb:
        yield sb


def test_sandbox_runs_code_in_a_scratch_folder_with_limits(sandbox):
    r = sandbox.run("import os\nprint(6 * 7)\nprint(os.getcwd())\nopen('kept.txt', 'w').write('hi')")
    assert r.output.splitlines() == ["42", str(sandbox.scratch)] and r.returncode == 0
    assert (sandbox.scratch / "kept.txt").read_text() == "hi"
    assert sandbox.run("print(open('kept.txt').read())").output.strip() == "hi"  # one folder per session
    limit, sandbox.timeout = sandbox.timeout, 1.0  # a loop that never ends: stopped at the limit, here 1 s
    try:
        r = sandbox.run("while True: pass")
    finally:
        sandbox.timeout = limit
    assert r.timed_out and r.as_tool_output().endswith("[timed out]")
    r = sandbox.run("x = bytearray(512 << 20)\nprint('allocated')")  # twice the 256 MB limit
    assert "MemoryError" in r.output and "allocated" not in r.output and r.returncode == 1
    r = sandbox.run("raise SystemExit(3)")
    assert r.as_tool_output() == "[exit status 3]"


def test_sandbox_has_no_network(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')"
    # Reachable from here, not from the sandbox: its own network namespace (the kernel's isolation, as
    # there is no in-process guard any more).
    socket.create_connection(("127.0.0.1", port), timeout=3).close()
    r = sandbox.run(code)
    assert "connected" not in r.output and r.returncode != 0
    assert "network" in r.confinement  # this Linux machine: kernel-level isolation
    server.close()


class ScriptedTerminal(Terminal):
    """The chat's terminal with its input scripted and its output recorded."""

    def __init__(self, answers):
        super().__init__()
        self.tty_in, self.answers, self.out, self.asked = False, list(answers), [], []

    def _input(self, prompt):
        self.asked.append(prompt)
        return self.answers.pop(0)

    def write(self, text):
        self.out.append(text)

    def note(self, text):
        self.out.append(text + "\n")

    warn = note


def scripted_replies(tok, replies):
    """A logits processor that makes the model give `replies`, one per answer, token by token."""
    header = tok.chat_format.encode_header({"role": "assistant", "content": ""})
    state = {"answer": -1}

    def process(tokens, logits):
        ids = tokens.tolist()
        start = max(i + len(header) for i in range(len(ids) - len(header) + 1) if ids[i:i + len(header)] == header)
        i = len(ids) - start
        if i == 0:
            state["answer"] += 1
        script = replies[min(state["answer"], len(replies) - 1)]
        forced = mx.full(logits.shape, -1e9, logits.dtype)
        return forced.at[:, script[min(i, len(script) - 1)]].add(2e9)

    return process


@pytest.fixture(scope="module")
def llama3(tokenizer_model_path):
    return Llama3Tokenizer(tokenizer_model_path)


@pytest.fixture(scope="module")
def model():
    params = dict(TINY_META_PARAMS, vocab_size=128256)
    m = Model(ModelArgs.from_dict(config_from_meta_params({**params, "use_scaled_rope": False})))
    m.args.max_position_embeddings = 512
    mx.eval(m.parameters())
    return m


def make_app(model, tok, sandbox, replies, answers, confirm=True):
    sp = tok.special_tokens
    scripts = []
    for reply in replies:
        if reply.startswith("<|python_tag|>"):
            scripts.append([sp["<|python_tag|>"]] + tok.encode(reply[len("<|python_tag|>"):]) + [sp["<|eom_id|>"]])
        else:
            scripts.append(tok.encode(reply) + [sp["<|eot_id|>"]])
    from llama_mlx.sample import make_sampler

    session = ChatSession(model, tok, system="Environment: ipython", max_tokens=40,
                          sampler=make_sampler(0.0), logits_processors=[scripted_replies(tok, scripts)])
    term = ScriptedTerminal(answers)
    return ChatApp(session, GenerationOptions(temp=0.0), term, tools=sandbox, confirm_tools=confirm), session, term


def test_tool_loop_runs_the_code_and_feeds_its_output_back(model, llama3, sandbox):
    app, session, term = make_app(model, llama3, sandbox,
                                  ["<|python_tag|>print(sum(range(10)))", "The sum is 45."], answers=["y"])
    app.ask("What is the sum of 0..9? Use Python.")
    roles = [m["role"] for m in session.messages]
    assert roles == ["system", "user", "assistant", "ipython", "assistant"]
    call, result, answer = session.messages[2:]
    assert call == {"role": "assistant", "content": "print(sum(range(10)))", "python_tag": True,
                    "stop_reason": "end_of_message"}
    assert result == {"role": "ipython", "content": "45"}
    assert answer["content"] == "The sum is 45."
    assert term.asked == ["run it? [y/N] "]  # asked once, before the run
    printed = "".join(term.out)
    assert "print(sum(range(10)))" in printed and "45" in printed
    # The cache holds Meta's encoding of the whole exchange (the call re-encodes as it was sampled).
    whole = llama3.apply_chat_template(session.messages, add_generation_prompt=False)
    held = session.cache.tokens
    assert held == whole[: len(held)] and len(whole) - len(held) <= 1
    assert llama3.special_tokens["<|eom_id|>"] in held


def test_declined_or_yes(model, llama3, sandbox):
    marker = sandbox.scratch / "ran.txt"
    code = f"open({str(marker)!r}, 'w').write('x')"
    app, session, term = make_app(model, llama3, sandbox, ["<|python_tag|>" + code, "OK."], answers=["n"])
    app.ask("Write the file.")
    assert not marker.exists()  # declined: never run
    assert session.messages[3] == {"role": "ipython", "content": "The user declined to run this code."}
    assert session.messages[4]["content"] == "OK."
    app, session, term = make_app(model, llama3, sandbox, ["<|python_tag|>" + code, "Done."], answers=[],
                                  confirm=False)
    app.ask("Write the file.")
    assert marker.read_text() == "x" and term.asked == []  # --yes: run without asking
    assert session.messages[-1]["content"] == "Done."


def test_tools_are_off_by_default(model, llama3):
    app, session, term = make_app(model, llama3, None, ["<|python_tag|>print(1)", "never"], answers=[])
    app.ask("Run it.")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.tool_call() == "print(1)" and term.asked == []


def test_cli_warns_once_when_the_template_ignores_tools(tiny_meta_checkpoint):
    """`chat --tools python` on SmolLM2 (its template drops tools, and it has no <|python_tag|>) says so in
    one line on stderr; on Meta's Llama 3 format (a tiny random model with Meta's tokenizer) it says nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).with_name("llama-mlx")
    env = {**os.environ, "LLAMA_MLX_HISTORY": "off"}

    def chat(*args):
        return subprocess.run([str(cli), "chat", "--tools", "python", *args], input="/exit\n", capture_output=True,
                              text=True, env=env, timeout=120)

    smollm2 = chat()
    assert smollm2.returncode == 0, smollm2.stderr
    assert [line for line in smollm2.stderr.splitlines() if "tools" in line] == [
        "warning: this model's chat template ignores tools, so the model will not see the python tool "
        "(Llama 3.1+ Instruct models call it with <|python_tag|>)"]
    meta = chat("--model", str(tiny_meta_checkpoint))
    assert meta.returncode == 0, meta.stderr
    assert "warning" not in meta.stderr and "python tool on" in meta.stdout
