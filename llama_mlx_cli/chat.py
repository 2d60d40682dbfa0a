"""`llama-mlx chat`: a streaming, multi-turn terminal chat around the library's `ChatSession`.

Ctrl-C during an answer asks the session to stop (a second one stops at once); the partial answer
is kept. At the prompt, Ctrl-C clears the line (as in Python's REPL); a second one on an empty
line quits. While an answer streams, keys are neither echoed nor lost: they become the next input.
The slash commands are a table (`COMMANDS`): name, usage, help, handler.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer

from llama_mlx.errors import ContextLengthError

if TYPE_CHECKING:
    from llama_mlx.chat import ChatSession, Turn

from .common import (
    AdapterOpt,
    DtypeOpt,
    GenerationOptions,
    GgufFileOpt,
    ModelOpt,
    PipelineOpt,
    SystemOpt,
    TensorParallelOpt,
    default_prompt_lookup,
    describe_exception,
    error_line,
    generation_options,
    handle_errors,
    lead_or_follow,
    load_model,
    model_label,
    note_line,
    out_console,
    refuse_in_group,
    split_mode,
    with_gguf_file,
)

EPILOG = """\
[bold]Examples[/bold]

  llama-mlx chat

  llama-mlx chat -M weights/Llama-3.2-1B-Instruct --system "You are a terse assistant."

  llama-mlx chat --temp 0 --max-tokens 128 --max-kv-size 4096

  llama-mlx chat -M weights/Llama-3.2-1B-Instruct --adapter-path adapters     # a LoRA from mlx_lm.lora

Inside the chat, /help lists the commands (/undo, /retry, /save, /load, /stats, ...).
End a line with a backslash, or wrap text in triple quotes, to send several lines; pasted text
stays one message. Ctrl-C stops an answer; at the prompt it clears the line, and a second
Ctrl-C on an empty line, Ctrl-D or /exit quits.

  llama-mlx chat --tools python        # run the model's <|python_tag|> code (asks first; --yes skips)

  mlx.launch --hosts 10.0.0.1,10.0.0.2 --backend ring -- llama-mlx chat -M NAME [--pipeline]
                                       # one model over two machines; rank 0 reads the input, /exit quits
"""

INPUT_HELP = """\
Input
  Enter sends. A line ending in \\ continues on the next line.
  \"\"\" starts a block of lines, ended by a line ending in \"\"\".
  Pasted text with newlines stays one message. Up/down arrows recall earlier input.
  A message starting with // is sent as text starting with /.
  Ctrl-C while an answer streams stops it; the partial answer is kept. Keys typed meanwhile
  become the next input line.
  Ctrl-C at the prompt clears the line; a second Ctrl-C on an empty line, Ctrl-D or /exit quits.
