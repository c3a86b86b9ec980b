"""Stage 1 — image-level labels to one composed prompt and each class's token span.

    "a photo including " + s(k1) + ", " + ... + s(kn) + ", " + "w1, w2, ..., and wm."

A class set (``prompts/voc.json``, ``prompts/coco.json`` or a user file of the same
format) gives, per class, its synonym text ``prompt`` and its background words, plus the
dataset's box threshold and background (tau, p). Spans are counted with the model's own
tokenizer, never hard-coded.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

def _prompts_dir() -> Path:
    """``prompts/`` of the checkout (editable installs), else the copy a wheel install puts
    under ``<prefix>/share/text2mask/prompts``."""
    here = Path(__file__).resolve().parent.parent / "prompts"
    return here if here.is_dir() else Path(sys.prefix) / "share" / "text2mask" / "prompts"


PROMPTS_DIR = _prompts_dir()
PREFIX = "a photo including "
MAX_TOKENS = 77  # CLIP context: start token + 75 + end token


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


def check_class_text(text: str) -> str:
    """A class text must begin and end with a letter or digit: CLIP's tokenizer glues a
    run of punctuation to the following comma, which would blur the class's token span."""
    t = text.strip()
    if not t or not (t[0].isalnum() and t[-1].isalnum()):
        raise ValueError(f"class text {text!r} must begin and end with a letter or digit")
    return t


def _norm(name: str) -> str:
    return name.lower().replace(" ", "").replace("_", "").replace("-", "")


def load_class_set(name_or_path: str | Path) -> ClassSet:
    """``voc``/``coco`` (bundled in ``prompts/``) or the path of a JSON file of that format."""
    path = Path(name_or_path)
    if not path.suffix and not path.is_file():  # a bundled name: voc, coco
        path = PROMPTS_DIR / f"{name_or_path}.json"
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


def background_text(words: Sequence[str]) -> str:
    if not words:
        return ""
    if len(words) == 1:
        return f"and {words[0]}."
    return ", ".join(words[:-1]) + f", and {words[-1]}."


def background_words(specs: Sequence[ClassSpec]) -> list[str]:
    """Union of the present classes' background words, in order of first appearance."""
    seen: dict[str, None] = {}
    for s in specs:
        for w in s.background:
            seen.setdefault(w, None)
    return list(seen)


@dataclass(frozen=True)
class Prompt:
    """One composed prompt; ``spans[i]`` are the token positions of ``classes[i]``
    (positions in the tokenized prompt with the start token at 0)."""

    text: str
    classes: tuple[int, ...]
    spans: tuple[tuple[int, ...], ...]
    num_tokens: int  # including start and end tokens


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def compose(tokenizer, texts: Sequence[str], classes: Sequence[int], background: Sequence[str]) -> Prompt:
    """Compose the prompt from the class texts and background words and locate the spans.

    Each piece is tokenized alone; CLIP's pre-tokenizer splits at spaces and punctuation,
    so the pieces' tokens concatenate to the prompt's tokens. That is checked, not assumed.
    """
    texts = [check_class_text(t) for t in texts]
    pieces: list[tuple[str, int | None]] = [(PREFIX, None)]
    for i, t in enumerate(texts):
        pieces.append((t, i))
        pieces.append((", " if (background or i < len(texts) - 1) else ".", None))
    if background:
        pieces.append((background_text(background), None))
    text = "".join(p for p, _ in pieces)
    spans: list[tuple[int, ...]] = [()] * len(texts)
    pos = 1  # start token
    for piece, owner in pieces:
        n = _count(tokenizer, piece)
        if owner is not None:
            spans[owner] = tuple(range(pos, pos + n))
        pos += n
    total = _count(tokenizer, text)
    if total != pos - 1:
        raise RuntimeError(f"token spans do not add up for prompt {text!r} ({pos - 1} vs {total} tokens)")
    if any(len(s) == 0 for s in spans):
        empty = [texts[i] for i, s in enumerate(spans) if not s]
        raise ValueError(f"class text(s) {empty} tokenize to nothing")
    return Prompt(text=text, classes=tuple(classes), spans=tuple(spans), num_tokens=total + 2)


@dataclass(frozen=True)
class PromptPlan:
    """The prompt(s) for one image. Several prompts only when one would not fit in 77
    tokens; ``actions`` says which overflow rules fired (ALGORITHM.md section 8)."""

    prompts: tuple[Prompt, ...]
    actions: tuple[str, ...] = field(default=())

    @property
    def classes(self) -> tuple[int, ...]:
        return tuple(k for p in self.prompts for k in p.classes)


def plan_prompts(tokenizer, class_set: ClassSet, classes: Sequence[int],
                 max_tokens: int = MAX_TOKENS) -> PromptPlan:
    """Prompt(s) for an image's classes (taken in ascending index order).

    Overflow: drop background words, then use plain class names instead of synonyms,
    then split the classes over several prompts. Never truncate, never lose a class.
    """
    classes = sorted(set(int(k) for k in classes))
    if not classes:
        raise ValueError("an image needs at least one class to compose a prompt")
    specs = [class_set.spec(k) for k in classes]
    synonyms = [s.prompt for s in specs]
    plain = [s.name for s in specs]
    bg = background_words(specs)

    p = compose(tokenizer, synonyms, classes, bg)
    if p.num_tokens <= max_tokens:
        return PromptPlan((p,))
    actions = ["dropped background words"]
    p = compose(tokenizer, synonyms, classes, ())
    if p.num_tokens <= max_tokens:
        return PromptPlan((p,), tuple(actions))
    actions.append("used plain class names instead of synonyms")
    p = compose(tokenizer, plain, classes, ())
    if p.num_tokens <= max_tokens:
        return PromptPlan((p,), tuple(actions))

    # Greedy split: fill each prompt with as many classes (in index order) as fit.
    prompts: list[Prompt] = []
    start = 0
    while start < len(classes):
        end = start + 1
        best = compose(tokenizer, plain[start:end], classes[start:end], ())
        if best.num_tokens > max_tokens:
            raise ValueError(f"class name {plain[start]!r} alone does not fit in {max_tokens} tokens")
        while end < len(classes):
            nxt = compose(tokenizer, plain[start:end + 1], classes[start:end + 1], ())
            if nxt.num_tokens > max_tokens:
                break
            best, end = nxt, end + 1
        prompts.append(best)
        start = end
    actions.append(f"split the classes over {len(prompts)} prompts")
    return PromptPlan(tuple(prompts), tuple(actions))
