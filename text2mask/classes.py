"""Class sets: a dataset's class names in index order (0 = background) and, per class,
the synonym text and background words the WSSS prompt composer uses, plus the dataset's
method parameters (box threshold, background tau and p).

Bundled sets (``voc``, ``coco``) live in the top-level ``prompts/`` folder and ship inside the
package as ``text2mask/prompts`` (a link to it; a wheel carries a copy) and
are read with ``importlib.resources``, so they resolve for editable, wheel and
``--user`` installs alike. Every place that turns names into indices uses this module.

Masks are 8-bit index PNGs in which 255 means "unsure" (training masks) or "void"
(ground truth), so a class set holds at most 254 classes besides background (indices
0..254). A larger set is refused when it is built, before any work: 16-bit masks would
need every reader (trainers, OpenCV users, our evaluation) to follow suit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import ConfigError, InputError
from .io import read_json

BUNDLED = ("voc", "coco")
IGNORE_INDEX = 255                 # "unsure" in a training mask, "void" in ground truth
MAX_CLASSES = IGNORE_INDEX - 1     # classes 1..254 besides background 0


def bundled_path(name: str):
    """The bundled class-set file ``name`` (voc, coco) as an importlib.resources path."""
    return resources.files("text2mask").joinpath("prompts", f"{name}.json")


def check_class_text(text: str) -> str:
    """A class text must begin and end with a letter or digit: CLIP's tokenizer glues a
    run of punctuation to the following comma, which would blur the class's token span."""
    t = text.strip()
    if not t or not (t[0].isalnum() and t[-1].isalnum()):
        raise ValueError(f"class text {text!r} must begin and end with a letter or digit")
    return t


def check_method_parameters(box_threshold: float | None, background_tau: float | None,
                            background_power: float | None, where: str) -> None:
    """ConfigError naming ``where`` for a value the method cannot use (None = not set):
    the box threshold is a fraction of a map's maximum, 0 <= b < 1 (0: no box mask; at
    1 no pixel passes); tau and p define the background score (tau - max_k SC_k)^p and
    must be finite and positive."""
    checks = (("box threshold", box_threshold, lambda v: 0 <= v < 1, "must lie in [0, 1) (0 disables the box mask)"),
              ("background tau", background_tau, lambda v: v > 0, "must be positive"),
              ("background power p", background_power, lambda v: v > 0, "must be positive"))
    for what, value, ok, rule in checks:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {what} {value!r} is not a number")
        if not math.isfinite(value) or not ok(value):
            raise ConfigError(f"{where}: {what} {value!r} {rule}")


@dataclass(frozen=True)
class ClassSpec:
    name: str
    prompt: str
    background: tuple[str, ...]


@dataclass(frozen=True)
class ClassSet:
    """A dataset's classes (index 1..n; 0 is background) and its method parameters."""

    name: str
    classes: tuple[ClassSpec, ...]
    box_threshold: float
    background_tau: float
    background_power: float
    source: str = ""
    default_background: tuple[str, ...] = ()

    def __post_init__(self):
        where = self.source or f"class set '{self.name}'"
        if len(self.classes) > MAX_CLASSES:
            raise ConfigError(f"{where}: {len(self.classes)} classes; at most {MAX_CLASSES} fit in an 8-bit "
                              f"index mask besides background 0 ({IGNORE_INDEX} means unsure/void)")
        check_method_parameters(self.box_threshold, self.background_tau, self.background_power, where)

    @property
    def num_classes(self) -> int:
        """Including background."""
        return len(self.classes) + 1

    @property
    def names(self) -> list[str]:
        return ["background"] + [c.name for c in self.classes]

    def spec(self, index: int) -> ClassSpec:
        if not 1 <= index <= len(self.classes):
            raise ValueError(f"class index {index} outside 1..{len(self.classes)} of class set '{self.name}'")
        return self.classes[index - 1]

    def indices(self, labels, where: str = "labels") -> tuple[int, ...]:
        """Class names or indices (a list, or one comma/semicolon separated string) ->
        sorted unique indices; an unknown one, or labels of another type, is a
        ConfigError naming ``where``."""
        if isinstance(labels, (int, float)) and not isinstance(labels, bool):
            labels = [labels] if float(labels).is_integer() else labels
        if not isinstance(labels, (str, list, tuple)):
            raise ConfigError(f"{where}: labels must be a list of class names or indices "
                              f"(or one comma-separated string), got {labels!r}")
        if isinstance(labels, str):
            labels = labels.replace(";", ",").split(",")
        out = set()
        for lab in labels:
            text = str(lab).strip()
            if not text:
                continue
            if text.isdigit():
                k = int(text)
                if not 1 <= k <= len(self.classes):
                    raise ConfigError(f"{where}: class index {k} outside 1..{len(self.classes)}")
            else:
                try:
                    k = self.index_of(text)
                except KeyError:
                    raise ConfigError(f"{where}: unknown class name {text!r} (class set '{self.name}')") from None
            out.add(k)
        return tuple(sorted(out))

    def index_of(self, name: str) -> int:
        """Class index of a class name (case-insensitive, spaces/underscores ignored)."""
        key = name_key(name)
        for i, c in enumerate(self.classes, start=1):
            if name_key(c.name) == key:
                return i
        raise KeyError(name)


def _words(value, what: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in value):
        raise ValueError(f"{what} must be a list of words, got {value!r}")
    return tuple(w.strip() for w in value)




_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def name_key(name: str) -> str:
    """How class names are compared: case, spaces, underscores and hyphens ignored."""
    return name.lower().replace(" ", "").replace("_", "").replace("-", "")


def load_class_set(name_or_path: str | Path) -> ClassSet:
    """``voc``/``coco`` (bundled) or the path of a JSON file of that format; an unusable
    file is an InputError naming it and the cause."""
    path = Path(name_or_path)
    if str(name_or_path) in BUNDLED and not path.is_file():  # a bundled name, unless a file says otherwise
        path = bundled_path(str(name_or_path))
    doc = read_json(path, "class/prompt file")
    expected = "expected {'classes': [{'name': ..., 'prompt': ..., 'background': [...]}, ...]}"
    if not isinstance(doc, dict) or not isinstance(doc.get("classes"), list):
        found = ("an object without a 'classes' list" if isinstance(doc, dict)
                 else f"a JSON {_JSON_TYPES.get(type(doc), type(doc).__name__)}")
        raise InputError(f"{path}: malformed prompts file ({found}); {expected}")
    for i, c in enumerate(doc["classes"], start=1):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"].strip():
            raise InputError(f"{path}: class {i} must be an object with a non-empty \"name\" string, got {c!r}")
    try:
        default_bg = _words(doc.get("default_background", ()), "default_background")
        classes = tuple(
            ClassSpec(
                name=c["name"].strip(),
                prompt=check_class_text(str(c.get("prompt", c["name"]))),
                background=_words(c["background"], f"background of {c['name']!r}") if "background" in c else default_bg,
            )
            for c in doc["classes"]
        )
        params = {key: _number(doc.get(key, default), key)
                  for key, default in (("box_threshold", 0.2), ("background_tau", 1.0), ("background_power", 2.0))}
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: malformed prompts file ({e}); {expected}") from None
    if not classes:
        raise InputError(f"{path}: prompts file lists no classes")
    names = [name_key(c.name) for c in classes]
    if len(set(names)) != len(names):
        raise InputError(f"{path}: duplicate class names")
    return ClassSet(name=str(doc.get("name", path.stem)), classes=classes, source=str(path),
                    default_background=default_bg, **params)


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)