"""

HISTORY_ENV = "LLAMA_MLX_HISTORY"  # the history file; empty or "off": none
HISTORY_FILE = "~/.cache/llama-mlx/chat_history"
HISTORY_MAX_CHARS = 4096  # longer inputs (pasted documents) are never written to the history file
HISTORY_HELP = (f"Write no inputs to the history file. Up/down arrows recall earlier inputs, kept in {HISTORY_FILE} "
                f"({HISTORY_ENV}=FILE: elsewhere; {HISTORY_ENV}=off: nowhere, as with this flag); inputs over "
                f"{HISTORY_MAX_CHARS} characters and those of sessions resumed with --load or /load are never kept.")

PREFILL_SECONDS = 0.25  # prefill chunks this long at most: Ctrl-C during a long prompt answers at once
LONG_PROMPT = 256  # prompts to prefill longer than this show their progress
TOOL_ROUNDS = 5  # code runs per question at most

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


# --------------------------------------------------------------------------------------------
# Terminal


class Terminal:
    """Prompt, input (readline, multi-line, paste), streamed output and dim notes."""

    def __init__(self, *, history: bool = True):
        self.console = out_console()
        self.tty_in = sys.stdin.isatty()
        self.colour = self.console.is_terminal and not self.console.no_color
        self.history_file = None
        self.readline = None
        self.kept: list[str] = []  # what the history file will hold: its old entries, then inputs worth keeping
        self.keep_inputs = True  # off once a saved session is resumed: its inputs stay out of the file
        self.typeahead = ""  # keys typed while an answer streamed: the start of the next input
        if self.tty_in:
            self._setup_readline(history)

    def _setup_readline(self, history: bool) -> None:
        try:
            import readline
        except ImportError:
            return
        self.readline = readline
        path = os.environ.get(HISTORY_ENV, HISTORY_FILE)
        if history and path.strip().lower() not in ("", "off"):
            self.history_file = Path(path).expanduser()
            with contextlib.suppress(OSError):
                readline.read_history_file(self.history_file)
            self.kept = self._history()
        readline.set_history_length(1000)

    def _history(self, start: int = 0) -> list[str]:
        rl = self.readline
        if rl is None:
            return []
        items = (rl.get_history_item(i) for i in range(start + 1, rl.get_current_history_length() + 1))
        return [item for item in items if item is not None]

    def save_history(self) -> None:
        """Write the history file: its old entries and the inputs worth keeping (not the whole recall list)."""
        if self.history_file is None:
            return
        rl = self.readline
        recall = self._history()
        rl.clear_history()
        for line in self.kept[-1000:]:
            rl.add_history(line)
        with contextlib.suppress(OSError):
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            rl.write_history_file(self.history_file)
            os.chmod(self.history_file, 0o600)  # pasted text may be private
        rl.clear_history()
        for line in recall:
            rl.add_history(line)

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

    def line_buffer(self) -> str:
        """What was typed on the line being edited (after a Ctrl-C: what it cleared)."""
        return self.readline.get_line_buffer() if self.readline is not None else ""

    def _input(self, prompt: str) -> str:
        """input(), starting from the keys typed ahead: a whole line of them is taken as entered."""
        if "\n" in self.typeahead:
            line, self.typeahead = self.typeahead.split("\n", 1)
            self.write(prompt.replace("\001", "").replace("\002", "") + line + "\n")
            if self.readline is not None and line.strip():
                self.readline.add_history(line)
            return line
        if self.typeahead and self.readline is not None:
            text, self.typeahead = self.typeahead, ""
            rl = self.readline

            def hook():
                rl.insert_text(text)
                rl.redisplay()
                rl.set_pre_input_hook(None)

            rl.set_pre_input_hook(hook)
        return input(prompt)

    @contextlib.contextmanager
    def quiet_keys(self):
        """While an answer streams: keys are not echoed and wait, uncooked, to become the next input.
        Ctrl-C still interrupts (ISIG stays on)."""
        if not self.tty_in:
            yield
            return
        import termios

        fd = sys.stdin.fileno()
        try:
            old = termios.tcgetattr(fd)
        except termios.error:
            yield
            return
        quiet = termios.tcgetattr(fd)
        quiet[3] &= ~(termios.ECHO | termios.ICANON)
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        try:
            yield
        finally:
            typed = b""
            with contextlib.suppress(OSError, ValueError):
                while select.select([fd], [], [], 0)[0]:
                    chunk = os.read(fd, 4096)
                    if not chunk:
                        break
                    typed += chunk
            termios.tcsetattr(fd, termios.TCSANOW, old)  # TCSANOW: keys still queued are kept
            self.typeahead = edit_keys(self.typeahead + typed.decode("utf-8", "replace"))

    def confirm(self, question: str) -> bool:
        try:
            answer = self._input(question)
        except EOFError:
            return False
        return answer.strip().lower() in ("y", "yes")

    def read_message(self) -> str:
        """One message, however many lines; EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C. Every line
        stays for recall; the history file gets them only for a message of bounded size, outside a
        resumed session."""
        start = len(self._history())
        text = self._read_message()
        if self.keep_inputs and len(text) <= HISTORY_MAX_CHARS:
            self.kept += self._history(start)
        return text

    def _read_message(self) -> str:
        first = self._input(self._prompt())
        if first.lstrip().startswith('"""'):
            rest = first.lstrip()[3:]
            if rest.rstrip().endswith('"""'):  # """text""" on one line
                return rest.rstrip()[:-3]
            block = [rest]
            while True:
                line = self._input(self._prompt(True))
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
            lines.append(self._input(self._prompt(True)))

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


_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|O.|.)?")


