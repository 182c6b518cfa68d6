"""A synthetic, fictional encyclopedia and the Self-RAG training data built from it.

The tiny default model (`selfrag_engine/data/tiny_selfrag`) is trained on this world, so it can only answer
a factual question by copying from a retrieved passage: which is what makes retrieval and the critique
tokens matter in a demo that has no 7B model.
"""
from selfrag_engine.tiny.world import Entity, World, WorldPassage, build_world

__all__ = ["Entity", "World", "WorldPassage", "build_world"]
