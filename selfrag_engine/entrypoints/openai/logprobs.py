"""OpenAI's log-probability objects: the completions' (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`) and the chat's (`content`: token, logprob, bytes, top_logprobs), and vLLM's `prompt_logprobs`.

A chosen token's string is the text it added to the output, as the incremental detokenizer made it
(`token_texts`): the strings join to the text exactly, the SentencePiece word's leading space included, and a
special token the text skips (`[No Retrieval]` with skip_special_tokens) is an empty string. A candidate of
`top_logprobs` is named by its own piece ('▁' as a space, special tokens by name), so the reflection tokens'
probabilities stay readable.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from selfrag_engine.detokenizer import SPIECE_UNDERLINE, IncrementalDetokenizer

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_texts(tok, prompt_ids: Sequence[int], token_ids: Sequence[int], skip_special_tokens: bool,
                detok: IncrementalDetokenizer | None = None) -> list[str]:
    """The text each token added (continuing `detok`, a streamed choice's, when given)."""
    detok = detok or IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    return [detok.add(t) for t in token_ids]


def clip_to(pieces: list[str], text: str) -> list[str]:
    """The pieces aligned with `text`: a piece the text does not hold where it stands keeps only the part it
    does hold (a stop string cut the text inside a token or before it; an echoed prompt has no `<s>`). Pieces
    that cannot cover the text are left as they are."""
    if "".join(pieces) == text:
        return pieces
    out, pos = [], 0
    for p in pieces:
        k = 0
        while k < len(p) and pos + k < len(text) and p[k] == text[pos + k]:
            k += 1
        out.append(p[:k])
        pos += k
    return out if pos == len(text) else pieces


class StreamedTokens:
    """A streamed choice's tokens for its logprobs, released with its text: a token whose text the stream holds
    back (it may begin a stop string) waits for it, and at the end the pieces are clipped to the final text, as
    `clip_to` clips the non-streamed answer's. So the streamed tokens, their strings and offsets equal the
    non-streamed ones chunk for chunk joined, with or without a stop string."""

    def __init__(self, tok, prompt_ids: Sequence[int], skip_special_tokens: bool):
        self.detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
        self.pending: list[tuple[int, str, float | None, dict[int, float] | None]] = []
        self.text = ""   # the text released so far
        self.covered = 0  # characters of it the released tokens' strings cover

    def release(self, token_ids: Sequence[int], token_logprobs: Sequence[float | None],
                top: Sequence[dict[int, float] | None] | None, text: str, finished: bool
                ) -> tuple[list[int], list[str], list[float | None], list[dict[int, float] | None] | None]:
        """One delta in; the tokens now final out: (ids, strings, logprobs, top candidates or None)."""
        tops = list(top) if top is not None else [None] * len(token_ids)
        for t, lp, c in zip(token_ids, token_logprobs, tops):
            self.pending.append((int(t), self.detok.add(t), lp, c))
        self.text += text
        if finished:
            n = len(self.pending)
            pieces = clip_to([p for _, p, _, _ in self.pending], self.text[self.covered:])
        else:
            n, room, pieces = 0, len(self.text) - self.covered, []
            for _, piece, _, _ in self.pending:
                if len(piece) > room:
                    break
                room -= len(piece)
                pieces.append(piece)
                n += 1
        out, self.pending = self.pending[:n], self.pending[n:]
        self.covered += sum(map(len, pieces))
        return ([t for t, _, _, _ in out], pieces, [lp for _, _, lp, _ in out],
                None if top is None else [c for _, _, _, c in out])


def piece_text(tok, token_id: int) -> str:
    """A candidate token by its own piece: '▁' as a space, an ASCII byte piece as its character."""
    piece = tok.id_to_token(int(token_id))
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte is not None and int(byte.group(1), 16) < 0x80:
        return chr(int(byte.group(1), 16))
    return piece.replace(SPIECE_UNDERLINE, " ")


def piece_bytes(tok, token_id: int) -> list[int]:
    """The UTF-8 bytes a token stands for (a byte-fallback piece: its one byte)."""
    piece = tok.id_to_token(int(token_id))
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte is not None:
        return [int(byte.group(1), 16)]
    return list(piece.replace(SPIECE_UNDERLINE, " ").encode("utf-8"))


def completion_logprobs(tok, token_ids: Sequence[int], texts: list[str], token_logprobs: Sequence[float | None],
                        top: Sequence[dict[int, float] | None] | None, offset: int = 0) -> dict[str, Any]:
    """OpenAI's completion logprobs; `text_offset` counts from `offset` (a streamed choice's characters so far,
    or 0)."""
    offsets, pos = [], offset
    for s in texts:
        offsets.append(pos)
        pos += len(s)
    tops = None
    if top is not None:
        tops = [None if step is None else {piece_text(tok, t): lp for t, lp in
                                           sorted(step.items(), key=lambda kv: -kv[1])} for step in top]
    return {"tokens": list(texts), "token_logprobs": list(token_logprobs), "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(tok, token_ids: Sequence[int], texts: list[str], token_logprobs: Sequence[float],
                  top_steps: Sequence[dict[int, float]] | None, top: int | None) -> dict[str, Any]:
    content = []
    for step, (t, s, lp) in enumerate(zip(token_ids, texts, token_logprobs)):
        # A byte-fallback token is its byte (its character may need the next token's); else the text's bytes.
        byte = _BYTE_PIECE.fullmatch(tok.id_to_token(int(t)))
        entry = {"token": s, "logprob": lp, "bytes": [int(byte.group(1), 16)] if byte else list(s.encode("utf-8")),
                 "top_logprobs": []}
        if top and top_steps is not None:
            ranked = sorted(top_steps[step].items(), key=lambda kv: (-kv[1], kv[0]))[:top]
            entry["top_logprobs"] = [{"token": piece_text(tok, i), "logprob": v, "bytes": piece_bytes(tok, i)}
                                     for i, v in ranked]
        content.append(entry)
    return {"content": content}


def prompt_logprobs_body(tok, entries: Sequence[dict[int, float] | None] | None) -> list | None:
    """vLLM's prompt_logprobs: per prompt token, None (the first) or {token id: {logprob, decoded_token}}."""
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": lp, "decoded_token": piece_text(tok, t)}
                                    for t, lp in e.items()} for e in entries]
