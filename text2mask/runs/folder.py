"""The run folder as a whole: who may write it, what it holds, and its status.

    run.lock             the configuration that owns the folder (created atomically)
    .holders/<host-pid>  one file per process writing now, touched as a heartbeat
    status/<part>.json   each job's own status ("all", or "shard<i>of<n>")
    run.json             the manifest: fingerprint, options, and the union of the parts

One folder holds one configuration. The first process creates ``run.lock`` with
``os.link`` (atomic, also on NFS); a process of the same configuration (a shard, a
resume) joins it; one of another configuration is refused, unless ``--overwrite`` and no
process of the old configuration has been seen for ``STALE_AFTER`` seconds, in which
case it takes the folder over. Every process re-reads the lock before each batch and
stops when the folder was taken over, so two configurations never keep writing together.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigMismatch, InputError
from ..io import write_json

LOCK = "run.lock"
HOLDERS = ".holders"
STATUS = "status"
HEARTBEAT = 10.0        # seconds between a process's heartbeats
STALE_AFTER = 120.0     # a holder silent this long is taken for dead
STALE_TEMP = 600.0      # temp files older than this were left by a killed writer


def check_writable(out: Path) -> None:
    """Fail before any model work when the output folder cannot be written."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{out}: output folder is not writable ({e.strerror or e})") from None


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
        return None
    return doc if isinstance(doc, dict) else None


def _differences(old: dict | None, new: dict) -> str:
    new = json.loads(json.dumps(new))
    keys = sorted(k for k in set(new) | set(old or {}) if (old or {}).get(k) != new.get(k))
    return ", ".join(keys) or "run.lock"


def _mismatch(out: Path, old_fp: dict | None, fp: dict) -> ConfigMismatch:
    return ConfigMismatch(
        f"{out} holds outputs of a different configuration (differs in: {_differences(old_fp, fp)}); "
        "refusing to mix results. Use another --out, or --overwrite to redo every image.")


def _create_exclusively(path: Path, doc: dict) -> bool:
    """Write ``doc`` to ``path`` only if nothing is there: a complete temp file hard-linked
    into place (link fails if the name exists, atomically, on local disks and NFS)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    write_json(tmp, doc)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


class Holder:
    """This process's presence in the folder: a file touched every ``HEARTBEAT`` seconds
    by a daemon thread (it stops with the process, however the process ends)."""

    def __init__(self, path: Path):
        self.path = path
        self._stop = threading.Event()
        threading.Thread(target=self._beat, daemon=True, name="text2mask-heartbeat").start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.path)
            except OSError:      # released, or the folder went away: nothing to keep alive
                return

    def release(self) -> None:
        self._stop.set()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _live_holders(out: Path, other_than: str) -> list[dict]:
    """Processes of another configuration that wrote a heartbeat recently."""
    live = []
    now = time.time()
    for p in sorted((Path(out) / HOLDERS).glob("*.json")):
        doc = _read_json(p)
        try:
            age = now - p.stat().st_mtime
        except FileNotFoundError:
            continue
        if doc and doc.get("config") != other_than and age < STALE_AFTER:
            live.append({**doc, "seen_seconds_ago": round(age)})
    return live


@dataclass
class Claim:
    """The folder's lock, held by this process for configuration ``config``."""

    out: Path
    config: str
    holder: Holder

    def verify(self) -> None:
        """Stop when another configuration took the folder over (``--overwrite``)."""
        doc = _read_json(self.out / LOCK)
        if doc is not None and doc.get("config") != self.config:
            raise ConfigMismatch(f"{self.out} was taken over by a run with another configuration "
                                 f"(--overwrite); this run stops so that the two do not mix")

    def release(self) -> None:
        self.holder.release()