def edit_keys(keys: str) -> str:
    """Keys as typed (uncooked) to the text they leave: backspace, Ctrl-U and Ctrl-W applied, Enter a
    newline, arrows and other control keys dropped."""
    out: list[str] = []
    for ch in _ESCAPES.sub("", keys):
        if ch in "\x7f\x08":
            if out and out[-1] != "\n":
                out.pop()
        elif ch == "\x15":  # Ctrl-U: the line so far
            while out and out[-1] != "\n":
                out.pop()
        elif ch == "\x17":  # Ctrl-W: the word before
            while out and out[-1] == " ":
                out.pop()
            while out and out[-1] not in " \n":
                out.pop()
        elif ch in "\r\n":
            out.append("\n")
        elif ch == "\t" or ch >= " ":
            out.append(ch)
    return "".join(out)


def sampling_text(opts: GenerationOptions, sources: dict[str, str]) -> str:
    """'temp 0.6, top-p 0.9 (Meta's defaults)'; values of different sources each name their own:
    'temp 0 (command line), top-p 0.9 (Meta's defaults)'."""
    temp, top_p = f"temp {opts.temp:g}", f"top-p {opts.top_p:g}"
    a, b = sources.get("temp"), sources.get("top_p")
    if a == b:
        return f"{temp}, {top_p}" + (f" ({a})" if a else "")
    return f"{temp}{f' ({a})' if a else ''}, {top_p}{f' ({b})' if b else ''}"


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
    if r.speculative:  # (every speculative response carries it, the first token's included)
        from llama_mlx.speculative import describe

        parts.append(describe(r.speculative))
    line = " · ".join(parts)
    if turn.interrupted:
        line += " · stopped"
    elif r.finish_reason == "length":
        line += " · cut at --max-tokens"
    elif r.finish_reason == "context":
        line += " · context full"
    return line


@dataclass(frozen=True)
class Command:
    """A slash command: its names (the first is shown), usage, one line of help, and its handler
    (returns False to end the chat)."""

    names: tuple[str, ...]
    usage: str
    help: str
    run: Callable[["ChatApp", str], Optional[bool]]


