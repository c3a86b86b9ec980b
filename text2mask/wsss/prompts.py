"""Stage 1 — image-level labels to one composed prompt and each class's token span.

    "a photo including " + s(k1) + ", " + ... + s(kn) + ", " + "w1, w2, ..., and wm."

A class set (``text2mask.classes``: bundled ``voc``/``coco`` or a user JSON file of the
same format) gives, per class, its synonym text ``prompt`` and its background words, plus the
dataset's box threshold and background (tau, p). Spans are counted with the model's own
tokenizer, never hard-coded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..classes import ClassSet, ClassSpec, check_class_text
from ..errors import ConfigError

PREFIX = "a photo including "
MAX_TOKENS = 77  # CLIP context: start token + 75 + end token


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


def _check_span_tokens(tokenizer, text: str, texts: Sequence[str], spans: Sequence[Sequence[int]]) -> None:
    """A class span must hold real word tokens. A tokenizer whose vocabulary did not load
    maps every word to the unknown / end-of-text token; a span of those would average
    attention over padding and still give confident-looking masks, so refuse it here
    too, whatever the loader checked."""
    ids = tokenizer(text)["input_ids"]  # with the start token at position 0, as spans count
    special = {tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id} - {None}
    for t, span in zip(texts, spans):
        bad = [i for i in span if ids[i] in special]
        if bad:
            names = tokenizer.convert_ids_to_tokens([ids[i] for i in bad])
            raise ValueError(f"class text {t!r} tokenizes to special token(s) {sorted(set(names))}: "
                             "the tokenizer's vocabulary did not load or does not know these words")


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
    _check_span_tokens(tokenizer, text, texts, spans)
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


def check_class_set_fits(tokenizer, class_set: ClassSet, max_tokens: int = MAX_TOKENS) -> None:
    """Every class, alone and by its plain name, must fit in one prompt: the overflow plan
    can split an image's classes over prompts but never shorten one class. Checked once,
    before any image, instead of failing every image that has the class."""
    where = class_set.source or f"class set '{class_set.name}'"
    for k in range(1, len(class_set.classes) + 1):
        spec = class_set.spec(k)
        try:
            p = compose(tokenizer, [spec.name], [k], ())
        except ValueError as e:
            raise ConfigError(f"{where}: class {k} {spec.name!r}: {e}") from None
        if p.num_tokens > max_tokens:
            raise ConfigError(f"{where}: class {k} {spec.name[:40]!r}...: does not fit in {max_tokens} tokens "
                              f"({p.num_tokens} in its shortest prompt, {PREFIX!r} + name + '.')")


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
