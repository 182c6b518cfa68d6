"""selfrag-engine: a decoding engine for Self-RAG models.

    from selfrag_engine import Engine, SamplingParams
    engine = Engine.from_pretrained("selfrag/selfrag_llama2_7b")  # a directory, a model id or "tiny"; device auto
    out = engine.generate(["### Instruction:\\nWho wrote Hamlet?\\n\\n### Response:\\n"],
                          SamplingParams(max_tokens=100, temperature=0.0))
"""
import importlib

# Resolved on first use, so importing one submodule (a kernel, the tokenizer) does not load the engine.
_EXPORTS = {
    "Engine": "selfrag_engine.engine.llm_engine",
    "RequestOutput": "selfrag_engine.engine.llm_engine",
    "CompletionOutput": "selfrag_engine.engine.output",
    "Delta": "selfrag_engine.engine.output",
    "EngineLoop": "selfrag_engine.engine.loop",
    "EngineClient": "selfrag_engine.engine.client",
    "SamplingParams": "selfrag_engine.engine.sampling_params",
    "StructuredOutput": "selfrag_engine.engine.structured_output",
    "LlamaConfig": "selfrag_engine.config",
    "Tokenizer": "selfrag_engine.tokenizer",
    "CheckpointError": "selfrag_engine.errors",
    "RequestError": "selfrag_engine.errors",
    "CacheCapacityError": "selfrag_engine.errors",
    "TokenizerError": "selfrag_engine.errors",
    "SelfragEngineError": "selfrag_engine.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'selfrag_engine' has no attribute '{name}'")
