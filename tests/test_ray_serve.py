"""`selfrag-engine serve --replicas` on a local Ray cluster (4 logical CPUs on this machine): 2 engine
replicas of the embedded model behind Ray Serve's proxy and a 2-shard index as 2 retrieval deployments,
spoken to with the official `openai` client and raw HTTP and compared with the single-process server
(`tests/server_process.py`) over the unsharded index; then a replica killed under a bounded load.

One cluster for the whole file (module-scoped), shut down in its teardown."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None or importlib.util.find_spec("faiss") is None,
                                reason="needs Ray Serve and faiss: pip install 'selfrag-engine[ray,retrieval]'")

from tests.helpers import one_ray_cluster_at_a_time  # noqa: E402
from tests.server_process import NAME, free_port  # noqa: E402
from tests.server_process import serve as single_process  # noqa: E402
from tests.test_retrieval_sharded import assert_same_top_k  # noqa: E402

QUESTIONS = ["What is Shiru Saklouth's profession?", "Where did Dada Laifi move to?"]
PROMPTS = ["Breinkrorn is a town on the", "Who founded Tranthu?"]
ENCODER = "hashing:256"


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    from selfrag_engine.entrypoints.cli import main
    from selfrag_engine.tiny.assets import default_corpus_path

    root = tmp_path_factory.mktemp("ray-index")
    for out, extra in (("whole", []), ("sharded", ["--shards", "2"])):
        assert main(["index", "build", "--passages", str(default_corpus_path()), "--out", str(root / out),
                     "--encoder", ENCODER, "--quiet", *extra]) == 0
    return root / "whole", root / "sharded"


@pytest.fixture(scope="module")
def single(indexes):
    with single_process("--index", str(indexes[0])) as server:
        yield server.base


@pytest.fixture(scope="module")
def cluster(indexes):
    import ray
    from ray import serve

    from selfrag_engine.entrypoints.ray_serve import (
        APP_NAME,
        DeploymentOptions,
        ReplicaConfig,
        build_application,
    )
    from selfrag_engine.entrypoints.replica_failure import CALLBACK, CALLBACK_ENV
    from selfrag_engine.tiny.assets import default_model_dir

    os.environ[CALLBACK_ENV] = CALLBACK  # read by the proxy the local cluster starts
    port = free_port()
    with one_ray_cluster_at_a_time():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            config = ReplicaConfig(model=str(default_model_dir()), served_model_name=NAME, device="cpu",
                                   index=str(indexes[1]), shard_timeout_s=60)
            serve.run(build_application(config, DeploymentOptions(replicas=2, replica_cpus=1, shard_cpus=0.5,
                                                                  health_check_period_s=1)),
                      name=APP_NAME, route_prefix="/")
            yield f"http://127.0.0.1:{port}"
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                os.environ.pop(CALLBACK_ENV, None)


def _engine_handle():
    from ray import serve

    from selfrag_engine.entrypoints.ray_serve import APP_NAME, ENGINE_DEPLOYMENT

    return serve.get_deployment_handle(ENGINE_DEPLOYMENT, APP_NAME)


def _replica_stats(expected: int = 2, exclude: str | None = None, wait_s: float = 180) -> dict[str, dict]:
    """Each engine replica's KV blocks and requests in flight, by replica id, once `expected` replicas (none of
    them `exclude`) have answered. The router picks the replica of each call, so calls go out in rounds until
    every replica has been reached; `wait_s` only bounds a replica that never answers."""
    handle = _engine_handle()
    deadline = time.monotonic() + wait_s
    stats: dict[str, dict] = {}
    while True:
        for call in [handle.kv_blocks.remote() for _ in range(8)]:
            try:
                s = call.result(timeout_s=60)
            except Exception:  # noqa: BLE001 - sent to a replica that just died: the next round goes elsewhere
                continue
            if s["replica"] != exclude:
                stats[s["replica"]] = s
        if len(stats) >= expected:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.5)


def _selfrag(base: str, question: str, **extra) -> dict:
    body = {"question": question, "mode": "always", "ndocs": 2, "max_tokens": 16, **extra}
    r = httpx.post(f"{base}/v1/selfrag", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _floats_close(a, b, tol: float = 1e-6) -> bool:
    """Equal JSON values, floats within `tol` (scores summed in another order on another process), the
    answers' timings aside."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol * max(1, abs(b))
    if isinstance(a, dict):  # "seconds": how long the query took, which differs from run to run
        return isinstance(b, dict) and a.keys() == b.keys() and all(_floats_close(a[k], b[k], tol) for k in a
                                                                    if k != "seconds")
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_floats_close(x, y, tol) for x, y in zip(a, b))
    return a == b


