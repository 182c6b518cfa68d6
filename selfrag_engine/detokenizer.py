"""Incremental detokenization: a request's text grown one token at a time, as vLLM hands it back.

    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    for token in generated:
        piece = detok.add(token)  # the text that token made final ("" while it waits)

The text is what vLLM's incremental detokenizer produces (`outputs[0].text`), which the reference Self-RAG
scripts read and OpenAI-compatible servers stream. Each new token is decoded with the fast Llama decoder over a
window of the last few tokens (the prompt's at first), and the window's text past what was already emitted is
the new text:
- the first generated word keeps its leading space (`" Paris is ..."`): the prompt's last tokens are its
  context, so the '▁' that decoding strips at the start of a window is not the generated word's;
- added and special tokens sit against their neighbours with no space put between them
  (`"[Irrelevant] I know.[Utility:1]</s>"`); with skip_special_tokens they are left out;
- SentencePiece byte-fallback pieces are fused into UTF-8, and a window whose text ends in U+FFFD (a character
  whose bytes have not all arrived) emits nothing until the next token completes it.

The window never holds more than the tokens since the last emission plus five of context, so a step costs the
same at the thousandth token as at the first.
"""
from __future__ import annotations

import re
from typing import AbstractSet, Iterable, Protocol, Sequence

SPIECE_UNDERLINE = "▁"
# A SentencePiece byte-fallback piece, as the fast tokenizer's ByteFallback decoder recognises it.
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# vLLM's window: five tokens of context before the token read, and the tokens not yet emitted.
_CONTEXT = 5


class Pieces(Protocol):
    """What the detokenizer reads of a tokenizer (`selfrag_engine.tokenizer.Tokenizer`)."""
    @property
    def special_ids(self) -> AbstractSet[int]: ...

    def id_to_token(self, token_id: int) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Pieces, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._special = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._prompt = prompt_ids
        self._pieces: list[str] | None = None  # the window, once the first token came
        self._prefix = 0  # window[prefix:read] is text already emitted (context); window[read:] is not
        self._read = 0

    def _context(self) -> list[str]:
        """The prompt's last pieces that decoding keeps (special ones skipped when they are skipped)."""
        pieces: list[str] = []
        for t in reversed(self._prompt):
            if int(t) not in self._special:
                pieces.append(self._tok.id_to_token(int(t)))
                if len(pieces) > _CONTEXT:
                    break
        pieces.reverse()
        return pieces

    def add(self, token_id: int) -> str:
        """Takes the next generated token; returns the text it made final."""
        token_id = int(token_id)
        skipped = token_id in self._special
        if self._pieces is None:
            self._pieces = self._context()
            if skipped:
                self._prefix = max(len(self._pieces) - _CONTEXT - 1, 0)
                self._read = len(self._pieces)
            else:
                self._pieces.append(self._tok.id_to_token(token_id))
                self._prefix = max(len(self._pieces) - _CONTEXT - 1, 0)
                self._read = len(self._pieces) - 1
        elif skipped:
            return ""
        else:
            self._pieces.append(self._tok.id_to_token(token_id))
        window = self._pieces
        prefix_text = fast_decode(window[self._prefix:self._read])
        new_text = fast_decode(window[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        # The emitted tokens become the context; what lies before it is never read again.
        del window[:self._read]
        self._prefix, self._read = 0, len(window)
        return new_text[len(prefix_text):]

    def add_all(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def snapshot(self) -> tuple:
        """The state, to put back with `restore` (a step that failed is undone)."""
        return (None if self._pieces is None else list(self._pieces), self._prefix, self._read)

    def restore(self, state: tuple) -> None:
        pieces, self._prefix, self._read = state
        self._pieces = None if pieces is None else list(pieces)


def fast_decode(tokens: list[str]) -> str:
    """The decoder of transformers' LlamaTokenizerFast (legacy): '▁' -> ' ', runs of byte pieces fused into
    UTF-8 (a run that is not valid UTF-8 gives one U+FFFD per byte), then one leading space stripped."""
    parts: list[str] = []
    run = bytearray()
    for token in tokens:
        token = token.replace(SPIECE_UNDERLINE, " ")
        byte = _BYTE_PIECE.fullmatch(token)
        if byte is not None:
            run.append(int(byte.group(1), 16))
            continue
        if run:
            parts.append(_bytes_text(run))
            run.clear()
        parts.append(token)
    if run:
        parts.append(_bytes_text(run))
    text = "".join(parts)
    return text[1:] if text.startswith(" ") else text


def _bytes_text(run: bytearray) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)
