"""LoRA/DoRA adapters as mlx-lm writes them, against mlx-lm itself: adapters made with
`mlx_lm.tuner.utils.linear_to_lora_layers` and saved as its trainer saves them, then our adapted logits
vs `mlx_lm.load(adapter_path=...)`, `generate --adapter-path` (a real process) vs mlx-lm's greedy tokens,
`convert --adapter-path` vs `mlx_lm.fuse`'s model, `serve --adapter-path` answering, and hostile adapter
folders refused in one line. Tiny random models (4-bit, and the same dequantized to float32)."""

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from llama_mlx.errors import AdapterError
from llama_mlx.loading import load
from test_server import Server

CLI = Path(sys.executable).with_name("llama-mlx")
PROMPT = "t5 t9 t33 t70"
IDS = mx.array([[5, 9, 33, 70, 100, 7]])
EOS = 2  # the random model's tokenizer: <|end_of_text|>


def run(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    env["COLUMNS"] = "300"  # (tables unwrapped: long temp paths stay whole)
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def make_adapter(base: Path, out: Path, *, kind: str = "lora", num_layers: int = 1, keys=None, seed: int = 0) -> Path:
    """An adapter as `mlx_lm.lora --train` leaves it: mlx-lm's own LoRA layers (non-zero lora_b, so the
    adapter changes the outputs; DoRA magnitudes moved off the base norms), its trainable parameters
    saved to adapters.safetensors and its config through mlx-lm's save_config."""
    import mlx_lm
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save_config

    model, _ = mlx_lm.load(str(base))
    model.freeze()
    params = {"rank": 4, "scale": 2.0, "dropout": 0.0, **({"keys": keys} if keys is not None else {})}
    linear_to_lora_layers(model, num_layers, params, use_dora=kind == "dora")
    mx.random.seed(seed)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    for name, v in trainable.items():
        if name.endswith(".lora_b"):
            trainable[name] = 0.5 * mx.random.normal(v.shape)
        elif name.endswith(".m"):
            trainable[name] = v * (1 + 0.3 * mx.random.uniform(shape=v.shape))
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), trainable)
    save_config({"fine_tune_type": kind, "num_layers": num_layers, "lora_parameters": params},
                out / "adapter_config.json")
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"q4": 4-bit base, "f32": it dequantized, "lora": LoRA on the last layer (every linear),
    "dora": DoRA on both layers' q_proj and down_proj, "untied": a 4-bit base with an output head,
    "head": LoRA on its last v_proj and its lm_head (a model-level key), "q4h": a 4-bit base with float16
    scales (where the arithmetic of a fuse decides the re-quantized codes)}."""
    from benchmarks.random_model import SHAPES, write_random_model
    from llama_mlx.convert import convert

    root = tmp_path_factory.mktemp("lora")
    # 256 ids, all in the tokenizer: every generated token shows in the text
    q4 = write_random_model(root / "q4", {**SHAPES["tiny"], "vocab_size": 256}, dtype="float32")
    f32 = convert(q4, root / "f32", dequantize=True).path
    untied = write_random_model(root / "untied", {**SHAPES["tiny"], "vocab_size": 256, "tie_word_embeddings": False},
                                dtype="float32")
    return {"q4": q4, "f32": f32, "lora": make_adapter(f32, root / "lora"),
            "dora": make_adapter(q4, root / "dora", kind="dora", num_layers=2,
                                 keys=["self_attn.q_proj", "mlp.down_proj"], seed=1),
            "untied": untied, "head": make_adapter(untied, root / "head", keys=["self_attn.v_proj", "lm_head"], seed=2),
            "q4h": write_random_model(root / "q4h", {**SHAPES["tiny"], "vocab_size": 256}, dtype="float16")}


def mlx_lm_greedy(base: Path, adapter, n: int) -> tuple[list[int], str]:
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, tokenizer = mlx_lm.load(str(base), adapter_path=str(adapter) if adapter else None)
    tokens = []
    for token, _ in generate_step(mx.array(tokenizer.encode(PROMPT)), model, max_tokens=n):
        if token == EOS:
            break
        tokens.append(int(token))
    return tokens, tokenizer.decode(tokens)


@pytest.mark.parametrize("base,adapter", [("f32", "lora"), ("q4", "lora"), ("q4", "dora"), ("f32", "dora"),
                                          ("untied", "head")])
def test_adapted_logits_match_mlx_lm(folders, base, adapter):
    import mlx_lm

    theirs, _ = mlx_lm.load(str(folders[base]), adapter_path=str(folders[adapter]))
    ours, _ = load(folders[base], adapter_path=folders[adapter])
    plain, _ = load(folders[base])
    want, got = theirs(IDS), ours(IDS)
    assert mx.abs(want - plain(IDS)).max().item() > 0.5  # the adapter matters here
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item(), mx.abs(got - want).max().item()


def test_adapted_projections_stay_apart_under_fusion(folders):
    # GPU rows fuse q/k/v and gate/up at load: adapted projections must keep their own matmuls.
    import mlx_lm

    theirs, _ = mlx_lm.load(str(folders["f32"]), adapter_path=str(folders["dora"]))
    ours, _ = load(folders["f32"], adapter_path=folders["dora"], fuse=True)  # q_proj adapted, k/v plain
    assert hasattr(ours.layers[0].self_attn, "qkv_proj")
    assert mx.allclose(ours(IDS), theirs(IDS), atol=1e-4, rtol=1e-4).item()


def test_batched_decoding_on_the_metal_row(folders, backend_row):
    # The Metal row (forced here on the CPU): projections fused at load, a batch's step compiled.
    import mlx_lm
    from mlx_lm.generate import generate_step

    from llama_mlx.batch import BatchEngine

    backend_row("metal")
    model, tokenizer = load(folders["q4"], adapter_path=folders["lora"])
    theirs, _ = mlx_lm.load(str(folders["q4"]), adapter_path=str(folders["lora"]))
    prompts = [[5, 9, 33], [70, 100, 7, 12, 40], [200]]
    engine = BatchEngine(model, tokenizer, max_batch=4)
    assert engine.bucketed and hasattr(model.layers[1].self_attn, "qkv_proj")  # compiled step, fused projections
    reqs = [engine.submit(p, max_tokens=6, stop_tokens=()) for p in prompts]
    while engine.has_work():
        engine.step()
    for p, r in zip(prompts, reqs):
        assert r.tokens == [int(t) for t, _ in generate_step(mx.array(p), theirs, max_tokens=6)]


def test_library_fuse_matches_mlx_lm_fuse(folders):
    from llama_mlx.lora import LoRALinear, fuse

    ours, _ = load(folders["q4"], adapter_path=folders["lora"])
    fuse(ours)
    assert not any(isinstance(m, LoRALinear) for _, m in ours.named_modules())
    want = _fused_by_mlx_lm(folders["q4"], folders["lora"], False)(IDS)
    assert mx.allclose(ours(IDS), want, atol=1e-4, rtol=1e-4).item()


def test_saved_prompt_cache_knows_the_adapter(folders, tmp_path):
    from llama_mlx import PromptCache, generate
    from llama_mlx.errors import PromptCacheError

    plain, tokenizer = load(folders["q4"])
    adapted, _ = load(folders["q4"], adapter_path=folders["lora"])
    for model, name in ((plain, "plain"), (adapted, "adapted")):
        cache = PromptCache(model)
        generate(model, tokenizer, PROMPT, max_tokens=2, prompt_cache=cache)
        cache.save(tmp_path / f"{name}.safetensors")
    assert PromptCache.load(adapted, tmp_path / "adapted.safetensors")[0].offset > 0
    with pytest.raises(PromptCacheError, match="another model"):
        PromptCache.load(adapted, tmp_path / "plain.safetensors")
    with pytest.raises(PromptCacheError, match="another model"):
        PromptCache.load(plain, tmp_path / "adapted.safetensors")


def test_generate_cli_matches_mlx_lm_token_for_token(folders):
    tokens, text = mlx_lm_greedy(folders["q4"], folders["lora"], 16)
    assert tokens and tokens != mlx_lm_greedy(folders["q4"], None, 16)[0]
    r = run("generate", "-M", folders["q4"], "--adapter-path", folders["lora"], "--raw", PROMPT,
            "--temp", "0", "--max-tokens", 16, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["text"], out["generation_tokens"]) == (text, len(tokens) + (len(tokens) < 16))


def _fused_by_mlx_lm(base: Path, adapter: Path, dequantize: bool):
    """mlx_lm.fuse's model: load with the adapter, each adapted layer's fuse(), as its main() does."""
    import mlx_lm

    model, _ = mlx_lm.load(str(base), adapter_path=str(adapter))
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    return model


@pytest.mark.parametrize("base,adapter,dequantize", [("q4", "lora", False), ("q4h", "lora", False),
                                                      ("q4", "dora", False), ("q4", "dora", True),
                                                      ("f32", "lora", False)])
def test_convert_fuses_as_mlx_lm_fuse(folders, tmp_path, base, adapter, dequantize):
    import mlx_lm

    out = tmp_path / "fused"
    if (base, adapter) == ("q4", "lora"):  # once through the CLI
        r = run("convert", folders[base], out, "--adapter-path", folders[adapter])
        assert r.returncode == 0, r.stderr
        assert f"Adapter {folders[adapter]} (fused in)" in " ".join(r.stdout.split())
    else:
        from llama_mlx.convert import convert

        convert(folders[base], out, adapter_path=folders[adapter], dequantize=dequantize)
    config = json.loads((out / "config.json").read_text())
    source = json.loads((folders[base] / "config.json").read_text())
    assert config.get("quantization") == (None if dequantize else source.get("quantization"))
    theirs = _fused_by_mlx_lm(folders[base], folders[adapter], dequantize)
    written, _ = mlx_lm.load(str(out))  # our output, read by mlx-lm
    if not dequantize:  # re-quantized with mlx-lm's arithmetic: the same codes, scales and biases
        want = dict(tree_flatten(theirs.parameters()))
        got = dict(tree_flatten(written.parameters()))
        assert got.keys() == want.keys()
        assert [k for k in want if not mx.array_equal(got[k], want[k]).item()] == []
    want = theirs(IDS)
    assert mx.allclose(written(IDS), want, atol=1e-4, rtol=1e-4).item()
    if base != "q4h":  # (float16 activations in mlx-lm there, float32 in ours on the CPU)
        assert mx.allclose(load(out)[0](IDS), want, atol=1e-4, rtol=1e-4).item()


def test_serve_with_adapter(folders, tmp_path):
    adapted, base = mlx_lm_greedy(folders["q4"], folders["lora"], 8)[1], mlx_lm_greedy(folders["q4"], None, 8)[1]
    assert adapted != base
    server = Server(tmp_path, "--adapter-path", str(folders["lora"]), model=folders["q4"])
    try:
        oai = server.openai()
        answer = oai.completions.create(model="q4", prompt=PROMPT, max_tokens=8, temperature=0)
        assert answer.choices[0].text == adapted
        # The same weights by path, without the adapter: another model of the registry
        plain = oai.completions.create(model=str(folders["q4"]), prompt=PROMPT, max_tokens=8, temperature=0)
        assert plain.choices[0].text == base
        assert oai.completions.create(model="q4", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text == adapted
    finally:
        server.stop()


# -- hostile adapter folders


def _copy(folders, tmp_path, which="lora") -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(folders[which], bad)
    return bad


def _edit_config(folder: Path, change) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _edit_tensors(folder: Path, change) -> None:
    tensors = dict(mx.load(str(folder / "adapters.safetensors")))
    change(tensors)
    mx.save_safetensors(str(folder / "adapters.safetensors"), tensors)


def _huge_header(folder: Path) -> None:
    # A header that declares a [2**40, 4] float32 lora_a over 16 bytes of data.
    header = json.dumps({"model.layers.1.self_attn.q_proj.lora_a":
                         {"dtype": "F32", "shape": [2**40, 4], "data_offsets": [0, 2**44]}}).encode()
    (folder / "adapters.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))


def _nan(tensors):
    name = "model.layers.1.mlp.up_proj.lora_b"
    tensors[name] = mx.where(mx.arange(tensors[name].size).reshape(tensors[name].shape) == 3, math.nan,
                             tensors[name])


def _outside_link(folder: Path) -> None:
    outside = folder.parent / "elsewhere.json"
    outside.write_text((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").symlink_to(outside)


HOSTILE = {
    "missing weights": (lambda f: (f / "adapters.safetensors").unlink(), ["adapters.safetensors", "missing"]),
    "unknown type": (lambda f: _edit_config(f, lambda c: c.update(fine_tune_type="qlora")), ["fine_tune_type", "qlora"]),
    "full fine-tune": (lambda f: _edit_config(f, lambda c: c.update(fine_tune_type="full")), ["full"]),
    "rank zero": (lambda f: _edit_config(f, lambda c: c["lora_parameters"].update(rank=0)), ["rank", "at least 1"]),
    "rank text": (lambda f: _edit_config(f, lambda c: c["lora_parameters"].update(rank="8")), ["rank", "integer"]),
    "rank mismatch": (lambda f: _edit_config(f, lambda c: c["lora_parameters"].update(rank=5)),
                      ["lora_a", "at rank 5", ", 5]"]),
    "huge rank": (lambda f: _edit_config(f, lambda c: c["lora_parameters"].update(rank=10**12)), ["rank"]),
    "scale NaN": (lambda f: (f / "adapter_config.json").write_text(
        (f / "adapter_config.json").read_text().replace('"scale": 2.0', '"scale": NaN')), ["scale", "finite"]),
    "no scale": (lambda f: _edit_config(f, lambda c: c["lora_parameters"].pop("scale")), ["scale", "missing"]),
    "key outside model": (lambda f: _edit_config(f, lambda c: c["lora_parameters"].update(keys=["self_attn.w_q"])),
                          ["keys", "self_attn.w_q", "lacks"]),
    "key on a norm": (lambda f: _edit_config(f, lambda c: c["lora_parameters"].update(keys=["input_layernorm"])),
                      ["input_layernorm", "linear"]),
    "layer outside model": (lambda f: _edit_tensors(f, lambda t: t.update(
        {"model.layers.7.self_attn.q_proj.lora_a": mx.zeros((128, 4)),
         "model.layers.7.self_attn.q_proj.lora_b": mx.zeros((4, 128))})), ["model.layers.7.self_attn.q_proj"]),
    "shape mismatch": (lambda f: _edit_tensors(f, lambda t: t.update(
        {"model.layers.1.self_attn.k_proj.lora_b": mx.zeros((4, 128))})), ["k_proj.lora_b", "[4, 64]"]),
    "lone lora_a": (lambda f: _edit_tensors(f, lambda t: t.pop("model.layers.1.mlp.up_proj.lora_b")),
                    ["up_proj.lora_b", "missing"]),
    "foreign tensor": (lambda f: _edit_tensors(f, lambda t: t.update({"model.layers.1.mlp.up_proj.weight":
                                                                          mx.zeros((256, 128))})), ["weight"]),
    "NaN values": (lambda f: _edit_tensors(f, _nan), ["up_proj.lora_b", "NaN"]),
    "huge declared size": (_huge_header, ["adapters.safetensors", "q_proj.lora_a"]),
    "config links outside": (_outside_link, ["outside the adapter folder"]),
    "weights a FIFO": (lambda f: ((f / "adapters.safetensors").unlink(), os.mkfifo(f / "adapters.safetensors")),
                       ["not a regular file"]),
    "config too large": (lambda f: (f / "adapter_config.json").write_text(" " * (2 << 20) + "{}"), ["bytes"]),
    "config not JSON": (lambda f: (f / "adapter_config.json").write_text("{rank: 8"), ["JSON"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_adapter_refused(folders, tmp_path, case):
    spoil, words = HOSTILE[case]
    bad = _copy(folders, tmp_path)
    spoil(bad)
    with pytest.raises(AdapterError) as e:
        load(folders["q4"], adapter_path=bad)
    for word in words:
        assert word in str(e.value), str(e.value)


@pytest.mark.parametrize("case,command", [  # (one process each: the rest are checked in-process above)
    ("huge declared size", "generate"), ("shape mismatch", "convert"), ("rank zero", "serve"),
    ("key outside model", "chat"),
])
def test_hostile_adapter_cli_one_line(folders, tmp_path, case, command):
    spoil, words = HOSTILE[case]
    bad = _copy(folders, tmp_path)
    spoil(bad)
    args = {"generate": ["generate", "-M", folders["q4"], "--raw", PROMPT, "--max-tokens", 2],
            "convert": ["convert", folders["q4"], tmp_path / "out"],
            "serve": ["serve", "-M", folders["q4"], "--port", 0],
            "chat": ["chat", "-M", folders["q4"]]}[command]
    one_line_error(run(*args, "--adapter-path", bad), *words)
    assert not (tmp_path / "out").exists()
