"""The server's bounds on one request's work and its errors, as a client sees them: `selfrag-engine serve` as a
subprocess, asked through raw HTTP (httpx, raw sockets) and the official `openai` client. Every refusal is a
4xx in OpenAI's error shape naming the field at fault; none is a 5xx."""
from __future__ import annotations

import itertools
import http.client
import json
import socket

import pytest

openai = pytest.importorskip("openai", reason="the openai client is a test dependency of the server")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="fastapi and uvicorn are the serve extra")

from tests.server_process import MODEL, NAME, serve  # noqa: E402

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="tiny_selfrag not present")

BODY_LIMIT = 65536
CONTEXT = 512  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def server():
    with serve("--max-body-bytes", str(BODY_LIMIT), "--timeout-header", "2", "--timeout-body", "2",
               "--max-pending", "64") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=60)


def _openai_error(r: httpx.Response, status: int, param: str | None = "?") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert "Traceback" not in r.text
    if param != "?":
        assert err["param"] == param, err
    return err


def _post(server, path: str, body=None, content: bytes | None = None, **kw) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if content is not None:
        return httpx.post(f"{server.base}{path}", content=content, headers=headers, timeout=60, **kw)
    return httpx.post(f"{server.base}{path}", json=body, timeout=60, **kw)


# -- 1. bounded work before the engine ------------------------------------------------------------------------

def test_a_body_over_the_limit_is_413_before_it_is_read(server):
    r = _post(server, "/v1/completions", content=b'{"prompt": [' + b"7, " * (BODY_LIMIT // 3) + b"7]}")
    _openai_error(r, 413, None)
    # A Content-Length that says so is refused without waiting for the bytes.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000000\r\n\r\n{\"prompt\": [")
        got = _closed_by_server(s).decode()
    assert got.startswith("HTTP/1.1 413") and "request_too_large" in got


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": [7] * (CONTEXT + 1)}, "prompt", "context"),
    ({"prompt": [[7, 8]] * 65}, "prompt", "prompts"),
    ({"prompt": "a" * 40000}, "prompt", "characters"),
    ({"prompt": "hi", "stop": ["x"] * 65}, "stop", "stop"),
    ({"prompt": "hi", "stop": ["x" * 257]}, "stop", "stop.0"),
    ({"prompt": "hi", "stop_token_ids": [3] * 65}, "stop_token_ids", "stop_token_ids"),
    ({"prompt": ["a", "b", "c", "d"], "n": 5}, "n", "n=5"),  # 20 rows: over the share of 64 // 4
    ({"prompt": "", "max_tokens": 2}, "prompt", "empty"),
    ({"prompt": [10 ** 9]}, "prompt", "vocabulary"),
    ({"prompt": "hi", "max_tokens": CONTEXT}, "max_tokens", "maximum context length"),
    ({"model": "other", "prompt": "hi"}, "model", "not served"),
])
def test_bodies_beyond_a_bound_are_400_naming_the_field(server, body, param, words):
    err = _openai_error(_post(server, "/v1/completions", body), 400, param)
    assert words in err["message"]


def test_chat_and_selfrag_bounds(server):
    msgs = [{"role": "user", "content": "hi"}] * 257
    _openai_error(_post(server, "/v1/chat/completions", {"messages": msgs}), 400, "messages")
    long = [{"role": "user", "content": "a" * 40000}]
    _openai_error(_post(server, "/v1/chat/completions", {"messages": long}), 400, "messages")
    passages = [{"title": "t", "text": "x"}] * 65
    _openai_error(_post(server, "/v1/selfrag", {"question": "Who?", "passages": passages}), 400, "passages")
    many = {"question": "Who?", "passages": [{"title": "t", "text": "x"}] * 17, "ndocs": 17}
    _openai_error(_post(server, "/v1/selfrag", many), 400, "ndocs")


def test_max_tokens_beyond_the_context_is_a_400_through_the_official_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="Name a color.", max_tokens=CONTEXT)
    assert e.value.param == "max_tokens" and "maximum context length" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=CONTEXT)
    assert e.value.param == "max_tokens"
    # Exactly the context is served.
    got = client.completions.create(model=NAME, prompt=[1, 7], max_tokens=CONTEXT - 2, temperature=0, stop=["\n"])
    assert got.choices[0].finish_reason in ("stop", "length")


