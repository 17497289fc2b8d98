"""Token categories from Python's own `tokenize`: what kind of source text a BPE token sits on.

Every character of a Python source gets the category of the `tokenize` token covering it; a BPE
token takes the category of its first non-whitespace character, and a token made only of
whitespace counts as indentation/newline. Text that `tokenize` cannot read (not Python, or
broken) gets "other" from the point where tokenizing stopped.
"""

from __future__ import annotations

import io
import keyword
import token as token_types
import tokenize

import numpy as np

CATEGORIES = (
    "keyword",
    "identifier",
    "operator",
    "indent/newline",
    "number",
    "string",
    "comment",
    "other",
)
CATEGORY_INDEX = {name: i for i, name in enumerate(CATEGORIES)}
_STRING_TYPES = {token_types.STRING} | {
    getattr(token_types, n)
    for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
    if hasattr(token_types, n)
}
_LAYOUT_TYPES = {token_types.INDENT, token_types.DEDENT, token_types.NEWLINE, token_types.NL}


def _category_of(tok: tokenize.TokenInfo) -> int:
    if tok.type == token_types.NAME:
        return CATEGORY_INDEX["keyword" if keyword.iskeyword(tok.string) else "identifier"]
    if tok.type == token_types.OP:
        return CATEGORY_INDEX["operator"]
    if tok.type == token_types.NUMBER:
        return CATEGORY_INDEX["number"]
    if tok.type in _STRING_TYPES:
        return CATEGORY_INDEX["string"]
    if tok.type == token_types.COMMENT:
        return CATEGORY_INDEX["comment"]
    if tok.type in _LAYOUT_TYPES:
        return CATEGORY_INDEX["indent/newline"]
    return CATEGORY_INDEX["other"]


def char_categories(text: str) -> np.ndarray:
    """[len(text)] category index of every character (whitespace outside tokens: indent/newline)."""
    cats = np.full(len(text), CATEGORY_INDEX["indent/newline"], dtype=np.int8)
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))

    def offset(row: int, col: int) -> int:
        return min(line_starts[min(row - 1, len(line_starts) - 1)] + col, len(text))

    reached = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == token_types.ENDMARKER:
                break
            start, end = offset(*tok.start), offset(*tok.end)
            if end > start:
                cats[start:end] = _category_of(tok)
            reached = max(reached, end)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        cats[reached:] = CATEGORY_INDEX["other"]
    return cats


def token_categories(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """[num_tokens] category of each BPE token given its character offsets into `text`."""
    cats = char_categories(text)
    out = np.empty(len(offsets), dtype=np.int8)
    for i, (start, end) in enumerate(offsets):
        span = text[start:end]
        stripped = len(span) - len(span.lstrip())
        if stripped == len(span):
            out[i] = CATEGORY_INDEX["indent/newline"]
        else:
            out[i] = cats[start + stripped]
    return out
