"""The OpenAI surface as the official `openai` client (and raw HTTP, for the 400s) sees it, against
`selfrag-engine serve` on the embedded tiny model, each answer compared with the Python API's on the same
request: chat content as parts or null, logprobs as OpenAI defines them, token strings that join to the text,
the model card, echo, the sampling fields and vLLM's extras, and a 400 naming every field the server refuses.
"""
from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai", reason="the openai client is a test dependency of the server")
httpx = pytest.importorskip("httpx")

from selfrag_engine import Engine, SamplingParams  # noqa: E402
from selfrag_engine.entrypoints.openai.request_params import ENGINE_FIELDS  # noqa: E402
from selfrag_engine.selfrag.prompts import format_prompt  # noqa: E402
from tests.server_process import MODEL, NAME, serve  # noqa: E402

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="tiny_selfrag not present")

QUESTION = "Who wrote the letter?"
PROMPT = format_prompt(QUESTION)


@pytest.fixture(scope="module")
def server():
    with serve("--max-pending", "32") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(MODEL, progress=False)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base}{path}", json=body, timeout=120)


def _refused(server, path: str, body: dict, param: str) -> dict:
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error


def _chat(**extra) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, **extra}


def _completion(**extra) -> dict:
    return {"model": NAME, "prompt": PROMPT, "max_tokens": 8, **extra}


# ---- the model card --------------------------------------------------------------------------------------


def test_model_card_and_an_unknown_model(client, server):
    card = client.models.retrieve(NAME)
    assert card.id == NAME and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    body = httpx.get(f"{server.base}/v1/models/org/other-model", timeout=10).json()
    assert body["error"]["param"] == "model" and "org/other-model" in body["error"]["message"]


# ---- chat content ----------------------------------------------------------------------------------------


def test_chat_content_as_text_parts_or_null_is_the_string_content(client, engine):
    expected = engine.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0.0))[0].text
    half = len(QUESTION) // 2
    parts = [{"type": "text", "text": QUESTION[:half]}, {"type": "text", "text": QUESTION[half:]}]
    # Parts join with newlines (as vLLM joins them): one part is the string itself.
    got = client.chat.completions.create(model=NAME, max_tokens=10, temperature=0,
                                         messages=[{"role": "user", "content": [parts[0] | {"text": QUESTION}]}])
    assert got.choices[0].message.content == expected
    joined = engine.generate(format_prompt(f"{QUESTION[:half]}\n{QUESTION[half:]}"),
                             SamplingParams(max_tokens=10, temperature=0.0))[0].text
    got = client.chat.completions.create(model=NAME, max_tokens=10, temperature=0,
                                         messages=[{"role": "user", "content": parts}])
    assert got.choices[0].message.content == joined
    # An assistant turn with null content is an earlier message with no text.
    history = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": None},
               {"role": "user", "content": QUESTION}]
    want = engine.generate(format_prompt(f"user: Hi.\nassistant: \n{QUESTION}"),
                           SamplingParams(max_tokens=10, temperature=0.0))[0].text
    got = client.chat.completions.create(model=NAME, max_tokens=10, temperature=0, messages=history)
    assert got.choices[0].message.content == want


def test_non_text_parts_and_tools_are_refused_naming_them(server):
    image = {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}
    error = _refused(server, "/v1/chat/completions",
                     _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}, image]}]),
                     "messages")
    assert "messages.0.content.1" in error["message"] and "image_url" in error["message"]
    error = _refused(server, "/v1/chat/completions", _chat(messages=[{"role": "user", "content": None}]), "messages")
    assert "messages.0.content" in error["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for field, value in (("tools", [tool]), ("tool_choice", "auto"), ("functions", [tool["function"]]),
                         ("function_call", "auto"), ("parallel_tool_calls", True), ("parallel_tool_calls", False)):
        _refused(server, "/v1/chat/completions", _chat(**{field: value}), field)
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    error = _refused(server, "/v1/chat/completions", _chat(messages=[call, {"role": "user", "content": "Hi"}]),
                     "messages")
    assert "messages.0.tool_calls" in error["message"]
    # Nothing may follow the last user message (the instruction): an assistant prefill or a late system
    # message would be dropped.
    for late in ({"role": "assistant", "content": "The"}, {"role": "system", "content": "Be brief."}):
        error = _refused(server, "/v1/chat/completions",
                         _chat(messages=[{"role": "user", "content": QUESTION}, late]), "messages")
        assert "messages.1" in error["message"] and late["role"] in error["message"]


def test_unknown_and_unusable_fields_are_refused_naming_them(server):
    _refused(server, "/v1/chat/completions", _chat(frobnicate=1), "frobnicate")
    _refused(server, "/v1/completions", _completion(frobnicate=1), "frobnicate")
    _refused(server, "/v1/completions", _completion(suffix="end"), "suffix")
    _refused(server, "/v1/chat/completions", _chat(top_logprobs=2), "top_logprobs")
    _refused(server, "/v1/completions", _completion(n=2, best_of=1, temperature=1.0), "best_of")
    _refused(server, "/v1/completions", _completion(echo=True, stream=True), "echo")
    # A stream has no place for the prompt's log-probabilities (vLLM refuses them too).
    _refused(server, "/v1/completions", _completion(prompt_logprobs=1, stream=True), "prompt_logprobs")
    _refused(server, "/v1/chat/completions", _chat(prompt_logprobs=0, stream=True), "prompt_logprobs")
    _refused(server, "/v1/completions", _completion(logit_bias={"the": 5}), "logit_bias")
    _refused(server, "/v1/completions", _completion(logit_bias={"99999999": 5}), "logit_bias")


def test_null_asks_for_the_default(client, engine):
    """OpenAI's reference marks the sampling fields nullable, and the openai client sends null for an argument
    given as None: each null is the field's default, and a completion's max_tokens null the rest of the context
    (vLLM's reading)."""
    want = engine.generate(PROMPT, SamplingParams(max_tokens=8, seed=0))[0].text
    nulls = dict(temperature=None, top_p=None, n=None, presence_penalty=None, frequency_penalty=None, stop=None,
                 logit_bias=None, user=None, stream=None)
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, seed=0, echo=None, logprobs=None,
                                    best_of=None, suffix=None, **nulls)
    assert got.choices[0].text == want
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
                                         seed=0, logprobs=None, top_logprobs=None, **nulls)
    assert got.choices[0].message.content == want
    rest = engine.max_model_len - len(engine.tokenizer.encode(PROMPT, add_bos=True))
    greedy = engine.generate(PROMPT, SamplingParams(max_tokens=rest, temperature=0.0))[0]
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=None, temperature=0)
    assert (got.choices[0].text, got.choices[0].finish_reason) == (greedy.text, greedy.finish_reason)


def test_a_selfrag_chat_refuses_the_sampling_fields_it_does_not_read(server):
    messages = [{"role": "user", "content": QUESTION}]
    for field, value in (("temperature", 0.5), ("logprobs", True), ("max_tokens", 8), ("timeout", 30.0)):
        _refused(server, "/v1/chat/completions",
                 {"messages": messages, "selfrag": {"mode": "never", "max_tokens": 4}, field: value}, field)
    _refused(server, "/v1/chat/completions",
             {"messages": messages, "selfrag": {"mode": "never", "max_tokens": 4, "stream": True}}, "selfrag.stream")
    # The long form's tree options in a short-form query.
    for field in ("beam_width", "max_depth"):
        _refused(server, "/v1/selfrag", {"question": QUESTION, "mode": "never", "max_tokens": 4, field: 2}, field)
    r = _post(server, "/v1/chat/completions", {"messages": messages, "temperature": 1.0,
                                               "selfrag": {"mode": "never", "max_tokens": 4}})
    assert r.status_code == 200, r.text  # a field at its default value asks for nothing


def test_what_the_clients_send_by_default_is_accepted(server):
    # LangChain's ChatOpenAI: model, stream, n, temperature (and stream_options when it streams).
    r = _post(server, "/v1/chat/completions", _chat(stream=False, n=1, temperature=0.7, user="u1"))
    assert r.status_code == 200, r.text
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", timeout=120,
                      json=_chat(stream=True, n=1, temperature=0.7, stream_options={"include_usage": True})) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] >= 1


# ---- logprobs --------------------------------------------------------------------------------------------


def test_token_strings_align_with_a_cut_or_echoed_text():
    from selfrag_engine.entrypoints.openai.logprobs import clip_to

    # A stop string cut the text inside the second token; the third made no text.
    assert clip_to([" Paris", " is\n", "It"], " Paris is") == [" Paris", " is", ""]
    # An echoed text prompt has no BOS.
    assert clip_to(["<s>", "###", " Instruction"], "### Instruction") == ["", "###", " Instruction"]
    # Pieces that cannot make the text stay as the tokens made them.
    assert clip_to([" a", " b"], " a c") == [" a", " b"]


def _joins(tokens: list[str], offsets: list[int] | None, text: str) -> None:
    assert "".join(tokens) == text
    if offsets is not None:
        assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]


@pytest.mark.parametrize("skip", [True, False])
def test_completion_logprobs_zero_and_token_strings_that_join_to_the_text(client, engine, skip):
    params = SamplingParams(max_tokens=16, temperature=0.0, skip_special_tokens=skip)
    expected = engine.generate(PROMPT, params)[0]
    if not skip:
        # The model writes reflection tokens here: the case where a skipped one must leave no trace.
        assert "[" in expected.text
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=0,
                                    extra_body={"skip_special_tokens": skip})
    lp = got.choices[0].logprobs
    assert got.choices[0].text == expected.text
    assert lp.token_logprobs == pytest.approx(expected.token_logprobs, abs=1e-5)
    assert lp.top_logprobs is None and len(lp.tokens) == len(expected.token_ids)
    _joins(lp.tokens, lp.text_offset, expected.text)
    # The first generated word keeps its SentencePiece space, as the text does.
    assert lp.tokens[0] == expected.text[:len(lp.tokens[0])]


def test_completion_top_logprobs_and_streamed_offsets(client, engine, server):
    expected = engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, logprobs=3,
                                                      skip_special_tokens=False))[0]
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3,
                                    extra_body={"skip_special_tokens": False})
    lp = got.choices[0].logprobs
    assert all(len(top) >= 1 for top in lp.top_logprobs)
    best = [max(top.values()) for top in lp.top_logprobs]
    assert best == pytest.approx([max(step.values()) for step in expected.logprobs], abs=1e-5)
    tokens, offsets = [], []
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3,
                                       stream=True, extra_body={"skip_special_tokens": False})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    _joins(tokens, offsets, expected.text)


def _stop_across_tokens(tokens: list[str], text: str) -> str:
    """A stop string that starts inside one token and ends inside the next, first found where it is cut."""
    pos = 0
    for a, b in zip(tokens, tokens[1:]):
        stop = a[1:] + b[:1]
        if len(a) >= 2 and b and stop.strip() and text.find(stop) == pos + 1:
            return stop
        pos += len(a)
    raise AssertionError(f"no stop string spans two tokens of {tokens}")


def test_streamed_logprobs_are_released_with_the_text_and_cut_at_a_stop_string(client):
    """The stream holds back text that may begin a stop string; its tokens wait with it, so the streamed
    tokens never run ahead of the streamed text, and joined they equal the non-streamed answer's."""
    full = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0)
    stop = _stop_across_tokens(full.choices[0].logprobs.tokens, full.choices[0].text)
    plain = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=2,
                                      stop=[stop])
    want = plain.choices[0]
    assert want.finish_reason == "stop" and stop not in want.text
    text, tokens, offsets, lps = "", [], [], []
    for chunk in client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=2,
                                           stop=[stop], stream=True):
        c = chunk.choices[0]
        text += c.text
        if c.logprobs is not None:
            tokens += c.logprobs.tokens
            offsets += c.logprobs.text_offset
            lps += c.logprobs.token_logprobs
        assert text.startswith("".join(tokens))  # never ahead of the text
    assert text == want.text
    assert tokens == want.logprobs.tokens and offsets == want.logprobs.text_offset
    assert lps == pytest.approx(want.logprobs.token_logprobs, abs=1e-6)
    # The chat endpoint's streamed logprobs likewise.
    messages = [{"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0,
                                          logprobs=True, stop=[stop])
    content, streamed = "", []
    for chunk in client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0,
                                                logprobs=True, stop=[stop], stream=True):
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs is not None:
                streamed += [t.token for t in chunk.choices[0].logprobs.content]
            assert content.startswith("".join(streamed))
    assert content == chat.choices[0].message.content
    assert streamed == [t.token for t in chat.choices[0].logprobs.content]


def test_chat_logprobs_true_alone_gives_the_chosen_tokens(client, engine):
    expected = engine.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0.0))[0]
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=10, temperature=0, logprobs=True)
    content = got.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(expected.token_logprobs, abs=1e-5)
    assert all(c.top_logprobs == [] for c in content)
    _joins([c.token for c in content], None, got.choices[0].message.content)