# -- 2. no 500s from input; every error in OpenAI's shape -----------------------------------------------------

@pytest.mark.parametrize("content, param, words", [
    (b'{"model": "\\ud800", "prompt": "hi"}', "model", "not served"),
    (b'{"prompt": "\xff\xfe"}', None, "UTF-8"),
    (b"[" * 5000 + b"]" * 5000, None, "nests"),
    (b'{"prompt": "hi", "n": ' + b"9" * 5000 + b"}", None, "digits"),
    (b'{"prompt": "hi", "temperature": NaN}', "temperature", "NaN"),
    (b'{"prompt": "hi", "temperature": 1e999}', "temperature", "Infinity"),
    (b'{"prompt": "hi", ', None, "not JSON"),
    (b'{"prompt": "hi", "temperature": "hot"}', "temperature", "temperature"),
])
def test_hostile_bytes_get_named_400s(server, content, param, words):
    err = _openai_error(_post(server, "/v1/completions", content=content), 400, param)
    assert words in err["message"]


def test_404_and_405_are_in_the_openai_shape(server):
    _openai_error(httpx.get(f"{server.base}/v2/nothing", timeout=30), 404, None)
    _openai_error(httpx.get(f"{server.base}/v1/completions", timeout=30), 405, None)
    _openai_error(httpx.delete(f"{server.base}/v1/models", timeout=30), 405, None)
    _openai_error(httpx.get(f"{server.base}/docs", timeout=30), 404, None)  # off unless --enable-docs


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


# A question of the embedded model's world with the passage that answers it: the model writes its answer and
# critique tokens (relevance, support, utility) within 40 tokens, so a branch's weighted terms add up past 1.
SELFRAG = {"question": "What is the job of Fezas Thedrekpik?",
           "passages": [{"title": "Fezas Thedrekpik", "text": "Born in 1954 in the town of Birnrou, Fezas Thedrekpik "
                                                              "is a novelist from Shekrania."},
                        {"title": "B", "text": "Bob read it."}], "max_tokens": 40, "mode": "always"}


def test_scores_that_overflow_are_a_400_naming_the_weights(server):
    """Weights at the edge of a double: wherever a branch's weighted score overflows (which one depends on
    the model's critique, so every sign is tried), the answer is a 400 naming the weights, streamed or not;
    otherwise a 200 whose every number is finite JSON."""
    w = 1.797e308
    refused = 0
    for signs in itertools.product((1, -1), repeat=3):
        body = {**SELFRAG, **{k: s * w for k, s in zip(("w_rel", "w_sup", "w_use"), signs)}}
        r = _post(server, "/v1/selfrag", body)
        if r.status_code == 200:
            _strict_json(r.text)
            continue
        err = _openai_error(r, 400, "w_rel")
        assert "w_rel, w_sup, w_use" in err["message"]
        refused += 1
        with httpx.stream("POST", f"{server.base}/v1/selfrag", json={**body, "stream": True}, timeout=60) as r:
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        events = [_strict_json(x) for x in lines[:-1]]
        assert events[-1]["error"]["param"] == "w_rel"
    assert refused >= 1


# -- 4. slow and idle clients ---------------------------------------------------------------------------------

def _closed_by_server(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the test's socket timeout bounds a server
    that never would)."""
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    return got


def test_sockets_that_send_nothing_or_half_the_headers_are_closed(server):
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    half = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
    with silent, half:
        assert _closed_by_server(silent) == b""
        assert _closed_by_server(half) == b""


def test_a_kept_alive_connection_whose_next_headers_stall_is_closed(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("GET", "/health")
        r = conn.getresponse()
        r.read()
        assert r.status == 200 and not r.will_close
        # The next request on the same connection, its headers half sent.
        conn.sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nAcc")
        assert _closed_by_server(conn.sock) == b""
    finally:
        conn.close()


def test_half_a_body_is_408_then_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        got = _closed_by_server(s).decode()
    assert got.startswith("HTTP/1.1 408") and '"type":"timeout"' in got
    # The server still serves.
    assert httpx.get(f"{server.base}/health", timeout=30).status_code == 200
