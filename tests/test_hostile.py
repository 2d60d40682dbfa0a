"""Hostile files and absurd values (issue 12): each gets its named error, fast, in bounded memory.

Classes: 1 saves never replace what is not ours; 2 token ids past the vocabulary; 3 config values;
4 containment; 5 Meta .pth; 6 safetensors headers; 7 GGUF metadata; 8 chat templates; 9 prompt-cache
files; 10 the rest (seeds, a source cut short while converting, JSON nested 100k deep).
Where a class is about memory or time, the load runs in a child process under RLIMIT_AS, and the
child's peak RSS and wall time are asserted.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import assets
from llama_mlx.cache import PromptCache
from llama_mlx.checkpoints import read_checkpoint
from llama_mlx.checkpoints.base import expected_shapes
from llama_mlx.checkpoints.safe_pickle import _ALLOWED, load_pth
from llama_mlx.convert import convert
from llama_mlx.errors import (
    ArgumentError,
    ChatTemplateLimitError,
    CheckpointError,
    ConfigError,
    LlamaMLXError,
    OutsideModelError,
    PromptCacheError,
    TokenIdError,
    TokenizerError,
    UnsafeCheckpointError,
    UnsafeOutputError,
    VocabularyMismatchError,
)
from llama_mlx.generate import generate_step, stream_generate
from llama_mlx.gguf_file import read_gguf_header
from llama_mlx.loading import load
from llama_mlx.model import Model, ModelArgs
from llama_mlx.sample import make_sampler
from llama_mlx.tokenizer import load_tokenizer
from llama_mlx.tokenizer.chat_template import render_chat_template

REPO = Path(__file__).resolve().parent.parent
CONFIG = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "tie_word_embeddings": False}
MEMORY_LIMIT = 2 << 30  # RLIMIT_AS of the children
MAX_RSS_MB = 1200  # the interpreter with MLX and llama_mlx imported is ~300 MB


def write_tiny_hf(folder: Path, config: dict | None = None, tokenizer: bool = True) -> Path:
    """A random 2-layer Llama in a Hugging Face folder (config.json, model.safetensors, Meta's tokenizer.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG, **(config or {})}
    shapes = expected_shapes({**CONFIG, "head_dim": CONFIG["hidden_size"] // CONFIG["num_attention_heads"]})
    mx.random.seed(0)
    mx.save_safetensors(str(folder / "model.safetensors"), {k: mx.random.normal(s) * 0.02 for k, s in shapes.items()})
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer:
        shutil.copyfile(assets.TOKENIZER_JSON, folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_hf(tmp_path_factory.mktemp("hostile") / "tiny")


def copy_of(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def model():
    mx.random.seed(1)
    m = Model(ModelArgs(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, vocab_size=64))
    mx.eval(m.parameters())
    return m


CHILD = """
import json, resource, sys, time
start = time.monotonic()
def report(fn):
    try:
        fn()
        result = {"error": None, "message": ""}
    except BaseException as e:
        result = {"error": type(e).__name__, "message": str(e)}
    # VmHWM: this process's own peak; ru_maxrss keeps the forking parent's resident size across exec
    try:
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        result["maxrss_mb"] = int(hwm.split()[1]) / 1024
    except (OSError, StopIteration):
        result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["seconds"] = time.monotonic() - start
    print(json.dumps(result))
"""


def run_bounded(code: str, *args, timeout: float = 60) -> dict:
    """Run `code` (which calls report(fn)) in a child limited to MEMORY_LIMIT of address space."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CHILD + textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit, env=env, cwd=REPO)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    assert result["maxrss_mb"] < MAX_RSS_MB, result
    return result


def assert_bounded_error(result: dict, error: str, *words: str, seconds: float = 20) -> None:
    assert result["error"] == error, result
    assert result["seconds"] < seconds, result
    for w in words:
        assert w in result["message"], result
    assert "\n" not in result["message"]


# 1. Saving never replaces what is not ours ------------------------------------------------------------

def special_targets(tmp_path: Path) -> dict[str, Path]:
    """A symlink, a FIFO, a socket, a private character device (/dev/null's numbers) and a folder."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    targets = {"symlink": tmp_path / "link", "fifo": tmp_path / "fifo", "socket": tmp_path / "sock",
               "folder": tmp_path / "folder"}
    targets["symlink"].symlink_to(victim)
    os.mkfifo(targets["fifo"])
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(targets["socket"]))
    s.close()
    targets["folder"].mkdir()
    if os.geteuid() == 0:
        targets["device"] = tmp_path / "null"
        os.mknod(targets["device"], stat.S_IFCHR | 0o600, os.makedev(1, 3))
    return targets


def modes(targets: dict[str, Path]) -> dict[str, int]:
    return {k: os.lstat(p).st_mode for k, p in targets.items()}


def test_prompt_cache_save_refuses_links_devices_fifos_sockets_folders(tmp_path, model):
    targets = special_targets(tmp_path)
    before = modes(targets)
    pc = PromptCache(model)
    for kind, path in targets.items():
        with pytest.raises(UnsafeOutputError, match="refusing to replace it") as e:
            pc.save(path)
        assert str(path) in str(e.value), kind
    assert modes(targets) == before
    assert (tmp_path / "victim.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    regular = tmp_path / "cache.safetensors"
    regular.write_text("old")
    pc.save(regular)  # a regular file is ours to replace
    assert PromptCache.load(model, regular)[0].tokens == []


def test_convert_replaces_only_a_folder_it_wrote(tmp_path, tiny):
    targets = special_targets(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    targets["foreign folder"] = foreign
    regular = tmp_path / "file"
    regular.write_text("x")
    targets["regular file"] = regular
    del targets["folder"]  # an empty folder loses nothing: it may be replaced
    before = modes(targets)
    for kind, path in targets.items():
        with pytest.raises(UnsafeOutputError, match="refusing to replace it") as e:
            convert(tiny, path, force=True)
        assert str(path) in str(e.value), kind
    assert modes(targets) == before
    assert (foreign / "thesis.tex").read_text() == "years of work"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    ours = tmp_path / "ours"
    convert(tiny, ours)
    convert(tiny, ours, force=True, dtype="float16")  # our own folder: replaced
    assert json.loads((ours / "config.json").read_text())["torch_dtype"] == "float16"
    convert(tiny, tmp_path / "folder", force=True)  # the empty folder
    assert (tmp_path / "folder" / "config.json").is_file()


# 2. Token ids past the model's vocabulary ---------------------------------------------------------------

def test_tokenizer_larger_than_the_model_is_refused_at_load(tiny):
    with pytest.raises(VocabularyMismatchError, match=r"up to 128255.*holds 256") as e:
        load(tiny)
    assert str(tiny) in str(e.value)


def test_ids_past_the_vocabulary_never_reach_the_gather(model):
    for bad in ([1, 2, 64], [1, -1], [10**6]):
        with pytest.raises(TokenIdError, match="outside the model's vocabulary"):
            next(generate_step(mx.array(bad), model))
    tok = load_tokenizer(assets.TOKENIZER_MODEL)
    with pytest.raises(TokenIdError, match=r"token id \d+ is outside the model's vocabulary \(0\.\.63\)"):
        next(stream_generate(model, tok, "The capital of France", max_tokens=1))  # Meta's ids reach 128255
    with pytest.raises(TokenIdError):
        next(stream_generate(model, tok, [3, 64], max_tokens=1))
    assert isinstance(next(generate_step(mx.array([1, 2, 63]), model, max_tokens=1))[0], int)


# 3. Config values, checked before anything is allocated --------------------------------------------------

@pytest.mark.parametrize("changes, key", [
    ({"hidden_size": "32"}, "hidden_size"),
    ({"num_hidden_layers": 3}, "num_hidden_layers"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"head_dim": 7.5}, "head_dim"),
    ({"vocab_size": -5}, "vocab_size"),
    ({"rope_theta": -1}, "rope_theta"),
    ({"rope_theta": "big"}, "rope_theta"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
    ({"rope_traditional": 1}, "rope_traditional"),
    ({"rope_scaling": "llama3"}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3"}}, "factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "8"}}, "factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8}}, "rope_type"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"quantization": {"group_size": 0, "bits": 4}}, "group_size"),
])
def test_bad_config_values_are_config_errors_naming_the_key(tmp_path, tiny, changes, key):
    folder = copy_of(tiny, tmp_path / "m")
    edit_config(folder, **changes)
    with pytest.raises(ConfigError, match=key) as e:
        read_checkpoint(folder)
    assert str(folder) in str(e.value)


def test_meta_params_booleans_and_numbers(tmp_path):
    import test_checkpoints_support as S

    folder = S.write_meta(tmp_path / "meta", S.meta_state_dict(), shards=1, tokenizer=False)
    for changes, key in [({"use_scaled_rope": "no"}, "use_scaled_rope"), ({"dim": "64"}, "dim"),
                         ({"n_layers": 10**9}, "n_layers"), ({"norm_eps": -1e-5}, "norm_eps"),
                         ({"vocab_size": "256"}, "vocab_size")]:
        params = {**S.TINY_PARAMS, **changes}
        (folder / "params.json").write_text(json.dumps({k: v for k, v in params.items() if v is not None}))
        with pytest.raises(ConfigError, match=key) as e:
            read_checkpoint(folder)
        assert "params.json" in str(e.value)


BILLION_LAYERS = """
from pathlib import Path
from llama_mlx.loading import load
report(lambda: load(Path(sys.argv[1])))
"""


def test_a_billion_layers_in_a_300_byte_config_fails_fast(tmp_path, tiny):
    folder = copy_of(tiny, tmp_path / "m")
    edit_config(folder, num_hidden_layers=10**9)
    assert (folder / "config.json").stat().st_size < 300
    assert_bounded_error(run_bounded(BILLION_LAYERS, folder), "ConfigError", "num_hidden_layers", str(folder))
    edit_config(folder, num_hidden_layers=4000)  # within bounds, but not what the tensors hold
    assert_bounded_error(run_bounded(BILLION_LAYERS, folder), "ConfigError", "num_hidden_layers",
                         "the tensors hold layers 0..1")


# 4. Containment -------------------------------------------------------------------------------------------

def write_index(folder: Path, shard: str) -> None:
    names = list(mx.load(str(folder / "model.safetensors")))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))


def test_weight_map_entries_must_stay_inside_the_folder(tmp_path, tiny):
    outside = tmp_path / "x.safetensors"
    shutil.copyfile(tiny / "model.safetensors", outside)
    folder = copy_of(tiny, tmp_path / "m")
    for shard in ("../x.safetensors", str(outside), "sub/../../x.safetensors"):
        write_index(folder, shard)
        with pytest.raises(OutsideModelError, match="outside the model folder") as e:
            read_checkpoint(folder)
        assert "x.safetensors" in str(e.value)
    (folder / "escape.safetensors").symlink_to(outside)
    write_index(folder, "escape.safetensors")
    with pytest.raises(OutsideModelError, match="escape.safetensors: shard .* resolves outside"):
        read_checkpoint(folder)
    (folder / "sub").mkdir()
    os.rename(folder / "model.safetensors", folder / "sub" / "model.safetensors")
    (folder / "inside.safetensors").symlink_to("sub/model.safetensors")
    write_index(folder / "sub", "inside.safetensors")
    shutil.move(folder / "sub" / "model.safetensors.index.json", folder / "model.safetensors.index.json")
    assert read_checkpoint(folder).files == [folder / "inside.safetensors"]  # a link within the tree is fine


def test_tokenizer_file_linked_outside_is_not_read_or_copied(tmp_path, tiny):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"chat_template": "ssh-rsa AAAA..."}))
    folder = copy_of(tiny, tmp_path / "m")
    (folder / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(OutsideModelError, match="tokenizer_config.json: tokenizer file resolves outside"):
        read_checkpoint(folder)
    with pytest.raises(OutsideModelError):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(OutsideModelError):
        load_tokenizer(folder)


def test_hugging_face_cache_snapshot_links_into_its_blobs(tmp_path, tiny):
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, name in enumerate(("config.json", "model.safetensors", "tokenizer.json")):
        shutil.copyfile(tiny / name, blobs / f"blob{i}")
        (snap / name).symlink_to(f"../../blobs/blob{i}")
    ckpt = read_checkpoint(snap)
    assert ckpt.tokenizer_files == [snap / "tokenizer.json"]
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    shutil.copyfile(tiny / "tokenizer.json", other / "t")
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to(other / "t")  # another repository's blob: outside
    with pytest.raises(OutsideModelError):
        read_checkpoint(snap)


# 5. Meta .pth ---------------------------------------------------------------------------------------------

def write_pth(path: Path, pickle_bytes: bytes, records: dict[str, bytes] | None = None,
              compress: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


STRIDE_ZERO = """
from llama_mlx.checkpoints.safe_pickle import load_pth
def go():
    for t in load_pth(sys.argv[1]).values():
        t.to_mlx()
report(go)
"""


def test_stride_zero_views_are_refused_in_bounded_memory(tmp_path):
    import torch

    path = tmp_path / "consolidated.00.pth"
    torch.save({f"w{i}": torch.zeros(1).expand(2**28) for i in range(8)}, path)  # 8 GiB of views of 4 bytes
    assert path.stat().st_size < 8192
    assert_bounded_error(run_bounded(STRIDE_ZERO, path), "CheckpointError", str(path), "stride-0")


def _ints(values) -> bytes:
    return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"


def _storage_pickle(build_state: dict | None = None, *, numel: int = 2, offset: int = 0, size=(2,),
                    stride=(1,)) -> bytes:
    """A hand-made pickle: {'w': _rebuild_tensor_v2(FloatStorage record '0' of `numel`, offset, size, stride)},
    optionally preceded by a BUILD that sets the state of the allowed global torch.FloatStorage itself."""
    p = [b"\x80\x02", b"ctorch\nFloatStorage\n"]
    if build_state is not None:
        p.append(pickle.dumps(build_state, protocol=2)[2:-1] + b"b")  # BUILD on the global
    p.append(b"0")  # POP
    p.append(b"}X\x01\x00\x00\x00w")  # EMPTY_DICT, the key
    p.append(b"ctorch._utils\n_rebuild_tensor_v2\n(")  # the function, MARK of its arguments
    p.append(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
             + b"J" + struct.pack("<i", numel) + b"tQ")  # the persistent id, BINPERSID
    p.append(b"J" + struct.pack("<i", offset) + _ints(size) + _ints(stride) + b"\x89NtR")
    p.append(b"s.")  # SETITEM, STOP
    return b"".join(p)


RECORD = np.array([1.5, 2.5], np.float32).tobytes()


def test_tensor_extent_must_fit_its_storage(tmp_path):
    for i, (kw, words) in enumerate([
        ({"size": (3,)}, "past the end of its storage"),
        ({"offset": 2, "size": (), "stride": ()}, "past the end of its storage"),  # a scalar past the end
        ({"size": (2, 2), "stride": (0, 1)}, "larger than its storage record"),
        ({"size": (-1,)}, "invalid size or stride"),
        ({"numel": 4}, "shorter than its 4 elements"),
    ]):
        path = write_pth(tmp_path / f"{i}.pth", _storage_pickle(**kw), {"0": RECORD})
        with pytest.raises(CheckpointError, match=words) as e:
            load_pth(path)
        assert str(path) in str(e.value)


def test_a_file_cannot_mutate_the_allowed_objects(tmp_path):
    good = write_pth(tmp_path / "good.pth", _storage_pickle(), {"0": RECORD})
    assert np.array(load_pth(good)["w"].to_mlx()).tolist() == [1.5, 2.5]
    evil = write_pth(tmp_path / "evil.pth", _storage_pickle({"name": "LongStorage"}), {"0": RECORD})
    with pytest.raises(UnsafeCheckpointError, match="refused: the pickle sets the state of a _StorageType"):
        load_pth(evil)
    assert _ALLOWED[("torch", "FloatStorage")].name == "FloatStorage"
    assert load_pth(good)["w"].to_mlx().dtype == mx.float32  # later files load as before


def test_compressed_members_are_refused_before_inflating(tmp_path):
    bomb = write_pth(tmp_path / "bomb.pth", _storage_pickle(), {"0": b"\0" * (64 << 20)}, compress=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match=r"bomb\.pth: member archive/\S+ is compressed; torch never compresses"):
        load_pth(bomb)


def test_nesting_depth_is_bounded(tmp_path):
    import torch

    nested: dict = {"w": torch.ones(1)}
    for _ in range(40):
        nested = {"n": nested}
    torch.save(nested, tmp_path / "deep.pth")
    with pytest.raises(CheckpointError, match="nested more than 16 deep"):
        load_pth(tmp_path / "deep.pth")


# 6. safetensors headers -----------------------------------------------------------------------------------

def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entries, words", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, ["overlaps"]),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, ["outside the 16 data bytes"]),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 0]}}, ["outside"]),
    ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, ["non-negative integers"]),
    ({"a": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, ["non-negative integers"]),
    ({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, ["unknown dtype"]),
    ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}, ["needs 32"]),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16.0]}}, ["[begin, end]"]),
])
def test_safetensors_headers_are_checked_before_mlx_reads_them(tmp_path, tiny, entries, words):
    folder = copy_of(tiny, tmp_path / "m")
    write_safetensors(folder / "model.safetensors", entries, b"\0" * 16)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(folder)
    msg = str(e.value)
    assert "model.safetensors: truncated or corrupt safetensors file: tensor '" in msg, msg
    assert all(w in msg for w in words), msg


