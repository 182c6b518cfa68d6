"""`selfrag-engine serve` as a subprocess on 127.0.0.1 over the embedded tiny model, asked by the official
`openai` client (completions, chat, streaming, logprobs, n, the Self-RAG extra body) and by raw HTTP for bad
bodies; then a bounded load of concurrent mixed clients, some of which hang up mid-stream."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai", reason="the openai client is a test dependency of the server")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="fastapi and uvicorn are the serve extra")

from selfrag_engine import Engine, SamplingParams  # noqa: E402
from selfrag_engine.retrieval.passages import Passage  # noqa: E402
from selfrag_engine.selfrag.long_form import LongFormSelfRAG  # noqa: E402
from selfrag_engine.selfrag.prompts import format_prompt  # noqa: E402
from selfrag_engine.selfrag.short_form import SelfRAG  # noqa: E402
from selfrag_engine.tiny.assets import default_model_dir, read_corpus, read_examples  # noqa: E402
from tests.helpers import spanning_stop  # noqa: E402

MODEL = default_model_dir()
NAME = "tiny-selfrag"
pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="tiny_selfrag not present")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "selfrag_engine", "serve", "--model", str(MODEL), "--port",
                             str(port), "--served-model-name", NAME, "--device", "cpu", "--quiet",
                             "--max-pending", "96"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read() if proc.poll() is not None else ""
            proc.kill()
            pytest.fail(f"the server did not come up: {out}")
        time.sleep(0.2)
    yield base
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(MODEL, progress=False)


def _cases(n: int) -> list[tuple[str, list[Passage]]]:
    """Questions of the committed examples, each with three corpus passages that share words with it."""
    corpus = read_corpus()
    out = []
    for ex in read_examples()["questions"][:n]:
        words = set(re.findall(r"\w+", ex["question"].lower()))
        ranked = sorted(corpus, key=lambda p: -len(words & set(re.findall(r"\w+", (p.title + " " + p.text).lower()))))
        out.append((ex["question"], ranked[:3]))
    return out


def _used_blocks(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return float(re.search(r"^selfrag_kv_blocks_used (\S+)$", text, re.M).group(1))


def test_models(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_equals_the_python_api(client, engine):
    prompt = format_prompt("What is the capital of the moon?")
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2)
    expected = engine.generate(prompt, params)[0]
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    choice = got.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert choice.logprobs.token_logprobs == pytest.approx(expected.token_logprobs, abs=1e-5)
    assert got.usage.completion_tokens == len(expected.token_ids)
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_completion_n_and_seed(client, engine):
    prompt = format_prompt("Name a color.")
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=1.0, seed=7, n=2)
    expected = [engine.generate(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=7 + i))[0].text
                for i in range(2)]
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == expected


def test_chat_and_its_stream(client, engine):
    question = read_examples()["instructions"][0]["instruction"]
    expected = engine.generate(format_prompt(question), SamplingParams(max_tokens=20, temperature=0.0))[0]
    messages = [{"role": "user", "content": question}]
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert got.choices[0].message.content == expected.text
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                            stream=True)
    parts, reasons = [], []
    for chunk in stream:
        parts.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(parts) == expected.text
    assert reasons[-1] == expected.finish_reason


def test_chat_logprobs(client, engine):
    prompt = format_prompt("Say hello.")
    expected = engine.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))[0]
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say hello."}],
                                         max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(expected.token_logprobs, abs=1e-5)
    assert all(len(c.top_logprobs) == 3 for c in content)


def test_selfrag_through_chat_extra_body_and_endpoint(client, server, engine):
    question, docs = _cases(1)[0]
    expected = SelfRAG(engine, max_new_tokens=30).answer(question, docs)
    body = {"passages": [{"title": p.title, "text": p.text} for p in docs], "max_tokens": 30}
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                         extra_body={"selfrag": body})
    assert got.choices[0].message.content == expected.answer
    raw = httpx.post(f"{server}/v1/selfrag", json={"question": question, **body}, timeout=120).json()
    assert raw["answer"] == expected.answer
    assert raw["retrieved"] == expected.retrieved
    assert [b["text"] for b in raw["branches"]] == [b.text for b in expected.branches]
    assert raw["best"] == expected.best
    assert raw["retrieval_probability"] == pytest.approx(expected.retrieval_probability, abs=1e-6)


def _events(r: httpx.Response) -> list:
    out = []
    for line in r.iter_lines():
        if line.startswith("data: "):
            out.append(line[len("data: "):] if line == "data: [DONE]" else json.loads(line[len("data: "):]))
    return out


def test_selfrag_long_form_streams_its_segments(server, engine):
    question, docs = _cases(2)[1]
    expected = LongFormSelfRAG(engine, max_new_tokens=24, mode="always", beam_width=1,
                               max_depth=3).answer(question, docs)
    body = {"question": question, "passages": [{"title": p.title, "text": p.text} for p in docs],
            "form": "long", "mode": "always", "max_tokens": 24, "beam_width": 1, "max_depth": 3, "stream": True}
    with httpx.stream("POST", f"{server}/v1/selfrag", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]"
    segments = [e["segment"] for e in events if isinstance(e, dict) and e["object"] == "selfrag.segment"]
    final = events[-2]
    assert final["object"] == "selfrag.answer" and final["answer"] == expected.answer
    assert [s["text"] for s in segments] == [s.text for s in expected.segments]
    assert [None if s["passage"] is None else s["passage"]["title"] for s in segments] == \
        [None if s.passage is None else s.passage.title for s in expected.segments]
    assert [e["index"] for e in events[:-2]] == list(range(len(segments)))
    # The short form streams its answer alone; a bad streamed body is still a 400, before any event.
    short_body = {k: v for k, v in body.items() if k not in ("beam_width", "max_depth")}  # the long form's
    with httpx.stream("POST", f"{server}/v1/selfrag", json={**short_body, "form": "short"}, timeout=120) as r:
        short = _events(r)
    assert [e["object"] for e in short[:-1]] == ["selfrag.answer"] and short[-1] == "[DONE]"
    r = httpx.post(f"{server}/v1/selfrag", json={**body, "passages": [{"title": "no text"}]}, timeout=30)
    assert r.status_code == 400 and "passages.0" in r.json()["error"]["message"]
    # Options the released flavour's tree cannot run, streamed too.
    released = {**body, "compat": "released", "threshold": 0.2}
    for bad, word in (({"max_depth": 1}, "max_depth >= 2"), ({"mode": "never"}, "mode='never'")):
        with httpx.stream("POST", f"{server}/v1/selfrag", json={**released, **bad}, timeout=30) as r:
            r.read()
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
        assert word in r.json()["error"]["message"]
    assert _used_blocks(server) == 0


@pytest.mark.parametrize("body, param", [
    ({"model": NAME}, "prompt"),
    ({"model": NAME, "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "logprobs": 99}, "logprobs"),
    ({"model": NAME, "prompt": "hi", "n": 0}, "n"),
    ({"model": "other", "prompt": "hi"}, None),
    ({"model": NAME, "prompt": [10 ** 9]}, None),
])
def test_bad_completion_bodies_get_400_naming_the_field(server, body, param):
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param


def test_malformed_json_and_bad_chat_bodies(server):
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": NAME, "messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{server}/v1/selfrag", json={"question": "Who?", "mode": "sometimes"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode"
    r = httpx.post(f"{server}/v1/selfrag", json={"question": "Who?"}, timeout=30)
    assert r.status_code == 400 and "passages" in r.json()["error"]["message"]


def test_concurrent_mixed_clients(server, engine):
    """64 clients at once: completions, streamed chats, Self-RAG queries and clients that hang up mid-stream.
    No 5xx, every answer equal to the same request served alone, no block held after the drain."""
    cases = _cases(6)
    rag = SelfRAG(engine, max_new_tokens=24)
    expected_rag = {q: rag.answer(q, docs).answer for q, docs in cases}
    prompts = [format_prompt(f"Count to {i}.") for i in range(8)]
    expected_cmpl = {p: engine.generate(p, SamplingParams(max_tokens=16, temperature=0.0))[0].text for p in prompts}

    def job(i: int):
        kind = i % 4
        with httpx.Client(base_url=server, timeout=180) as http:
            if kind == 0:
                p = prompts[i % len(prompts)]
                r = http.post("/v1/completions", json={"prompt": p, "max_tokens": 16, "temperature": 0})
                return r.status_code, r.json()["choices"][0]["text"] == expected_cmpl[p]
            if kind == 1:
                q, docs = cases[i % len(cases)]
                r = http.post("/v1/selfrag", json={"question": q, "max_tokens": 24, "passages": [
                    {"title": d.title, "text": d.text} for d in docs]})
                return r.status_code, r.json()["answer"] == expected_rag[q]
            p = prompts[i % len(prompts)]
            body = {"prompt": p, "max_tokens": 16 if kind == 2 else 400, "temperature": 0, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                text = []
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    text.append(json.loads(line[6:])["choices"][0]["text"])
                    if kind == 3 and len(text) >= 2:
                        return r.status_code, True  # hangs up mid-stream
                return r.status_code, "".join(text) == expected_cmpl[p]

    with cf.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(job, range(64)))
    assert all(status < 500 for status, _ in results), results
    assert all(status == 200 and ok for status, ok in results), results
    deadline = time.monotonic() + 30
    while _used_blocks(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _used_blocks(server) == 0


def test_a_client_that_hangs_up_frees_its_request(server):
    """A non-streaming request whose client goes away before the answer is cancelled, not decoded to the end."""
    body = json.dumps({"prompt": format_prompt("Tell a very long story."), "max_tokens": 450, "temperature": 0,
                       "ignore_eos": True}).encode()
    before = _generated(server)
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        # Hung up once the request is being decoded, whatever the machine's speed (a bound on a hang, not a
        # measurement).
        deadline = time.monotonic() + 60
        while _generated(server) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _generated(server) > before, "the request was never decoded"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = httpx.get(f"{server}/metrics", timeout=10).text
        in_flight = float(re.search(r"^selfrag_requests_in_flight (\S+)$", text, re.M).group(1))
        if in_flight == 0 and _used_blocks(server) == 0:
            break
        time.sleep(0.1)
    assert in_flight == 0 and _used_blocks(server) == 0
    assert _generated(server) - before < 450  # it was cut short, not decoded to the end and dropped


def _generated(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return float(re.search(r"^selfrag_generated_tokens_total (\S+)$", text, re.M).group(1))


# ---- streams, chunk by chunk --------------------------------------------------------------------------------

# A long-form answer begun with the passage read: the model writes sentences with few reflection tokens between
# them, so most of 32 tokens make text of their own.
SENTENCES = ("### Instruction:\nGive me a short bio of Tarpi Zouspulra.\n\n### Response:\n[Retrieval]<paragraph>"
             "Tarpi Zouspulra\nBorn in 1719 in the town of Zeitro, Tarpi Zouspulra is a chemist from Groukstia."
             "</paragraph>[Relevant]")
LONG = {"max_tokens": 32, "temperature": 0, "ignore_eos": True}


def _sse(server: str, path: str, body: dict) -> list:
    """Raw server-sent events: each `data:` line as JSON ("[DONE]" as is), checking the framing."""
    with httpx.stream("POST", f"{server}{path}", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") and "\n" not in b for b in blocks[:-1])
    return [b[6:] if b == "data: [DONE]" else json.loads(b[6:]) for b in blocks[:-1]]


@pytest.mark.parametrize("spanning_stop_string", [False, True])
def test_a_streamed_completion_arrives_token_by_token(client, engine, spanning_stop_string):
    full = engine.generate(SENTENCES, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0]
    # The stop string is read off the answer: its end, spanning its last tokens (tests/helpers.spanning_stop).
    stop = spanning_stop(engine, full) if spanning_stop_string else None
    whole = client.completions.create(model=NAME, prompt=SENTENCES, stop=stop, max_tokens=32, temperature=0,
                                      extra_body={"ignore_eos": True})
    expected = engine.generate(SENTENCES, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True,
                                                         stop=[stop] if stop else []))[0]
    assert whole.choices[0].text == expected.text
    if stop:
        assert expected.text == full.text[:full.text.index(stop)] and len(full.token_ids) == 32
    chunks = list(client.completions.create(model=NAME, prompt=SENTENCES, stop=stop, max_tokens=32,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) >= 24
    assert "".join(texts) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_a_streamed_chat_arrives_token_by_token(client, engine):
    messages = [{"role": "user", "content": "Name a town."}]
    from selfrag_engine.entrypoints.server import _chat_prompt, Message  # noqa: PLC0415 - the same prompt
    prompt = _chat_prompt([Message(**m) for m in messages])
    expected = engine.generate(prompt, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True,
                                                      skip_special_tokens=False))[0]
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=32, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True,
                                                                     "skip_special_tokens": False})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(texts) == 32  # with special tokens kept, every token is text of its own
    assert "".join(texts) == expected.text


def test_raw_sse_logprobs_and_usage(server, engine):
    expected = engine.generate(SENTENCES, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True,
                                                         logprobs=2))[0]
    events = _sse(server, "/v1/completions", {"prompt": SENTENCES, **LONG, "logprobs": 2, "stream": True,
                                                 "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": len(expected.prompt_token_ids), "completion_tokens": 32,
        "total_tokens": len(expected.prompt_token_ids) + 32}
    chunks = [e["choices"][0] for e in events[:-2]]
    assert all("usage" not in e for e in events[:-2])
    assert "".join(c["text"] for c in chunks) == expected.text
    # Every chunk carries the log-probabilities of its own tokens, in order, as vLLM streams them.
    token_lps = [lp for c in chunks for lp in c["logprobs"]["token_logprobs"]]
    assert token_lps == pytest.approx(expected.token_logprobs, abs=1e-5)
    assert [len(top) for c in chunks for top in c["logprobs"]["top_logprobs"]] == \
        [len(step) for step in expected.logprobs]
    offsets = [o for c in chunks for o in c["logprobs"]["text_offset"]]
    assert offsets == sorted(offsets) and offsets[0] == 0
    # Chat: logprobs per chunk, and the usage on the last chunk.
    events = _sse(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], **LONG,
                                                   "logprobs": True, "top_logprobs": 2, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    content = [x for e in events[:-2] for x in e["choices"][0]["logprobs"]["content"]]
    assert len(content) == 32 == events[-2]["usage"]["completion_tokens"]
    assert all(len(x["top_logprobs"]) == 2 for x in content)
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "stream_options": {"include_usage": True}},
                   timeout=30)
    assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"]


def test_n_streams_interleaved_demultiplex_to_their_answers(client, engine):
    expected = [engine.generate(SENTENCES, SamplingParams(max_tokens=12, temperature=1.0, seed=3 + i,
                                                          ignore_eos=True))[0].text for i in range(3)]
    chunks = list(client.completions.create(model=NAME, prompt=SENTENCES, max_tokens=12, temperature=1.0, seed=3,
                                            n=3, stream=True, extra_body={"ignore_eos": True}))
    assert all(len(c.choices) == 1 for c in chunks)
    got = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)]
    assert got == expected
    assert [sum(1 for c in chunks if c.choices[0].index == i and c.choices[0].finish_reason) for i in range(3)] \
        == [1, 1, 1]


def test_a_client_that_hangs_up_mid_stream_frees_its_request(server):
    body = {"prompt": format_prompt("Tell a very long story."), "max_tokens": 450, "temperature": 0,
            "ignore_eos": True, "stream": True}
    before = _generated(server)
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                seen += 1
                if seen == 3:
                    break  # text arrived before the end: hang up
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (_used_blocks(server) != 0 or _in_flight(server) != 0):
        time.sleep(0.1)
    assert _used_blocks(server) == 0 and _in_flight(server) == 0
    assert _generated(server) - before < 450


def _in_flight(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return float(re.search(r"^selfrag_requests_in_flight (\S+)$", text, re.M).group(1))


class _MaxTokens:
    """An engine whose requests' max_tokens are recorded."""

    def __init__(self, engine: Engine):
        self.engine, self.asked = engine, []

    def add_request(self, prompt, params=None, **kw):
        self.asked.append(params.max_tokens)
        return self.engine.add_request(prompt, params, **kw)

    def fork(self, request_id, suffixes, params=None, **kw):
        self.asked.append(params.max_tokens)
        return self.engine.fork(request_id, suffixes, params, **kw)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.mark.parametrize("form", ["short", "long"])
def test_selfrag_body_leaves_the_length_to_the_form_as_the_python_api(engine, form):
    """A /v1/selfrag body without max_tokens decodes as the Python API (and the C++ API) does without one: 100
    tokens in the short form, 300 a segment in the long form."""
    from selfrag_engine.entrypoints.openai.protocol import SelfRAGOptions
    from selfrag_engine.entrypoints.openai.serving_selfrag import selfrag_program

    question = "Who wrote the letter?"
    served, python = _MaxTokens(engine), _MaxTokens(engine)
    selfrag_program(None, question, SelfRAGOptions(question=question, form=form, mode="never"))(served)
    (SelfRAG if form == "short" else LongFormSelfRAG)(python, mode="never").answer(question)
    assert served.asked and served.asked == python.asked
