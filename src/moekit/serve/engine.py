"""The serving engine: one decoder-only model and its tokenizer, decoding one request at a time.

    engine = Engine(model, tokenizer, name="tiny")
    ids = engine.encode_prompt("def parse(")
    for piece in engine.stream(ids, SamplingParams(max_tokens=32, temperature=0)):
        print(piece.text, end="")          # the last piece carries finish_reason "stop" or "length"

Decoding runs through the model's KV cache token by token (prefill the prompt once, then one
token per forward), with the same sampling as `MoETransformer.generate` (`sample_next_token`), so a
greedy request equals `model.generate(..., temperature=0)` and a seeded one equals `generate` with
a generator seeded alike. The engine owns a lock: the model serves one request at a time, and
callers from several threads simply wait their turn.

Text comes out incrementally without ever splitting a character: a byte-level tokenizer can end a
token in the middle of a multi-byte UTF-8 character, which decodes to U+FFFD until the next token
completes it, so only the text before a trailing U+FFFD is "stable" and may be sent (pitfall:
decoding each token alone and concatenating garbles every such character). Stop strings are
matched on the stable text, and text that could still become a stop string is held back until it
cannot, so a streamed completion never shows part of a stop string.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from moekit.model.decoder import sample_next_token

REPLACEMENT_CHAR = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence
CONTEXT_TOKENS = 4  # prompt tokens decoded before the completion, so word-start markers decode right


class ServingTokenizer(Protocol):
    """What the engine needs of a tokenizer (moekit's `Tokenizer` has it)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class PromptError(ValueError):
    """A prompt the model cannot take (too long, token ids out of vocabulary); `code` as in OpenAI's errors."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one completion; validated by the HTTP layer (`protocol.parse_completion_request`)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None  # None = no top-k filtering
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Piece:
    """Newly stable completion text; `finish_reason` is set on the last piece only."""

    text: str
    finish_reason: str | None = None  # "stop" (eos or a stop string) | "length" (max_tokens or context)
    completion_tokens: int = 0  # tokens sampled so far


@dataclass
class IncrementalDecoder:
    """The completion text decoded so far, growing only by text that later tokens cannot change.

    Decodes the whole completion (after a few prompt tokens of context) at each step: O(n) per
    token, negligible next to a forward pass for the lengths a single model serves.
    """

    decode: Callable[[Sequence[int]], str]
    context_ids: list[int]
    ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.context_ids = list(self.context_ids[-CONTEXT_TOKENS:])
        self._context_text = self.decode(self.context_ids)

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)

    def text(self, final: bool = False) -> str:
        """The completion text; unless `final`, without a trailing incomplete character."""
        full = self.decode(self.context_ids + self.ids)
        if full.startswith(self._context_text):
            text = full[len(self._context_text) :]
        else:  # a decoder that rewrites the context when more follows: fall back to no context
            text = self.decode(self.ids)
        return text if final else text.rstrip(REPLACEMENT_CHAR)


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


@torch.inference_mode()
def decode_tokens(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: frozenset[int],
) -> Iterator[int]:
    """Sampled token ids one at a time through a KV cache; ends after an eos id or max_new_tokens."""
    if max_new_tokens <= 0:
        return
    device = next(model.parameters()).device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # [1, S]
    logits_1V = model(input_ids, cache=cache).logits[:, -1]
    for step in range(max_new_tokens):
        next_1 = sample_next_token(logits_1V, params.temperature, params.top_k, params.top_p, generator)
        token = int(next_1.item())
        yield token
        if token in eos_ids or step == max_new_tokens - 1:
            return
        logits_1V = model(next_1[:, None], cache=cache).logits[:, -1]


class Engine:
    """A decoder-only model with KV cache (`new_cache`, `forward(ids, cache=...)`) and its tokenizer."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: ServingTokenizer,
        name: str,
        *,
        eos_ids: Sequence[int] | None = None,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if not hasattr(model, "new_cache"):
            raise ValueError(f"{type(model).__name__} has no KV cache (new_cache): serving needs a decoder")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_seq_len = int(model.config.max_seq_len)
        self.vocab_size = int(model.config.vocab_size)
        if eos_ids is None:
            eos = getattr(tokenizer, "eos_id", None)
            eos_ids = () if eos is None else (eos,)
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        # a prompt must leave room for at least one new token
        limit = self.max_seq_len - 1
        if max_prompt_tokens is not None:
            if max_prompt_tokens < 1:
                raise ValueError(f"max_prompt_tokens={max_prompt_tokens} is invalid: expected >= 1")
            limit = min(limit, max_prompt_tokens)
        self.max_prompt_tokens = limit
        self._lock = threading.Lock()

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (text or ids), checked against the length limit and the vocabulary.

        An empty prompt starts from the end-of-document token, as if at the start of a document."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            if not self.eos_ids:
                raise PromptError(
                    "the prompt is empty and the tokenizer has no end-of-text token to start from"
                )
            ids = [min(self.eos_ids)]
        if len(ids) > self.max_prompt_tokens:
            raise PromptError(
                f"the prompt has {len(ids)} tokens; this server takes at most {self.max_prompt_tokens} "
                f"(model max_seq_len {self.max_seq_len}, one position kept for the completion)",
                code="context_length_exceeded",
            )
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise PromptError(f"token ids {bad[:8]} are outside the vocabulary [0, {self.vocab_size})")
        return ids

    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[Piece]:
        """Pieces of newly stable text as tokens are sampled; the last one has a finish_reason.

        Holds the engine lock while decoding. `cancel` (e.g. set when a client goes away) ends the
        stream early with no final piece."""
        with self._lock:
            yield from self._stream(prompt_ids, params, cancel)

    def _stream(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event | None
    ) -> Iterator[Piece]:
        room = self.max_seq_len - len(prompt_ids)
        budget = min(params.max_tokens, room)
        decoder = IncrementalDecoder(self.tokenizer.decode, list(prompt_ids))
        sent = 0  # characters of the completion already handed out
        n = 0
        for token in decode_tokens(self.model, prompt_ids, budget, params, self.eos_ids):
            if cancel is not None and cancel.is_set():
                return
            n += 1
            if token in self.eos_ids:  # the end-of-text token ends the completion and is not shown
                text = decoder.text(final=True)
                cut = find_stop(text, params.stop)
                yield Piece(text[sent:cut], "stop", n)
                return
            decoder.add(token)
            text = decoder.text()
            cut = find_stop(text, params.stop)
            if cut is not None:
                yield Piece(text[sent:cut], "stop", n)
                return
            end = len(text) - held_back(text, params.stop)
            if end > sent:
                yield Piece(text[sent:end], None, n)
                sent = end
        text = decoder.text(final=True)
        cut = find_stop(text, params.stop)
        yield Piece(text[sent:cut], "length" if cut is None else "stop", n)

    def complete(self, prompt_ids: Sequence[int], params: SamplingParams) -> Piece:
        """The whole completion as one piece (text, finish_reason, completion_tokens)."""
        parts = list(self.stream(prompt_ids, params))
        return Piece("".join(p.text for p in parts), parts[-1].finish_reason, parts[-1].completion_tokens)
