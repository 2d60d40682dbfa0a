"""Bad input gets one clear stderr line and the right exit code, never a traceback; help and version work."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def command() -> list[str]:
    exe = Path(sys.executable).with_name("llama-mlx")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "llama_mlx_cli.main"]


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    env["TERM"] = "xterm-256color"
    return subprocess.run([*command(), *map(str, args)], input=stdin, capture_output=True, text=True, env=env,
                          timeout=300)


def assert_one_line_error(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in r.stderr and "\x1b[" not in r.stderr
    assert r.stdout == ""
    for word in words:
        assert word in line, line
    return line


@pytest.fixture(scope="module")
def gguf(default_model):
    # SmolLM2's converted folder (loads in 0.4 s, its GGUF in 2 s): the errors are the CLI's, not the format's
    return str(default_model)


@pytest.mark.parametrize("cmd", [["generate", "hi"], ["chat"], ["info"]])
def test_unknown_model_path(cmd, tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    assert_one_line_error(run(*cmd, "--model", missing), 1, str(missing))


def test_unknown_model_name():
    assert_one_line_error(run("generate", "--model", "no-such-model-xyz", "hi"), 1, "no-such-model-xyz",
                          "no model of that name")


@pytest.mark.parametrize("cmd", [["generate", "hi"], ["info"]])
def test_folder_that_is_not_a_model(cmd, tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    assert_one_line_error(run(*cmd, "--model", tmp_path), 1, str(tmp_path))


def test_folder_with_a_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    assert_one_line_error(run("info", "--model", tmp_path), 1)


def test_prompt_file_that_does_not_exist(gguf, tmp_path):
    missing = tmp_path / "prompt.txt"
    assert_one_line_error(run("generate", "--model", gguf, "--file", missing), 1, str(missing), "does not exist")


def test_prompt_beyond_the_context(gguf, tmp_path):
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("lorem ipsum dolor sit amet " * 2500)  # ~12k tokens; the context is 8192
    line = assert_one_line_error(run("generate", "--model", gguf, "--file", long_prompt), 1, "8192")
    assert "context" in line


def test_session_file_that_does_not_exist(gguf, tmp_path):
    assert_one_line_error(run("chat", "--model", gguf, "--load", tmp_path / "nope.safetensors"), 1, "nope")


def test_invalid_values_found_after_loading(gguf):
    assert_one_line_error(run("generate", "--model", gguf, "--logit-bias", "nonsense", "hi"), 1, "--logit-bias")
    assert_one_line_error(run("generate", "--model", gguf, "--max-kv-size", "64", "--kv-bits", "4", "hi"), 1,
                          "--kv-bits")


@pytest.mark.parametrize("args, option", [
    (["--temp", "-1"], "--temp"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-tokens", "many"], "--max-tokens"),
    (["--kv-bits", "7"], "--kv-bits"),
    (["--kv-group-size", "48"], "--kv-group-size"),
    (["--min-p", "2"], "--min-p"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--sampling-order", "random"], "--sampling-order"),
    (["--dtype", "int8"], "--dtype"),
    (["--no-such-option"], "--no-such-option"),
])
def test_invalid_option_values_are_usage_errors(args, option):
    # Typer rejects these before any model loads: exit code 2, still one line.
    assert_one_line_error(run("generate", *args, "hi"), 2, option)


def test_usage_errors_of_every_command():
    assert_one_line_error(run("chat", "--max-tokens", "-3"), 2, "--max-tokens")
    assert_one_line_error(run("info", "--context", "0"), 2, "--context")
    assert_one_line_error(run("no-such-command"), 2, "no-such-command")
    assert_one_line_error(run("generate", "--file", "x.txt", "prompt"), 2, "--file")


def test_help_of_every_command_has_examples():
    for cmd in (["chat"], ["generate"], ["info"]):
        r = run(*cmd, "--help")
        assert r.returncode == 0, r.stderr
        assert "Examples" in r.stdout and f"llama-mlx {cmd[0]}" in r.stdout
        assert "\x1b[" not in r.stdout


def test_every_command_is_registered():
    from llama_mlx_cli.main import app

    names = {c.name for c in app.registered_commands}
    assert {"chat", "generate", "info", "convert", "bench"} <= names
    r = run("--help")
    assert r.returncode == 0
    listed = {m.group(1) for m in re.finditer(r"^│ (\w+)\s", r.stdout, re.M)}
    assert {"chat", "generate", "info", "convert", "bench"} <= listed


def test_version_and_completion():
    from llama_mlx import __version__

    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"llama-mlx {__version__}"
    # the shell named: detection walks the parent processes, which a CI runner may not have
    r = subprocess.run([*command(), "--show-completion", "bash"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "_LLAMA_MLX_COMPLETE" in r.stdout
