"""Streaming detokenizer over the tokenizer's own decoder, for every vocabulary kind: byte-level
BPE (Qwen, Llama 3, SmolLM: GPT-2's byte map) and SentencePiece (Llama 2, Mistral: `▁` for
spaces, `<0xNN>` byte fallback), through `tokenizers.decoders.DecodeStream`.

Decoding the whole sequence again after every token costs O(n) per step and can split a
multi-byte character (CJK, emoji) across two pieces. DecodeStream decodes only a short window of
recent ids and holds its output while that ends in an unfinished UTF-8 character, so no piece
ever holds half a character. The pieces joined equal `tokenizer.decode(ids)` (special tokens
skipped, as there): `finalize` hands out what the stream still holds, U+FFFD for a character
that never completed, as decode() does, unless the output was cut off (`finalize(cut=True)`: at
max_tokens, a cancel or the time limit), where the unfinished character is dropped. One
exception, in nonsense output only: SentencePiece's ByteFallback decoder replaces a whole run of
byte tokens with U+FFFD when the run is not valid UTF-8, so a valid byte streamed before invalid
ones stays visible where decode() replaces it.

Ids the tokenizer does not know (random-weight models pad their vocab) produce nothing.

`token_bytes_table` gives each id's own bytes in a byte-level vocabulary (what OpenAI's logprobs
call a token's `bytes`); streaming text does not use it.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class StreamingDetokenizer:
    """reset() / add_token(id) -> newly final text / finalize() -> the rest."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.reset()

    def reset(self) -> None:
        self._stream = DecodeStream(skip_special_tokens=True)
        self._held: list[int] = []  # ids whose text the stream has not given out yet
        self._context: list[int] = []  # the ids just before them (a leading `▁` is a space there)

    def add_token(self, token_id: int) -> str:
        if not 0 <= token_id < self._vocab_size:
            return ""
        self._held.append(token_id)
        try:
            text = self._stream.step(self._tokenizer, token_id)
        except Exception:  # the library's own error for a prefix that decodes differently now
            return self._restart()
        if text is None:
            return ""
        self._context = (self._context + self._held)[-4:]
        self._held = []
        return text

    def _restart(self) -> str:
        """Give out the held ids' text and continue in a new stream primed with the ids before
        them (DecodeStream raises when invalid bytes made its earlier output disagree with the
        decode of the same ids; nonsense output only)."""
        context = (self._context + self._held)[-1:]
        text = self.finalize()
        try:
            self._stream.step(self._tokenizer, context[0])
            self._context = context
        except Exception:  # not even that one decodes alone: start afresh
            self.reset()
        return text

    def finalize(self, cut: bool = False) -> str:
        """Emit what is still held: the text the held ids add after the ones before them (or,
        where those no longer decode to the text already given out, the held ids alone).
        `cut`: the output was cut off (max_tokens, cancel, time limit) rather than ended by the
        model, so a character left unfinished at the end (U+FFFD from decode()) is dropped."""
        if not self._held:
            return ""
        held, before = self._held, self._tokenizer.decode(self._context)
        full = self._tokenizer.decode(self._context + held)
        self.reset()
        text = full[len(before) :] if full.startswith(before) else self._tokenizer.decode(held)
        return text.rstrip("\ufffd") if cut else text


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


# str.translate table: character code point -> byte value (as a code point < 256).
_UNICODE_TO_BYTE = {ord(ch): b for b, ch in bytes_to_unicode().items()}


def _token_bytes(token: str) -> bytes:
    if all(ord(ch) in _UNICODE_TO_BYTE for ch in token):
        return token.translate(_UNICODE_TO_BYTE).encode("latin-1")
    return token.encode("utf-8")


@functools.lru_cache(maxsize=8)
def token_bytes_table(tokenizer: Tokenizer) -> tuple[bytes, ...]:
    """The bytes each token id decodes to (built once per tokenizer and cached)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    table = [b""] * (max(vocab.values(), default=-1) + 1)
    for token, token_id in vocab.items():
        if token_id not in special:
            table[token_id] = _token_bytes(token)
    return tuple(table)
