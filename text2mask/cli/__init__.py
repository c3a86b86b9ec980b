"""``text2mask`` command line: thin shells over each method's Python API."""
from __future__ import annotations

from .root import app


def main() -> None:
    app()


__all__ = ["app", "main"]
