"""`llama-mlx chat`: a streaming, multi-turn terminal chat over one prompt cache.

The session keeps ONE `PromptCache` for the conversation and hands `stream_generate` the whole
transcript each turn: `PromptCache.prepare` keeps the shared prefix, so only the new turn is
prefilled. Ctrl-C during an answer closes the stream (the cache records what it holds in the
generator's `finally`) and keeps the partial answer.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import select
import signal
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from llama_mlx.errors import LlamaMLXError

from .common import (
    DtypeOpt,
    ExtraEosOpt,
    GenerationOptions,
    KVBitsOpt,
    KVGroupSizeOpt,
    LogitBiasOpt,
    MaxKVSizeOpt,
    MaxTokensOpt,
    MinPOpt,
    MinTokensToKeepOpt,
    ModelOpt,
    PrefillStepOpt,
    RepetitionContextOpt,
    RepetitionPenaltyOpt,
    SamplingOrderOpt,
    SeedOpt,
    StopOpt,
    SystemOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
    describe_exception,
    error_line,
    handle_errors,
    load_model,
    model_label,
    out_console,
)

EPILOG = """\
[bold]Examples[/bold]

  llama-mlx chat

  llama-mlx chat -M weights/Llama-3.2-1B-Instruct --system "You are a terse assistant."

  llama-mlx chat --temp 0 --max-tokens 128 --max-kv-size 4096

Inside the chat, /help lists the commands (/undo, /retry, /save, /load, /stats, ...).
End a line with a backslash, or wrap text in triple quotes, to send several lines; pasted text
stays one message. Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt quits.
"""

HELP = """\
Commands
  /help                 this help
  /reset                forget the conversation (the system prompt stays)
  /system [TEXT]        set the system prompt (no TEXT: show it; /system - removes it)
  /undo                 drop the last exchange (question and answer)
  /retry                answer the last question again
  /save FILE            save the transcript and its KV cache (FILE.safetensors)
  /load FILE            resume a saved conversation, without prefilling it again
  /history              show the conversation
  /stats                session statistics and settings
  /set [NAME VALUE]     change a setting: temp, top-p, top-k, min-p, max-tokens, seed,
                        repetition-penalty, repetition-context-size (no NAME: show them)
  /exit                 quit (also /quit, /bye, Ctrl-D, or Ctrl-C at the prompt)

Input
  Enter sends. A line ending in \\ continues on the next line.
  \"\"\" starts a block of lines, ended by a line ending in \"\"\".
  Pasted text with newlines stays one message. Up/down arrows recall earlier input.
  A message starting with // is sent as text starting with /.
  Ctrl-C while an answer streams stops it; the partial answer is kept.
