"""Streaming detokenizers: token ids in one at a time, finished text out.

The text they emit, joined, equals the backend's `decode(all_ids)`. They never cut a UTF-8
character in two, and each token costs O(1) amortized: nothing is re-decoded.
"""

from __future__ import annotations

import codecs
from typing import Callable, Sequence

__all__ = ["NaiveStreamingDetokenizer", "StreamingDetokenizer"]

_REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    """Detokenizer for vocabularies whose tokens stand for byte strings.

    `token_piece(id)` gives the bytes a token stands for, or, with `byte_fallback`, an `int`
    for a SentencePiece byte token (`<0x41>`). Byte-level BPE (Llama 3, GPT-2 style) joins
    the bytes of all tokens and decodes them with errors="replace"; an incremental UTF-8
    decoder does the same piece by piece. SentencePiece's byte fallback decodes each run of
    byte tokens on its own and turns an invalid run into one U+FFFD per byte, so runs are
    held until they end. `strip_first_space` drops one leading space of the whole text
    (the `Strip` decoder of Llama 2 style tokenizers).
    """

    def __init__(
        self,
        token_piece: Callable[[int], bytes | int],
        *,
        byte_fallback: bool = False,
        strip_first_space: bool = False,
    ):
        self._piece = token_piece
        self._byte_fallback = byte_fallback
        self._strip_first_space = strip_first_space
        self.reset()

    def reset(self) -> None:
        """Forget every token given so far."""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._run = bytearray()  # pending byte-fallback tokens
        self._at_start = True
        self.num_tokens = 0

    def add_token(self, token: int) -> str:
        """Take one token id; return the text it completes (often "", never half a character)."""
        self.num_tokens += 1
        piece = self._piece(int(token))
        if isinstance(piece, int):
            self._run.append(piece)
            return ""
        text = self._flush_run()
        text += self._utf8.decode(piece)
        return self._emit(text)

    def finalize(self) -> str:
        """Flush what is held back (an unfinished character becomes U+FFFD, as `decode` does)."""
        text = self._flush_run() + self._utf8.decode(b"", True)
        return self._emit(text)

    def _flush_run(self) -> str:
        if not self._run:
            return ""
        run = bytes(self._run)
        self._run.clear()
        try:
            return run.decode("utf-8")
        except UnicodeDecodeError:
            return _REPLACEMENT * len(run)

    def _emit(self, text: str) -> str:
        if self._at_start and text:
            self._at_start = False
            if self._strip_first_space and text[0] == " ":
                text = text[1:]
        return text


class NaiveStreamingDetokenizer:
    """Fallback for decoders we do not model: re-decodes the tokens since the last newline.

    Exact for decoders where text that ends in a newline is never changed by what follows;
    the cost per token grows with the length of the current line, not of the answer.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.reset()

    def reset(self) -> None:
        """Forget every token given so far."""
        self._context: list[int] = []  # the token that ended the previous line, for context
        self._context_len = 0
        self._window: list[int] = []
        self._emitted = 0
        self.num_tokens = 0

    def _window_text(self) -> str:
        return self._decode(self._context + self._window)[self._context_len :]

    def add_token(self, token: int) -> str:
        """Take one token id; return the text it completes."""
        self.num_tokens += 1
        self._window.append(int(token))
        text = self._window_text()
        if text.endswith(_REPLACEMENT):  # maybe a character still being spelled out
            return ""
        new = text[self._emitted :]
        if text.endswith("\n"):
            self._context = self._window[-1:]
            self._context_len = len(self._decode(self._context))
            self._window = []
            self._emitted = 0
        else:
            self._emitted = len(text)
        return new

    def finalize(self) -> str:
        """Flush what is held back."""
        text = self._window_text()
        new = text[self._emitted :]
        self._emitted = len(text)
        return new
