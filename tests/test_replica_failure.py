"""`replica_failure.ReplicaFailure`, the middleware around Ray Serve's proxy, driven through httpx's ASGI
transport with stand-ins for the proxy: one whose replica dies before answering (it returns without a
response, as Ray's proxy does for a dead replica), one whose stream breaks, one that answers."""
import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette", reason="starlette (through fastapi) is the serve extra")

from starlette.middleware import Middleware  # noqa: E402

from selfrag_engine.entrypoints.replica_failure import ReplicaFailure, proxy_middlewares  # noqa: E402


class Proxy:
    """Fails the first `failures` requests the way Ray's proxy does for a dead replica, then echoes."""

    def __init__(self, failures: int, stream_breaks: bool = False):
        self.failures, self.stream_breaks = failures, stream_breaks
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        if self.stream_breaks:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"data: {\"x\": 1}\n\n", "more_body": True})
            return  # the replica died mid-stream: no last body message
        if self.failures > 0:
            self.failures -= 1
            return  # no response at all
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def _client(proxy: Proxy) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=ReplicaFailure(proxy)), base_url="http://t")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_dead_replica_answers(anyio_backend):
    # Not streamed, nothing sent: sent again once (the same body), and answered.
    proxy = Proxy(failures=1)
    async with _client(proxy) as c:
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
    assert r.status_code == 200 and r.json() == {"prompt": "x", "max_tokens": 3}
    assert len(proxy.bodies) == 2 and proxy.bodies[0] == proxy.bodies[1]
    # Failing twice: a 503 in OpenAI's error shape, with Retry-After.
    proxy = Proxy(failures=2)
    async with _client(proxy) as c:
        r = await c.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    error = r.json()["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "replica_unavailable"
    assert set(error) == {"message", "type", "param", "code"} and len(proxy.bodies) == 2
    # A streamed request is never sent twice: 503 at once.
    proxy = Proxy(failures=1)
    async with _client(proxy) as c:
        r = await c.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert r.status_code == 503 and len(proxy.bodies) == 1
    # A stream that breaks ends with an error event instead of a cut connection.
    async with _client(Proxy(0, stream_breaks=True)) as c:
        r = await c.post("/v1/completions", json={"prompt": "x", "stream": True})
    events = [line for line in r.text.splitlines() if line]
    assert r.status_code == 200 and events[0] == 'data: {"x": 1}'
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "replica_unavailable"


def test_the_proxy_callback_names_the_middleware():
    assert [m.cls for m in proxy_middlewares()] == [ReplicaFailure]
    assert all(isinstance(m, Middleware) for m in proxy_middlewares())


def test_replica_options_are_checked_before_anything_loads(capsys):
    from selfrag_engine.entrypoints.cli import main

    for argv, message in ((["--max-replicas", "3"], "--max-replicas needs --replicas N"),
                          (["--ray-address", "auto"], "--ray-address needs --replicas N"),
                          (["--replicas", "0"], "--replicas must be at least 1, got 0"),
                          (["--replicas", "3", "--max-replicas", "2"], "--max-replicas 2 is below --replicas 3"),
                          (["--replicas", "2", "--shard-timeout", "0"], "--shard-timeout must be positive")):
        assert main(["serve", "--model", "tiny", *argv]) == 2
        assert message in capsys.readouterr().err
