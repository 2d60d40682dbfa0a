"""`llama-mlx generate`: one completion, streamed to stdout so it composes in pipes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llama_mlx.errors import ImageError

from .common import (
    AdapterOpt,
    DtypeOpt,
    GenerationOptions,
    GgufFileOpt,
    ModelOpt,
    OUTPUT,
    PipelineOpt,
    SystemOpt,
    TensorParallelOpt,
    err_console,
    generation_options,
    handle_errors,
    load_model,
    model_label,
    split_mode,
    usage_error,
    with_gguf_file,
)

EPILOG = """\
[bold]Examples[/bold]

  llama-mlx generate "Write a haiku about the sea"

  echo "Summarise: $(cat notes.txt)" | llama-mlx generate --max-tokens 200

  llama-mlx generate --file prompt.txt --temp 0.7 --top-p 0.9 --seed 1 -M weights/Llama-3.2-1B-Instruct

  llama-mlx generate -p "Why is the sky blue?" --verbose        # mlx-lm's names and statistics

  llama-mlx generate --raw "The capital of France is" --max-tokens 8

  llama-mlx generate -M path/to/Llama-3.2-11B-Vision-Instruct --image photo.jpg "What is in this picture?"

  llama-mlx generate --json "Hi" | jq .generation_tps

  llama-mlx generate -M weights/Llama-3.2-1B-Instruct --adapter-path adapters "Hi"   # mlx_lm.lora's output

  mlx.launch --hosts 10.0.0.1,10.0.0.2 --backend ring -- llama-mlx generate "Hi" -M NAME [--pipeline]