class ChatApp:
    """The read-answer loop: commands, Ctrl-C handling and rendering around a `ChatSession`."""

    def __init__(self, session: ChatSession, options: GenerationOptions, term: Terminal, *,
                 tools=None, confirm_tools: bool = True, sampling_sources: Optional[dict[str, str]] = None,
                 lockstep: bool = False):
        self.session, self.options, self.term = session, options, term
        self.tools, self.confirm_tools = tools, confirm_tools  # tools: a PythonSandbox, or None
        self.sampling_sources = sampling_sources or {}  # option -> where its value came from
        self.lockstep = lockstep  # rank 0 under mlx.launch: answers run on every rank (llama_mlx.lockstep)
        self._stop = False

    def banner(self) -> None:
        s, o = self.session, self.options
        sampling = sampling_text(o, self.sampling_sources)
        self.term.note(f"llama-mlx chat · {s.name} · context {s.context_limit:,} tokens · {sampling} · "
                       "/help for commands · Ctrl-D to quit")
        if self.tools is not None:
            t = self.tools
            self.term.note(f"python tool on: code runs in {t.scratch}, confined by {t.confinement}; "
                           f"{t.timeout:g} s, {t.memory_mb} MB, {t.max_processes} processes"
                           + ("" if self.confirm_tools else " · runs without asking"))

    def run(self) -> int:
        """Read and answer until /exit, Ctrl-D, or Ctrl-C twice at the prompt; returns the exit code."""
        from llama_mlx.chat import ChatError
        armed = False  # the last thing at the prompt was a Ctrl-C
        try:
            while True:
                try:
                    text = self.term.read_message()
                except EOFError:
                    self.term.write("\n")
                    return 0
                except KeyboardInterrupt:
                    cleared = self.term.line_buffer()
                    try:
                        self.term.write("\n")
                        if armed and not cleared.strip():
                            return 0
                        armed = True
                        self.term.note("(Ctrl-C again on an empty line, Ctrl-D or /exit to quit)")
                    except KeyboardInterrupt:  # pressed twice at once
                        return 0
                    continue
                armed = False
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

    def handle(self, text: str) -> Optional[bool]:
        from llama_mlx.chat import ChatError
        stripped = text.strip()
        if stripped.startswith("//"):
            return self.ask(stripped[1:])
        if not stripped.startswith("/"):
            return self.ask(text)
        name, _, arg = stripped.partition(" ")
        command = COMMAND_BY_NAME.get(name.lower())
        if command is None:
            raise ChatError(f"unknown command {name.lower()}; /help lists them (start with // to send a '/' message)")
        return command.run(self, arg.strip())

    # --- commands ----------------------------------------------------------------------

    def cmd_exit(self, arg: str) -> bool:
        return False

    def cmd_help(self, arg: str) -> None:
        self.term.write(help_text())

    def cmd_reset(self, arg: str) -> None:
        s = self.session
        s.reset()
        self.term.note("conversation cleared" + (" (system prompt kept)" if s.system is not None else ""))

    def cmd_system(self, arg: str) -> None:
        s, t = self.session, self.term
        if not arg:
            t.note(f"system prompt: {s.system!r}" if s.system is not None
                   else "no system prompt (the model's template default applies)")
        else:
            s.set_system(None if arg == "-" else arg)
            t.note("system prompt removed" if arg == "-" else "system prompt set")

    def cmd_undo(self, arg: str) -> None:
        freed = self.session.undo()
        self.term.note(f"dropped the last exchange ({freed} tokens freed from the cache) · "
                       f"{_plural(self.session.exchanges(), 'exchange')} left")

    def cmd_retry(self, arg: str) -> None:
        self.session.retry()
        if self.options.temp == 0:
            self.term.note("(temperature 0: the same answer again; /set temp 0.7 to vary it)")
        self._answer()

    def _not_in_lockstep(self, command: str) -> None:
        from llama_mlx.chat import ChatError
        if self.lockstep:
            raise ChatError(f"{command} is not available under mlx.launch (each rank's KV cache holds only its shard)")

    def cmd_save(self, arg: str) -> None:
        from llama_mlx.chat import ChatError, session_files
        self._not_in_lockstep("/save")
        if not arg:
            raise ChatError("usage: /save FILE")
        s = self.session
        s.save(Path(arg))
        conversation, cache = session_files(arg)
        self.term.note(f"saved {_plural(s.exchanges(), 'exchange')} to {conversation} (JSON) and "
                       f"{len(s.cache.tokens)} cached tokens to {cache}")

    def cmd_load(self, arg: str) -> None:
        from llama_mlx.chat import ChatError
        self._not_in_lockstep("/load")
        if not arg:
            raise ChatError("usage: /load FILE")
        self.note_loaded(self.session.load(Path(arg)))
        self.term.keep_inputs = False

    def note_loaded(self, info: dict) -> None:
        s = self.session
        name = info["conversation"] or info["cache"]
        line = f"loaded {name}: {_plural(s.exchanges(), 'exchange')}, "
        if info["to_prefill"] == 0:
            line += f"{info['cached']} tokens already in the KV cache (no prefill needed)"
        else:
            line += (f"{info['cached']} tokens already in the KV cache, {info['to_prefill']} to prefill "
                     "with the next answer")
        if info["note"]:
            line += f" ({info['note']})"
        self.term.note(line)

    def cmd_history(self, arg: str) -> None:
        s, t = self.session, self.term
        if not s.messages:
            t.note("(empty conversation)")
            return
        for m in s.messages:
            role = m["role"]
            t.console.print(f"{role}:", style="bold cyan" if role == "user" else "bold", markup=False,
                            highlight=False)
            t.write(m["content"] + "\n")

    def cmd_stats(self, arg: str) -> None:
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
        o = self.options
        cache = self.session.cache.options
        parts = [f"{name} {getattr(o, attr)}" for name, (attr, _, _) in SETTINGS.items()]
        parts += [f"max-kv-size {cache.get('max_kv_size')}", f"kv-bits {cache.get('kv_bits')}"]
        return ", ".join(parts)

    def cmd_set(self, arg: str) -> None:
        from llama_mlx.chat import ChatError
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
        opts = self.options
        old = getattr(opts, attr)
        setattr(opts, attr, parsed)
        try:
            configure(self.session, opts, lockstep=self.lockstep)
        except ValueError as e:
            setattr(opts, attr, old)
            raise ChatError(str(e)) from None
        self.term.note(f"{name} = {parsed}")

    # --- answers -----------------------------------------------------------------------

    def ask(self, text: str) -> None:
        image, self.pending_image = getattr(self, "pending_image", None), None
        self.session.add_user(text, **({"image": image} if image is not None else {}))
        self._answer()

    def cmd_image(self, arg: str) -> None:
        from llama_mlx.chat import ChatError
        from llama_mlx.errors import ImageError
        from llama_mlx.vision.processor import load_image
        from llama_mlx.vision.prompt import sees_images

        if not arg:
            raise ChatError("/image PATH: name the image file")
        if not sees_images(self.session.model):
            raise ChatError(f"{self.session.name} reads text only: /image needs a Llama 3.2 Vision model")
        path = Path(arg).expanduser()
        try:
            load_image(path)
        except ImageError as e:
            raise ChatError(str(e)) from None
        self.pending_image = str(path.resolve())  # a saved chat names it wherever it is resumed
        self.term.note(f"{path.name} goes with your next message")

    def _answer(self) -> None:
        """Answer the last question; with tools on, run the code it calls and answer its output."""
        for _ in range(TOOL_ROUNDS):
            if not self._answer_once():
                return
            code = self.session.tool_call()
            if code is None or self.tools is None:
                return
            if not self._run_tool(code):
                return
        self.term.warn(f"(stopped after {TOOL_ROUNDS} code runs for one question)")

    def _run_tool(self, code: str) -> bool:
        """Run a tool call (asking first unless --yes) and add its output; False: do not answer it."""
        t, s = self.term, self.session
        t.note("the model wants to run this Python code:")
        t.write(textwrap.indent(code.strip("\n"), "    ") + "\n")
        if self.confirm_tools and not t.confirm("run it? [y/N] "):
            s.add_tool_result("The user declined to run this code.")
            t.note("(not run; the model is told so)")
            return True
        try:
            result = self.tools.run(code)
        except KeyboardInterrupt:
            s.add_tool_result("The run was interrupted by the user.")
            t.write("\n")
            t.note("(interrupted)")
            return False
        output = result.as_tool_output()
        t.note("output:")
        t.write(textwrap.indent(output, "    ") + "\n")
        s.add_tool_result(output)
        return True

    def _answer_once(self) -> bool:
        """Stream one answer; returns whether it ended by itself (not stopped before it began)."""
        from llama_mlx.chat import ChatError

        s, t = self.session, self.term
        self._stop = False
        status = None
        started = False

        def on_progress(done: int, total: int) -> None:
            # Long prompts are read in several chunks; their progress is worth showing.
            if status is not None and not started and total > LONG_PROMPT:
                status.update(f"reading the prompt… {done}/{total} tokens (Ctrl-C stops)")

        try:
            dropped = s.fit()
        except ContextLengthError as e:  # the session dropped the question
            raise ChatError(f"{e}; /reset to start over, or shorten it") from None
        if dropped:
            what = "the oldest exchange" if dropped == 1 else f"the {dropped} oldest exchanges"
            t.warn(f"(the conversation outgrew the context: dropped {what}; the system prompt is kept)")
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            with t.quiet_keys():
                if t.console.is_terminal:
                    status = t.console.status("", spinner="dots")
                    status.start()
                stream = s.respond(stop_requested=lambda: self._stop, prompt_progress=on_progress)
                try:
                    for response in stream:
                        if response.text:
                            if not started and status is not None:
                                status.stop()
                            started = True
                            t.write(response.text)
                except KeyboardInterrupt:  # a second Ctrl-C: the answer so far is kept
                    pass
                finally:
                    stream.close()
                    if status is not None:
                        status.stop()
        finally:
            signal.signal(signal.SIGINT, previous)
        turn = s.last
        t.write("\n")
        if turn is None or turn.response is None:
            t.note("(stopped before the answer began)")
            return False
        t.note(stats_line(turn, s.context_limit))
        return not turn.interrupted

    def _on_sigint(self, signum, frame) -> None:
        if self._stop and not self.lockstep:  # (in lockstep every rank stops at the next step, not mid-step)
            raise KeyboardInterrupt  # a second Ctrl-C: stop right now
        self._stop = True