"""

SETTINGS = {
    # name: (attribute of GenerationOptions, parser, check)
    "temp": ("temp", float, lambda v: v >= 0),
    "top-p": ("top_p", float, lambda v: 0 < v <= 1),
    "top-k": ("top_k", int, lambda v: v >= 0),
    "min-p": ("min_p", float, lambda v: 0 <= v <= 1),
    "max-tokens": ("max_tokens", int, lambda v: v >= 1),
    "seed": ("seed", lambda s: None if s.lower() in ("none", "off") else int(s), lambda v: True),
    "repetition-penalty": ("repetition_penalty", lambda s: None if s.lower() in ("none", "off") else float(s),
                           lambda v: v is None or v > 0),
    "repetition-context-size": ("repetition_context_size", int, lambda v: v >= 1),
}

SESSION_FORMAT = "llama-mlx-chat/1"


class ChatError(LlamaMLXError):
    """A chat command could not be carried out; the session goes on."""


class Turn:
    """Statistics of one answer."""

    def __init__(self, response, context_used: int, interrupted: bool):
        self.response = response
        self.context_used = context_used
        self.interrupted = interrupted


class ChatSession:
    """The conversation, its prompt cache and its settings; no terminal I/O here."""

    def __init__(self, model, tokenizer, options: GenerationOptions, *, system: Optional[str] = None,
                 name: str = "model"):
        from llama_mlx.generate import PromptCache, context_length

        self.model, self.tokenizer, self.options, self.name = model, tokenizer, options, name
        self.cache = PromptCache(model, **options.cache_kwargs())
        self.messages: list[dict] = [{"role": "system", "content": system}] if system is not None else []
        self.model_context = context_length(model)
        self.last: Optional[Turn] = None
        self.totals = {"answers": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                       "prompt_seconds": 0.0, "generation_seconds": 0.0, "peak_memory": 0.0}
        self._kwargs = options.stream_kwargs(tokenizer)

    # --- state -------------------------------------------------------------------------

    @property
    def context_limit(self) -> int:
        size = self.cache.options.get("max_kv_size")
        return min(self.model_context, size) if size else self.model_context

    @property
    def system(self) -> Optional[str]:
        if self.messages and self.messages[0]["role"] == "system":
            return self.messages[0]["content"]
        return None

    def _first_turn(self) -> int:
        return 1 if self.system is not None else 0

    def exchanges(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "user")

    def context_used(self) -> int:
        return min(len(self.cache.tokens), self.context_limit)

    def settings_changed(self) -> None:
        """Rebuild the sampler after a /set (raises ValueError on a bad combination)."""
        self._kwargs = self.options.stream_kwargs(self.tokenizer)

    def _template(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)

    # --- turns -------------------------------------------------------------------------

    def fit(self) -> tuple[list[int], int]:
        """Prompt ids of the conversation, dropping the oldest exchanges until prompt plus answer fit.

        Returns (ids, exchanges dropped). The system prompt and the newest message always stay; when
        even they do not fit, nothing is dropped and ContextLengthError is raised.
        """
        from llama_mlx.errors import ContextLengthError

        limit = self.context_limit
        reserve = min(self.options.max_tokens, limit // 2)
        messages = list(self.messages)
        start = self._first_turn()
        dropped = 0
        while True:
            ids = self._template(messages, True)
            if len(ids) + reserve <= limit or (len(messages) - start <= 1 and len(ids) < limit):
                # (a lone question that leaves less room than --max-tokens still gets a shorter answer)
                self.messages = messages
                return ids, dropped
            if len(messages) - start <= 1:
                raise ContextLengthError(
                    f"this message needs {len(ids)} tokens with the system prompt; the context holds {limit}")
            del messages[start]  # the oldest question ...
            if len(messages) - start > 1 and messages[start]["role"] == "assistant":
                del messages[start]  # ... and its answer
            dropped += 1

    def respond(self, on_text: Callable[[str], None], stop_requested: Callable[[], bool] = lambda: False,
                on_progress: Optional[Callable[[int, int], None]] = None, ids: Optional[list[int]] = None) -> Turn:
        """Answer the last user message, streaming text to `on_text`; stops early when `stop_requested()`.

        `ids`: the prompt from `fit()` when the caller already has it. The answer (or what was
        produced before a stop) is appended to the conversation.
        """
        from llama_mlx.generate import stream_generate

        if ids is None:
            ids, _ = self.fit()

        def progress(done: int, total: int) -> None:
            if stop_requested():
                raise KeyboardInterrupt  # between prefill chunks the cache is consistent
            if on_progress:
                on_progress(done, total)

        stream = stream_generate(self.model, self.tokenizer, ids, self.options.max_tokens,
                                 prompt_cache=self.cache, prompt_progress=progress, **self._kwargs)
        pieces: list[str] = []
        last = None
        interrupted = False
        try:
            for response in stream:
                last = response
                pieces.append(response.text)
                if response.text:
                    on_text(response.text)
                if stop_requested() and response.finish_reason is None:
                    interrupted = True
                    break
        except KeyboardInterrupt:
            interrupted = True
        finally:
            stream.close()  # the generator's finally records what the cache holds (or resets it)
        if last is not None:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
            self._account(last)
        turn = Turn(last, self.context_used(), interrupted)
        self.last = turn
        return turn

    def _account(self, r) -> None:
        t = self.totals
        t["answers"] += 1
        t["prompt_tokens"] += r.prompt_tokens
        t["cached_tokens"] += r.cached_tokens
        t["generated_tokens"] += r.generation_tokens
        t["prompt_seconds"] += r.time_to_first_token
        if r.generation_tps > 0:
            t["generation_seconds"] += (r.generation_tokens - 1) / r.generation_tps
        t["peak_memory"] = max(t["peak_memory"], r.peak_memory)

    def _trim_cache_to_messages(self) -> None:
        """Drop cached tokens past what the remaining conversation shares with them."""
        target: list[int] = []
        if self.messages:
            with contextlib.suppress(Exception):
                target = self._template(self.messages, False)
        self.cache.keep_prefix(target)

    # --- commands ----------------------------------------------------------------------

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def drop_unanswered(self) -> None:
        """Remove a trailing question that got no answer."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def undo(self) -> int:
        """Drop the last exchange and trim the cache to match; returns tokens freed."""
        start = self._first_turn()
        if len(self.messages) <= start:
            raise ChatError("nothing to undo")
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if len(self.messages) > start and self.messages[-1]["role"] == "user":
            self.messages.pop()
        before = len(self.cache.tokens)
        self._trim_cache_to_messages()
        return before - len(self.cache.tokens)

    def prepare_retry(self) -> str:
        """Forget the last answer so `respond` produces it again; returns the question."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ChatError("no question to answer again")
        return self.messages[-1]["content"]

    def reset(self) -> None:
        self.messages = self.messages[: self._first_turn()]
        self.cache.reset()
        self.last = None

    def set_system(self, text: Optional[str]) -> None:
        if self.system is not None:
            self.messages.pop(0)
        if text is not None:
            self.messages.insert(0, {"role": "system", "content": text})
        self._trim_cache_to_messages()

    def fingerprint(self) -> dict:
        args = self.model.args
        return {"layers": args.num_hidden_layers, "kv_heads": args.num_key_value_heads, "head_dim": args.head_dim,
                "hidden_size": args.hidden_size, "vocab_size": args.vocab_size}

    def save(self, path: Path) -> Path:
        """Write the transcript and the KV cache; returns the file written."""
        path = session_path(path)
        if path.parent and not path.parent.is_dir():
            raise ChatError(f"{path.parent}: no such folder")
        self.cache.save(path, metadata={
            "format": SESSION_FORMAT,
            "model": self.name,
            "fingerprint": self.fingerprint(),
            "messages": self.messages,
            "saved": _dt.datetime.now().isoformat(timespec="seconds"),
        })
        return path

    def load(self, path: Path) -> Path:
        """Resume what `save` wrote: the transcript and the cache (nothing is prefilled again)."""
        from llama_mlx.generate import PromptCache

        path = session_path(path, must_exist=True)
        try:
            cache, meta = PromptCache.load(self.model, path)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise ChatError(f"{path}: not a saved chat session ({describe_exception(e)})") from None
        if meta.get("format") != SESSION_FORMAT or not isinstance(meta.get("messages"), list):
            raise ChatError(f"{path}: not a saved chat session (a prompt cache without a transcript?)")
        if meta.get("fingerprint") not in (None, self.fingerprint()):
            raise ChatError(f"{path}: saved with a different model ({meta.get('model', '?')})")
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in meta["messages"]
                    if isinstance(m, dict) and "role" in m and "content" in m]
        self.cache, self.messages, self.last = cache, messages, None
        return path


def session_path(path: Path, must_exist: bool = False) -> Path:
    """The session file as the user named it (the library reads it as safetensors whatever its suffix)."""
    path = Path(path).expanduser()
    if must_exist and not path.is_file():
        raise ChatError(f"{path}: no such file")
    return path


# --------------------------------------------------------------------------------------------
# Terminal


class Terminal:
    """Prompt, input (readline, multi-line, paste), streamed output and dim notes."""

    def __init__(self):
        self.console = out_console()
        self.tty_in = sys.stdin.isatty()
        self.colour = self.console.is_terminal and not self.console.no_color
        self.history_file = None
        if self.tty_in:
            self._setup_readline()

    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:
            return
        self.readline = readline
        path = os.environ.get("LLAMA_MLX_HISTORY")
        if path is None:
            path = str(Path.home() / ".cache" / "llama-mlx" / "chat_history")
        if path:
            self.history_file = Path(path).expanduser()
            with contextlib.suppress(OSError):
                readline.read_history_file(self.history_file)
        readline.set_history_length(1000)

    def save_history(self) -> None:
        if self.history_file is None:
            return
        with contextlib.suppress(OSError):
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(self.history_file)

    def _prompt(self, continuation: bool = False) -> str:
        text = "... " if continuation else ">>> "
        if not (self.colour and self.tty_in):
            return text
        # \001 and \002 tell readline the escape codes take no room on screen.
        return f"\001\033[1;{'2' if continuation else '32'}m\002{text}\001\033[0m\002"

    def _pending(self) -> bool:
        """More input already waiting: the rest of a paste (a human cannot type that fast)."""
        if not self.tty_in:
            return False
        try:
            return bool(select.select([sys.stdin], [], [], 0.05)[0])
        except (OSError, ValueError):
            return False

    def read_message(self) -> str:
        """One message, however many lines; EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C."""
        first = input(self._prompt())
        if first.lstrip().startswith('"""'):
            rest = first.lstrip()[3:]
            if rest.rstrip().endswith('"""'):  # """text""" on one line
                return rest.rstrip()[:-3]
            block = [rest]
            while True:
                line = input(self._prompt(True))
                if line.rstrip().endswith('"""'):
                    block.append(line.rstrip()[:-3])
                    return "\n".join(block).strip("\n")
                block.append(line)
        lines = [first]
        while True:
            if lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1]
            elif not self._pending():
                return "\n".join(lines)
            lines.append(input(self._prompt(True)))

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def note(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False, highlight=False)

    def warn(self, text: str) -> None:
        self.console.print(text, style="yellow", markup=False, highlight=False)

    def error(self, text: str) -> None:
        sys.stdout.flush()
        error_line(text)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def stats_line(turn: Turn, limit: int) -> str:
    r = turn.response
    parts = [
        f"{r.time_to_first_token:.2f}s to first token",
        f"prompt {r.prompt_tokens} tok at {r.prompt_tps:.1f} tok/s ({r.cached_tokens} cached)",
        f"{r.generation_tokens} tok at {r.generation_tps:.1f} tok/s",
        f"context {turn.context_used}/{limit}",
        f"peak {r.peak_memory:.2f} GB",
    ]
    line = " · ".join(parts)
    if turn.interrupted:
        line += " · stopped"
    elif r.finish_reason == "length":
        line += " · cut at --max-tokens"
    elif r.finish_reason == "context":
        line += " · context full"
    return line