def test_safetensors_header_longer_than_the_file(tmp_path, tiny):
    folder = copy_of(tiny, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors file"):
        read_checkpoint(folder)


# 7. GGUF metadata -----------------------------------------------------------------------------------------

def gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + payload


U32, F32, STR, ARR = 4, 6, 8, 9


def write_gguf_metadata(path: Path, kvs: list[bytes], n_tensors: int = 0) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs))
    return path


def llama_kvs(**override) -> list[bytes]:
    values = {"llama.embedding_length": 32, "llama.attention.head_count": 4, "llama.block_count": 2,
              "llama.feed_forward_length": 64, "llama.vocab_size": 256, **override}
    kvs = [gguf_kv("general.architecture", STR, gguf_string("llama"))]
    for k, v in values.items():
        if isinstance(v, bytes):
            kvs.append(gguf_kv(k, STR, v))
        else:
            kvs.append(gguf_kv(k, U32, struct.pack("<I", v)))
    return kvs


@pytest.mark.parametrize("override, error, words", [
    ({"llama.attention.head_count": 0}, ConfigError, ["llama.attention.head_count", "positive integer"]),
    ({"llama.attention.head_count": gguf_string("32")}, ConfigError, ["llama.attention.head_count"]),
    ({"llama.block_count": 10**9}, ConfigError, ["num_hidden_layers"]),
    ({"general.alignment": 0}, CheckpointError, ["general.alignment", "power of two"]),
    ({"general.alignment": 24}, CheckpointError, ["general.alignment"]),
])
def test_gguf_metadata_values_are_validated(tmp_path, override, error, words):
    path = write_gguf_metadata(tmp_path / "m.gguf", llama_kvs(**override))
    with pytest.raises(error) as e:
        read_checkpoint(path)
    assert str(path) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_gguf_tokenizer_metadata_types(tmp_path):
    path = write_gguf_metadata(tmp_path / "t.gguf", [
        gguf_kv("tokenizer.ggml.model", STR, gguf_string("gpt2")),
        gguf_kv("tokenizer.ggml.tokens", U32, struct.pack("<I", 7)),
    ])
    with pytest.raises(TokenizerError, match="'tokenizer.ggml.tokens' must be a list of strings"):
        load_tokenizer(path)


