"""The README's code blocks, as a newcomer pastes them: the Python runs, and every `llama-mlx` line
parses with the real command (each option exists and takes the value given)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from llama_mlx_cli.main import app

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def _blocks(language):
    return [body for lang, body in _BLOCK.findall(README.read_text()) if lang == language]


def _invocations(blocks):
    """Each `llama-mlx ...` command in these shell lines, as argument lists."""
    found = []
    for block in blocks:
        for line in block.splitlines():
            for part in re.split(r"\|\||&&|\|", line):
                # `[--pipeline]` is usage notation for an optional flag: parse it too
                words = [re.sub(r"^\[(-.*)\]$", r"\1", w) for w in shlex.split(part, comments=True)]
                if "--" in words and words[0] == "mlx.launch":
                    words = words[words.index("--") + 1:]
                if words and Path(words[0]).name == "llama-mlx":
                    found.append(words[1:])
    return found


def test_python_blocks_run_as_pasted(tmp_path):
    (block,) = _blocks("python")
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tok/s, finished by" in proc.stdout
    # The prompt cache round trip: the saved file exists and holds the prompt and answer (8 + 8 tokens).
    assert (tmp_path / "story.safetensors").is_file()
    cached = int(re.search(r"(\d+) tokens cached", proc.stdout).group(1))
    assert 8 < cached <= 8 + 8 + 2


def _epilogs():
    group = typer.main.get_command(app)
    return [group.get_command(group.context_class(group), name).epilog or "" for name in group.list_commands(None)]


@pytest.mark.parametrize("where", ["README", "--help examples"])
def test_every_command_line_parses(where):
    invocations = _invocations(_blocks("bash") if where == "README" else _epilogs())
    assert len(invocations) >= 20  # the README's Use lines and set-up `llama-mlx chat`; the help's examples
    group = typer.main.get_command(app)
    for args in invocations:
        name, rest = args[0], args[1:]
        command = group.get_command(group.context_class(group), name)
        assert command is not None, f"README names a command that does not exist: llama-mlx {name}"
        try:
            command.make_context(name, list(rest))
        except Exception as e:  # typer's vendored click raises its own UsageError
            pytest.fail(f"{where}: llama-mlx {shlex.join(args)}: {getattr(e, 'format_message', e.__str__)()}")