def test_replicas_answer_as_the_single_process_server(cluster, single):
    from openai import OpenAI

    clients = {name: OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
               for name, base in (("ray", cluster), ("single", single))}
    got: dict[str, list] = {"ray": [], "single": []}
    for name, client in clients.items():
        assert [m.id for m in client.models.list().data] == [NAME]
        for prompt in PROMPTS:
            c = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
            got[name].append(("completion", c.choices[0].text, c.usage.completion_tokens))
            stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True)
            got[name].append(("stream", "".join(ch.choices[0].text for ch in stream if ch.choices)))
        chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                              max_tokens=12, temperature=0)
        got[name].append(("chat", chat.choices[0].message.content))
        # Self-RAG through chat, retrieving from the index (sharded behind the replicas, whole in the single one).
        sr = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[1]}],
                                            extra_body={"selfrag": {"mode": "always", "ndocs": 2, "max_tokens": 16}})
        got[name].append(("selfrag-chat", sr.choices[0].message.content))
    assert got["ray"] == got["single"]
    for question in QUESTIONS:
        a, b = _selfrag(cluster, question), _selfrag(single, question)
        assert a["retrieved"] and [x["passage"] for x in a["branches"]] == [x["passage"] for x in b["branches"]]
        for key in ("answer", "best", "retrieved"):
            assert a[key] == b[key]
        assert [x["text"] for x in a["branches"]] == [x["text"] for x in b["branches"]]
        assert [x["final"] for x in a["branches"]] == pytest.approx([x["final"] for x in b["branches"]], abs=1e-6)
    # Long form, streamed as server-sent events: the same events.
    events = {}
    for name, base in (("ray", cluster), ("single", single)):
        body = {"question": QUESTIONS[0], "form": "long", "mode": "always", "ndocs": 2, "max_tokens": 12,
                "stream": True, "beam_width": 1, "max_depth": 2}
        with httpx.stream("POST", f"{base}/v1/selfrag", json=body, timeout=120) as r:
            assert r.status_code == 200
            events[name] = [line for line in r.iter_lines() if line]
    assert events["ray"][-1] == events["single"][-1] == "data: [DONE]"
    parsed = {name: [json.loads(e.removeprefix("data: ")) for e in lines[:-1]] for name, lines in events.items()}
    assert _floats_close(parsed["ray"], parsed["single"]), (events["ray"], events["single"])
    # Every replica answers /health and /metrics; a bad body is the same 400 as the single server's.
    assert httpx.get(f"{cluster}/health", timeout=30).json() == {"status": "ok"}
    assert "selfrag_kv_blocks_used" in httpx.get(f"{cluster}/metrics", timeout=30).text
    bad = {"model": NAME, "prompt": "x", "max_tokens": -1}
    ra, rb = (httpx.post(f"{b}/v1/completions", json=bad, timeout=30) for b in (cluster, single))
    assert ra.status_code == rb.status_code == 400 and ra.json() == rb.json()
    # Every response names its replica; both replicas are up and idle.
    from selfrag_engine.entrypoints.ray_serve import REPLICA_HEADER

    stats = _replica_stats()
    assert len(stats) == 2 and all(s["used"] == 0 and s["pending"] == 0 for s in stats.values()), stats
    assert ra.headers[REPLICA_HEADER] in stats


def test_sharded_retrieval_deployments_merge_the_unsharded_top_k(cluster, indexes):
    from ray import serve

    from selfrag_engine.entrypoints.ray_serve import APP_NAME, remote_retriever
    from selfrag_engine.errors import IndexShardError
    from selfrag_engine.retrieval.retriever import Retriever

    handles = [serve.get_deployment_handle(f"IndexShard{i}", APP_NAME) for i in range(2)]
    remote = remote_retriever(str(indexes[1]), handles, timeout_s=60)
    whole = Retriever.load(indexes[0])
    queries = QUESTIONS + ["a town on the river", "founded in 1214", "Who moved to Nithdreith?"]
    for k in (2, 5, 9):
        got = remote.search_batch_with_scores(queries, k)
        assert [[h.passage for h in hits] for hits in got] == [[whole.passages[h.row] for h in hits] for hits in got]
        assert_same_top_k(whole, whole.encoder.encode_queries(queries), [list(h) for h in got], k)
    # A shard that does not answer is a named error within the timeout, not a hang or a partial top-k.
    # (A handle to a shard deployment that is not there: what a deleted or never-recovering shard looks like.)
    from ray.serve.handle import DeploymentHandle

    gone = remote_retriever(str(indexes[1]), [handles[0], DeploymentHandle("IndexShard1Gone", APP_NAME)], timeout_s=3)
    with pytest.raises(IndexShardError, match="index shard 1 of 2"):
        gone.search("a town on the river", 3)
    remote.close()
    gone.close()


