#!/usr/bin/env python3
"""Llama 3.2 Vision: llama-mlx against mlx-vlm on the same random weights, one image and a short text.

One folder of random weights of a real shape (`11b`: Llama 3.2 11B Vision's config.json numbers, the
language model 4-bit g64, the vision tower bfloat16, as `llama-mlx convert -q` writes; `tiny` for a CPU
check) is loaded by llama-mlx (once per backend row: `metal`, the path Macs run, and `cuda`, our CUDA
wing) and by mlx-vlm (`mlx_vlm.utils.load_model`). Each runtime is fed the same prompt ids
(`<|image|><|begin_of_text|>` + random text ids: the image first, where Meta's and transformers' row
conventions agree) and the same image arrays (our processor: equal to transformers' MllamaImageProcessor
and to mlx-vlm's), and decodes greedily:

* ours: `model.attach_images` (vision tower, projector, cross-attention keys once) and `generate_step`;
* mlx-vlm: its `generate_step` (vision tower inside its prefill; image states re-projected every step).

Time to first token covers the vision tower, the prefill and the first token; decode tok/s the tokens
after the first. Trials alternate (the order rotates each round) with every model resident, after one
untimed warm-up each; reported are medians, min/max and per-round ratios ours / mlx-vlm.
Writes --out.json (every number) and --out.md (the table).

  # CPU check (seconds):
  python benchmarks/vision_vs_mlx_vlm.py --shape tiny --rows cpu -g 8 --trials 2 --out /tmp/vision-tiny
  # GPU (MLX CUDA): both rows of ours against mlx-vlm
  python3 benchmarks/vision_vs_mlx_vlm.py --shape 11b --rows metal,cuda --work /tmp/vw \\
      --out benchmarks/results/vision_vs_mlx_vlm-gpu-nvidia-h100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing llama-mlx

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

VISION_11B = dict(hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16,
                  intermediate_size=5120, vision_output_dim=7680, image_size=560, patch_size=14, max_num_tiles=4,
                  norm_eps=1e-5, intermediate_layers_indices=[3, 7, 15, 23, 30])
SHAPES = {
    # Llama 3.2 11B Vision (the hub's config.json; tests/test_vision_info.py checks its parameter count)
    "11b": dict(vision=VISION_11B, text=dict(
        vocab_size=128256, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, cross_attention_layers=list(range(3, 40, 5)), original_context=8192)),
    # tests/mllama_oracle.py's tiny model, its widths multiples of the quantization group
    "tiny": dict(vision=dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4,
                             intermediate_size=64, vision_output_dim=96, image_size=28, patch_size=14,
                             max_num_tiles=4, norm_eps=1e-5, intermediate_layers_indices=[1, 3]),
                 text=dict(vocab_size=300, hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, cross_attention_layers=[1, 3],
                           original_context=64)),
}
MARKER = "llama_mlx_benchmark"


def shape_config(shape: str) -> dict:
    """The config.json of a shape: Hugging Face's keys (transformers 5's and the flat ones mlx-vlm reads)."""
    from llama_mlx.vision.convert import mlx_vlm_keys

    sizes = SHAPES[shape]
    text = dict(sizes["text"])
    original = text.pop("original_context")
    text.update(rms_norm_eps=1e-5, max_position_embeddings=131072, model_type="mllama_text_model",
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": original})
    return mlx_vlm_keys({"model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"],
                         "image_token_index": text["vocab_size"], "text_config": text,
                         "vision_config": {**sizes["vision"], "model_type": "mllama_vision_model"}})


def _random(name: str, shape: tuple, stored, dtype, bits: int, group_size: int, seed: int) -> mx.array:
    """Packed codes and scales as benchmarks/random_model.py makes them (the language model); float
    matrices of the vision tower and projector ~ N(0, 1/fan_in); norms and gates ones, biases zeros."""
    from benchmarks.random_model import _random_tensor

    if stored == mx.uint32 or name.endswith((".scales", ".biases")):
        return _random_tensor(name, shape, stored, dtype, bits, group_size, seed)
    if len(shape) >= 2:
        return (mx.random.normal(shape) / math.sqrt(math.prod(shape[1:]))).astype(dtype)
    return (mx.zeros if name.endswith(".bias") else mx.ones)(shape, dtype=dtype)


def write_random_mllama(folder: Path, shape: str, *, bits: int = 4, group_size: int = 64,
                        dtype: str = "bfloat16", seed: int = 0) -> Path:
    """A random-weight Llama 3.2 Vision MLX folder (language model quantized, vision tower float), written
    tensor by tensor through the converter's writer; reused when made with the same settings."""
    from mlx.utils import tree_flatten

    from benchmarks.random_model import _write_tokenizer
    from llama_mlx.checkpoints.plan import Item
    from llama_mlx.checkpoints.writer import write_weights
    from llama_mlx.quant import quantize
    from llama_mlx.vision.model import MllamaArgs, Model

    config = shape_config(shape)
    made = {"shape": shape, "bits": bits, "group_size": group_size, "dtype": dtype, "seed": seed}
    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()).get(MARKER) == made:
        return folder
    model = Model(MllamaArgs.from_dict(config))  # lazily initialised: only the shapes are read
    quantization = quantize(model.language_model, bits, group_size)
    specs = [(k, tuple(v.shape), v.dtype) for k, v in tree_flatten(model.parameters())]
    del model
    float_dtype = getattr(mx, dtype)

    def item(name, shape_, stored):
        out = stored if stored == mx.uint32 else float_dtype
        return Item(name, [(name, shape_, out)],
                    lambda: {name: _random(name, shape_, stored, float_dtype, bits, group_size, seed)},
                    math.prod(shape_))

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    mx.random.seed(seed)
    write_weights(folder, [item(*s) for s in specs], max_shard_bytes=2 << 30)
    _write_tokenizer(folder)
    config.update(quantization=quantization, quantization_config=quantization, torch_dtype=dtype,
                  eos_token_id=2, bos_token_id=1, **{MARKER: made})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


