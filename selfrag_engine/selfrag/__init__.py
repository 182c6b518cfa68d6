"""The Self-RAG algorithms on top of the engine: prompts, reflection-token scores, short and long form."""
