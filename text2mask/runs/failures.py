"""The failure log: one JSON line per failed item (id, stage, error), appended as it
happens. Each job has its own file (``failures.jsonl``, or ``failures-shard<i>of<n>.jsonl``
for ``--shard``), so that shards on a shared folder never write the same file."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..io import write_text


def failures_name(shard: tuple[int, int] | None) -> str:
    return "failures.jsonl" if shard is None else f"failures-shard{shard[0]}of{shard[1]}.jsonl"


def describe(error: BaseException | str) -> str:
    """The message a user reads: an InputError's own text (it names the file), else the
    exception type and text."""
    if isinstance(error, str):
        return error
    msg = str(error) or type(error).__name__
    return msg if isinstance(error, InputError) else f"{type(error).__name__}: {msg}"


class FailureLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.unwritten = 0          # lines lost to a full disk: the summary says so

    def reset(self, keep_ids: set[str]) -> None:
        """Start this run's record, keeping earlier failures of items it does not touch."""
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["id"] in keep_ids:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass
        write_text(self.path, "".join(line + "\n" for line in kept))

    def add(self, key: str, stage: str, error: BaseException | str) -> dict:
        rec = {"id": key, "stage": stage, "error": describe(error)}
        try:
            # one short append per line, so that a reader never sees half a record
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError:
            self.unwritten += 1
        return rec
