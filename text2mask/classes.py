"""Class sets: a dataset's class names in index order (0 = background) and, per class,
the synonym text and background words the WSSS prompt composer uses, plus the dataset's
method parameters (box threshold, background tau and p).

Bundled sets (``voc``, ``coco``) ship inside the package (``text2mask/class_sets``) and
are read with ``importlib.resources``, so they resolve for editable, wheel and
``--user`` installs alike. Every place that turns names into indices uses this module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

BUNDLED = ("voc", "coco")


def bundled_path(name: str):
    """The bundled class-set file ``name`` (voc, coco) as an importlib.resources path."""
    return resources.files("text2mask").joinpath("class_sets", f"{name}.json")


def check_class_text(text: str) -> str:
    """A class text must begin and end with a letter or digit: CLIP's tokenizer glues a
    run of punctuation to the following comma, which would blur the class's token span."""
    t = text.strip()
    if not t or not (t[0].isalnum() and t[-1].isalnum()):
        raise ValueError(f"class text {text!r} must begin and end with a letter or digit")
    return t


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
        sorted unique indices; an unknown one is a ValueError naming ``where`` and it."""
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
                    raise ValueError(f"{where}: class index {k} outside 1..{len(self.classes)}")
            else:
                try:
                    k = self.index_of(text)
                except KeyError:
                    raise ValueError(f"{where}: unknown class name {text!r} (class set '{self.name}')") from None
            out.add(k)
        return tuple(sorted(out))

    def index_of(self, name: str) -> int:
        """Class index of a class name (case-insensitive, spaces/underscores ignored)."""
        key = _norm(name)
        for i, c in enumerate(self.classes, start=1):
            if _norm(c.name) == key:
                return i
        raise KeyError(name)


def _words(value, what: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in value):
        raise ValueError(f"{what} must be a list of words, got {value!r}")
    return tuple(w.strip() for w in value)




def _norm(name: str) -> str:
    return name.lower().replace(" ", "").replace("_", "").replace("-", "")


def load_class_set(name_or_path: str | Path) -> ClassSet:
    """``voc``/``coco`` (bundled in ``prompts/``) or the path of a JSON file of that format."""
    path = Path(name_or_path)
    if str(name_or_path) in BUNDLED and not path.is_file():  # a bundled name, unless a file says otherwise
        path = bundled_path(str(name_or_path))
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: class/prompt file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON prompts file ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read class/prompt file ({e.strerror or e})") from None
    try:
        default_bg = _words(doc.get("default_background", ()), "default_background")
        classes = tuple(
            ClassSpec(
                name=str(c["name"]),
                prompt=check_class_text(str(c.get("prompt", c["name"]))),
                background=_words(c["background"], f"background of {c['name']!r}") if "background" in c else default_bg,
            )
            for c in doc["classes"]
        )
        cs = ClassSet(
            name=str(doc.get("name", path.stem)),
            classes=classes,
            box_threshold=float(doc.get("box_threshold", 0.2)),
            background_tau=float(doc.get("background_tau", 1.0)),
            background_power=float(doc.get("background_power", 2.0)),
            source=str(path),
            default_background=default_bg,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed prompts file ({type(e).__name__}: {e}); "
                         "expected {'classes': [{'name': ..., 'prompt': ..., 'background': [...]}, ...]}") from None
    if not classes:
        raise ValueError(f"{path}: prompts file lists no classes")
    names = [_norm(c.name) for c in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate class names")
    return cs


