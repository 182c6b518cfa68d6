"""OpenAI's log-probability objects: the completions' (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`) and the chat's (`content`: token, logprob, bytes, top_logprobs)."""
from __future__ import annotations

from typing import Any

from selfrag_engine.engine.output import Delta, RequestOutput


def _token_str(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tok, out: RequestOutput | Delta, offset: int = 0) -> dict[str, Any]:
    """OpenAI's completion logprobs of `out`'s tokens; a streamed chunk's offsets continue from `offset`, the
    characters its choice sent before."""
    tokens = [_token_str(tok, t) for t in out.token_ids]
    offsets, pos = [], offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    top = None
    if out.logprobs is not None:
        top = [{_token_str(tok, t): lp for t, lp in step.items()} for step in out.logprobs]
    return {"tokens": tokens, "token_logprobs": list(out.token_logprobs), "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(tok, out: RequestOutput | Delta, top: int | None) -> dict[str, Any]:
    content = []
    for step, (t, lp) in enumerate(zip(out.token_ids, out.token_logprobs)):
        s = _token_str(tok, t)
        entry = {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": []}
        if top and out.logprobs is not None:
            ranked = sorted(out.logprobs[step].items(), key=lambda kv: -kv[1])[:top]
            entry["top_logprobs"] = [{"token": _token_str(tok, i), "logprob": v,
                                      "bytes": list(_token_str(tok, i).encode("utf-8"))} for i, v in ranked]
        content.append(entry)
    return {"content": content}
