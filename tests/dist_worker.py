"""One rank of the distributed tests (run by `mlx.launch`, or alone for the single-process oracle).

    python tests/dist_worker.py MODEL MODE OUT [--tokens N] [--prompt-ids 1,2,3] [--text PROMPT]

MODE: single (no sharding), tensor or pipeline. Writes OUT/rank{R}.npz (logits of the prompt,
and of it run again through a cache in chunks, greedy token ids) and OUT/rank{R}.json (peak
memory), and prints the greedy completion of --text on stdout (only rank 0 may print).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from llama_mlx import generate, generate_step, make_sampler
from llama_mlx.cache import make_prompt_cache
from llama_mlx.distributed import group, quiet_other_ranks
from llama_mlx.errors import LlamaMLXError
from llama_mlx.loading import load


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("mode", choices=["single", "tensor", "pipeline"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt-ids", default="1,5,9,3,7,11,2,4,6,8,10,12")
    ap.add_argument("--text", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--text-only", action="store_true", help="skip the logits and token checks")
    ap.add_argument("--logits-only", action="store_true", help="skip the generated tokens")
    args = ap.parse_args()

    g = group()
    quiet_other_ranks(g)
    try:
        model, tokenizer = load(args.model, dtype=args.dtype,
                                distributed=False if args.mode == "single" else args.mode)
    except LlamaMLXError as e:
        (args.out / f"rank{g.rank()}.error").write_text(str(e))
        print(f"error: {e}", file=sys.stderr, flush=True)
        # mlx.launch stops every rank once one exits: wait until all have reported.
        mx.eval(mx.distributed.all_sum(mx.zeros(1), group=g))
        return 1
    if args.mode == "single":
        mx.eval(model.parameters())
    load_peak = mx.get_peak_memory()

    ids = [int(t) for t in args.prompt_ids.split(",")]
    if not args.text_only:
        check_logits(model, ids, args)
    if args.text is not None:
        text = generate(model, tokenizer, args.text, max_tokens=args.tokens, sampler=make_sampler(0.0))
        print(f"<<{text}>>", flush=True)
    stats = {"rank": g.rank(), "size": g.size(), "load_peak": load_peak, "peak": mx.get_peak_memory(),
             "active": mx.get_active_memory(), "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
             "layers": len(model.layers)}
    (args.out / f"rank{g.rank()}.json").write_text(json.dumps(stats))
    return 0


def check_logits(model, ids: list[int], args) -> None:
    g = group()
    logits = model(mx.array([ids])).astype(mx.float32)
    # The same prompt through a cache, prefilled in chunks of 5 then one token at a time.
    cache = make_prompt_cache(len(model.layers))
    chunks = [model(mx.array([ids[:5]]), cache), model(mx.array([ids[5:-1]]), cache), model(mx.array([ids[-1:]]), cache)]
    cached = mx.concatenate(chunks, axis=1).astype(mx.float32)
    n = 0 if args.logits_only else args.tokens
    greedy = [] if not n else [t for t, _ in generate_step(mx.array(ids), model, max_tokens=n,
                                          sampler=make_sampler(0.0), prefill_step_size=4)]
    sampled = [] if not n else [t for t, _ in generate_step(mx.array(ids), model, max_tokens=n,
                                           sampler=make_sampler(1.0), prefill_step_size=4)]
    np.savez(args.out / f"rank{g.rank()}.npz", logits=np.array(logits), cached=np.array(cached),
             greedy=np.array(greedy), sampled=np.array(sampled))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # other ranks print nothing: leave the traceback where the test looks
        import traceback

        out = Path(sys.argv[3])
        (out / f"rank{group().rank()}.traceback").write_text(traceback.format_exc())
        raise
