"""A token id as OpenAI's logprobs spell it: its text and its bytes.

A byte-level BPE token can hold part of a UTF-8 character; its `bytes` are then exact and its
text is written as OpenAI does for such tokens, `bytes:\\xe4\\xbd`. Special tokens (`<|im_end|>`)
are spelled as the tokenizer names them."""

from __future__ import annotations

from tokenizers import Tokenizer

from fermi.detokenizer import token_bytes_table


class TokenText:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._table = token_bytes_table(tokenizer)
        self._cache: dict[int, tuple[str, bytes]] = {}

    def piece(self, token_id: int) -> tuple[str, bytes]:
        """(text, bytes) of one token id; ids the tokenizer does not know give ("", b"")."""
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._spell(token_id)
        return cached

    def _spell(self, token_id: int) -> tuple[str, bytes]:
        raw = self._table[token_id] if 0 <= token_id < len(self._table) else b""
        if not raw:
            name = self.tokenizer.id_to_token(token_id) or ""
            return name, name.encode()
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw
