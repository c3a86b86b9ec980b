"""The ``text2mask`` command: global options, then one command group per method."""
from __future__ import annotations

from typing import Optional

import typer

from .. import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Segmentation masks from the attention inside Stable Diffusion.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"text2mask {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More messages (-vv: debug)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    from ..log import setup

    setup(-1 if quiet else verbose)


# The WSSS commands stay at the top level, where the first release put them.
from . import wsss  # noqa: E402,F401  (registers its commands on ``app``)
