"""Self-RAG's prompt, passage and output text formats (as the published model was trained)."""
from __future__ import annotations

import re

from selfrag_engine.errors import RequestError
from selfrag_engine.vocab import GROUPS, PARAGRAPH_CLOSE, PARAGRAPH_OPEN

__all__ = ["GROUPS", "PARAGRAPH_CLOSE", "PARAGRAPH_OPEN", "format_passage", "format_prompt", "postprocess",
           "script_postprocess"]

# What post-processing removes: every control token except [Continue to Use Evidence], and </s>.
_STRIPPED = [t for g in GROUPS.values() for t in g if t != "[Continue to Use Evidence]"]
_STRIPPED += [PARAGRAPH_OPEN, PARAGRAPH_CLOSE, "</s>"]


def format_prompt(instruction: str, input: str | None = None) -> str:
    if not instruction or not instruction.strip():
        raise RequestError("the instruction (question) is empty")
    if input:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def format_passage(title: str, text: str) -> str:
    return f"[Retrieval]{PARAGRAPH_OPEN}{title}\n{text}{PARAGRAPH_CLOSE}"


def postprocess(text: str, long_form: bool = False) -> str:
    """The answer text: control tokens and </s> removed, one leading space dropped; the long form also puts a
    space after sentence punctuation glued to the next word (segments are joined without one)."""
    for token in _STRIPPED:
        text = text.replace(token, "")
    if text.startswith(" "):
        text = text[1:]
    if long_form:
        text = re.sub(r"([.!?])(\w)", r"\1 \2", text)
    return text


def script_postprocess(text: str) -> str:
    """The released short-form script's post-processing of an answer it returns: control tokens, </s> and
    newlines removed, nothing else; vLLM's leading space stays (`" Paris is ..."`)."""
    for token in _STRIPPED:
        text = text.replace(token, "")
    return text.replace("\n", "").replace("<|endoftext|>", "")