"""


def read_prompt(prompt: Optional[str], file: Optional[Path]) -> str:
    """The prompt from the argument, a file, or stdin ('-' or nothing given with stdin piped);
    ValueError when it is empty."""
    text = _read_prompt(prompt, file)
    if text == "":
        where = "on stdin" if prompt in (None, "-") and (file is None or str(file) == "-") else (
            f"in {file}" if file is not None else "given")
        raise ValueError(f"the prompt {where} is empty; nothing to answer")
    return text


def _read_prompt(prompt: Optional[str], file: Optional[Path]) -> str:
    if prompt is not None and file is not None:
        raise usage_error("give the prompt either as PROMPT or with --file, not both")
    if file is not None and str(file) != "-":
        if not file.exists():
            raise FileNotFoundError(2, "prompt file does not exist", str(file))
        if file.is_dir():
            raise IsADirectoryError(21, "prompt file is a folder", str(file))
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{file}: prompt file is not UTF-8 text") from None
    elif prompt == "-" or str(file) == "-" or (prompt is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
    elif prompt is None:
        raise usage_error("no prompt: give PROMPT, --file FILE, or pipe the prompt on stdin")
    else:
        return prompt
    # `echo` and editors end files with a newline that is not part of the prompt.
    return text[:-1] if text.endswith("\n") else text


@generation_options()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(
        help="The prompt. '-' (or nothing, with stdin piped) reads stdin.", show_default=False)] = None,
    prompt_opt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", metavar="TEXT", help="The prompt, as mlx-lm takes it (instead of PROMPT).",
        show_default=False)] = None,
    model: ModelOpt = None,
    gguf_file: GgufFileOpt = None,
    adapter_path: AdapterOpt = None,
    file: Annotated[Optional[Path], typer.Option(
        "--file", "-f", metavar="FILE", help="Read the prompt from FILE ('-' for stdin).", show_default=False)] = None,
    system: SystemOpt = None,
    image: Annotated[Optional[list[Path]], typer.Option(
        "--image", metavar="PATH", help="An image the prompt asks about (Llama 3.2 Vision models; one image).",
        show_default=False)] = None,
    raw: Annotated[bool, typer.Option(
        "--raw", "--ignore-chat-template",
        help="Use the prompt as plain text (after BOS), without the chat template.")] = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object with the text and the statistics instead of the text.",
        rich_help_panel=OUTPUT)] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Statistics on stderr after the text: mlx-lm's lines (Prompt, Generation, Peak "
        "memory) and one summary line.", rich_help_panel=OUTPUT)] = False,
    options: GenerationOptions = None,
    dtype: DtypeOpt = "auto",
    pipeline: PipelineOpt = False,
    tensor_parallel: TensorParallelOpt = False,
) -> None:
    """Generate a completion of a prompt. Only the generated text goes to stdout."""
    model = with_gguf_file(model, gguf_file)
    if prompt is not None and prompt_opt is not None:
        raise usage_error("give the prompt either as PROMPT or with --prompt, not both")
    _run(prompt if prompt_opt is None else prompt_opt, model, file, system, raw, json_out, verbose, dtype, options,
         pipeline, tensor_parallel, image, adapter_path)


@handle_errors
def _run(prompt, model, file, system, raw, json_out, verbose, dtype, opts: GenerationOptions, pipeline=False,
         tensor_parallel=False, image=None, adapter_path=None) -> None:
    from llama_mlx.generate import stream_generate

    split = split_mode(pipeline, tensor_parallel)
    text_in = read_prompt(prompt, file)
    images = _read_images(image)
    if images is not None:
        _check_sees_images(model)
    if raw and system is not None:
        raise usage_error("--system needs the chat template: drop --raw")
    opts.check_static()
    # (Under mlx.launch every rank runs this same generation: its input is the same on each.)
    lm, tokenizer = load_model(model, dtype, pipeline=split, adapter_path=adapter_path)
    opts.check(tokenizer)
    if images is not None:
        from llama_mlx.vision.prompt import sees_images

        if not sees_images(lm):
            raise ImageError(f"{model_label(model)} reads text only: --image needs a Llama 3.2 Vision model")
    if raw:
        request = text_in
    else:
        request = ([{"role": "system", "content": system}] if system is not None else [])
        request.append({"role": "user", "content": text_in})

    out = sys.stdout
    pieces: list[str] = []
    last = None
    stream = stream_generate(lm, tokenizer, request, opts.max_tokens, **opts.stream_kwargs(tokenizer),
                             **opts.cache_kwargs(), **opts.speculative_kwargs(),
                             **({"images": images} if images is not None else {}))
    try:
        for response in stream:
            last = response
            pieces.append(response.text)
            if not json_out and response.text:
                out.write(response.text)
                out.flush()
    finally:
        stream.close()
    text = "".join(pieces)
    stats = _stats(last)
    if json_out:
        out.write(json.dumps({"text": text, "model": model_label(model), **stats}, ensure_ascii=False) + "\n")
    elif not text.endswith("\n"):
        out.write("\n")
    out.flush()
    if verbose:
        from llama_mlx.generate import verbose_stats

        console = err_console()
        if last is not None and text:  # mlx-lm's lines, for scripts that read them; then ours
            console.print("=" * 10 + "\n" + verbose_stats(last).rstrip("\n"), style="dim", markup=False)
        console.print(stats_line(stats), style="dim", markup=False)


def _read_images(paths: Optional[list[Path]]) -> Optional[list]:
    """The --image files decoded (before the model loads, so that a bad file fails at once)."""
    if not paths:
        return None
    if len(paths) > 1:
        raise ImageError(f"{len(paths)} images given: one image per message (Llama 3.2 Vision was trained so)")
    from llama_mlx.vision.processor import load_image

    return [load_image(p) for p in paths]


def _check_sees_images(model: Optional[str]) -> None:
    """ImageError before loading when the model named is a local text-only one (the default model included)."""
    from llama_mlx.resolve import DEFAULT_MODEL, weights_dir
    from llama_mlx.vision.loading import is_mllama_folder

    name = model or DEFAULT_MODEL
    local = next((p for p in (Path(name).expanduser(), weights_dir() / name) if p.exists()), None)
    if (model is None or local is not None) and not (local is not None and is_mllama_folder(local)):
        raise ImageError(f"{model_label(model)} reads text only: --image needs a Llama 3.2 Vision model")


def _stats(r) -> dict:
    if r is None:
        return {"finish_reason": None, "prompt_tokens": 0, "cached_tokens": 0, "generation_tokens": 0,
                "prompt_tps": 0.0, "generation_tps": 0.0, "time_to_first_token": 0.0, "peak_memory_gb": 0.0,
                "draft_tokens": 0, "accepted_tokens": 0}
    return {
        "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens,
        "cached_tokens": r.cached_tokens,
        "generation_tokens": r.generation_tokens,
        "prompt_tps": round(r.prompt_tps, 3),
        "generation_tps": round(r.generation_tps, 3),
        "time_to_first_token": round(r.time_to_first_token, 4),
        "peak_memory_gb": round(r.peak_memory, 4),
        "draft_tokens": r.draft_tokens,
        "accepted_tokens": r.accepted_tokens,
        **({"speculative": r.speculative} if r.speculative else {}),
    }


def stats_line(s: dict) -> str:
    """One line of generation statistics."""
    return (f"prompt: {s['prompt_tokens']} tokens, {s['prompt_tps']:.1f} tokens/s · "
            f"generation: {s['generation_tokens']} tokens, {s['generation_tps']:.1f} tokens/s · "
            f"first token after {s['time_to_first_token']:.2f}s · peak memory {s['peak_memory_gb']:.2f} GB · "
            f"finish: {s['finish_reason']}" + (
                f" · drafted {s['draft_tokens']}, accepted {s['accepted_tokens']}" if s.get("draft_tokens") else ""))