COMMANDS = [
    Command(("/help", "/?"), "/help", "this help", ChatApp.cmd_help),
    Command(("/reset", "/clear"), "/reset", "forget the conversation (the system prompt stays)", ChatApp.cmd_reset),
    Command(("/system",), "/system [TEXT]", "set the system prompt (no TEXT: show it; /system - removes it)",
            ChatApp.cmd_system),
    Command(("/undo",), "/undo", "drop the last exchange (question and answer)", ChatApp.cmd_undo),
    Command(("/retry",), "/retry", "answer the last question again", ChatApp.cmd_retry),
    Command(("/save",), "/save FILE", "save the conversation as JSON in FILE, named as given, and its KV cache "
            "beside it in FILE.safetensors (FILE.json: FILE.safetensors; a FILE ending in .safetensors gets the "
            "cache, the conversation going to the .json beside it)", ChatApp.cmd_save),
    Command(("/load",), "/load FILE", "resume a saved conversation (either file); what its cache holds is not "
            "prefilled again", ChatApp.cmd_load),
    Command(("/image",), "/image PATH", "attach an image to the next message (Llama 3.2 Vision models; one per "
            "message)", ChatApp.cmd_image),
    Command(("/history",), "/history", "show the conversation", ChatApp.cmd_history),
    Command(("/stats",), "/stats", "session statistics and settings", ChatApp.cmd_stats),
    Command(("/set",), "/set [NAME VALUE]", f"change a setting: {', '.join(SETTINGS)} (no NAME: show them)",
            ChatApp.cmd_set),
    Command(("/exit", "/quit", "/bye", "/q"), "/exit", "quit (also /quit, /bye, Ctrl-D, or Ctrl-C twice at the prompt)",
            ChatApp.cmd_exit),
]
COMMAND_BY_NAME = {name: command for command in COMMANDS for name in command.names}