class Ours:
    def __init__(self, folder: Path, row: str):
        from llama_mlx import backends
        from llama_mlx.vision.loading import load_mllama

        self.row, self.name = row, f"llama-mlx ({row})"
        backends.use(row)  # the row decides the load-time transform and fusion
        self.model, _ = load_mllama(folder, lazy=False)

    def steps(self, ids: list[int], arrays: dict, n: int):
        from llama_mlx import backends
        from llama_mlx.generate import generate_step
        from llama_mlx.sample import make_sampler

        backends.use(self.row)
        cache = self.model.make_cache()
        self.model.attach_images(cache, arrays["pixel_values"], arrays["aspect_ratio_ids"], arrays["aspect_ratio_mask"])
        for token, _ in generate_step(mx.array(ids), self.model, max_tokens=n, sampler=make_sampler(0.0),
                                      prompt_cache=cache):
            yield int(token)


class MlxVlm:
    name = "mlx-vlm"

    def __init__(self, folder: Path):
        from mlx_vlm.utils import load_model

        self.model = load_model(folder)
        # Meta's intermediate states (ours): mlx-vlm keeps the listed layers' outputs, Meta their inputs,
        # i.e. the outputs of the layers before; the same work, so the two runtimes decode the same model.
        tower = self.model.vision_tower
        tower.intermediate_layers_indices = [i - 1 for i in tower.intermediate_layers_indices]

    def steps(self, ids: list[int], arrays: dict, n: int):
        from mlx_vlm.generate import generate_step

        mask = np.zeros((1, len(ids), 1, arrays["aspect_ratio_mask"].shape[-1]), np.int64)
        mask[0, ids.index(self.model.config.image_token_index):, 0, : int(arrays["num_tiles"][0][0])] = 1
        for token, _ in generate_step(mx.array([ids]), self.model, mx.array(arrays["pixel_values"]), None,
                                      max_tokens=n, temperature=0.0,
                                      aspect_ratio_ids=mx.array(arrays["aspect_ratio_ids"]),
                                      aspect_ratio_mask=mx.array(arrays["aspect_ratio_mask"]),
                                      cross_attention_mask=mx.array(mask)):
            yield int(token)


