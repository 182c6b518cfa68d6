"""Who may use `selfrag-engine serve`: the API key (through the official `openai` client), TLS, the Host check
against DNS rebinding, CORS, the docs switch, and metrics labelled by route template."""
from __future__ import annotations

import random
import re
import shutil
import ssl
import subprocess

import pytest

openai = pytest.importorskip("openai", reason="the openai client is a test dependency of the server")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="fastapi and uvicorn are the serve extra")

from selfrag_engine.entrypoints.access import Access, default_hosts  # noqa: E402
from selfrag_engine.entrypoints.cli import build_parser  # noqa: E402
from tests.server_process import MODEL, NAME, serve  # noqa: E402

pytestmark = [pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="tiny_selfrag not present"),
              pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")]

KEY = "s3cret-key"
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return d / "key.pem", d / "cert.pem", ssl.create_default_context(cafile=str(d / "cert.pem"))


@pytest.fixture(scope="module")
def server(cert):
    key, crt, trust = cert
    with serve("--api-key", KEY, "--allowed-origins", ORIGIN, "--ssl-keyfile", str(key), "--ssl-certfile", str(crt),
               verify=trust, scheme="https") as s:
        yield s


@pytest.fixture(scope="module")
def http(server, cert):
    with httpx.Client(base_url=server.base, verify=cert[2], timeout=60) as c:
        yield c


def test_the_key_is_required_everywhere_but_health(server, http, cert):
    assert http.get("/health").status_code == 200
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                         ("POST", "/v1/selfrag"), ("GET", "/openapi.json"), ("GET", "/no/such/route")):
        r = http.request(method, path, json={} if method == "POST" else None)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    wrong = openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0,
                          http_client=httpx.Client(verify=cert[2]))
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0,
                          http_client=httpx.Client(verify=cert[2], timeout=60))
    assert [m.id for m in right.models.list().data] == [NAME]
    got = right.completions.create(model=NAME, prompt="Name a color.", max_tokens=3, temperature=0)
    assert got.choices[0].finish_reason in ("stop", "length")
    wrong.close()
    right.close()


def test_plain_http_is_not_served_on_the_tls_port(server):
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=10)


def test_a_foreign_host_header_is_refused(http):
    auth = {"Authorization": f"Bearer {KEY}"}
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        r = http.get("/v1/models", headers={**auth, "Host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    for host in ("localhost", "127.0.0.1:1234", "LOCALHOST"):
        assert http.get("/v1/models", headers={**auth, "Host": host}).status_code == 200, host


def test_cors_allows_only_the_given_origins(http):
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = http.options("/v1/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = http.options("/v1/completions", headers={**pre, "Origin": "http://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


def test_docs_are_off_and_metrics_are_labelled_by_route(http):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert http.get("/docs", headers=auth).status_code == 404
    assert http.get("/redoc", headers=auth).status_code == 404
    rng = random.Random(29)
    paths = ["/" + "".join(rng.choice("abcdefghij/") for _ in range(12)) for _ in range(40)]
    for p in paths:
        assert http.get(p, headers=auth).status_code in (404, 405)
    text = http.get("/metrics", headers=auth).text
    endpoints = set(re.findall(r'selfrag_requests_total\{endpoint="([^"]*)"', text))
    assert "unmatched" in endpoints and "/v1/models" in endpoints and "/health" in endpoints
    assert not any(p in endpoints for p in paths)
    assert endpoints <= {"unmatched", "/health", "/metrics", "/v1/models", "/v1/completions",
                         "/v1/chat/completions", "/v1/selfrag", "/openapi.json"}


def test_options_from_the_command_line_and_the_environment(monkeypatch):
    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m"])
    monkeypatch.delenv("SELFRAG_API_KEY", raising=False)
    access = Access.from_args(args)
    assert access.api_key is None and not access.enable_docs and access.allowed_origins == ()
    assert set(access.allowed_hosts) == {"localhost", "127.0.0.1", "::1"}
    monkeypatch.setenv("SELFRAG_API_KEY", "from-env")
    assert Access.from_args(args).api_key == "from-env"
    args = parser.parse_args(["serve", "--model", "m", "--api-key", "flag", "--allowed-hosts", "api.example",
                              "--enable-docs", "--host", "0.0.0.0"])
    access = Access.from_args(args)
    assert access.api_key == "flag" and access.allowed_hosts == ("api.example",) and access.enable_docs
    wide = default_hosts("0.0.0.0")
    assert "localhost" in wide and "0.0.0.0" not in wide
