"""`selfrag-engine serve` over the embedded tiny model as a subprocess on 127.0.0.1, for the tests that speak
to it over real sockets. Its output goes to a file the test can read (a leaked traceback shows there)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from selfrag_engine.tiny.assets import default_model_dir

MODEL = default_model_dir()
NAME = "tiny-selfrag"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    scheme: str = "http"

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def serve(*args: str, env: dict[str, str] | None = None, ready_headers: dict[str, str] | None = None,
          verify: bool | str = True, scheme: str = "http", model: Path = MODEL) -> Iterator[Server]:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="selfrag-serve-", suffix=".log")[1])
    environ = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "selfrag_engine", "serve", "--model", str(model), "--port",
                                 str(port), "--served-model-name", NAME, "--device", "cpu", "--quiet", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=environ)
    server = Server(proc, port, log, scheme)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{server.base}/health", timeout=1, headers=ready_headers,
                             verify=verify).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up: {server.output()}")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.unlink(missing_ok=True)