def measure(runtime, ids: list[int], arrays: dict, n: int) -> dict:
    from llama_mlx.benchmark import free_memory

    free_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    gen = runtime.steps(ids, arrays, n)
    tokens = [next(gen)]
    first = time.perf_counter()
    tokens += list(gen)
    end = time.perf_counter()
    mx.synchronize()
    return {"ttft_s": first - start, "prompt_tps": len(ids) / (first - start),
            "generation_tps": (len(tokens) - 1) / (end - first), "tokens": tokens,
            "peak_memory_gb": mx.get_peak_memory() / 1e9}


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def run(args) -> dict:
    from PIL import Image

    from llama_mlx.benchmark import device_summary
    from llama_mlx.vision.processor import ImageProcessor

    t0 = time.perf_counter()
    folder = write_random_mllama(Path(args.work) / f"mllama-{args.shape}-q4", args.shape)
    made_s = time.perf_counter() - t0
    config = json.loads((folder / "config.json").read_text())
    vision, text = config["vision_config"], config["text_config"]
    tile = vision["image_size"]
    pixels = np.random.default_rng(0).integers(0, 256, (2 * tile, 2 * tile, 3), dtype=np.uint8)  # 2x2 tiles
    arrays = ImageProcessor.for_model(tile, vision["max_num_tiles"])([Image.fromarray(pixels)])
    text_ids = np.random.default_rng(1).integers(0, min(text["vocab_size"], 128000), args.prompt_tokens - 1).tolist()
    ids = [config["image_token_index"], 1 if args.shape == "tiny" else 128000, *text_ids]

    runtimes, loads, errors = [], {}, {}
    makers = [(f"llama-mlx ({row})", lambda row=row: Ours(folder, row)) for row in args.rows.split(",")]
    makers += [] if args.no_mlx_vlm else [("mlx-vlm", lambda: MlxVlm(folder))]
    for name, make in makers:  # a runtime that fails is reported; the others still run
        try:
            start = time.perf_counter()
            r = make()
            loads[name] = time.perf_counter() - start
            measure(r, ids, arrays, 3)  # warm-up: kernels compiled for these shapes
            runtimes.append(r)
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"{name} failed: {errors[name]}", flush=True)
    trials = {r.name: [] for r in runtimes}
    for t in range(args.trials):
        order = runtimes[t % len(runtimes):] + runtimes[: t % len(runtimes)]
        for r in order:
            m = measure(r, ids, arrays, args.gen_tokens)
            trials[r.name].append(m)
            print(f"trial {t} {r.name}: ttft {m['ttft_s'] * 1e3:.1f} ms, decode {m['generation_tps']:.1f} tok/s",
                  flush=True)
    result = {"shape": args.shape, "prompt_tokens": len(ids), "text_tokens": len(ids) - 1,
              "image_tiles": int(arrays["num_tiles"][0][0]), "image_size": [2 * tile, 2 * tile],
              "gen_tokens": args.gen_tokens, "trials": args.trials, "quantization": config["quantization"],
              "vision_dtype": config["torch_dtype"], "device": device_summary(), "versions": _versions(),
              "folder_seconds": made_s, "load_s": loads, "errors": errors, "runs": trials, "summary": {}}
    for name, ms in trials.items():
        result["summary"][name] = {k: _stats([m[k] for m in ms]) for k in ("ttft_s", "prompt_tps", "generation_tps",
                                                                           "peak_memory_gb")}
    if "mlx-vlm" in trials:
        theirs = trials["mlx-vlm"]
        for name, ms in trials.items():
            if name == "mlx-vlm":
                continue
            result["summary"][name]["vs_mlx_vlm"] = {
                "generation_tps": _stats([a["generation_tps"] / b["generation_tps"] for a, b in zip(ms, theirs)]),
                "ttft_s": _stats([a["ttft_s"] / b["ttft_s"] for a, b in zip(ms, theirs)]),
                "tokens_agreeing": min(_agree(a["tokens"], b["tokens"]) for a, b in zip(ms, theirs))}
    return result


def _agree(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs share (bfloat16 here, float32 activations in mlx-vlm's
    vision tower: random weights drift apart after a while)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _versions() -> dict:
    from importlib import metadata

    out = {"mlx": mx.__version__}
    for name in ("mlx-vlm", "llama-mlx"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def markdown(r: dict) -> str:
    d = r["device"]
    lines = [f"# Llama 3.2 Vision ({r['shape']}, random weights): llama-mlx vs mlx-vlm", "",
             f"Device: {d.get('name')} ({d.get('backend')}). Versions: {r['versions']}. Language model "
             f"{r['quantization']['bits']}-bit g{r['quantization']['group_size']}, vision tower {r['vision_dtype']}.",
             f"Prompt: 1 image ({r['image_size'][0]}x{r['image_size'][1]}, {r['image_tiles']} tiles) + "
             f"{r['text_tokens']} text tokens ({r['prompt_tokens']} ids); {r['gen_tokens']} tokens decoded greedily; "
             f"{r['trials']} alternating trials after a warm-up, every model resident. Medians [min, max].", "",
             "| runtime | time to first token (ms) | prompt tok/s | decode tok/s | decode vs mlx-vlm | "
             "TTFT vs mlx-vlm | leading tokens equal | load s |", "|---|---|---|---|---|---|---|---|"]

    def f(s, scale=1.0, fmt="{:.1f}"):
        return f"{fmt.format(s['median'] * scale)} [{fmt.format(s['min'] * scale)}, {fmt.format(s['max'] * scale)}]"

    for name, s in r["summary"].items():
        v = s.get("vs_mlx_vlm")
        lines.append(f"| {name} | {f(s['ttft_s'], 1e3)} | {f(s['prompt_tps'])} | {f(s['generation_tps'])} | "
                     f"{f(v['generation_tps'], fmt='{:.2f}x') if v else '-'} | "
                     f"{f(v['ttft_s'], fmt='{:.2f}x') if v else '-'} | {v['tokens_agreeing'] if v else '-'} | "
                     f"{r['load_s'][name]:.1f} |")
    lines += [f"\n{name} failed: {e}" for name, e in r["errors"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="11b")
    p.add_argument("--rows", default="metal,cuda", help="llama-mlx backend rows to run (cpu, metal, cuda)")
    p.add_argument("-p", "--prompt-tokens", type=int, default=64, help="text tokens after the image, BOS included")
    p.add_argument("-g", "--gen-tokens", type=int, default=128)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp") + "/vision-bench")
    p.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    p.add_argument("--no-mlx-vlm", action="store_true")
    args = p.parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