NESTED_GGUF = """
from llama_mlx.gguf_file import read_gguf_header
report(lambda: read_gguf_header(sys.argv[1]))
"""


def test_gguf_arrays_nested_100k_deep_fail_fast(tmp_path):
    depth = 100_000
    payload = (struct.pack("<IQ", ARR, 1)) * depth + struct.pack("<IQ", U32, 0)
    path = write_gguf_metadata(tmp_path / "deep.gguf", [gguf_string("x") + struct.pack("<I", ARR) + payload])
    assert_bounded_error(run_bounded(NESTED_GGUF, path), "CheckpointError", str(path), "nests arrays")
    huge = write_gguf_metadata(tmp_path / "huge.gguf", [gguf_kv("x", ARR, struct.pack("<IQ", STR, 2**62))])
    with pytest.raises(CheckpointError, match="claims 4611686018427387904 items"):
        read_gguf_header(huge)


# 8. Chat templates ----------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hi"}]
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"

TEMPLATE_CHILD = """
from llama_mlx.tokenizer import load_tokenizer
report(lambda: load_tokenizer(sys.argv[1]).apply_chat_template([{"role": "user", "content": "hi"}]))
"""


def test_a_template_looping_ten_billion_times_is_refused_quickly(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copyfile(assets.TOKENIZER_JSON, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": LOOP}))
    result = run_bounded(TEMPLATE_CHILD, folder)
    assert_bounded_error(result, "ChatTemplateLimitError", "steps", seconds=25)


@pytest.mark.parametrize("template", [
    "{{ 'a' * 10000000000 }}",
    "{{ 2 ** 10000000000 }}",
    "{{ 'a'|center(10000000000) }}",
    "{{ 'a'.ljust(10**10) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
    "{% for i in range(100000) %}{{ 'x' * 60000 }}{% endfor %}",
])
def test_templates_that_multiply_text_are_refused(template):
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match="chat template"):
        render_chat_template(template, MESSAGES, True)
    assert time.monotonic() - t0 < 10


def test_bounded_rendering_keeps_ordinary_templates_working():
    assert render_chat_template("{% for m in messages %}<{{ m.role }}>{{ m.content ~ '!' }}{% endfor %}",
                                MESSAGES * 3, False) == "<user>hi!" * 3


# 9. Prompt-cache files ------------------------------------------------------------------------------------

def saved_cache(model, path: Path, **options) -> Path:
    pc = PromptCache(model, **options)
    tokens = [1, 2, 3, 4, 5]
    model(mx.array([tokens]), pc.cache)
    pc.record(tokens)
    pc.save(path, metadata={"note": "x"})
    return path


def rewrite(path: Path, edit) -> None:
    arrays, header = mx.load(str(path), return_metadata=True)
    info = json.loads(header["llama_mlx"])
    meta = json.loads(header["metadata"])
    arrays = edit(arrays, info, meta) or arrays
    mx.save_safetensors(str(path), arrays, metadata={"llama_mlx": json.dumps(info), "metadata": json.dumps(meta)})


def _set(d: dict, **kv):
    d.update(kv)


@pytest.mark.parametrize("edit, words", [
    (lambda a, i, m: _set(i, tokens=i["tokens"][:-1]), ["4 tokens need [1, 2, 4, 8]"]),
    (lambda a, i, m: _set(i, tokens=[1, 2, 3, 4, 999]), ["token ids below 64"]),
    (lambda a, i, m: _set(i, tokens="12345"), ["'tokens'"]),
    (lambda a, i, m: _set(i["layers"][0], kind="os.system"), ["unknown cache kind"]),
    (lambda a, i, m: _set(i["layers"][1], kind="RotatingKVCache", max_size=8, keep=4, offset=5), ["RotatingKVCache"]),
    (lambda a, i, m: _set(i, layers=i["layers"][:1]), ["1 layers, the model 2"]),
    (lambda a, i, m: _set(m, options={"max_kv_size": "big"}), ["max_kv_size"]),
    (lambda a, i, m: _set(m, options={"rm_rf": True}), ["options"]),
    (lambda a, i, m: _set(i, fingerprint="0" * 32), ["saved for another model"]),
    (lambda a, i, m: _set(i["layers"][0], n=1), ["arrays do not fit"]),
    (lambda a, i, m: {**a, "0.0": mx.zeros((1, 2, 5, 3))}, ["array 0.0", "need [1, 2, 5, 8]"]),
    (lambda a, i, m: {**a, "9.9": mx.zeros((1,))}, ["unexpected array"]),
])
def test_inconsistent_prompt_caches_are_named_errors(tmp_path, model, edit, words):
    path = saved_cache(model, tmp_path / "c.safetensors")
    rewrite(path, edit)
    with pytest.raises(PromptCacheError) as e:
        PromptCache.load(model, path)
    assert str(path) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_truncated_foreign_and_other_models_caches(tmp_path, model):
    path = saved_cache(model, tmp_path / "c.safetensors")
    loaded, meta = PromptCache.load(model, path)
    assert loaded.tokens == [1, 2, 3, 4, 5] and meta == {"note": "x"}
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    cut = r"cut\.safetensors: truncated or corrupt safetensors file: tensor .* outside"
    with pytest.raises(PromptCacheError, match=cut):
        PromptCache.load(model, tmp_path / "cut.safetensors")
    mx.save_safetensors(str(tmp_path / "foreign.safetensors"), {"w": mx.zeros((2,))})
    with pytest.raises(PromptCacheError, match="not a llama-mlx prompt cache"):
        PromptCache.load(model, tmp_path / "foreign.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(PromptCacheError, match="truncated"):
        PromptCache.load(model, tmp_path / "text.safetensors")
    mx.random.seed(7)
    other = Model(ModelArgs(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, vocab_size=64))
    other.model.norm.weight = other.model.norm.weight * 2  # same shapes, other weights
    with pytest.raises(PromptCacheError, match="saved for another model"):
        PromptCache.load(other, path)
    q = saved_cache(model, tmp_path / "q.safetensors")
    rewrite(q, lambda a, i, m: _set(m, options={"kv_bits": 8, "kv_group_size": 32}))
    with pytest.raises(PromptCacheError, match="a KVCache where the saved options make a QuantizedKVCache"):
        PromptCache.load(model, q)


# 10. The rest: seeds, a source cut short while converting, JSON nested 100k deep ------------------------

@pytest.mark.parametrize("seed", [-1, 2**70, True, "1"])
def test_seeds_out_of_range_are_argument_errors(seed):
    with pytest.raises(ArgumentError, match="seed must be an integer from 0 to 2\\*\\*64 - 1"):
        make_sampler(0.7, seed=seed)
    assert issubclass(ArgumentError, (LlamaMLXError, ValueError))


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
def test_cli_seed_out_of_range_is_one_line(smollm2_gguf_path, seed):
    exe = Path(sys.executable).with_name("llama-mlx")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "llama_mlx_cli.main"]
    r = subprocess.run([*cmd, "generate", "--model", str(smollm2_gguf_path), "--seed", seed, "--temp", "0.7",
                        "--max-tokens", "1", "hi"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "seed" in lines[0], r.stderr


def test_a_source_truncated_while_converting_is_named(tmp_path, tiny):
    src = copy_of(tiny, tmp_path / "src")

    def cut(progress):
        if progress.done == 1:
            os.truncate(src / "model.safetensors", 4096)

    with pytest.raises(CheckpointError, match=r"src/model\.safetensors: truncated or unreadable while converting"):
        convert(src, tmp_path / "out", progress=cut)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_pth_truncated_while_converting_is_named(tmp_path):
    import test_checkpoints_support as S

    src = S.write_meta(tmp_path / "meta", S.meta_state_dict(), shards=1)
    shard = src / "consolidated.00.pth"

    def cut(progress):
        if progress.done == 1:
            os.truncate(shard, shard.stat().st_size // 3)

    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: truncated while reading storage record"):
        convert(src, tmp_path / "out", progress=cut)
    assert not (tmp_path / "out").exists()


DEEP_JSON = """
from pathlib import Path
from llama_mlx.loading import load
from llama_mlx.cache import PromptCache
from llama_mlx.tokenizer import load_tokenizer
kind, path = sys.argv[1], Path(sys.argv[2])
if kind == "config":
    report(lambda: load(path))
elif kind == "tokenizer":
    report(lambda: load_tokenizer(path))
else:
    from llama_mlx.model import Model, ModelArgs
    m = Model(ModelArgs(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=64))
    report(lambda: PromptCache.load(m, path))
"""


def test_json_nested_100k_deep(tmp_path, tiny):
    deep = "[" * 100_000 + "]" * 100_000
    folder = copy_of(tiny, tmp_path / "m")
    (folder / "config.json").write_text(deep)
    assert_bounded_error(run_bounded(DEEP_JSON, "config", folder), "ConfigError", "config.json",
                         "nested too deeply")
    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copyfile(assets.TOKENIZER_JSON, tok / "tokenizer.json")
    (tok / "tokenizer_config.json").write_text(deep)
    assert_bounded_error(run_bounded(DEEP_JSON, "tokenizer", tok), "TokenizerError", "tokenizer_config.json",
                         "nested too deeply")
    cache = tmp_path / "c.safetensors"
    mx.save_safetensors(str(cache), {"0.0": mx.zeros((1,))}, metadata={"llama_mlx": deep})
    assert_bounded_error(run_bounded(DEEP_JSON, "cache", cache), "PromptCacheError", "nested too deeply")
    (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep.encode())
    with pytest.raises(PromptCacheError, match="nested too deeply"):
        PromptCache.load(Model(ModelArgs(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=64)), tmp_path / "h.safetensors")
