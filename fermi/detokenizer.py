"""Streaming detokenizer for byte-level BPE tokenizers (Qwen, GPT-2 style).

Decoding the whole sequence again after every token costs O(n) per step and can split a
multi-byte character (CJK, emoji) across two pieces. Instead every token id maps once to its
bytes; the detokenizer accumulates bytes and emits the longest prefix that ends on a complete
UTF-8 character, holding back at most 3 bytes. The pieces joined equal `tokenizer.decode(ids)`.

The byte table follows the `tokenizers` ByteLevel decoder: a token's characters go through the
GPT-2 unicode->byte map when all of them are in it, else the token's own UTF-8 is used (that is
how added tokens such as `<think>` come out). Special tokens (`<|im_end|>`) and ids the tokenizer
does not know (random-weight models pad their vocab) produce no bytes.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer


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


def _complete_prefix_length(buf: bytearray) -> int:
    """Length of the longest prefix of `buf` that does not end inside a UTF-8 sequence that
    later bytes could still complete. Invalid bytes count as complete (they decode to U+FFFD)."""
    n = len(buf)
    start = n - 1
    while start >= 0 and n - start <= 4 and buf[start] & 0xC0 == 0x80:
        start -= 1  # skip continuation bytes back to the last lead byte
    if start < 0 or n - start > 4:
        return n
    lead = buf[start]
    need = (
        2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else 4 if lead & 0xF8 == 0xF0 else 1
    )
    return start if n - start < need else n


class StreamingDetokenizer:
    """reset() / add_token(id) -> newly final text / finalize() -> the rest."""

    def __init__(self, tokenizer: Tokenizer):
        self._table = token_bytes_table(tokenizer)
        self.reset()

    def reset(self) -> None:
        self._pending = bytearray()

    def add_token(self, token_id: int) -> str:
        if 0 <= token_id < len(self._table):
            self._pending += self._table[token_id]
        cut = _complete_prefix_length(self._pending)
        if cut == 0:
            return ""
        text = self._pending[:cut].decode("utf-8", errors="replace")
        del self._pending[:cut]
        return text

    def finalize(self) -> str:
        """Emit what is still held (an unfinished character becomes U+FFFD, as decode() does)."""
        text = self._pending.decode("utf-8", errors="replace")
        self._pending.clear()
        return text