# ---- echo ------------------------------------------------------------------------------------------------


def test_echo_puts_the_prompt_first(client, engine):
    expected = engine.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0.0))[0]
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert got.choices[0].text == PROMPT + expected.text


def test_echo_with_logprobs_scores_the_prompt(client, engine, server):
    ids = engine.tokenizer.encode(PROMPT, add_bos=True)
    if "prompt_logprobs" not in ENGINE_FIELDS:
        _refused(server, "/v1/completions", _completion(echo=True, logprobs=1), "prompt_logprobs")
        return
    expected = engine.generate(PROMPT, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))[0]
    # lm-eval's loglikelihood request: token ids, echo, logprobs 1, one token.
    got = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = got.choices[0].logprobs
    n = len(ids)
    assert len(lp.tokens) == n + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [e[t] for t, e in zip(ids[1:], expected.prompt_logprobs[1:])]
    assert lp.token_logprobs[1:n] == pytest.approx(want, abs=1e-5)
    assert lp.token_logprobs[n] == pytest.approx(expected.token_logprobs[0], abs=1e-5)
    _joins(lp.tokens, lp.text_offset, got.choices[0].text)


# ---- sampling fields and vLLM's extras ------------------------------------------------------------------


PENALTIES = {"presence_penalty": 1.5, "frequency_penalty": 1.0, "repetition_penalty": 1.8, "min_p": 0.3}


@pytest.mark.parametrize("field", sorted(PENALTIES))
def test_penalties_equal_the_python_api_or_are_refused(client, engine, server, field):
    value = PENALTIES[field]
    if field not in ENGINE_FIELDS:
        _refused(server, "/v1/completions", _completion(**{field: value}), field)
        return
    # Sampled, three seeds: the greedy answer of the tiny model is too short for a penalty to move it.
    def texts(**extra):
        return [engine.generate(PROMPT, SamplingParams(max_tokens=16, temperature=1.0, seed=s, **extra))[0].text
                for s in range(3)]

    expected = texts(**{field: value})
    assert expected != texts()  # the field changes the output: a server that ignored it would fail below
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=0, n=3,
                                    extra_body={field: value})
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == expected


def test_best_of_keeps_the_best_samples_as_the_python_api_does(client, engine, server):
    if "best_of" not in ENGINE_FIELDS:
        _refused(server, "/v1/completions", _completion(best_of=3, temperature=1.0), "best_of")
        return
    out = engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=5, n=2, best_of=4))[0]
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=5, n=2,
                                    best_of=4)
    assert [c.text for c in got.choices] == [c.text for c in out.outputs]
    assert got.usage.completion_tokens == sum(len(c.token_ids) for c in out.outputs)
    _refused(server, "/v1/completions", _completion(best_of=4, n=2, temperature=1.0, stream=True), "best_of")


def test_logit_bias_by_token_id_string(client, engine, server):
    token = engine.tokenizer.encode("Paris", add_bos=False)[0]
    if "logit_bias" not in ENGINE_FIELDS:
        _refused(server, "/v1/completions", _completion(logit_bias={str(token): 100}), "logit_bias")
        return
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0,
                                    logit_bias={str(token): 100}, logprobs=0)
    assert got.choices[0].logprobs.tokens and got.usage.completion_tokens == 4
    expected = engine.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0.0, logit_bias={token: 100.0}))[0]
    assert expected.token_ids == [token] * 4 and got.choices[0].text == expected.text


def test_json_schema_response_format(client, server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}},
              "required": ["name"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    if "structured" not in ENGINE_FIELDS:
        _refused(server, "/v1/chat/completions", _chat(response_format=fmt), "response_format")
        return
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=40, temperature=0, response_format=fmt)
    value = json.loads(got.choices[0].message.content)
    assert set(value) == {"name"} and isinstance(value["name"], str)
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=8, temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert got.choices[0].message.content in ("yes", "no")
    _refused(server, "/v1/chat/completions", _chat(response_format={"type": "json_object"}, guided_regex="a+"),
             "guided_regex")
    # A schema beside another type would be ignored: refused.
    beside = {"type": "text", "json_schema": fmt["json_schema"]}
    _refused(server, "/v1/chat/completions", _chat(response_format=beside), "response_format")