def test_a_replica_killed_under_load(cluster):
    from ray import serve

    from selfrag_engine.entrypoints.ray_serve import APP_NAME, ENGINE_DEPLOYMENT, REPLICA_HEADER

    before = _replica_stats()
    assert len(before) == 2
    results: dict[int, tuple] = {}
    served_by: dict[int, str] = {}  # each stream's replica, from its response header
    first_chunk = [threading.Event() for _ in range(8)]

    def run(i: int) -> None:
        body = {"model": NAME, "prompt": PROMPTS[i % 2], "max_tokens": 400, "ignore_eos": True, "temperature": 0,
                "stream": i < 6}
        try:
            if body["stream"]:
                with httpx.stream("POST", f"{cluster}/v1/completions", json=body, timeout=180) as r:
                    served_by[i] = r.headers[REPLICA_HEADER]
                    lines = []
                    for line in r.iter_lines():
                        if line:
                            lines.append(line)
                            first_chunk[i].set()
                    results[i] = ("stream", r.status_code, lines[-1])
            else:
                first_chunk[i].set()
                r = httpx.post(f"{cluster}/v1/completions", json=body, timeout=180)
                results[i] = ("plain", r.status_code, r.json())
        except Exception as e:  # noqa: BLE001 - recorded: a broken connection fails the test below
            results[i] = ("error", repr(e))
            first_chunk[i].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for e in first_chunk:
        assert e.wait(120)
    # Every stream has produced tokens; the replica holding the first one dies (a crash: its process killed).
    victim = served_by[0]
    os.kill(before[victim]["pid"], signal.SIGKILL)
    for t in threads:
        t.join(200)
        assert not t.is_alive()  # none hangs
    assert all(r[0] != "error" for r in results.values()), results
    # Non-streamed requests on the dead replica had produced nothing: sent again, they succeed.
    plain = [r for r in results.values() if r[0] == "plain"]
    assert len(plain) == 2 and all(status == 200 and body["usage"]["completion_tokens"] == 400
                                   for _, status, body in plain)
    # Exactly the streams on the dead replica end with the error event; the others finish.
    broken = {i for i, r in results.items() if r[0] == "stream" and r[2] != "data: [DONE]"}
    assert broken == {i for i, replica in served_by.items() if replica == victim}
    for i in broken:
        event = json.loads(results[i][2].removeprefix("data: "))
        assert event["error"]["code"] == "replica_unavailable" and "retry" in event["error"]["message"]
    # Ray replaces the replica; the survivor holds no KV blocks of the finished requests.
    deadline = time.monotonic() + 180
    while True:
        status = serve.status().applications[APP_NAME].deployments[ENGINE_DEPLOYMENT]
        if status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) == 2:
            break
        assert time.monotonic() < deadline, status
        time.sleep(1)
    stats = _replica_stats(exclude=victim)  # until this process's router has heard of the new replica
    assert len(stats) == 2 and set(served_by.values()) - {victim} <= set(stats)
    assert all(s["used"] == 0 and s["pending"] == 0 for s in stats.values()), stats  # no block leaked
    r = httpx.post(f"{cluster}/v1/completions", json={"model": NAME, "prompt": PROMPTS[0], "max_tokens": 4},
                   timeout=120)
    assert r.status_code == 200


def test_autoscaling_adds_a_replica_under_load_within_its_bounds(cluster):
    """`--replicas 1 --max-replicas 2`: requests in flight above the target per replica add a second replica
    (Ray's autoscaler, its upscale delay set to 0 here), and no more than the bound."""
    from ray import serve

    from selfrag_engine.entrypoints.ray_serve import (
        ENGINE_DEPLOYMENT,
        DeploymentOptions,
        ReplicaConfig,
        build_application,
    )
    from selfrag_engine.tiny.assets import default_model_dir

    app, prefix = "autoscaled", "/autoscaled"
    config = ReplicaConfig(model=str(default_model_dir()), served_model_name=NAME, device="cpu")
    options = DeploymentOptions(replicas=1, max_replicas=2, target_ongoing_requests=1, replica_cpus=0.5,
                                upscale_delay_s=0, health_check_period_s=1)
    serve.run(build_application(config, options), name=app, route_prefix=prefix)
    base = f"{cluster}{prefix}"
    scaled = threading.Event()
    statuses: list[int] = []

    def load() -> None:  # requests back to back until the deployment has grown
        while not scaled.is_set():
            r = httpx.post(f"{base}/v1/completions", json={"model": NAME, "prompt": PROMPTS[0], "max_tokens": 200,
                                                           "ignore_eos": True, "temperature": 0}, timeout=120)
            statuses.append(r.status_code)

    def replicas() -> dict:
        return dict(serve.status().applications[app].deployments[ENGINE_DEPLOYMENT].replica_states)

    clients = [threading.Thread(target=load) for _ in range(4)]
    try:
        assert replicas() == {"RUNNING": 1}
        for t in clients:
            t.start()
        deadline = time.monotonic() + 180
        while replicas().get("RUNNING", 0) < 2:
            assert time.monotonic() < deadline, replicas()
            time.sleep(1)
        scaled.set()
        for t in clients:
            t.join(150)
            assert not t.is_alive()
        assert statuses and set(statuses) == {200}
        assert sum(replicas().values()) == 2  # the bound holds: 4 requests in flight would ask for 4
    finally:
        scaled.set()
        serve.delete(app)
