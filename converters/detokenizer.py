"""Streams token ids to text without ever splitting a UTF-8 character across two chunks."""
from __future__ import annotations

import codecs

from converters.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns tokens into text one at a time; the chunks concatenate to exactly `tokenizer.decode(ids)`.

    Byte-level tokens often carry only part of a character (an emoji is usually 2-4 tokens), so bytes of an
    unfinished character wait in Python's incremental UTF-8 decoder, which replaces invalid bytes with U+FFFD just
    as the one-shot decode does.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token ('' while a character is still unfinished)."""
        return self._decoder.decode(self._tokenizer.piece_bytes(token_id, self._skip_special))

    def flush(self) -> str:
        """Whatever is left at the end of the stream; an unfinished character comes out as U+FFFD."""
        return self._decoder.decode(b"", final=True)

    @property
    def pending_bytes(self) -> int:
        """Bytes held back because they do not yet form a whole character."""
        return len(self._decoder.getstate()[0])