def claim(out: Path, fingerprint: dict, config: str, overwrite: bool) -> Claim:
    """Take or join the folder for ``config``; ConfigMismatch if another one owns it."""
    out = Path(out)
    lock = out / LOCK
    doc = {"config": config, "fingerprint": fingerprint, "host": socket.gethostname(), "pid": os.getpid(),
           "claimed": time.strftime("%Y-%m-%dT%H:%M:%S")}
    legacy = _read_json(out / "run.json")      # a folder written before run.lock existed
    if not lock.exists() and legacy and "fingerprint" in legacy and not overwrite \
            and legacy["fingerprint"] != json.loads(json.dumps(fingerprint)):
        raise _mismatch(out, legacy["fingerprint"], fingerprint)
    if not _create_exclusively(lock, doc):
        old = _read_json(lock)
        if old is None or old.get("config") != config:
            if not overwrite:
                raise _mismatch(out, (old or {}).get("fingerprint"), fingerprint)
            live = _live_holders(out, other_than=config)
            if live:
                who = ", ".join(f"{h.get('host')} pid {h.get('pid')} (seen {h['seen_seconds_ago']} s ago)" for h in live)
                raise ConfigMismatch(f"{out} is being written now by a run with another configuration ({who}); "
                                     "wait for it to end or stop it before --overwrite")
            write_json(lock, doc)
            _drop_parts_of_other_configs(out, config)
    holders = out / HOLDERS
    holders.mkdir(exist_ok=True)
    me = holders / f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}.json"
    write_json(me, {"config": config, "host": socket.gethostname(), "pid": os.getpid()})
    return Claim(out, config, Holder(me))


# -- status of each job, and of the folder ------------------------------------------------

def part_name(shard: tuple[int, int] | None) -> str:
    return "all" if shard is None else f"shard{shard[0]}of{shard[1]}"


def write_part(out: Path, part: str, doc: dict) -> None:
    write_json(Path(out) / STATUS / f"{part}.json", doc)


def read_parts(out: Path, config: str) -> list[dict]:
    parts = []
    for p in sorted((Path(out) / STATUS).glob("*.json")):
        doc = _read_json(p)
        if doc and doc.get("config") == config:
            parts.append(doc)
    return parts


def _drop_parts_of_other_configs(out: Path, config: str) -> None:
    for p in (Path(out) / STATUS).glob("*.json"):
        doc = _read_json(p)
        if not doc or doc.get("config") != config:
            p.unlink()


def holder_alive(out: Path, holder: str | None) -> bool:
    if not holder:
        return False
    try:
        return time.time() - (Path(out) / HOLDERS / holder).stat().st_mtime < STALE_AFTER
    except FileNotFoundError:
        return False


def union_status(out: Path, parts: list[dict], missing: list[str]) -> str:
    """The folder's status from every job's part and the items without outputs:
    running > failed > incomplete > complete. A part still marked running whose process
    is gone counts as interrupted (its items are missing)."""
    if any(p.get("status") == "running" and holder_alive(out, p.get("holder")) for p in parts):
        return "running"
    if any(p.get("failed") for p in parts):
        return "failed"
    if missing:
        return "incomplete"
    return "complete"


# -- what the folder holds ----------------------------------------------------------------

def remove_stale_temp_files(out: Path, folders, older_than: float = STALE_TEMP) -> None:
    """Temp files a killed writer left; young ones may belong to a shard still running."""
    now = time.time()
    for folder in folders:
        for tmp in (Path(out) / folder).glob(".*.tmp"):
            try:
                if now - tmp.stat().st_mtime > older_than:
                    tmp.unlink()
            except FileNotFoundError:
                pass


def set_aside(out: Path, names, reason: str, log) -> list[Path]:
    """Rename outputs the configuration does not produce (or that no longer describe the
    folder) to ``<name>.stale-<time>``: nothing is lost, and nothing reads them as current."""
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in names:
        src = Path(out) / name
        if not src.exists():
            continue
        stem, dot, ext = name.partition(".")
        dst = src.with_name(f"{stem}.stale-{stamp}{dot}{ext}")
        n = 1
        while dst.exists():
            dst = src.with_name(f"{stem}.stale-{stamp}-{n}{dot}{ext}")
            n += 1
        try:
            os.replace(src, dst)
        except FileNotFoundError:   # another shard set it aside first
            continue
        log(f"note: {name} set aside as {dst.name} ({reason})")
        moved.append(dst)
    return moved