def help_text() -> str:
    """The /help text, from the command table."""
    lines = ["Commands"] + [textwrap.fill(c.help, 100, break_on_hyphens=False, initial_indent=f"  {c.usage:<22}", subsequent_indent=" " * 24)
                            for c in COMMANDS]
    return "\n".join(lines) + "\n\n" + INPUT_HELP


def configure(session: ChatSession, opts: GenerationOptions, *, lockstep: bool = False) -> None:
    """Give the session the options' answer length and sampling (ValueError on a bad combination).
    lockstep: the session generates through a `lockstep.Leader` (recipes, fixed prefill chunks)."""
    if lockstep:
        session.generate_kwargs = opts.lockstep_kwargs(session.tokenizer)
        if opts.seed is not None and getattr(opts, "_seeded", None) != opts.seed:
            import mlx.core as mx

            mx.random.seed(opts.seed)  # rank 0 draws each answer's seed from it
            opts._seeded = opts.seed
    else:
        session.generate_kwargs = dict(opts.stream_kwargs(session.tokenizer), prefill_seconds=PREFILL_SECONDS,
                                       **opts.speculative_kwargs(keep_cache=True))
    session.max_tokens = opts.max_tokens


def _tools(value: Optional[str]) -> Optional[str]:
    if value is not None and value != "python":
        raise typer.BadParameter(f"{value!r} is not a known tool (known: python)")
    return value


TOOLS = "Tools"


@generation_options(max_tokens=512, temp=None, top_p=None)
def chat(
    model: ModelOpt = None,
    gguf_file: GgufFileOpt = None,
    adapter_path: AdapterOpt = None,
    system: SystemOpt = None,
    options: GenerationOptions = None,
    dtype: DtypeOpt = "auto",
    pipeline: PipelineOpt = False,
    tensor_parallel: TensorParallelOpt = False,
    load_session: Annotated[Optional[Path], typer.Option(
        "--load", metavar="FILE", help="Resume a conversation saved with /save.", show_default=False)] = None,
    tools: Annotated[Optional[str], typer.Option(
        "--tools", metavar="python", callback=_tools, rich_help_panel=TOOLS, show_default=False,
        help="Let the model run Python (Llama 3.1's <|python_tag|> code interpreter), confined: files only in a "
             "scratch folder (system paths read-only), no network or Unix sockets, time, memory and process "
             "limits. Refused where it cannot be confined. Off by default.")] = None,
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", rich_help_panel=TOOLS, help="With --tools: run the model's code without asking first.")] = False,
    tool_timeout: Annotated[float, typer.Option(
        "--tool-timeout", min=0.1, rich_help_panel=TOOLS,
        help="With --tools: seconds a run may take (then all its processes are killed).")] = 10.0,
    tool_memory: Annotated[int, typer.Option(
        "--tool-memory", min=64, rich_help_panel=TOOLS,
        help="With --tools: megabytes of memory a run may use, all its processes together.")] = 1024,
    no_history: Annotated[bool, typer.Option(
        "--no-history", help=HISTORY_HELP, show_default=False)] = False,
) -> None:
    """Chat with a model in the terminal: streamed answers, multi-turn, with /commands (/help)."""
    model = with_gguf_file(model, gguf_file)
    raise typer.Exit(_run(model, system, dtype, load_session, options, tools, yes, tool_timeout, tool_memory,
                          split_mode(pipeline, tensor_parallel), history=not no_history, adapter_path=adapter_path))


