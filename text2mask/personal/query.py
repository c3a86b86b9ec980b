"""Stage 3 prompts — a query text with the concept's token before its class word, and
the token spans the instance map averages over.

    "a white mug filled with cola"  ->  "a white <new1> mug filled with cola"
    phrase = span of "<new1> mug", token = "<new1>", class = "mug", text = every word

The token goes before the first whole-word occurrence of the class word, unless the
text already holds the token. Spans are counted with the model's tokenizer, piece by
piece (CLIP's pre-tokenizer splits at spaces and punctuation, and an added token is
split out before BPE), and the pieces must add up to the whole prompt: checked, not
assumed. The tokens must have been added to the tokenizer first (else "<new1>" is 4 BPE
pieces).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError

MAX_TOKENS = 77  # CLIP context: start token + 75 + end token
AREA_PREFIX = "a photo including "
SPAN_MODES = ("phrase", "token", "class", "text")


@dataclass(frozen=True)
class QueryPrompt:
    """The prompt fed to the text encoder and the token positions of each span mode
    (positions with the start token at 0)."""

    text: str
    spans: dict[str, tuple[int, ...]]

    def span(self, mode: str) -> tuple[int, ...]:
        return self.spans[mode]


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def class_match(text: str, class_name: str) -> re.Match | None:
    """First whole-word, case-insensitive occurrence of the class word(s) in ``text``."""
    words = r"\s+".join(re.escape(w) for w in class_name.split())
    return re.search(rf"(?<![\w<>-]){words}(?![\w<>-])", text, flags=re.IGNORECASE)


def compose_query(tokenizer, text: str, class_name: str, token: str | None) -> QueryPrompt:
    """The prompt for ``text`` with ``token`` (None: the base model's plain text) before
    the class word, and its spans. InputError when the class word is missing."""
    text = " ".join(text.split())
    if token and token in text:
        t0 = text.index(token)
        t1 = t0 + len(token)
        m = class_match(text[t1:], class_name)
        c0, c1 = (t1 + m.start(), t1 + m.end()) if m else (t1, t1)
    else:
        m = class_match(text, class_name)
        if m is None:
            raise InputError(f"query text {text!r} has no whole word {class_name!r} (the class) to put the "
                             f"concept's token before")
        if token:
            text = f"{text[:m.start()]}{token} {text[m.start():]}"
            t0, t1 = m.start(), m.start() + len(token)
            c0, c1 = t1 + 1, t1 + 1 + (m.end() - m.start())
        else:
            t0 = t1 = m.start()
            c0, c1 = m.start(), m.end()
    pieces = [text[:t0], text[t0:t1], text[t1:c0], text[c0:c1], text[c1:]]
    counts = [_count(tokenizer, p) for p in pieces]
    total = _count(tokenizer, text)
    if sum(counts) != total:
        raise RuntimeError(f"token spans do not add up for prompt {text!r} ({sum(counts)} vs {total} tokens); "
                           "was the concept's token added to the tokenizer?")
    if total + 2 > MAX_TOKENS:
        raise InputError(f"query text {text!r} needs {total + 2} tokens, more than CLIP's {MAX_TOKENS}")
    starts = [1]
    for n in counts:
        starts.append(starts[-1] + n)
    tok = tuple(range(starts[1], starts[2]))
    cls = tuple(range(starts[3], starts[4]))
    spans = {"token": tok or cls, "class": cls or tok, "phrase": tuple(sorted(set(tok) | set(cls))),
             "text": tuple(range(1, total + 1))}
    if not spans["phrase"]:
        raise InputError(f"query text {text!r}: the class word {class_name!r} tokenizes to nothing")
    return QueryPrompt(text, spans)


def area_prompt(tokenizer, class_name: str) -> QueryPrompt:
    """The object-area prompt "a photo including <class>." on the base model."""
    return compose_query(tokenizer, f"{AREA_PREFIX}{class_name}.", class_name, None)


def subject_text(class_name: str) -> str:
    """The paper's Subject-only query: "a <new1> mug" once the token goes in."""
    return f"a {class_name}"


def without_token(text: str, token: str) -> str:
    """The paper's Context-only query: the text without the concept's token."""
    return " ".join(text.replace(token, " ").split())
