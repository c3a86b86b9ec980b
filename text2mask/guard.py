"""The guard layer: what a command reads and what it writes, checked before any work.

Every command declares its inputs (photos, masks, concepts, parts files, checkpoints,
manifests, ground-truth folders, local model folders) and its outputs (the ``--out``
folder or file, a ``--json`` report), then calls :meth:`Guard.check` before the model
loads. The rules, the same for every method (README, *Outputs*):

1. **Inputs are sacred.** An output that is an input, contains one, or lies inside an
   input folder is refused (exit 2, naming both). ``--out`` may not be the folder that
   holds an input file either. After ``check`` the inputs are protected for the rest of
   the process: :func:`text2mask.io` refuses to replace or create a file among them.
2. **Nothing outside --out.** A name taken from data (an episode id, a token, a class or
   concept name, a file stem) becomes a file name only through :func:`safe_name`.
3. **Fail before work.** ``check`` also refuses an output folder that is a file, an output
   file that is a folder or already exists (unless the command overwrites by design), and
   an output location that cannot be written, all before any model loads.

A hub id (``org/name`` that is not a local path) is not a file and is not declared.
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from .errors import ConfigError, InputError

# Names of the files a run writes are built from data; longer names than this fail on
# common file systems (255 bytes) once a suffix is added.
MAX_NAME = 200
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")

# Files and folders the current command read, protected against every write (rule 1).
_protected_files: set[Path] = set()
_protected_dirs: set[Path] = set()


def safe_name(name: str, what: str) -> str:
    """``name`` unchanged when it can be one file name inside an output folder; else exit 2
    naming ``what`` (e.g. "episode id", "concept token"). Refused: empty, ``.``/``..``, a
    path separator, a control character, a leading dot (hidden files and the writers'
    temporary files start with one) and names over ``MAX_NAME`` characters."""
    text = str(name)
    why = ("it is empty" if not text else
           "it is . or .." if text in (".", "..") else
           "it holds a path separator or a control character" if _UNSAFE.search(text) else
           "it starts with a dot" if text.startswith(".") else
           f"it is longer than {MAX_NAME} characters" if len(text) > MAX_NAME else None)
    if why:
        raise ConfigError(f"{what} {text!r} cannot be a file name ({why}); rename it in the data")
    return text


def _resolve(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and folder in path.parents


def protected(path: str | os.PathLike) -> str | None:
    """Why writing ``path`` would harm an input of this command (None when it would not)."""
    if not (_protected_files or _protected_dirs):
        return None
    p = _resolve(path)
    if p in _protected_files:
        return f"{path} is an input of this run"
    for d in _protected_dirs:
        if p == d or _inside(p, d):
            return f"{path} lies inside the input folder {d}"
    return None


def release() -> None:
    """Forget the protected inputs (the end of a command)."""
    _protected_files.clear()
    _protected_dirs.clear()


class Guard:
    """The inputs and outputs of one command; see the module docstring for the rules.

        guard = Guard()
        guard.inputs(photos, "photo")
        guard.model(model)
        out = guard.output_folder(out)
        guard.check()          # before the model loads
    """

    def __init__(self) -> None:
        self._inputs: list[tuple[Path, str, Path]] = []      # (resolved, what, as given)
        self._outputs: list[tuple[Path, str, Path, str]] = []  # (resolved, what, as given, kind)

    # -- declarations ---------------------------------------------------------------------
    def input(self, path: str | os.PathLike | None, what: str) -> None:
        """A file or folder the command reads (None and paths that do not exist are skipped:
        the reader reports those)."""
        if path is None:
            return
        p = Path(path)
        if p.exists():
            self._inputs.append((_resolve(p), what, p))

    def inputs(self, paths, what: str) -> None:
        for p in paths or ():
            self.input(p, what)

    def model(self, source: str | os.PathLike | None, what: str = "--model") -> None:
        """A model source: a local folder or file is an input; a hub id is not a file."""
        if source is not None and not isinstance(source, (bytes,)) and isinstance(source, (str, os.PathLike)):
            if Path(source).expanduser().exists():
                self.input(Path(source).expanduser(), f"{what} model")

    def output_folder(self, out: str | os.PathLike, what: str = "--out") -> Path:
        """A folder the command writes into (``check`` probes it without creating it)."""
        self._outputs.append((_resolve(out), what, Path(out), "folder"))
        return Path(out)

    def output_file(self, path: str | os.PathLike, what: str = "--out", replace: bool = False) -> Path:
        """A file the command writes. An existing file is refused unless ``replace`` (the
        command's documented behaviour is to rewrite it, e.g. a report)."""
        self._outputs.append((_resolve(path), what, Path(path), "replace" if replace else "file"))
        return Path(path)

    # -- the checks -----------------------------------------------------------------------
    def check(self) -> "Guard":
        """Apply the rules; raise ``ConfigError`` (exit 2) on the first breach. Then protect
        the inputs for the rest of the command."""
        for out, what, given, kind in self._outputs:
            for src, src_what, src_given in self._inputs:
                self._clash(out, what, given, kind, src, src_what, src_given)
            if kind == "folder":
                if given.exists() and not given.is_dir():
                    raise ConfigError(f"{what} {given} is an existing file, not a folder")
                _probe_folder(given, what)
            else:
                if given.is_dir():
                    raise ConfigError(f"{what} {given} is a folder; give a file name")
                if kind == "file" and given.exists():
                    raise ConfigError(f"{what} {given} exists; it is never overwritten: choose another file "
                                      "or remove it")
                _probe_folder(given.parent if str(given.parent) else Path("."), what)
        for src, _, _ in self._inputs:
            (_protected_dirs if src.is_dir() else _protected_files).add(src)
        return self

    @staticmethod
    def _clash(out: Path, what: str, given: Path, kind: str, src: Path, src_what: str, src_given: Path) -> None:
        why = None
        if out == src:
            why = "is"
        elif kind == "folder" and not src.is_dir() and out == src.parent:
            why = "is the folder of"
        elif _inside(src, out):
            why = "contains"
        elif src.is_dir() and _inside(out, src):
            why = "lies inside"
        if why:
            raise ConfigError(f"{what} {given} {why} the {src_what} {src_given}; inputs are never written: "
                              "choose another output")


def _probe_folder(folder: Path, what: str) -> None:
    """Fail when ``folder`` could not be created or written, without creating it: a probe
    file is written and deleted in it, or in its nearest existing ancestor."""
    probe_in = Path(os.path.abspath(folder))
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise InputError(f"{what} {folder}: the file {probe_in} is in the way of this folder")
    try:
        probe = probe_in / f".write-test-{os.getpid()}-{secrets.token_hex(3)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{what} {folder}: output folder is not writable ({e.strerror or e})") from None
