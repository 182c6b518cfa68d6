"""The Self-RAG vocabulary: the one definition of its added tokens and reflection groups.

`ADDED_TOKENS` is in the published id order: in `selfrag/selfrag_llama2_7b` they are ids 32000..32015, after
Llama-2's 32,000 pieces. `GROUPS` lists each reflection group's tokens in the order the scores read them.
"""
from __future__ import annotations

ADDED_TOKENS: tuple[str, ...] = (
    "[No Retrieval]", "[Retrieval]", "[Continue to Use Evidence]", "[Irrelevant]", "[Relevant]",
    "<paragraph>", "</paragraph>", "[Utility:1]", "[Utility:2]", "[Utility:3]", "[Utility:4]", "[Utility:5]",
    "[Fully supported]", "[Partially supported]", "[No support / Contradictory]", "<pad>",
)
PAD_TOKEN = "<pad>"
# Self-RAG registered all added tokens but the pad token as additional special tokens.
ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = tuple(t for t in ADDED_TOKENS if t != PAD_TOKEN)

GROUPS: dict[str, tuple[str, ...]] = {
    "retrieval": ("[Retrieval]", "[No Retrieval]", "[Continue to Use Evidence]"),
    "relevance": ("[Relevant]", "[Irrelevant]"),
    "grounding": ("[Fully supported]", "[Partially supported]", "[No support / Contradictory]"),
    "utility": ("[Utility:1]", "[Utility:2]", "[Utility:3]", "[Utility:4]", "[Utility:5]"),
}
PARAGRAPH_OPEN, PARAGRAPH_CLOSE = "<paragraph>", "</paragraph>"