class ChatApp:
    """The read-answer loop: commands, Ctrl-C handling and rendering around a `ChatSession`."""

    def __init__(self, session: ChatSession, term: Terminal):
        self.session, self.term = session, term
        self._stop = False

    def banner(self) -> None:
        s = self.session
        self.term.note(f"llama-mlx chat · {s.name} · context {s.context_limit:,} tokens · "
                       "/help for commands · Ctrl-D to quit")

    def run(self) -> int:
        """Read and answer until /exit, Ctrl-D or Ctrl-C at the prompt; returns the exit code."""
        try:
            while True:
                try:
                    text = self.term.read_message()
                except EOFError:
                    self.term.write("\n")
                    return 0
                except KeyboardInterrupt:
                    self.term.write("\n")
                    return 0
                if not text.strip():
                    continue
                try:
                    if self.handle(text) is False:
                        return 0
                except ChatError as e:
                    self.term.error(str(e))
                except Exception as e:  # a bug or a bad file must not end the session
                    if os.environ.get("LLAMA_MLX_DEBUG"):
                        raise
                    self.term.error(describe_exception(e))
        finally:
            self.term.save_history()

    # --- commands ----------------------------------------------------------------------

    def handle(self, text: str):
        stripped = text.strip()
        if stripped.startswith("//"):
            return self.ask(stripped[1:])
        if not stripped.startswith("/"):
            return self.ask(text)
        name, _, arg = stripped.partition(" ")
        arg = arg.strip()
        name = name.lower()
        s, t = self.session, self.term
        if name in ("/exit", "/quit", "/bye", "/q"):
            return False
        if name in ("/help", "/?"):
            t.write(HELP)
        elif name in ("/reset", "/clear"):
            s.reset()
            t.note("conversation cleared" + (" (system prompt kept)" if s.system is not None else ""))
        elif name == "/system":
            if not arg:
                t.note(f"system prompt: {s.system!r}" if s.system is not None
                       else "no system prompt (the model's template default applies)")
            else:
                s.set_system(None if arg == "-" else arg)
                t.note("system prompt removed" if arg == "-" else "system prompt set")
        elif name == "/undo":
            freed = s.undo()
            t.note(f"dropped the last exchange ({freed} tokens freed from the cache) · "
                   f"{_plural(s.exchanges(), 'exchange')} left")
        elif name == "/retry":
            s.prepare_retry()
            if s.options.temp == 0:
                t.note("(temperature 0: the same answer again; /set temp 0.7 to vary it)")
            self._answer()
        elif name == "/save":
            if not arg:
                raise ChatError("usage: /save FILE")
            path = s.save(Path(arg))
            t.note(f"saved {_plural(s.exchanges(), 'exchange')} and {len(s.cache.tokens)} cached tokens to {path}")
        elif name == "/load":
            if not arg:
                raise ChatError("usage: /load FILE")
            path = s.load(Path(arg))
            t.note(f"loaded {path}: {_plural(s.exchanges(), 'exchange')}, {len(s.cache.tokens)} tokens already in the "
                   f"KV cache (no prefill needed)")
        elif name == "/history":
            self.show_history()
        elif name == "/stats":
            self.show_stats()
        elif name == "/set":
            self.set_option(arg)
        else:
            raise ChatError(f"unknown command {name}; /help lists them (start with // to send a '/' message)")
        return None

    def ask(self, text: str) -> None:
        self.session.add_user(text)
        self._answer()

    def _answer(self) -> None:
        from llama_mlx.errors import ContextLengthError

        s, t = self.session, self.term
        self._stop = False
        status = None
        started = [False]

        def on_text(text: str) -> None:
            if not started[0]:
                started[0] = True
                if status is not None:
                    status.stop()
            t.write(text)

        def on_progress(done: int, total: int) -> None:
            # Only long prompts are read in several chunks; their progress is worth showing.
            if status is not None and not started[0] and total > s.options.prefill_step_size:
                status.update(f"reading the prompt… {done}/{total} tokens")

        try:
            ids, dropped = s.fit()
        except ContextLengthError as e:
            s.drop_unanswered()
            raise ChatError(f"{e}; /reset to start over, or shorten it") from None
        if dropped:
            what = "the oldest exchange" if dropped == 1 else f"the {dropped} oldest exchanges"
            t.warn(f"(the conversation outgrew the context: dropped {what}; the system prompt is kept)")
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            if t.console.is_terminal:
                status = t.console.status("", spinner="dots")
                status.start()
            try:
                turn = s.respond(on_text, lambda: self._stop, on_progress, ids=ids)
            except KeyboardInterrupt:  # a second Ctrl-C before the stream began
                s.drop_unanswered()
                t.write("\n")
                t.note("(stopped before the answer began)")
                return
            except BaseException:
                s.drop_unanswered()
                raise
        finally:
            if status is not None:
                status.stop()
            signal.signal(signal.SIGINT, previous)
        if turn.response is None:
            s.drop_unanswered()
            t.write("\n")
            t.note("(stopped before the answer began)")
            return
        t.write("\n")
        t.note(stats_line(turn, s.context_limit))

    def _on_sigint(self, signum, frame) -> None:
        if self._stop:
            raise KeyboardInterrupt  # a second Ctrl-C: stop right now
        self._stop = True

    def show_history(self) -> None:
        s, t = self.session, self.term
        if not s.messages:
            t.note("(empty conversation)")
            return
        for m in s.messages:
            role = m["role"]
            t.console.print(f"{role}:", style="bold cyan" if role == "user" else "bold", markup=False,
                            highlight=False)
            t.write(m["content"] + "\n")

    def show_stats(self) -> None:
        s, t = self.session, self.term
        tot = s.totals
        gen_tps = (tot["generated_tokens"] - tot["answers"]) / tot["generation_seconds"] \
            if tot["generation_seconds"] > 0 else 0.0
        lines = [
            f"model: {s.name}",
            f"exchanges: {s.exchanges()} · answers generated: {tot['answers']}",
            f"context: {s.context_used()}/{s.context_limit} tokens in the KV cache "
            f"(model context {s.model_context})",
            f"prompt tokens prefilled: {tot['prompt_tokens']} · reused from the cache: {tot['cached_tokens']}",
            f"tokens generated: {tot['generated_tokens']} · mean speed {gen_tps:.1f} tok/s",
            f"peak memory: {tot['peak_memory']:.2f} GB",
            "settings: " + self._settings_text(),
        ]
        if s.last is not None and s.last.response is not None:
            lines.append("last answer: " + stats_line(s.last, s.context_limit))
        for line in lines:
            t.note(line)

    def _settings_text(self) -> str:
        o = self.session.options
        cache = self.session.cache.options
        parts = [f"{name} {getattr(o, attr)}" for name, (attr, _, _) in SETTINGS.items()]
        parts += [f"max-kv-size {cache.get('max_kv_size')}", f"kv-bits {cache.get('kv_bits')}"]
        return ", ".join(parts)

    def set_option(self, arg: str) -> None:
        if not arg:
            self.term.note("settings: " + self._settings_text())
            return
        name, _, value = arg.partition(" ")
        name = name.lower().lstrip("-").replace("_", "-")
        name = {"temperature": "temp"}.get(name, name)
        if name not in SETTINGS or not value.strip():
            raise ChatError(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTINGS)}")
        attr, parse, ok = SETTINGS[name]
        try:
            parsed = parse(value.strip())
        except ValueError:
            raise ChatError(f"/set {name}: {value.strip()!r} is not a valid value") from None
        if not ok(parsed):
            raise ChatError(f"/set {name}: {value.strip()} is out of range")
        opts = self.session.options
        old = getattr(opts, attr)
        setattr(opts, attr, parsed)
        try:
            self.session.settings_changed()
        except ValueError as e:
            setattr(opts, attr, old)
            raise ChatError(str(e)) from None
        self.term.note(f"{name} = {parsed}")