TOOL_SYSTEM = "Environment: ipython"  # Llama 3.1's system line that turns its code interpreter on


def python_tool_warning(tokenizer) -> Optional[str]:
    """Why the model cannot use `--tools python` (Llama 3.1's code interpreter), or None when it can."""
    from llama_mlx.tools import supports_tools

    if not supports_tools(tokenizer):
        return ("this model's chat template ignores tools, so the model will not see the python tool "
                "(Llama 3.1+ Instruct models call it with <|python_tag|>)")
    if "<|python_tag|>" not in tokenizer.special_tokens:
        return ("this model has no <|python_tag|> token, so it cannot call the python tool "
                "(Llama 3.1's code interpreter)")
    return None


@handle_errors
def _run(model, system, dtype, load_session, opts: GenerationOptions, tools=None, yes=False, tool_timeout=10.0,
         tool_memory=1024, pipeline=None, history=True, adapter_path=None) -> int:
    from llama_mlx.chat import ChatSession, session_path
    from llama_mlx.loading import generation_defaults, resolve_model

    if load_session is not None:
        refuse_in_group("--load")  # (each rank's KV cache holds only its shard)
        session_path(load_session, must_exist=True)  # fail before the model loads
    if yes and tools is None:
        raise ValueError("--yes only applies with --tools python")
    if tools == "python":  # refuse before the model loads where the code cannot be confined
        from llama_mlx.sandbox import confinement

        confinement()
    opts.check_static()
    if opts.draft_model is not None or opts.prompt_lookup:
        refuse_in_group("speculative decoding (--draft-model, --prompt-lookup)")
    if opts.draft_model is None and opts.prompt_lookup is None:
        opts.prompt_lookup = default_prompt_lookup()
    lm, tokenizer = load_model(model, dtype, pipeline=pipeline, adapter_path=adapter_path)
    if tools is not None and (warning := python_tool_warning(tokenizer)):
        note_line(f"warning: {warning}")
    sources = opts.use_model_defaults(generation_defaults(resolve_model(model)))
    opts.check_static()
    opts.check(tokenizer)
    leader = lead_or_follow(lambda: (lm, tokenizer))  # under mlx.launch the other ranks follow here, then exit
    sandbox = None
    try:
        if tools is not None:
            system = TOOL_SYSTEM if system is None else f"{TOOL_SYSTEM}\n\n{system}"
        session = ChatSession(lm, tokenizer, system=system, name=model_label(model), **opts.cache_kwargs(),
                              generate=leader.stream_generate if leader is not None else None)
        configure(session, opts, lockstep=leader is not None)
        if tools == "python":
            from llama_mlx.sandbox import PythonSandbox

            sandbox = PythonSandbox(timeout=tool_timeout, memory_mb=tool_memory)
        app = ChatApp(session, opts, Terminal(history=history), tools=sandbox, confirm_tools=not yes,
                      sampling_sources=sources, lockstep=leader is not None)
        app.banner()
        if leader is not None:
            app.term.note(f"split over {leader.group.size()} ranks ({lm.shard_plan.mode} parallel) "
                          "· mlx.launch passes no Ctrl-C or Ctrl-D: /exit quits")
        if load_session is not None:
            info = session.load(load_session)
            if system is not None:
                session.set_system(system)
                info = dict(info, cached=len(session.cache.tokens),
                            to_prefill=len(session.tokens) - len(session.cache.tokens))
            app.note_loaded(info)
            app.term.keep_inputs = False
        return app.run()
    finally:
        if sandbox is not None:
            sandbox.close()
        if leader is not None:
            leader.shutdown()  # the other ranks go home
