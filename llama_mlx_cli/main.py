"""The `llama-mlx` command: chat, generate, serve, convert, info, bench, pull, list, rm."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from . import bench as _bench
from . import chat as _chat
from . import convert as _convert
from . import generate as _generate
from . import info as _info
from . import models as _models
from . import serve as _serve
from .common import LlamaGroup, launched

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
    from llama_mlx.hub import show_progress

    show_progress(sys.stderr.isatty())  # the hub's own download bars, on a terminal only

    # Under mlx.launch every rank runs the command: rank 0 alone prints (the others write to the null device).
    if launched():
        from llama_mlx.distributed import quiet_other_ranks

        quiet_other_ranks()


app.command("chat", epilog=_chat.EPILOG)(_chat.chat)
app.command("generate", epilog=_generate.EPILOG)(_generate.generate)
app.command("convert", epilog=_convert.EPILOG)(_convert.convert)
app.command("info", epilog=_info.EPILOG)(_info.info)
app.command("bench", epilog=_bench.EPILOG)(_bench.bench)
app.command("pull", epilog=_models.PULL_EPILOG)(_models.pull)
app.command("list", epilog=_models.LIST_EPILOG)(_models.list_models)
app.command("rm", epilog=_models.RM_EPILOG)(_models.rm)
app.command("serve", epilog=_serve.EPILOG)(_serve.serve)

if __name__ == "__main__":
    app()