def chat(
    model: ModelOpt = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = 512,
    temp: TempOpt = 0.6,
    top_p: TopPOpt = 0.9,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    min_tokens_to_keep: MinTokensToKeepOpt = 1,
    seed: SeedOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    repetition_context_size: RepetitionContextOpt = 20,
    logit_bias: LogitBiasOpt = None,
    sampling_order: SamplingOrderOpt = "mlx",
    stop: StopOpt = None,
    extra_eos_token: ExtraEosOpt = None,
    max_kv_size: MaxKVSizeOpt = None,
    kv_bits: KVBitsOpt = None,
    kv_group_size: KVGroupSizeOpt = 64,
    prefill_step_size: PrefillStepOpt = 512,
    dtype: DtypeOpt = "auto",
    load_session: Annotated[Optional[Path], typer.Option(
        "--load", metavar="FILE", help="Resume a conversation saved with /save.", show_default=False)] = None,
) -> None:
    """Chat with a model in the terminal: streamed answers, multi-turn, with /commands (/help)."""
    options = {k: v for k, v in locals().items() if k not in ("model", "system", "dtype", "load_session")}
    code = _run(model, system, dtype, load_session, options)
    raise typer.Exit(code)


@handle_errors
def _run(model, system, dtype, load_session, options) -> int:
    opts = GenerationOptions(**{k: (v or [] if k in ("logit_bias", "stop", "extra_eos_token") else v)
                                for k, v in options.items()})
    if load_session is not None:
        session_path(load_session, must_exist=True)  # fail before the model loads
    opts.check_static()
    lm, tokenizer = load_model(model, dtype)
    opts.check(tokenizer)
    session = ChatSession(lm, tokenizer, opts, system=system, name=model_label(model))
    term = Terminal()
    app = ChatApp(session, term)
    app.banner()
    if load_session is not None:
        path = session.load(load_session)
        if system is not None:
            session.set_system(system)
        term.note(f"loaded {path}: {_plural(session.exchanges(), 'exchange')}, {len(session.cache.tokens)} "
                  "tokens already in the KV cache (no prefill needed)")
    return app.run()

