"""Per-item records: what made each finished item, so that a resume can tell whether it
still holds.

    records/<id>.json   {"id", "config": <digest of the run fingerprint>, "inputs": {...}}

``inputs`` is whatever the method reads for the item (WSSS: the class indices after the
label source was read, the sha256 of the photo's bytes). The writer removes the item's
completion marker, writes the record, then the outputs, the marker last. So a marker
with a record proves that every output was written by the configuration and from the
inputs the record names; a kill between the steps leaves an item without a marker,
which is redone.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ..errors import InputError
from ..io import write_json

RECORDS = "records"
_CHUNK = 1 << 20


def canonical(obj) -> str:
    """One JSON text per value: sorted keys, no spaces (tuples become lists)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def config_digest(fingerprint: dict) -> str:
    """sha256 of the canonical fingerprint: names the configuration in every record."""
    return hashlib.sha256(canonical(fingerprint).encode()).hexdigest()


def file_digest(path: str | os.PathLike, what: str = "file") -> str:
    """sha256 of a file's bytes; InputError naming the file if it cannot be read."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    return h.hexdigest()


def record_path(out: Path, key: str) -> Path:
    return Path(out) / RECORDS / f"{key}.json"


def make_record(key: str, config: str, inputs: dict) -> dict:
    return {"id": key, "config": config, "inputs": json.loads(canonical(inputs))}


def write_record(out: Path, record: dict) -> None:
    write_json(record_path(out, record["id"]), record)


def read_record(out: Path, key: str) -> dict | None:
    """The stored record, or None when there is none or it cannot be read (then the
    item is redone)."""
    try:
        rec = json.loads(record_path(out, key).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
        return None
    return rec if isinstance(rec, dict) else None


class State(str, Enum):
    COMPLETE = "complete"            # marker, record of this configuration, same inputs
    PENDING = "pending"              # no marker (never written, or interrupted)
    CHANGED = "input changed"        # finished, but its inputs differ now
    OTHER_CONFIG = "other configuration"   # finished by another configuration (e.g. an interrupted --overwrite)
    UNRECORDED = "no record"         # a marker without a readable record


def marker_path(out: Path, marker: str, key: str) -> Path:
    """The completion marker of ``key``; ``marker`` is a pattern like "masks/{id}.png"."""
    return Path(out) / marker.format(id=key)


def stored_state(out: Path, key: str, marker: str, config: str) -> tuple[State, dict | None]:
    """What the folder says about ``key`` before its current inputs are looked at:
    PENDING, UNRECORDED, OTHER_CONFIG, or COMPLETE with the record whose inputs are
    still to be compared with the current ones."""
    if not marker_path(out, marker, key).is_file():
        return State.PENDING, None
    rec = read_record(out, key)
    if rec is None or rec.get("id") != key:
        return State.UNRECORDED, None
    if rec.get("config") != config:
        return State.OTHER_CONFIG, rec
    return State.COMPLETE, rec


def compare_inputs(rec: dict, inputs: dict) -> State:
    return State.COMPLETE if rec.get("inputs") == json.loads(canonical(inputs)) else State.CHANGED


@dataclass
class ResumePlan:
    """Which of a job's items to do, and why."""

    todo: list = field(default_factory=list)           # (item, inputs or None)
    complete: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)   # redone because the input changed
    other_config: list[str] = field(default_factory=list)  # redone: made by another configuration
    unrecorded: list[str] = field(default_factory=list)
