"""Issue 13, items 5, 6 and 8 at the command line: mlx-lm's names, one meaning per short flag,
model-specific sampling defaults, and an empty stdin as an error."""

import json
import os
import re
import subprocess

import pytest
import typer

from llama_mlx.generate import generate
from llama_mlx.loading import load
from llama_mlx_cli.common import resolve_dtype
from llama_mlx_cli.main import app
from test_cli_chat import command

PROMPT = "Name a colour."


def run(*args, stdin=None, timeout=600):
    env = dict(os.environ, LLAMA_MLX_HISTORY="")
    env.pop("FORCE_COLOR", None)
    return subprocess.run([*command(), *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout)


def short_flags() -> dict[str, dict[str, str]]:
    """{short flag: {command: the long name it stands for}} over every command."""
    table: dict[str, dict[str, str]] = {}
    root = typer.main.get_command(app)
    for name, cmd in sorted(root.commands.items()):
        for param in cmd.params:
            opts = [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]
            shorts = [o for o in opts if re.fullmatch(r"-[A-Za-z?]", o)]
            longs = [o for o in opts if o.startswith("--")]
            for s in shorts:
                table.setdefault(s, {})[name] = longs[0] if longs else s
    return table


def test_every_short_flag_means_one_thing_across_commands():
    table = short_flags()
    for flag, uses in table.items():
        assert len(set(uses.values())) == 1, f"{flag} means {uses}"
    meaning = {flag: next(iter(uses.values())) for flag, uses in table.items()}
    # The table as the issue asks for it: mlx-lm's letters where it has them.
    expected = {"-M": "--model", "-m": "--max-tokens", "-s": "--system", "-p": "--prompt", "-f": "--file",
                "-v": "--verbose", "-q": "--quantize", "-d": "--dequantize", "-y": "--yes"}
    for flag, long in expected.items():
        assert meaning.get(flag) == long, (flag, table.get(flag))
    assert "convert" not in table["-f"]  # --force has no short flag any more
    assert set(table["-p"]) == {"generate"}


@pytest.fixture(scope="module")
def expected(tiny_meta_checkpoint):
    # The names and the printout are tested, not the model: the tiny random one (greedy) answers at once.
    model, tokenizer = load(tiny_meta_checkpoint, dtype=resolve_dtype(None))
    return generate(model, tokenizer, [{"role": "user", "content": PROMPT}], 6)


def test_generate_takes_prompt_option_and_verbose_prints_mlx_lm_stats(tiny_meta_checkpoint, expected):
    for flag in ("--prompt", "-p"):
        r = run("generate", "-M", str(tiny_meta_checkpoint), "-m", "6", flag, PROMPT, "--verbose")
        assert r.returncode == 0, r.stderr
        assert r.stdout.rstrip("\n") == expected.rstrip("\n")  # stdout: the text only
        # mlx_lm.generate's statistics lines, verbatim in form.
        assert re.search(r"^==========\nPrompt: \d+ tokens, \d+\.\d{3} tokens-per-sec\n"
                         r"Generation: 6 tokens, \d+\.\d{3} tokens-per-sec\nPeak memory: \d+\.\d{3} GB$",
                         r.stderr, re.M), r.stderr
    r = run("generate", "-M", str(tiny_meta_checkpoint), "-p", PROMPT, PROMPT)
    assert r.returncode == 2 and "not both" in r.stderr


def test_generate_with_an_empty_stdin_is_an_error(default_model, tmp_path):
    for stdin in ("", "\n"):
        r = run("generate", "-M", str(default_model), stdin=stdin, timeout=120)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert r.stdout == ""
        assert r.stderr.strip() == "error: the prompt on stdin is empty; nothing to answer"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = run("generate", "-M", str(default_model), "-f", str(empty), timeout=120)
    assert r.returncode == 1 and "is empty" in r.stderr and r.stderr.count("\n") == 1


def test_convert_takes_mlx_lm_names(tiny_meta_checkpoint, tmp_path):
    out = tmp_path / "q"
    r = run("convert", "--hf-path", str(tiny_meta_checkpoint), "--mlx-path", str(out), "-q", "--requantize", "--q-bits", "8",
            "--q-group-size", "32")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and config["quantization"]["group_size"] == 32
    # -d: a quantized folder back to floats (mlx-lm's --dequantize).
    floats = tmp_path / "f"
    r = run("convert", str(out), str(floats), "-d", "--dtype", "float16")
    assert r.returncode == 0, r.stderr
    config = json.loads((floats / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float16"
    from safetensors import safe_open

    with safe_open(str(floats / "model.safetensors"), "np") as f:
        assert not any(k.endswith(".scales") for k in f.keys())
    # --force has only its long name; -f is generate's --file.
    r = run("convert", str(out), str(floats), "-f")
    assert r.returncode == 2 and "-f" in r.stderr
    r = run("convert", str(out), "--hf-path", str(out))
    assert r.returncode == 2 and "not both" in r.stderr


def test_chat_sampling_defaults_follow_the_model(smollm2_gguf_path, default_model, tmp_path):
    import shutil

    env_input = "/stats\n/exit\n"
    # SmolLM2's files carry no sampling values: Meta's defaults apply.
    r = run("chat", "-M", str(smollm2_gguf_path), stdin=env_input)
    assert r.returncode == 0, r.stderr
    assert "temp 0.6, top-p 0.9 (Meta's defaults)" in r.stdout
    # A folder whose generation_config.json recommends values: those apply, unless given.
    folder = tmp_path / "smol"
    shutil.copytree(default_model, folder)  # (the GGUF converted once, by the session's default_model)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(temperature=0.2, top_p=0.8)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    r = run("chat", "-M", str(folder), stdin=env_input)
    assert "temp 0.2, top-p 0.8 (the model's generation_config)" in r.stdout, r.stdout
    assert re.search(r"settings: temp 0\.2, top-p 0\.8", r.stdout)
    r = run("chat", "-M", str(folder), "--temp", "0.5", stdin=env_input)
    assert re.search(r"settings: temp 0\.5, top-p 0\.8", r.stdout), r.stdout
    # Each value names its own source: temp from the command line, top-p from the model.
    assert "temp 0.5 (command line), top-p 0.8 (the model's generation_config)" in r.stdout, r.stdout
    # (its converted folder, which carries none either, loads faster than the GGUF)
    r = run("chat", "-M", str(default_model), "--temp", "0", stdin=env_input)
    assert "temp 0 (command line), top-p 0.9 (Meta's defaults)" in r.stdout, r.stdout
    r = run("chat", "-M", str(default_model), "--temp", "0", "--top-p", "0.5", stdin=env_input)
    assert "temp 0, top-p 0.5 (command line)" in r.stdout, r.stdout
