"""`llama-mlx generate` against the library's `generate`, greedy, on a tiny random model with Meta's tokenizer
(the command is tested, not a model: SmolLM2 takes seconds a run here to read its chat template's prompt)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_mlx.generate import generate
from llama_mlx.loading import load
from llama_mlx_cli.common import resolve_dtype

PROMPT = "Name three primary colours."
MAX_TOKENS = 8


def command() -> list[str]:
    exe = Path(sys.executable).with_name("llama-mlx")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "llama_mlx_cli.main"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    env["TERM"] = "xterm-256color"  # even so, piped output must stay plain
    return subprocess.run([*command(), *args], input=stdin if stdin is not None else "", capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def folder(tiny_meta_checkpoint):
    return tiny_meta_checkpoint


@pytest.fixture(scope="module")
def expected(folder):
    # The CLI loads with dtype "auto" (weights as stored); the library is asked for the same.
    model, tokenizer = load(folder, dtype=resolve_dtype(None))
    text = generate(model, tokenizer, [{"role": "user", "content": PROMPT}], MAX_TOKENS)
    assert text.strip()
    return text


def test_prompt_as_argument_matches_library(folder, expected):
    r = run("generate", "--model", str(folder), "--temp", "0", "--max-tokens", str(MAX_TOKENS), PROMPT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + ("" if expected.endswith("\n") else "\n")
    assert r.stderr == ""  # only the text, and no stats without --verbose
    assert "\x1b[" not in r.stdout


def test_prompt_from_file_matches_library_and_verbose_stats_go_to_stderr(folder, expected, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT + "\n", encoding="utf-8")  # an editor's final newline is not part of it
    r = run("generate", "-M", str(folder), "--max-tokens", str(MAX_TOKENS), "--file", str(prompt_file),
            "--verbose")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected.rstrip("\n")
    assert "generation:" in r.stderr and "tokens/s" in r.stderr
    assert "\x1b[" not in r.stderr


def test_prompt_from_stdin_with_json(folder, expected):
    r = run("generate", "-M", str(folder), "--max-tokens", str(MAX_TOKENS), "--json", stdin=PROMPT + "\n")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)  # exactly one JSON object
    assert data["text"] == expected
    assert data["generation_tokens"] >= 1 and data["prompt_tokens"] > 5
    assert data["finish_reason"] in ("stop", "length")
    for key in ("prompt_tps", "generation_tps", "time_to_first_token", "peak_memory_gb"):
        assert isinstance(data[key], float) and data[key] >= 0


def test_verbose_reports_speculation_in_one_line(folder, expected):
    """With prompt lookup the text is plain greedy's and --verbose adds one line: acceptance, the
    drafts a round and the estimated speed-up (or that it drafted nothing)."""
    import re

    r = run("generate", "-M", str(folder), "--temp", "0", "--max-tokens", str(MAX_TOKENS),
            "--prompt-lookup", "3", "--verbose", PROMPT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected.rstrip("\n")
    lines = [line for line in r.stderr.splitlines() if line.startswith("speculative: ")]
    assert len(lines) == 1, r.stderr
    assert re.fullmatch(r"speculative: (\d+% of \d+ drafts accepted, k \d+(-\d+)?|no drafts)"
                        r"(, off \d+ of \d+ rounds)?(, \d+\.\d\dx estimated)?", lines[0]), lines[0]
