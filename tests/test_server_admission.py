"""Fair admission and other users' progress, in the server's process (no clock in any assertion):

- admission is counted in rows with a per-request share: a request over the share is a 400 even when the
  server is full; one that fits the share but not the free slots is a 429 with a Retry-After computed from
  the rate rows were given back;
- a prompt being tokenized does not hold the engine loop: while one request's tokenizer is stopped on an event
  the test controls, another request is served to the end and the loop keeps stepping.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="fastapi and uvicorn are the serve extra")

from selfrag_engine import Engine  # noqa: E402
from selfrag_engine.engine.loop import EngineLoop  # noqa: E402
from selfrag_engine.entrypoints import admission as admission_module  # noqa: E402
from selfrag_engine.entrypoints.admission import Admission, AdmissionGate  # noqa: E402
from selfrag_engine.entrypoints.body_guard import BodyGuard  # noqa: E402
from selfrag_engine.entrypoints.server import build_app  # noqa: E402
from selfrag_engine.entrypoints.server_limits import BodyChecks, ModelBounds, ServerLimits  # noqa: E402
from selfrag_engine.selfrag.prompts import format_prompt  # noqa: E402
from selfrag_engine.tiny.assets import default_model_dir  # noqa: E402

MODEL = default_model_dir()
pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="tiny_selfrag not present")


class _Held:
    """An app that answers each admitted request only when the test lets it go."""

    def __init__(self):
        self.entered: asyncio.Queue = asyncio.Queue()
        self.gates: list[asyncio.Event] = []

    async def __call__(self, scope, receive, send):
        gate = asyncio.Event()
        self.gates.append(gate)
        await self.entered.put(gate)
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})


def _stack(capacity: int):
    held = _Held()
    admission = Admission(capacity)
    checks = BodyChecks.resolve(ServerLimits(), ModelBounds(512, 16), capacity)
    app = BodyGuard(AdmissionGate(held, admission), checks)
    return app, held, admission


def test_rows_a_share_a_400_for_what_never_fits_and_a_429_for_what_must_wait():
    async def main():
        app, held, admission = _stack(64)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            post = lambda body: c.post("/v1/completions", json=body)  # noqa: E731
            # One request of 4 prompts x n=64 (256 rows) can never be served here: 400, not 429.
            r = await post({"prompt": ["a", "b", "c", "d"], "n": 64})
            assert r.status_code == 400 and r.json()["error"]["param"] == "n"
            # The share is a quarter of the slots: four requests at the share fill the server...
            big = [asyncio.create_task(post({"prompt": "a", "n": 16})) for _ in range(4)]
            for _ in range(4):
                await held.entered.get()
            assert admission.used == 64
            # ... then a one-row request waits (429, Retry-After), while a request over the share is still 400.
            r = await post({"prompt": "a"})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_exceeded"
            r = await post({"prompt": "a", "n": 17})
            assert r.status_code == 400 and r.json()["error"]["param"] == "n"
            # A request that finishes gives its rows back; the next one is admitted.
            held.gates[0].set()
            assert (await big[0]).status_code == 200
            small = asyncio.create_task(post({"prompt": "a"}))
            await held.entered.get()
            assert admission.used == 49
            for g in held.gates:
                g.set()
            assert [(await t).status_code for t in [*big[1:], small]] == [200] * 4
            assert admission.used == 0

    asyncio.run(main())


def test_retry_after_comes_from_the_rate_rows_are_given_back(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(admission_module.time, "monotonic", lambda: now[0])
    a = Admission(64)
    assert a.try_take(64) and not a.try_take(1)
    assert a.retry_after(8) == 1  # no history yet
    for _ in range(4):  # 16 rows given back (and taken again) every 2 s: 8 rows/s
        now[0] += 2.0
        a.give_back(16)
        assert a.try_take(16)
    assert a.retry_after(8) == 1    # 8 rows at 8 rows/s
    assert a.retry_after(40) == 5   # 40 rows at 8 rows/s
    assert a.retry_after(10 ** 6) == 600  # bounded


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(MODEL, progress=False)


def test_the_loop_keeps_stepping_while_a_prompt_is_tokenized(engine):
    tok = engine.tokenizer
    original = tok.encode
    entered, release = threading.Event(), threading.Event()
    threads: list[str] = []
    marker = "A long prompt under tokenization."

    def encode(text, *args, **kwargs):
        if marker in text:
            threads.append(threading.current_thread().name)
            entered.set()
            assert release.wait(120), "the test never let the tokenizer go"
        return original(text, *args, **kwargs)

    async def main():
        with EngineLoop(engine) as loop:
            app = build_app(loop, "tiny")
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t",
                                         timeout=120) as c:
                slow = asyncio.create_task(c.post("/v1/completions", json={
                    "prompt": format_prompt(marker), "max_tokens": 4, "temperature": 0}))
                assert await asyncio.to_thread(entered.wait, 120)
                steps = loop.steps
                other = await c.post("/v1/completions", json={
                    "prompt": format_prompt("Name a color."), "max_tokens": 8, "temperature": 0,
                    "ignore_eos": True})
                assert other.status_code == 200
                assert other.json()["usage"]["completion_tokens"] == 8
                assert loop.steps > steps and not slow.done()  # it stepped other rows while one was held
                release.set()
                r = await slow
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

    tok.encode = encode
    try:
        asyncio.run(main())
    finally:
        del tok.encode
        release.set()
    assert threads and all(name not in ("selfrag-engine-loop", threading.main_thread().name) for name in threads)


class _Transport:
    """The parts of an asyncio transport uvicorn's protocol reads, recording what is written."""

    def __init__(self):
        self.written, self.closed = b"", False

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_a_connection_beyond_the_bound_gets_a_503_in_the_openai_shape(parser):
    import json

    import uvicorn
    from uvicorn.server import ServerState

    from selfrag_engine.entrypoints import slow_clients

    if parser == "httptools" and slow_clients.HttpToolsProtocol is None:
        pytest.skip("httptools is not installed")

    async def app(scope, receive, send):
        pass

    async def main():
        options = {**slow_clients.uvicorn_options(ServerLimits(limit_concurrency=3, header_timeout_s=600)),
                   "http": slow_clients.protocol_class(600, 3, parser)}
        config = uvicorn.Config(app, **options)
        config.load()
        state = ServerState()
        opened = []
        for _ in range(4):
            protocol = options["http"](config=config, server_state=state, app_state={})
            transport = _Transport()
            protocol.connection_made(transport)
            opened.append((protocol, transport))
        assert [t.closed for _, t in opened] == [False, False, False, True]
        head, _, body = opened[-1][1].written.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        for protocol, transport in opened:
            protocol.connection_lost(None)

    asyncio.run(main())
