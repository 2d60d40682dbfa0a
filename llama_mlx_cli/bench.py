"""`llama-mlx bench`: prompt and generation speed, time to first token, peak memory and load time."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import (
    DtypeOpt,
    GgufFileOpt,
    JsonOpt,
    ModelOpt,
    err_console,
    fetch_default_model,
    handle_errors,
    model_label,
    note_line,
    out_console,
    resolve_dtype,
    with_gguf_file,
)

EPILOG = """\
[bold]Examples[/bold]

  llama-mlx bench

  llama-mlx bench --prompt-tokens 512 -g 128 -n 3      # the GPU sizes, on a CPU too

  llama-mlx bench -M weights/Llama-3.2-1B-Instruct --prompt-tokens 512 -g 128 -n 5

  llama-mlx bench --prompt-tokens 128 -g 32 -n 3 --json

Each trial loads the model, warms it up, then generates greedily after a prompt of random token ids.
Figures are medians over trials; progress goes to stderr. Unset sizes depend on the device:
a GPU gets 512 prompt tokens, 128 generated and 3 trials, a CPU 128, 32 and 2.
To compare with mlx-lm, see benchmarks/vs_mlx_lm.py.
"""

ROWS = [
    ("prompt_tps", "prompt", "tokens/s", "{:.1f}"),
    ("generation_tps", "generation", "tokens/s", "{:.2f}"),
    ("ttft_s", "time to first token", "s", "{:.3f}"),
    ("peak_memory_gb", "peak memory", "GB", "{:.3f}"),
    ("load_s", "load time", "s", "{:.2f}"),
]


def bench(
    model: ModelOpt = None,
    gguf_file: GgufFileOpt = None,
    prompt_tokens: Annotated[Optional[int], typer.Option(
        "--prompt-tokens", min=1, metavar="N", show_default=False,
        help="Prompt length, in tokens (random ids). Default: 512 on a GPU, 128 on a CPU.")] = None,
    gen_tokens: Annotated[Optional[int], typer.Option(
        "--gen-tokens", "--generation-tokens", "-g", min=2, metavar="N", show_default=False,
        help="Tokens to generate. Default: 128 on a GPU, 32 on a CPU.")] = None,
    trials: Annotated[Optional[int], typer.Option(
        "--trials", "--num-trials", "-n", min=1, metavar="N", show_default=False,
        help="Timed trials; the figures are their medians. Default: 3 on a GPU, 2 on a CPU.")] = None,
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Benchmark a model: prompt and generation tokens/s, time to first token, peak memory, load time."""
    model = with_gguf_file(model, gguf_file)
    _run(model, prompt_tokens, gen_tokens, trials, dtype, json_out)


@handle_errors
def _run(model, prompt_tokens, gen_tokens, trials, dtype, json_out: bool) -> None:
    from llama_mlx.benchmark import GPU_SIZES, benchmark, default_sizes

    fetch_default_model(model)
    sizes = default_sizes()
    if sizes != GPU_SIZES and None in (prompt_tokens, gen_tokens, trials):
        note_line(f"On this CPU: prompt {prompt_tokens or sizes.prompt_tokens} tokens, "
                  f"{gen_tokens or sizes.gen_tokens} generated, {trials or sizes.trials} trials; for the GPU "
                  f"sizes ask with --prompt-tokens {GPU_SIZES.prompt_tokens} -g {GPU_SIZES.gen_tokens} "
                  f"-n {GPU_SIZES.trials}")
    console = err_console()
    status = console.status("", spinner="dots") if console.is_terminal else None

    def progress(stage: str, i: int, n: int, t) -> None:
        if stage == "load":
            message = f"Loading {model_label(model)} (untimed, once)…"
        elif stage == "trial":
            message = f"Trial {i}/{n}: load, warm up, prefill and generate…"
        else:
            note_line(f"trial {i}/{n}: prompt {t.prompt_tps:.1f} tok/s, generation {t.generation_tps:.2f} tok/s, "
                      f"time to first token {t.ttft_s:.3f} s, peak memory {t.peak_memory_gb:.3f} GB, "
                      f"load {t.load_s:.2f} s")
            return
        if status is None:
            note_line(message)
        else:
            status.update(message)

    if status is not None:
        status.start()
    try:
        result = benchmark(model, prompt_tokens, gen_tokens, trials, dtype=resolve_dtype(dtype), progress=progress)
    finally:
        if status is not None:
            status.stop()
    d = {"name": model_label(model), **result.to_dict()}
    if json_out:
        sys.stdout.write(json.dumps(d) + "\n")
        return
    render(d)


def render(d: dict) -> None:
    dev = d["device"]
    table = Table(title=f"{d['name']} · {dev['name']} ({dev['device']}, MLX {dev['mlx']})", title_justify="left",
                  title_style="bold", caption=f"prompt {d['prompt_tokens']} tokens, {d['generation_tokens']} generated, "
                                              f"median of {d['trials']} trial{'s' if d['trials'] != 1 else ''}",
                  caption_justify="left")
    table.add_column("metric", style="cyan", no_wrap=True)
    table.add_column("median", justify="right")
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    table.add_column("unit")
    for key, label, unit, fmt in ROWS:
        values = [t[key] for t in d["per_trial"]]
        table.add_row(label, fmt.format(d[key]), fmt.format(min(values)), fmt.format(max(values)), unit)
    out_console().print(table)
