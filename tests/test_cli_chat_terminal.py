"""Issue 13, items 1-4: the chat as a terminal user expects it, in a real pseudo-terminal (on SmolLM2
where the answers or its template matter, else on a random model: the terminal is what is tested).

Ctrl-C at the prompt clears the line; Ctrl-C during a long prefill is back at the prompt within
2 s; keys typed while an answer streams are not echoed and become the next input; /save writes a
readable conversation beside the cache and /load says truthfully what will be prefilled.
"""

import json
import re
import time

import pexpect
import pytest
from test_cli_chat import PROMPT, STATS, Chat, clean

from llama_mlx.chat import SESSION_FORMAT
from llama_mlx_cli.chat import LONG_PROMPT


@pytest.fixture(scope="module")
def smol(default_model):
    # SmolLM2's converted folder, not its GGUF: the same weights, loaded in 0.4 s instead of 2 s a process
    return str(default_model)


@pytest.fixture(scope="module")
def random_meta(tmp_path_factory):
    """A random 4-bit model with Meta's tokenizer, big enough that a prompt of a few hundred tokens
    takes a second or two to prefill (SmolLM2 takes half a minute here), and deterministic at temp 0."""
    import shutil

    import assets

    from benchmarks.random_model import SHAPES, write_random_model

    shape = {**SHAPES["tiny"], "hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
             "vocab_size": 128256}
    folder = write_random_model(tmp_path_factory.mktemp("random-meta") / "m", shape, dtype="float32")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # its own word-level tokenizer: Meta's instead
        (folder / name).unlink()
    shutil.copyfile(assets.TOKENIZER_MODEL, folder / "tokenizer.model")
    return str(folder)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    from llama_mlx.loading import weights_dir

    return AutoTokenizer.from_pretrained(str(weights_dir() / "SmolLM2-135M-Instruct"))


def test_ctrl_c_at_the_prompt_clears_the_line_and_save_load_are_truthful(smol, tmp_path, hf_tokenizer):
    # A short system prompt in place of SmolLM2's default one: fewer tokens to prefill, twice.
    chat = Chat("--model", smol, "--temp", "0", "--max-tokens", "8", "--system", "Be brief.")
    answer, _ = chat.ask("What is the capital of France?")
    assert "Paris" in answer

    # Half-typed text, then Ctrl-C: the line is cleared, the process and the conversation stay.
    chat.p.send("half typed words")
    chat.p.expect_exact("half typed words")  # echoed by readline: it is on the line
    chat.p.sendintr()
    chat.p.expect_exact("Ctrl-C again on an empty line")
    chat.wait_prompt()
    assert chat.p.isalive()
    history = chat.command("/history")
    assert "France" in history and "Paris" in history and "half typed" not in history
    # The cleared text is gone: the next line is a command of its own, not "half typed words/stats".
    out = chat.command("/stats")
    assert "exchanges: 1" in out

    # /help says how files are named.
    help_text = chat.command("/help")
    assert "JSON" in help_text and "named as given" in help_text and "FILE.safetensors" in help_text

    # /save NAME: the conversation as JSON in NAME exactly, the cache beside it in NAME.safetensors.
    name = tmp_path / "talk"
    out = chat.command(f"/save {name}")
    assert f"to {name} (JSON)" in out and f"{name}.safetensors" in out
    saved = json.loads(name.read_text(encoding="utf-8"))
    assert saved["format"] == SESSION_FORMAT
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant"]
    assert saved["messages"][1]["content"] == "What is the capital of France?"
    assert (tmp_path / "talk.safetensors").is_file()

    # A file that is not a saved chat: one clear error line, and the chat goes on.
    notes = tmp_path / "notes.txt"
    notes.write_text("just some notes\n")
    chat.p.sendline(f"/load {notes}")
    chat.wait_prompt()
    err = chat.log[-1]
    assert re.search(r"error: .*notes\.txt: not a saved chat \(not JSON", err), err
    assert "unexpected" not in err and "Traceback" not in err
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x00\x01 definitely not safetensors")
    chat.p.sendline(f"/load {bogus}")
    chat.wait_prompt()
    err = chat.log[-1]
    assert "bogus.safetensors: not a saved chat" in err and "unexpected" not in err, err

    # /load reports truthfully, counted against transformers' rendering of the same template:
    # with the cache, what it holds is not prefilled again (only the template's end of the answer,
    # never fed to the model, is left) ...
    ids = hf_tokenizer.apply_chat_template(saved["messages"], add_generation_prompt=False, tokenize=True)
    want = len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # newer transformers give a BatchEncoding
    out = chat.command(f"/load {name}")
    found = re.search(r"1 exchange, (\d+) tokens already in the KV cache(?:, (\d+) to prefill| \(no prefill)", out)
    assert found, out
    cached, left = int(found.group(1)), int(found.group(2) or 0)
    assert cached + left == want and cached > want - 4
    # ... and the conversation alone (its cache removed): every token of it is to prefill.
    (tmp_path / "talk.safetensors").unlink()
    out = chat.command(f"/load {name}")
    assert f"0 tokens already in the KV cache, {want} to prefill with the next answer" in out, out
    assert "no KV cache beside it" in out
    chat.command("/set max-tokens 1")  # the prefill is what counts here
    answer, stats = chat.ask("And of Italy?")
    assert int(stats.group(3)) == 0 and int(stats.group(2)) > want  # it really prefilled them all

    # Two Ctrl-C on an empty line leave, with code 0.
    chat.ctrl_c_at_prompt()
    chat.p.expect_exact("Ctrl-C again")
    chat.wait_prompt()
    chat.ctrl_c_at_prompt()
    chat.p.expect(pexpect.EOF)
    chat.p.close()
    assert chat.p.exitstatus == 0


