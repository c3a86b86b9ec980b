"""``text2mask`` command line: thin shells over each method's Python API.

``root`` holds the app, the global options and the helpers every method's commands
share; each method's module registers its commands here, so that ``root`` imports none
of them (no import cycle).
"""
from __future__ import annotations

from . import fewshot, refer, slime, wsss  # noqa: F401  (wsss and refer put their commands on the root app)
from .root import app

app.add_typer(slime.app, name="slime")
app.add_typer(fewshot.app, name="fewshot")


def main() -> None:
    app()


__all__ = ["app", "main"]
