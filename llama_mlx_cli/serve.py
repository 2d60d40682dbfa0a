"""`llama-mlx serve`: the OpenAI-, Anthropic- and ollama-compatible HTTP server (llama_mlx.server on uvicorn)."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    MODEL,
    SAMPLING,
    DraftModelOpt,
    DtypeOpt,
    GgufFileOpt,
    KVBitsOpt,
    KVGroupSizeOpt,
    NumDraftTokensOpt,
    PipelineOpt,
    PromptLookupOpt,
    TensorParallelOpt,
    _top_p,
    distributed_arg,
    error_line,
    handle_errors,
    lead_or_follow,
    model_label,
    note_line,
    note_split,
    refuse_in_group,
    split_mode,
    with_gguf_file,
)

EPILOG = """\
[bold]Examples[/bold]

  llama-mlx serve                                   # http://127.0.0.1:8080/v1, the default model

  llama-mlx serve -M weights/Llama-3.2-1B-Instruct --port 9000 --api-key "$KEY"

  llama-mlx serve -M SmolLM2-135M-Instruct -M mlx-community/Llama-3.2-1B-Instruct-4bit --max-loaded-models 2
                                                    # both preloaded; a request's "model" may also name
                                                    # any other model `llama-mlx list` shows (loaded then)

  llama-mlx serve --keep-alive 10m                  # unload models idle for 10 minutes

  llama-mlx serve -M weights/Llama-3.2-1B-Instruct --adapter-path adapters
                                                    # with a LoRA adapter from mlx_lm.lora

  OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=x your-openai-app

  OLLAMA_HOST=http://127.0.0.1:8080 your-ollama-app   # ollama's API on the same port

  mlx.launch --hosts 10.0.0.1,10.0.0.2 --backend ring -- llama-mlx serve -M NAME [--pipeline]
                                                    # one model over two machines; rank 0 listens
                                                    # and runs one request at a time (no batching
                                                    # across ranks); SIGTERM or Ctrl-C to rank 0
                                                    # stops every rank
