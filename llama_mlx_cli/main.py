"""The `llama-mlx` command: chat, generate, convert, info, bench, serve."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import bench as _bench
from . import chat as _chat
from . import convert as _convert
from . import generate as _generate
from . import info as _info
from . import serve as _serve
from .common import LlamaGroup

app = typer.Typer(
    name="llama-mlx",
    cls=LlamaGroup,
    help="Meta's Llama 3 family, run locally with MLX: chat, generate, convert, inspect, benchmark.\n\n"
         "Run [bold]llama-mlx chat[/bold] to start chatting with the default model "
         "(SmolLM2-135M-Instruct, fetched on first use).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["--help", "-h"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from llama_mlx import __version__

        typer.echo(f"llama-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option(
        "--version", "-V", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
) -> None:
    pass  # only --version lives here; the help text is the app's


app.command("chat", epilog=_chat.EPILOG)(_chat.chat)
app.command("generate", epilog=_generate.EPILOG)(_generate.generate)
app.command("convert", epilog=_convert.EPILOG)(_convert.convert)
app.command("info", epilog=_info.EPILOG)(_info.info)
app.command("bench", epilog=_bench.EPILOG)(_bench.bench)
app.command("serve", epilog=_serve.EPILOG)(_serve.serve)

if __name__ == "__main__":
    app()
