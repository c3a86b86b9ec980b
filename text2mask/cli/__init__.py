"""``text2mask`` command line: thin shells over each method's Python API.

``root`` holds the app, the global options and the helpers every method's commands
share; each method's module registers its commands here, so that ``root`` imports none
of them (no import cycle).
"""
from __future__ import annotations

import os
import sys

from . import fewshot, refer, slime, wsss  # noqa: F401  (wsss and refer put their commands on the root app)
from . import export  # noqa: F401,E402  (`text2mask export`, on the root app)
from .root import app

app.add_typer(slime.app, name="slime")
app.add_typer(fewshot.app, name="fewshot")

# Every command's --help ends with the exit codes (one contract: text2mask.errors).
EXIT_CODES = ("Exit codes: 0 done; 1 some items failed (named; batch runs log them in failures.jsonl) or a "
              "training diverged; 2 bad option, input, model or output, found before any work; 3 crashed "
              "(-v shows the traceback); 130 interrupted.")
for _typer in (app, *(g.typer_instance for g in app.registered_groups)):
    for _command in _typer.registered_commands:
        _command.epilog = _command.epilog or EXIT_CODES
for _info in (app.info, *(g for g in app.registered_groups)):
    _info.epilog = _info.epilog or EXIT_CODES


def _stdout_is_devnull() -> bool:
    try:
        out, null = os.fstat(sys.stdout.fileno()), os.stat(os.devnull)
    except (OSError, ValueError, AttributeError):
        return False
    return (out.st_dev, out.st_ino) == (null.st_dev, null.st_ino)


def main() -> None:
    devnull_before = _stdout_is_devnull()
    try:
        app()
    except SystemExit as e:
        # A reader that stops early (`text2mask --help | head`) closes the pipe: rich then
        # points stdout at /dev/null and exits 1 (click wraps stdout and exits 1). Nothing
        # failed, so exit 0; a real exit 1 (failed items) keeps its code.
        broken = "PacifyFlushWrapper" in type(sys.stdout).__name__ or (_stdout_is_devnull() and not devnull_before)
        if e.code == 1 and broken:
            sys.exit(0)
        raise


__all__ = ["app", "main"]
