"""Saves (`/save`, prompt caches, atomic writes) cannot be redirected by links planted in the folder,
replace only regular files, and save a pair of files both or neither.

The attack: a link planted at a guessable temporary name (the old `.NAME.PID.tmp`) made the save write
through it, overwriting the link's target. Here links are planted at every name the old scheme used."""

import json
import os
from pathlib import Path

import assets
import mlx.core as mx
import pytest

from llama_mlx import fileio
from llama_mlx.cache import PromptCache
from llama_mlx.chat import ChatSession
from llama_mlx.errors import UnsafeOutputError
from llama_mlx.model import Model, ModelArgs
from llama_mlx.sample import make_sampler
from llama_mlx.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def session_parts():
    mx.random.seed(3)
    model = Model(ModelArgs(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, vocab_size=128256))
    mx.eval(model.parameters())
    return model, load_tokenizer(assets.TOKENIZER_MODEL)


def talked(session_parts, question="Hi") -> ChatSession:
    model, tok = session_parts
    session = ChatSession(model, tok, max_tokens=2, sampler=make_sampler(0.0))
    session.add_user(question)
    list(session.respond())
    return session


def plant(folder: Path, names: list[str]) -> tuple[Path, list[Path]]:
    victim = folder / "victim.txt"
    victim.write_text("precious")
    links = [folder / n for n in names]
    for link in links:
        link.symlink_to(victim)
    return victim, links


def old_temp_names(target: str, suffix: str = "") -> list[str]:
    """The temporary names the old scheme derived from the pid (nested, as the chat's cache save had them)."""
    pid = os.getpid()
    first = f".{target}.{pid}.tmp{suffix}"
    return [first, f".{first}.{pid}.tmp{suffix}"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and not p.is_symlink())


def test_links_at_the_old_temp_names_do_not_redirect_saves(tmp_path, session_parts):
    names = (old_temp_names("c.safetensors", ".safetensors") + old_temp_names("talk.safetensors", ".safetensors")
             + old_temp_names("talk.json") + old_temp_names("talk.json", ".safetensors") + old_temp_names("x.txt"))
    victim, links = plant(tmp_path, names)
    session = talked(session_parts)
    for save in (lambda: PromptCache(session_parts[0]).save(tmp_path / "c.safetensors"),
                 lambda: session.save(tmp_path / "talk.json"),
                 lambda: fileio.atomic_write_text(tmp_path / "x.txt", "new")):
        save()
        assert victim.read_text() == "precious"
    assert all(link.is_symlink() and link.resolve() == victim for link in links)
    assert (tmp_path / "x.txt").read_text() == "new"
    again = ChatSession(*session_parts, max_tokens=2)
    assert again.load(tmp_path / "talk.json")["cached"] == len(session.cache.tokens) > 0
    assert leftovers(tmp_path) == []


def test_temp_names_are_random_new_regular_files_not_the_pid(tmp_path):
    target = tmp_path / "out.bin"
    seen = []
    for _ in range(2):
        with fileio.atomic_files([target]) as (f,):
            f.write(b"x")
            (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.bin.")]
            assert tmp.is_file() and not tmp.is_symlink() and os.lstat(tmp).st_nlink == 1
            seen.append(tmp.name)
    pid = os.getpid()
    assert seen[0] != seen[1]
    for name in seen:
        random_part = name.removeprefix(".out.bin.").removesuffix(".tmp")
        assert len(random_part) >= 24 and int(random_part, 16) >= 0, name  # 96 random bits, hex
        assert name not in (f".out.bin.{pid}.tmp", f".out.bin.{pid}")
    assert target.read_bytes() == b"x" and leftovers(tmp_path) == []


def test_a_pair_is_refused_whole_when_either_path_is_a_link(tmp_path, session_parts):
    session = talked(session_parts)
    victim, (link,) = plant(tmp_path, ["talk.json"])
    with pytest.raises(UnsafeOutputError, match="symbolic link"):
        session.save(tmp_path / "talk.json")
    assert not (tmp_path / "talk.safetensors").exists()  # the cache half is not left behind
    (tmp_path / "other.json").write_text("mine")
    (tmp_path / "other.safetensors").symlink_to(victim)
    with pytest.raises(UnsafeOutputError, match="symbolic link"):
        session.save(tmp_path / "other.json")
    assert (tmp_path / "other.json").read_text() == "mine"
    assert victim.read_text() == "precious" and link.is_symlink()
    assert leftovers(tmp_path) == []


def test_a_link_planted_while_writing_refuses_the_whole_pair(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("old a")
    victim, _ = plant(tmp_path, [])
    with pytest.raises(UnsafeOutputError, match="symbolic link"), fileio.atomic_files([a, b]) as (fa, fb):
        fa.write(b"new a")
        fb.write(b"new b")
        b.symlink_to(victim)  # checked again just before the renames
    assert a.read_text() == "old a" and victim.read_text() == "precious"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("swap", ["exchange", "hard link", "rename"])
def test_a_failing_second_rename_leaves_neither_file(tmp_path, session_parts, monkeypatch, swap):
    """A disk error at the last step (the conversation's rename) undoes the cache's rename: an earlier
    save stays whole, and a first save leaves nothing. Every way of keeping the old file is tried."""
    if swap != "exchange":
        monkeypatch.setattr(fileio, "exchange_paths", lambda a, b: False)
    if swap == "rename":
        def no_links(*args, **kwargs):
            raise PermissionError(1, "links not supported here")
        monkeypatch.setattr(os, "link", no_links)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name.endswith(".json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    first, second = talked(session_parts, "Hi"), talked(session_parts, "Something else entirely")
    first.save(tmp_path / "kept.json")
    before = {p: p.read_bytes() for p in (tmp_path / "kept.json", tmp_path / "kept.safetensors")}
    monkeypatch.setattr(os, "replace", replace)
    for name in ("kept.json", "fresh.json"):
        with pytest.raises(OSError, match="No space left"):
            second.save(tmp_path / name)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "fresh.json").exists() and not (tmp_path / "fresh.safetensors").exists()
    assert leftovers(tmp_path) == []
    assert json.loads((tmp_path / "kept.json").read_text())["messages"] == first.messages
