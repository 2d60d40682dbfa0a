"""Help that tells the truth: each command's sampling defaults and where they come from, and where the
chat keeps its input history (issue "What a newcomer still trips on", items 6 and 7)."""

import os
import re
import subprocess
import sys
from pathlib import Path


def help_text(*args: str) -> str:
    exe = Path(sys.executable).with_name("llama-mlx")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "llama_mlx_cli.main"]
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    env.update(COLUMNS="200", TERMINAL_WIDTH="200")
    r = subprocess.run([*cmd, *args, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def option_help(text: str, option: str) -> str:
    """An option's row of the help panel, its wrapped lines joined."""
    rows = re.split(r"\n│ (?=-)", text)
    row = next(r for r in rows if r.startswith(option))
    return " ".join(re.sub(r"[│╰─╯]", " ", row).split())


def test_generate_help_shows_its_greedy_defaults():
    text = help_text("generate")
    temp, top_p = option_help(text, "--temp"), option_help(text, "--top-p")
    assert "[default: 0.0 (greedy, as mlx-lm)]" in temp and "Meta's" not in temp, temp
    assert "[default: 1.0 (off, as mlx-lm)]" in top_p and "Meta's" not in top_p, top_p


def test_chat_help_shows_the_model_then_meta_defaults():
    text = help_text("chat")
    temp, top_p = option_help(text, "--temp"), option_help(text, "--top-p")
    assert "[default: the model's generation_config.json, else 0.6 (Meta's)]" in temp, temp
    assert "[default: the model's generation_config.json, else 0.9 (Meta's)]" in top_p, top_p
    assert "[default: 0.0" not in temp and "[default: 1.0" not in top_p


def test_chat_help_documents_the_history_file_and_how_to_turn_it_off():
    row = option_help(help_text("chat"), "--no-history")
    assert "~/.cache/llama-mlx/chat_history" in row, row
    assert "LLAMA_MLX_HISTORY=FILE" in row and "LLAMA_MLX_HISTORY=off" in row
    assert "4096 characters" in row and "/load" in row
