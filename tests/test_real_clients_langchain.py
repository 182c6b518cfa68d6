"""LangChain (`langchain-openai`), a client nobody here wrote, against `selfrag-engine serve` on the embedded model:
ChatOpenAI's invoke, batch and stream, its content blocks, `with_structured_output`, and the completions LLM, each
with what LangChain sends by default. Greedy answers are checked against the Python API's generation of the same
prompt (the server's chat format is Self-RAG's instruction format)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("langchain_openai", reason="langchain-openai is a test dependency (requirements-clients.txt)")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from langchain_core.messages import HumanMessage  # noqa: E402
from langchain_openai import ChatOpenAI, OpenAI  # noqa: E402

from selfrag_engine import Engine, SamplingParams  # noqa: E402
from selfrag_engine.selfrag.prompts import format_prompt  # noqa: E402
from selfrag_engine.tiny.assets import read_examples  # noqa: E402
from tests.server_process import MODEL, NAME, serve  # noqa: E402

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="tiny_selfrag not present")

MAX_TOKENS = 32
# Instructions the model answers without retrieval (greetings, rewriting, arithmetic), from the committed examples.
INSTRUCTIONS = [e["instruction"] for e in read_examples()["instructions"]][:4]


@pytest.fixture(scope="module")
def server():
    with serve() as s:
        yield s


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(MODEL, progress=False)


@pytest.fixture(scope="module")
def expected(engine):
    """The Python API's greedy answer to each instruction, as the server's chat formats it."""
    outs = engine.generate([format_prompt(i) for i in INSTRUCTIONS],
                           SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return dict(zip(INSTRUCTIONS, outs))


def chat(server, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{server.base}/v1", api_key="unused", model=NAME, max_retries=0, timeout=120,
                      **kwargs)


def test_invoke_answers_as_the_engine(server, expected):
    llm = chat(server, temperature=0, max_tokens=MAX_TOKENS)
    for instruction, out in expected.items():
        msg = llm.invoke(instruction)
        assert msg.content == out.text
        assert msg.response_metadata["finish_reason"] == out.finish_reason
        assert msg.response_metadata["model_name"] == NAME
        usage = msg.usage_metadata
        assert (usage["input_tokens"], usage["output_tokens"]) == (len(out.prompt_token_ids), len(out.token_ids))
    assert any(out.text.strip() for out in expected.values())


def test_invoke_with_langchains_defaults(server, engine):
    """No temperature and no max_tokens: the request carries model, messages, stream and the seed; the server's
    defaults (vLLM's: temperature 1, the rest of the context) apply, so a seeded draw is repeatable and ends within
    the context."""
    llm = chat(server, seed=11)
    first, second = llm.invoke(INSTRUCTIONS[0]), llm.invoke(INSTRUCTIONS[0])
    assert first.content == second.content
    assert first.response_metadata["finish_reason"] in ("stop", "length")
    assert first.usage_metadata["input_tokens"] + first.usage_metadata["output_tokens"] <= engine.max_model_len


def test_batch_keeps_order(server, expected):
    llm = chat(server, temperature=0, max_tokens=MAX_TOKENS)
    msgs = llm.batch(list(expected), config={"max_concurrency": 4})
    assert [m.content for m in msgs] == [o.text for o in expected.values()]


def test_stream_arrives_in_chunks_that_join_to_the_answer(server, expected):
    llm = chat(server, temperature=0, max_tokens=MAX_TOKENS, stream_usage=True)
    instruction, out = max(expected.items(), key=lambda kv: len(kv[1].token_ids))
    chunks = list(llm.stream(instruction))
    texts = [c.content for c in chunks if c.content]
    assert len(texts) > 1
    assert "".join(texts) == out.text
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert len(usage) == 1  # stream_usage: OpenAI's last chunk with the usage and no choices
    assert (usage[0]["input_tokens"], usage[0]["output_tokens"]) == (len(out.prompt_token_ids), len(out.token_ids))


def test_content_blocks_answer_as_a_string(server, expected):
    llm = chat(server, temperature=0, max_tokens=MAX_TOKENS)
    instruction, out = next(iter(expected.items()))
    half = len(instruction) // 2
    msg = llm.invoke([HumanMessage(content=[{"type": "text", "text": instruction[:half]},
                                            {"type": "text", "text": instruction[half:]}])])
    assert msg.content == out.text


ANSWER_SCHEMA = {
    "title": "Reply",
    "description": "A short reply.",
    "type": "object",
    "properties": {"greeting": {"type": "boolean"}, "mood": {"type": "string", "enum": ["happy", "calm", "sad"]}},
    "required": ["greeting", "mood"],
    "additionalProperties": False,
}


def test_with_structured_output_json_schema(server):
    """LangChain's default method (json_schema): the reply parses and validates against the schema."""
    llm = chat(server, temperature=0, max_tokens=64)
    structured = llm.with_structured_output(ANSWER_SCHEMA, include_raw=True)
    for instruction in INSTRUCTIONS[:2]:
        result = structured.invoke(instruction)
        assert result["parsing_error"] is None
        jsonschema.validate(result["parsed"], ANSWER_SCHEMA)
        assert json.loads(result["raw"].content) == result["parsed"]


def test_with_structured_output_json_mode(server):
    llm = chat(server, temperature=0, max_tokens=64)
    # A chat instruction: on it the model closes a free JSON object within 64 tokens (on the rewriting and
    # arithmetic instructions it writes a string that never ends, the model's doing, not the grammar's).
    result = llm.with_structured_output(method="json_mode", include_raw=True).invoke("Who are you?")
    assert result["parsing_error"] is None
    assert isinstance(result["parsed"], dict)


def test_function_calling_is_refused_by_name(server):
    """The server calls no tools: LangChain's function-calling method gets a 400 naming `tools`, never an
    answer that silently ignored them."""
    llm = chat(server, temperature=0, max_tokens=16)
    with pytest.raises(openai.BadRequestError) as err:
        llm.with_structured_output(ANSWER_SCHEMA, method="function_calling").invoke(INSTRUCTIONS[0])
    assert "tools" in str(err.value)


def test_completions_llm_with_its_default_fields(server, engine):
    """langchain_openai.OpenAI sends frequency_penalty 0, presence_penalty 0, logprobs null, n 1, seed null and
    top_p 1 with every request: all accepted, and the greedy text is the engine's."""
    prompt = format_prompt(INSTRUCTIONS[1])
    llm = OpenAI(base_url=f"{server.base}/v1", api_key="unused", model=NAME, temperature=0, max_tokens=MAX_TOKENS,
                 max_retries=0, timeout=120)
    out = engine.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]
    assert llm.invoke(prompt) == out.text
    assert llm.batch([prompt, prompt]) == [out.text, out.text]