"""

SERVER = "Server"


def parse_keep_alive(value: Optional[str]) -> Optional[float]:
    """--keep-alive in seconds, in ollama's keep_alive syntax (300, 30s, 5m, 1h30m, 500ms); negative:
    forever (None); 0: unload when idle."""
    from llama_mlx.api_common import ApiError
    from llama_mlx.api_ollama import parse_keep_alive as parse

    try:
        seconds = parse(value)
    except ApiError:
        raise typer.BadParameter(f"{value!r} is not a duration (like 300, 30s, 5m, 1h; -1: forever)",
                                 param_hint="--keep-alive") from None
    return None if seconds is None or seconds < 0 else seconds


_HOST = re.compile(r"\*|[a-z0-9_.-]+(:\d+)?|\[[0-9a-f:.]+\](:\d+)?|[0-9a-f:]+", re.IGNORECASE)


def _host_list(values: list[str]) -> list[str]:
    hosts = [h.strip() for v in values for h in v.split(",") if h.strip()]
    for h in hosts:
        if not _HOST.fullmatch(h):
            raise typer.BadParameter(f"{h!r} is not a host name or address (like mybox.lan or 192.168.1.5)",
                                     param_hint="--allowed-hosts")
    return hosts


@handle_errors
def serve(
    models: Annotated[Optional[list[str]], typer.Option(
        "--model", "-M", metavar="PATH|NAME", show_default=False, rich_help_panel=MODEL,
        help="A model to preload (repeatable; the first is the default, served when a request names none): a "
             "Meta / Hugging Face / MLX folder, a .gguf file, a name in weights/, or a Hugging Face id (fetched "
             "once into the HF cache). A request's \"model\" may also name any model `llama-mlx list` shows, "
             "or a path: it is loaded then (never downloaded). Default: SmolLM2-135M-Instruct.")] = None,
    gguf_file: GgufFileOpt = None,
    adapter_path: Annotated[Optional[Path], typer.Option(
        "--adapter-path", metavar="PATH", show_default=False, rich_help_panel=MODEL,
        help="An mlx-lm LoRA/DoRA adapter folder (as `mlx_lm.lora` writes it) applied to the --model models; a "
             "request naming one of their paths gets the model without it.")] = None,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on (loopback by default; 0.0.0.0 exposes the server).",
        rich_help_panel=SERVER)] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.",
                                      rich_help_panel=SERVER)] = 8080,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="LLAMA_MLX_API_KEY", metavar="KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on /v1 requests.",
        rich_help_panel=SERVER)] = None,
    max_concurrency: Annotated[int, typer.Option(
        "--max-concurrency", min=1, help="Requests generated at once; more wait in the queue. Under mlx.launch: 1 "
        "(each request runs on every rank in turn).",
        rich_help_panel=SERVER)] = 8,
    decode_concurrency: Annotated[int, typer.Option(
        "--decode-concurrency", min=1, metavar="N",
        help="Most requests decoded together in one batched step (continuous batching).",
        rich_help_panel=SERVER)] = 8,
    max_kv_bytes: Annotated[Optional[int], typer.Option(
        "--max-kv-bytes", min=1, metavar="BYTES",
        help="Cap on the KV cache of all running requests: one that does not fit now waits, one that "
             "could never fit gets 503. Default: no cap.", rich_help_panel=SERVER)] = None,
    queue_size: Annotated[int, typer.Option(
        "--queue-size", min=0, help="Requests that may wait; beyond, the server answers 503.",
        rich_help_panel=SERVER)] = 16,
    prompt_cache_bytes: Annotated[int, typer.Option(
        "--prompt-cache-bytes", min=0, metavar="BYTES",
        help="Bound of the KV prefix cache kept between requests (least recently used evicted; 0: none).",
        rich_help_panel=SERVER)] = 1 << 30,
    allowed_origins: Annotated[Optional[list[str]], typer.Option(
        "--allowed-origins", metavar="ORIGIN",
        help="Allow browser requests from this origin, e.g. https://app.example (CORS; repeatable; '*' for any). "
             "Requests from other origins are refused (403), loopback ones (http://localhost:PORT) aside.",
        rich_help_panel=SERVER)] = None,
    allowed_hosts: Annotated[Optional[list[str]], typer.Option(
        "--allowed-hosts", metavar="HOSTS",
        help="Also answer requests whose Host header names one of these (comma-separated, repeatable; '*' for "
             "any). By default only loopback names and addresses and --host's are answered (403 otherwise), so "
             "a web page cannot reach the server through a name of its own (DNS rebinding).",
        rich_help_panel=SERVER)] = None,
    max_body_bytes: Annotated[int, typer.Option(
        "--max-body-bytes", min=1, metavar="BYTES", help="Largest request body accepted (413 beyond).",
        rich_help_panel=SERVER)] = 8 << 20,
    max_connections: Annotated[Optional[int], typer.Option(
        "--max-connections", min=1, metavar="N",
        help="Most client connections served at once (503 beyond). Default: 1024, or fewer where the open-file "
             "limit is lower.", rich_help_panel=SERVER)] = None,
    shutdown_timeout: Annotated[float, typer.Option(
        "--shutdown-timeout", min=0, metavar="SECONDS",
        help="On SIGTERM or Ctrl-C, how long requests may take to finish; streams still running then end with "
             "an error event. A second signal stops at once.", rich_help_panel=SERVER)] = 5.0,
    header_timeout: Annotated[float, typer.Option(
        "--header-timeout", min=0.1, metavar="SECONDS",
        help="Disconnect a client that has not sent its request headers this long after connecting (or after "
             "its last response).", rich_help_panel=SERVER)] = 10.0,
    allow_image_urls: Annotated[bool, typer.Option(
        "--allow-image-urls",
        help="Fetch images that requests name by http(s) URL (vision models). Off by default: only inline "
             "images (data URLs, base64) are read.", rich_help_panel=SERVER)] = False,
    allow_image_files: Annotated[Optional[Path], typer.Option(
        "--allow-image-files", metavar="DIR", exists=True, file_okay=False, dir_okay=True,
        help="Read images that requests name by file path, only under DIR (vision models). Off by default.",
        rich_help_panel=SERVER)] = None,
    max_loaded_models: Annotated[Optional[int], typer.Option(
        "--max-loaded-models", min=1, metavar="N",
        help="Most models loaded at once; loading another unloads the least recently used idle one. "
             "Default: no bound.", rich_help_panel=SERVER)] = None,
    max_loaded_bytes: Annotated[Optional[int], typer.Option(
        "--max-loaded-bytes", min=1, metavar="BYTES",
        help="Bound on the loaded models' weights (a model not loaded counts its size on disk); loading another "
             "unloads the least recently used idle ones. Default: no bound.", rich_help_panel=SERVER)] = None,
    keep_alive: Annotated[Optional[str], typer.Option(
        "--keep-alive", metavar="DURATION",
        help="Unload a model idle this long (300, 30s, 5m, 1h; 0: as soon as idle; -1: never). A request may "
             "set its own (ollama's keep_alive). Default: never.", rich_help_panel=SERVER)] = None,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", "-m", min=1, help="Answer length when a request does not say (capped by the context).",
        rich_help_panel=SERVER)] = 512,
    temp: Annotated[Optional[float], typer.Option(
        "--temp", "--temperature", min=0.0, show_default=False, rich_help_panel=SAMPLING,
        help="Temperature of requests that set none, every model's (0: greedy); a request's own wins. "
             "Default: each model's generation_config.json (or GGUF general.sampling.temp), else 0.6 (Meta's).")] = None,
    top_p: Annotated[Optional[float], typer.Option(
        "--top-p", callback=_top_p, show_default=False, rich_help_panel=SAMPLING,
        help="Top-p of requests that set none, every model's; a request's own wins. Default: each model's "
             "generation_config.json (or GGUF general.sampling.top_p), else 0.9 (Meta's).")] = None,
    dtype: DtypeOpt = "auto",
    kv_bits: KVBitsOpt = None,
    kv_group_size: KVGroupSizeOpt = 64,
    fit: Annotated[bool, typer.Option(
        "--fit/--no-fit", rich_help_panel=SERVER,
        help="Size the context and the KV cache to the memory budget (what the weights leave of it, less 10%): "
             "longer requests get 400, and the KV of all requests is capped there unless --max-kv-bytes says.")] = True,
    memory_budget: Annotated[Optional[int], typer.Option(
        "--memory-budget", min=1, metavar="BYTES", show_default=False, rich_help_panel=SERVER,
        help="Memory --fit sizes to. Default: the device's (Metal's recommended working set, a GPU's memory, "
             "else the machine's RAM).")] = None,
    pipeline: PipelineOpt = False,
    tensor_parallel: TensorParallelOpt = False,
    draft_model: DraftModelOpt = None,
    num_draft_tokens: NumDraftTokensOpt = None,
    prompt_lookup: PromptLookupOpt = None,
    log_level: Annotated[str, typer.Option(
        "--log-level", metavar="LEVEL", help="uvicorn's log level: critical, error, warning, info, debug.",
        rich_help_panel=SERVER)] = "info",
) -> None:
    """Serve models over HTTP: OpenAI's chat/completions, completions, responses, embeddings and models,
    Anthropic's messages, and ollama's /api/* (chat, generate, embed, tags, show, ps, pull)."""
    models = list(models or [])
    model = with_gguf_file(models[0] if models else None, gguf_file)
    from llama_mlx import server
    from llama_mlx.api_images import ImagePolicy
    from llama_mlx.loading import load, resolve_model

    from .common import GenerationOptions, default_prompt_lookup, fetch_default_model, resolve_dtype

    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise typer.BadParameter(f"{log_level!r} is not one of critical, error, warning, info, debug",
                                 param_hint="--log-level")
    split = split_mode(pipeline, tensor_parallel)
    hosts = _host_list(allowed_hosts or [])
    seconds = parse_keep_alive(keep_alive)
    if len(models) > 1:
        refuse_in_group("serving several models (--model repeated)")
    if max_loaded_models is not None and len(models) > max_loaded_models:
        raise typer.BadParameter(f"{len(models)} models preloaded but at most {max_loaded_models} may be loaded",
                                 param_hint="--max-loaded-models")
    fetch_default_model(model)  # first use: its download bar, before the server starts
    path = resolve_model(model)  # a bad path fails here, before binding
    more = [(model_label(m), resolve_model(m)) for m in models[1:]]
    names = [model_label(model)] + [name for name, _ in more]
    if len(set(names)) < len(names):
        raise typer.BadParameter(f"two models are named alike ({', '.join(names)}); name each once",
                                 param_hint="--model")

    if adapter_path is not None:  # one that does not fit a model fails here, before binding
        from llama_mlx.lora import check_adapter

        for p in [path] + [p for _, p in more]:
            check_adapter(adapter_path, p)

    def loader_for(p, adapter=None):
        return lambda: load(p, dtype=resolve_dtype(dtype), distributed=False, adapter_path=adapter)

    def loader():
        loaded = load(path, dtype=resolve_dtype(dtype), distributed=distributed_arg(split),
                      adapter_path=adapter_path)
        note_split(loaded[0])
        p = getattr(loaded[0], "shard_plan", None)
        if p is not None and p.size > 1 and p.rank == 0:
            note_line(f"split over {p.size} ranks ({p.mode} parallel): one request at a time, no batching across ranks")
        return loaded

    speculative = None
    if draft_model is not None or prompt_lookup:
        refuse_in_group("speculative decoding (--draft-model, --prompt-lookup)")
    elif prompt_lookup is None and decode_concurrency == 1:  # (speculative jobs are never batched)
        prompt_lookup = default_prompt_lookup()
    if draft_model is not None or prompt_lookup:
        # Speculative requests run alone (not batched): rows would accept different numbers of drafts.
        options = GenerationOptions(draft_model=resolve_model(draft_model) if draft_model else None,
                                    num_draft_tokens=num_draft_tokens, prompt_lookup=prompt_lookup)
        if draft_model is not None and prompt_lookup:
            options.speculative_kwargs()  # refuses the pair in one line, before loading anything
        speculative = options.speculative_kwargs
    # Under mlx.launch the other ranks load the model and run rank 0's requests here, until it stops.
    leader = lead_or_follow(loader)
    if not server._is_loopback(host) and api_key is None:
        note_line(f"warning: listening on {host} without --api-key: anyone who can reach it can use it")
    listened = server.run(
        loader, host=host, port=port, model_name=model_label(model), api_key=api_key,
        allowed_origins=allowed_origins or (), allowed_hosts=hosts, max_body_bytes=max_body_bytes,
        default_max_tokens=max_tokens, max_concurrency=max_concurrency, queue_size=queue_size,
        prompt_cache_bytes=prompt_cache_bytes, decode_concurrency=decode_concurrency, max_kv_bytes=max_kv_bytes,
        speculative=speculative, lockstep=leader, log_level=log_level, model_path=path, models=more,
        loader_for=loader_for if leader is None else None, max_loaded_models=max_loaded_models,
        max_loaded_bytes=max_loaded_bytes, keep_alive=seconds,
        images=ImagePolicy(allow_urls=allow_image_urls, files_dir=allow_image_files),
        max_connections=max_connections, shutdown_timeout=shutdown_timeout, header_timeout=header_timeout,
        cache_options=None if kv_bits is None else dict(kv_bits=kv_bits, kv_group_size=kv_group_size),
        fit=fit, memory_budget=memory_budget,
        temperature=temp, top_p=top_p, adapter_path=adapter_path,
        on_ready=lambda engine: note_line(f"{', '.join(names)} loaded"
                                          f"{f' ({engine.fit.describe()})' if engine.fit else ''}; "
                                          f"serving on http://{host}:{port}/v1"))
    if not listened:
        error_line(f"could not listen on {host}:{port}")
    if leader is not None:
        leader.shutdown()
    # The engines' threads have drained their streams; leave without the interpreter's teardown all
    # the same: MLX's C++ destructors may abort it (SIGABRT, "terminate called without an active
    # exception") while a thread, a ring peer's under mlx.launch, still waits.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if listened else 1)