def test_ctrl_c_during_a_long_prefill_is_back_at_the_prompt_within_2_seconds(random_meta):
    # A prompt of about 450 tokens: long enough to show progress (over LONG_PROMPT), and to be stopped in the middle.
    system = " ".join(f"Rule {i}: answer politely and mention the number {i * 7}." for i in range(30))
    chat = Chat("--model", random_meta, "--temp", "0", "--max-tokens", "4", "--system", system, timeout=600)
    chat.p.sendline("Which rule mentions 21?")
    chat.p.expect(r"reading the prompt… (\d+)/(\d+) tokens")
    done, total = int(chat.p.match.group(1)), int(chat.p.match.group(2))
    assert total > LONG_PROMPT and done < total
    sent = time.monotonic()
    chat.p.sendintr()
    chat.p.expect_exact(PROMPT)
    elapsed = time.monotonic() - sent
    out = clean(chat.p.before)
    assert elapsed < 2.0, f"back at the prompt after {elapsed:.2f}s"
    assert "stopped before the answer began" in out
    # The cache is consistent: it holds part of the system prompt, the question is dropped ...
    stats = chat.command("/stats")
    used = int(re.search(r"context: (\d+)/\d+", stats).group(1))
    assert 0 < used < total
    assert "Which rule" not in chat.command("/history")
    # ... and the next question reuses what was prefilled before the stop.
    answer, match = chat.ask("Which rule mentions 14?")
    assert int(match.group(3)) >= used - 1
    chat.p.sendeof()
    chat.p.expect(pexpect.EOF)


def test_keys_typed_while_streaming_are_not_echoed_and_become_the_next_input(random_meta):
    chat = Chat("--model", random_meta, "--temp", "0", "--max-tokens", "24")
    chat.p.sendline("Tell me a long story about a cat who sails the sea.")
    chat.p.expect(r"\?25h")  # the first token: streaming has begun
    chat.p.expect(r"[A-Za-z]+\W+[A-Za-z]+")
    chat.p.send("zebra\x7fquestion")  # a typo fixed with backspace while the answer streams
    chat.p.expect(r"peak [\d.]+ GB[^\r\n]*")
    answer = clean(chat.p.before)
    assert STATS.search(clean(chat.p.before + chat.p.after))
    assert "zebra" not in answer and "question" not in answer  # not echoed into the answer
    chat.p.expect_exact(PROMPT)
    chat.p.expect_exact("zebrquestion")  # the next input line starts with them, edited as typed
    chat.p.send(" mark?\r")
    chat.p.expect(r"peak [\d.]+ GB[^\r\n]*")
    chat.wait_prompt()
    history = chat.command("/history")
    assert "zebrquestion mark?" in history  # one message, intact
    chat.p.sendline("/exit")
    chat.p.expect(pexpect.EOF)
    chat.p.close()
    assert chat.p.exitstatus == 0
